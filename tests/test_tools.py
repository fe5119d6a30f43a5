"""Calculator, record/replay cache and toolbox. No data, no network."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from negagent.errors import NegagentError
from negagent.tools import (
    Tool,
    Toolbox,
    ToolCache,
    build_tool_cache,
    build_toolbox,
    calculate,
    search_tool,
)
from negagent.tools.cache import cache_key

REPO = Path(__file__).resolve().parents[1]

# --- calculator ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "expression, expected",
    [
        ("2 * 1", "2"),
        ("6 * 2/3", "4"),
        ("6/3", "2"),
        ("10/4", "2.5"),
        ("1/3", "0.333333"),
        ("2/3", "0.666667"),
        ("0.1 + 0.2", "0.3"),
        ("-7 // 2", "-4"),
        ("7 % 3", "1"),
        ("2 ** 10", "1024"),
        ("-(3 - 5) * +2", "4"),
        ("((1 + 2) * (3 + 4))", "21"),
        ("2 ** -3", "0.125"),
        ("1/30000000", "3.33333e-8"),
        ("sqrt(16)", "4"),
        ("sqrt(2)", "1.414214"),
        ("abs(-3.5)", "3.5"),
        ("round(2.5)", "3"),
        ("round(3.14159, 2)", "3.14"),
        ("floor(2.7) + ceil(2.1)", "5"),
        ("factorial(5)", "120"),
        ("1.05 ** 2", "1.1025"),
        ("1.0001 ** 365", "1.037172"),
    ],
)
def test_calculate_values(expression: str, expected: str) -> None:
    assert calculate(expression) == expected


@pytest.mark.parametrize(
    "expression, expected",
    [
        ("1,800 + 200", "2000"),
        ("1,234,567 - 1", "1234566"),
        ("$1,234.50 * 2", "2469"),
        ("$5 + $7", "12"),
        ("3 x 4", "12"),
        ("3x4", "12"),
        ("3 × 4", "12"),
        ("12 ÷ 4", "3"),
        ("2^10", "1024"),
        ("5 + 5 =", "10"),
        ("5 + 5 = ?", "10"),
        ("100 * 15%", "15"),
        ("17 % 5", "2"),
        ("5!", "120"),
        ("10 − 4", "6"),
        ("  42  ", "42"),
    ],
)
def test_calculate_teacher_spellings(expression: str, expected: str) -> None:
    assert calculate(expression) == expected


@pytest.mark.parametrize(
    "expression",
    [
        "__import__('os')",
        "__import__('os').system('echo hacked')",
        "().__class__.__bases__[0].__subclasses__()",
        "(1).__class__",
        "x",
        "x + 1",
        "lambda: 1",
        "[i for i in range(3)]",
        "{i for i in range(3)}",
        "(i for i in range(3))",
        "open('/etc/passwd')",
        "eval('1')",
        "max(1, 2)",
        "sqrt(x=4)",
        "'a' * 3",
        "True + 1",
        "1j",
        "[1, 2]",
        "1 if 1 else 2",
        "1 < 2",
        "1 and 2",
        "~1",
        "1 << 3",
        "1 ^^ 2",
        "a := 1",
        "",
        "   ",
        "1 +",
        "1,2345",
        "1/0",
        "5 // 0",
        "(-8) ** (1/3)",
        "sqrt(-1)",
        "factorial(2.5)",
        "\x00",
    ],
)
def test_calculate_rejects_everything_else(expression: str) -> None:
    assert calculate(expression).startswith("Error: ")


@pytest.mark.parametrize(
    "expression",
    [
        "9**9**9",
        "10**100000",
        "99999999999**99999",
        "2**2**2**2**2**2",
        "1.5**100000",
        "factorial(100000)",
        "100000!",
        "round(1, 10**10)",
        "1" * 10_000,
        "(" * 250 + "1" + ")" * 250,
        "-" * 199 + "1",
    ],
)
def test_calculate_is_bounded(expression: str) -> None:
    start = time.perf_counter()
    result = calculate(expression)
    assert time.perf_counter() - start < 1.0
    if expression != "-" * 199 + "1":
        assert result.startswith("Error: ")


def test_calculate_never_raises_on_random_text() -> None:
    alphabet = "0123456789+-*/%().,^x×÷=!$ eE_jsqrt"
    rng = random.Random(0)
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        assert isinstance(calculate(text), str)


# --- record/replay cache ------------------------------------------------------------------------


class CountingBackend:
    """A fake search backend that counts live calls."""

    identity = "fake-search-v1"

    def __init__(self) -> None:
        self.calls: list[str] = []

    def search(self, query: str) -> str:
        self.calls.append(query)
        if query == "fail":
            return "Error: service unavailable"
        if query == "boom":
            raise RuntimeError("backend exploded")
        return f"#1: about {query} #2: more on {query}"


def _toolbox(cache: ToolCache | None) -> tuple[Toolbox, CountingBackend]:
    backend = CountingBackend()
    return Toolbox({"search": search_tool(backend), "calculate": Tool(calculate, None)}, cache), backend


def test_record_then_replay_gives_the_same_observations(tmp_path: Path) -> None:
    path = tmp_path / "tools.jsonl"
    queries = ["Kiss and Tell", "Shirley Temple", "Ünïcode ✓"]
    recorder, live = _toolbox(ToolCache(path, "record"))
    recorded = [recorder.call("search", q) for q in queries]
    assert live.calls == queries

    replayer, replay_backend = _toolbox(ToolCache(path, "replay"))
    assert [replayer.call("search", q) for q in queries] == recorded
    assert replay_backend.calls == []

    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [line["argument"] for line in lines] == queries
    assert lines[0]["key"] == cache_key("search", "fake-search-v1", "Kiss and Tell")
    assert set(lines[0]) == {"key", "tool", "backend", "argument", "observation"}


def test_replay_miss_is_an_error_observation_not_a_live_call(tmp_path: Path) -> None:
    path = tmp_path / "tools.jsonl"
    _toolbox(ToolCache(path, "record"))[0].call("search", "known")
    toolbox, backend = _toolbox(ToolCache(path, "replay"))
    result = toolbox.call("search", "unknown")
    assert not result.ok
    assert result.observation == "Error: no recorded observation for search[unknown] (replay mode)"
    assert backend.calls == []


def test_auto_replays_hits_and_records_misses(tmp_path: Path) -> None:
    path = tmp_path / "tools.jsonl"
    _toolbox(ToolCache(path, "record"))[0].call("search", "a")
    toolbox, backend = _toolbox(ToolCache(path, "auto"))
    toolbox.call("search", "a")
    toolbox.call("search", "b")
    toolbox.call("search", "b")
    assert backend.calls == ["b"]
    assert len(ToolCache(path, "replay")) == 2


def test_record_mode_always_calls_and_the_last_line_wins(tmp_path: Path) -> None:
    path = tmp_path / "tools.jsonl"
    toolbox, backend = _toolbox(ToolCache(path, "record"))
    toolbox.call("search", "a")
    toolbox.call("search", "a")
    assert backend.calls == ["a", "a"]
    assert len(path.read_text().splitlines()) == 2 and len(ToolCache(path, "replay")) == 1


def test_failures_are_not_recorded(tmp_path: Path) -> None:
    path = tmp_path / "tools.jsonl"
    toolbox, backend = _toolbox(ToolCache(path, "auto"))
    assert not toolbox.call("search", "fail").ok
    assert not toolbox.call("search", "boom").ok
    assert not toolbox.call("search", "fail").ok
    assert backend.calls == ["fail", "boom", "fail"]
    assert not path.exists()


def test_cache_key_separates_tool_backend_and_argument() -> None:
    keys = {
        cache_key("search", "bm25", "a b"),
        cache_key("search", "bm25 a", "b"),
        cache_key("search", "serper", "a b"),
        cache_key("lookup", "bm25", "a b"),
    }
    assert len(keys) == 4


def test_torn_last_line_is_dropped_and_appends_continue(tmp_path: Path) -> None:
    path = tmp_path / "tools.jsonl"
    _toolbox(ToolCache(path, "record"))[0].call("search", "a")
    with path.open("ab") as file:  # a writer killed halfway through a line
        file.write(b'{"key": "abc", "tool": "sea')
    assert len(ToolCache(path, "replay")) == 1  # replay reads but never writes
    toolbox, backend = _toolbox(ToolCache(path, "auto"))
    toolbox.call("search", "b")
    assert backend.calls == ["b"]
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line) for line in lines)


def test_finished_last_line_without_newline_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "tools.jsonl"
    _toolbox(ToolCache(path, "record"))[0].call("search", "a")
    path.write_bytes(path.read_bytes().rstrip(b"\n"))
    toolbox, backend = _toolbox(ToolCache(path, "auto"))
    toolbox.call("search", "a")
    toolbox.call("search", "b")
    assert backend.calls == ["b"]
    assert len(path.read_text().splitlines()) == 2


def test_cache_user_errors(tmp_path: Path) -> None:
    with pytest.raises(NegagentError, match="mode"):
        ToolCache(tmp_path / "c.jsonl", "sometimes")
    with pytest.raises(NegagentError, match="does not exist"):
        ToolCache(tmp_path / "missing.jsonl", "replay")
    with pytest.raises(NegagentError, match="needs a file"):
        ToolCache(None, "auto")
    corrupt = tmp_path / "corrupt.jsonl"
    corrupt.write_text('not json\n{"key": "k", "observation": "o"}\n')
    with pytest.raises(NegagentError, match="line 1"):
        ToolCache(corrupt, "auto")


def test_off_mode_never_touches_the_file(tmp_path: Path) -> None:
    path = tmp_path / "tools.jsonl"
    toolbox, backend = _toolbox(ToolCache(path, "off"))
    toolbox.call("search", "a")
    toolbox.call("search", "a")
    assert backend.calls == ["a", "a"] and not path.exists()


# --- toolbox -----------------------------------------------------------------------------------


def test_toolbox_results() -> None:
    toolbox, _ = _toolbox(None)
    assert toolbox.names == ("search", "calculate")
    assert toolbox.call("calculate", " 2 + 2 ").observation == "4"
    assert toolbox.call("calculate", " 2 + 2 ").ok
    unknown = toolbox.call("lookup", "x")
    assert not unknown.ok
    assert unknown.observation == "Error: unknown tool 'lookup'; available: search, calculate"
    assert not toolbox.call("calculate", "1/0").ok
    assert not toolbox.call("search", "fail").ok
    boom = toolbox.call("search", "boom")
    assert not boom.ok and boom.observation == "Error: search failed (RuntimeError: backend exploded)"
    empty = toolbox.call("search", "  ")
    assert not empty.ok and empty.observation == "Error: empty search query"


def test_calculator_is_never_cached(tmp_path: Path) -> None:
    path = tmp_path / "tools.jsonl"
    toolbox, _ = _toolbox(ToolCache(path, "auto"))
    assert toolbox.call("calculate", "6/3").observation == "2"
    assert not path.exists()
    path.write_text("")
    assert _toolbox(ToolCache(path, "replay"))[0].call("calculate", "6/3").observation == "2"


def test_build_toolbox_for_math_needs_no_search_settings() -> None:
    toolbox = build_toolbox(["calculate"], {})
    assert toolbox.names == ("calculate",)
    with pytest.raises(NegagentError, match="unknown tool 'wikipedia'"):
        build_toolbox(["wikipedia"], {})


def test_build_toolbox_reports_missing_search_data(tmp_path: Path) -> None:
    with pytest.raises(NegagentError, match="search.data_dir"):
        build_toolbox(["search"], {"search": {"backend": "bm25"}})
    with pytest.raises(NegagentError, match="does not exist"):
        build_toolbox(["search"], {"search": {"data_dir": str(tmp_path / "nowhere")}})
    with pytest.raises(NegagentError, match="unknown search.backend"):
        build_toolbox(["search"], {"search": {"backend": "bing"}})


def test_default_config_composes() -> None:
    cfg = OmegaConf.load(REPO / "conf" / "tools" / "default.yaml")
    assert cfg.search.backend == "bm25" and cfg.search.top_k == 3
    assert cfg.search.data_dir is None  # no top-level data_dir in this lone file
    assert build_tool_cache(cfg.cache) is None
    assert build_toolbox(["calculate"], cfg).names == ("calculate",)
