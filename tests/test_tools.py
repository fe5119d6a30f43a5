"""Calculator, record/replay cache and toolbox. No data, no network."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from types import SimpleNamespace

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
from negagent.tools import calculator
from negagent.tools.cache import cache_key
from negagent.tools.toolbox import ToolResult

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


UNSUPPORTED_SYNTAX = "use numbers and + - * / ** ( )"
UNSUPPORTED_FUNCTION = "Error: unsupported function; available: sqrt, abs, round, floor, ceil, factorial"


@pytest.mark.parametrize(
    "expression, expected",
    [
        ("__import__('os')", UNSUPPORTED_FUNCTION),
        ("__import__('os').system('echo hacked')", UNSUPPORTED_FUNCTION),
        ("().__class__.__bases__[0].__subclasses__()", UNSUPPORTED_FUNCTION),
        ("(1).__class__", f"Error: unsupported syntax (Attribute); {UNSUPPORTED_SYNTAX}"),
        ("x", "Error: unknown name 'x'; use numbers only"),
        ("x + 1", "Error: unknown name 'x'; use numbers only"),
        ("lambda: 1", f"Error: unsupported syntax (Lambda); {UNSUPPORTED_SYNTAX}"),
        ("[i for i in range(3)]", f"Error: unsupported syntax (ListComp); {UNSUPPORTED_SYNTAX}"),
        ("{i for i in range(3)}", f"Error: unsupported syntax (SetComp); {UNSUPPORTED_SYNTAX}"),
        ("(i for i in range(3))", f"Error: unsupported syntax (GeneratorExp); {UNSUPPORTED_SYNTAX}"),
        ("open('/etc/passwd')", UNSUPPORTED_FUNCTION),
        ("eval('1')", UNSUPPORTED_FUNCTION),
        ("max(1, 2)", UNSUPPORTED_FUNCTION),
        ("sqrt(x=4)", UNSUPPORTED_FUNCTION),
        ("sqrt(4, 2)", "Error: sqrt takes 1 argument(s)"),
        ("round()", "Error: round takes 1 or 2 argument(s)"),
        ("round(1, 2, 3)", "Error: round takes 1 or 2 argument(s)"),
        ("'a' * 3", "Error: unsupported value 'a'"),
        ("True + 1", "Error: unsupported value True"),
        ("1j", "Error: unsupported value 1j"),
        ("[1, 2]", f"Error: unsupported syntax (List); {UNSUPPORTED_SYNTAX}"),
        ("1 if 1 else 2", f"Error: unsupported syntax (IfExp); {UNSUPPORTED_SYNTAX}"),
        ("1 < 2", f"Error: unsupported syntax (Compare); {UNSUPPORTED_SYNTAX}"),
        ("1 and 2", f"Error: unsupported syntax (BoolOp); {UNSUPPORTED_SYNTAX}"),
        ("~1", "Error: unsupported operator (Invert)"),
        ("1 << 3", "Error: unsupported operator (LShift)"),
        ("1 ^^ 2", "Error: cannot parse '1 ^^ 2' as arithmetic"),
        ("a := 1", "Error: cannot parse 'a := 1' as arithmetic"),
        ("", "Error: empty expression"),
        ("   ", "Error: empty expression"),
        ("$", "Error: empty expression"),  # nothing left once the spellings are rewritten
        (" 1 + ", "Error: cannot parse '1 +' as arithmetic"),
        ("1,2345", f"Error: unsupported syntax (Tuple); {UNSUPPORTED_SYNTAX}"),
        ("1/0", "Error: division by zero"),
        ("5 // 0", "Error: division by zero"),
        ("0 ** -1", "Error: division by zero"),
        ("(-8) ** (1/3)", "Error: fractional power of a negative number"),
        ("sqrt(-1)", "Error: square root of a negative number"),
        ("factorial(2.5)", "Error: factorial needs a whole number"),
        ("factorial(-1)", "Error: factorial of a negative number"),
        ("round(2.5, 0.5)", "Error: round's digits needs a whole number"),
        ("\x00", "Error: cannot parse '\\x00' as arithmetic"),
    ],
)
def test_calculate_rejects_everything_else(expression: str, expected: str) -> None:
    """Anything outside the allow-list is an error observation that names what is wrong."""
    assert calculate(expression) == expected


@pytest.mark.parametrize(
    "expression, expected",
    [
        # Each answer names the bound that stopped it, so the work was refused before it was done
        # (computing 9**9**9 or 100000! would not return in any reasonable time).
        ("9**9**9", "Error: result has more than 1000 digits"),
        ("10**100000", "Error: result has more than 1000 digits"),
        ("99999999999**99999", "Error: result has more than 1000 digits"),
        ("2**2**2**2**2**2", "Error: result has more than 1000 digits"),
        ("10**1000", "Error: result has more than 1000 digits"),  # 1001 digits: one too many
        ("10**999 * 10", "Error: result has more than 1000 digits"),
        ("1.5**100000", "Error: result is too large"),
        ("factorial(100000)", "Error: factorial argument above 450"),
        ("100000!", "Error: factorial argument above 450"),
        ("451!", "Error: factorial argument above 450"),
        ("450!", "Error: result has more than 1000 digits"),
        ("round(1, 10**10)", "Error: too many digits to round to"),
        ("round(1, 1001)", "Error: too many digits to round to"),
        ("round(1, 1000)", "1"),
        ("1" * 10_000, "Error: expression longer than 200 characters"),
        ("1" * 201, "Error: expression longer than 200 characters"),
        ("1" * 200, "1" * 200),  # the longest accepted input
        ("(" * 250 + "1" + ")" * 250, "Error: expression longer than 200 characters"),
        ("(" * 99 + "1" + ")" * 99, "1"),  # parentheses alone add no level
        # Levels are bounded on their own, so the answer never depends on the caller's stack depth.
        ("-" * 199 + "1", "Error: expression nested deeper than 100 levels"),
        ("-" * 100 + "1", "Error: expression nested deeper than 100 levels"),
        ("-" * 99 + "1", "-1"),  # 99 signs and the number: 100 levels
        ("-" * 98 + "1", "1"),
        ("1+" * 99 + "1", "100"),  # the longest sum that fits in 200 characters stays within the levels
    ],
)
def test_calculate_is_bounded(expression: str, expected: str) -> None:
    assert calculate(expression) == expected


N = 12345678901234567891  # a square root too long for a float: only the exact path gets every digit right


@pytest.mark.parametrize(
    "expression, expected",
    [
        # Powers of 0, 1 and -1 are exact whatever the exponent (a float of 10**999 would overflow).
        ("1 ** 10**999", "1"),
        ("1 ** -(10**999)", "1"),
        ("(-1) ** (10**999)", "1"),
        ("(-1) ** (10**999 + 1)", "-1"),
        ("0 ** 10**999", "0"),
        ("0 ** -(10**999)", "Error: division by zero"),
        ("0 ** 0", "1"),
        ("1 ** -3", "1"),
        ("(-1) ** 5", "-1"),
        # Fractional bases and exponents.
        ("0.1 ** 999", "1e-999"),
        ("0.1 ** 1000", "Error: result has more than 1000 digits"),  # estimated at exactly the bound: exact path
        ("4 ** 0.5", "2"),
        ("0 ** 0.5", "0"),
        ("0.25 ** 0.5", "0.5"),
        ("(-4) ** 0.5", "Error: fractional power of a negative number"),
        ("sqrt(0)", "0"),
        ("sqrt(0.25)", "0.5"),
        (f"sqrt({N * N})", str(N)),
        (f"sqrt({N * N}/4)", f"{N // 2}.5"),
        ("sqrt(2*10**400)", "Error: OverflowError: integer division result too large for a float"),
        ("factorial(0)", "1"),
        ("0!", "1"),
        # Rounding: half away from zero, for results and for round().
        ("round(-2.5)", "-3"),
        ("round(0.6)", "1"),
        ("round(-0.4)", "0"),
        ("1/2000000", "0.000001"),
        ("0.0000025", "0.000003"),
        ("2 + 1/10000000", "2"),  # rounds to a whole number: no trailing "."
        ("1e400", "Error: number is too large"),
    ],
)
def test_calculate_edge_values(expression: str, expected: str) -> None:
    assert calculate(expression) == expected


@pytest.mark.parametrize("value", [None, 42, b"1+1"])
def test_calculate_needs_text(value) -> None:
    assert calculate(value) == "Error: the expression must be text"


def test_calculate_levels_are_counted_per_branch() -> None:
    """Depth is the deepest branch, not the number of nodes: 50 signs, a sum, and 49 more signs
    reach 101 levels on the right branch only."""
    assert calculate("-" * 50 + "(1+" + "-" * 49 + "1)") == "Error: expression nested deeper than 100 levels"
    assert calculate("-" * 50 + "(1+" + "-" * 48 + "1)") == "2"
    assert calculate("(" + "-" * 48 + "1)+(" + "-" * 48 + "1)") == "2"  # two branches of 50 levels


@pytest.mark.parametrize("elapsed, expected", [(1.0, "2"), (1.5, "Error: took longer than 1 s")])
def test_calculate_time_limit(monkeypatch: pytest.MonkeyPatch, elapsed: float, expected: str) -> None:
    """The clock is read between steps: past 1 s (not at it) the work stops. A fake clock that jumps
    by `elapsed` after the start makes this exact."""
    readings = iter([100.0] + [100.0 + elapsed] * 10)
    monkeypatch.setattr(calculator, "time", SimpleNamespace(monotonic=lambda: next(readings)))
    assert calculate("1+1") == expected


def test_calculate_largest_results_are_exact() -> None:
    """Results up to the digit bound are computed exactly, not refused."""
    assert calculate("10**999") == "1" + "0" * 999
    assert calculate("2**3000") == str(2**3000)  # 904 digits
    assert calculate("449!") == str(math.factorial(449))


def test_calculate_never_raises_on_random_text() -> None:
    """Any text gives an error observation or a number, never an exception."""
    alphabet = "0123456789+-*/%().,^x×÷=!$ eE_jsqrt"
    rng = random.Random(0)
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        result = calculate(text)
        assert result.startswith("Error: ") or math.isfinite(float(result)), (text, result)


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
    path = tmp_path / "new" / "folders" / "tools.jsonl"  # made on the first record
    queries = ["Kiss and Tell", "Shirley Temple", "Ünïcode ✓"]
    recorder, live = _toolbox(ToolCache(path, "record"))
    recorded = [recorder.call("search", q) for q in queries]
    assert live.calls == queries

    replayer, replay_backend = _toolbox(ToolCache(path, "replay"))
    assert [replayer.call("search", q) for q in queries] == recorded
    assert replay_backend.calls == []

    text = path.read_text(encoding="utf-8")
    assert "Ünïcode ✓" in text  # stored as text, not \u escapes
    lines = [json.loads(line) for line in text.splitlines()]
    assert [line["argument"] for line in lines] == queries
    assert lines[0] == {"key": cache_key("search", "fake-search-v1", "Kiss and Tell"), "tool": "search",
                        "backend": "fake-search-v1", "argument": "Kiss and Tell",
                        "observation": "#1: about Kiss and Tell #2: more on Kiss and Tell"}


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
    key = cache_key("search", "fake-search-v1", "b")
    with path.open("a") as file:  # two recordings of one call: the later one is replayed
        for observation in ("#1: old", "#1: new"):
            file.write(json.dumps({"key": key, "observation": observation}) + "\n")
    assert _toolbox(ToolCache(path, "replay"))[0].call("search", "b") == ToolResult("#1: new", True)


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
    torn = path.read_bytes()
    assert len(ToolCache(path, "replay")) == 1
    assert path.read_bytes() == torn  # replay reads but never writes
    toolbox, backend = _toolbox(ToolCache(path, "auto"))
    toolbox.call("search", "b")
    assert backend.calls == ["b"]
    assert [json.loads(line)["argument"] for line in path.read_text().splitlines()] == ["a", "b"]


def test_finished_last_line_without_newline_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "tools.jsonl"
    _toolbox(ToolCache(path, "record"))[0].call("search", "a")
    recorded = path.read_bytes()
    path.write_bytes(recorded.rstrip(b"\n"))
    replayer, _ = _toolbox(ToolCache(path, "replay"))
    assert replayer.call("search", "a") == ToolResult("#1: about a #2: more on a", True)
    assert path.read_bytes() == recorded.rstrip(b"\n")  # replay: untouched
    assert len(ToolCache(path, "auto")) == 1 and path.read_bytes() == recorded  # the newline is put back, at the end
    toolbox, backend = _toolbox(ToolCache(path, "auto"))
    toolbox.call("search", "a")
    toolbox.call("search", "b")
    assert backend.calls == ["b"]
    assert len(path.read_text().splitlines()) == 2


CORRUPT_LINE_2 = "tool cache {dir}/corrupt.jsonl line 2 is not a cache entry: fix or delete that line"


@pytest.mark.parametrize(
    "name, mode, expected",
    [
        ("c.jsonl", "sometimes", "unknown tool cache mode 'sometimes': use one of off, record, replay, auto"),
        ("missing.jsonl", "replay", "tool cache {dir}/missing.jsonl does not exist: replay mode needs a recorded file"),
        (None, "auto", "tool cache mode auto needs a file: set the tool cache path"),
        (None, "record", "tool cache mode record needs a file: set the tool cache path"),
        ("corrupt.jsonl", "auto", CORRUPT_LINE_2),
        ("corrupt.jsonl", "replay", CORRUPT_LINE_2),
    ],
)
def test_cache_user_errors(tmp_path: Path, name: str | None, mode: str, expected: str) -> None:
    """A bad mode, a missing file or a broken line is a user error naming the file and the line."""
    # Line 1 is a good entry and line 3 is blank: the count names the broken line itself.
    (tmp_path / "corrupt.jsonl").write_text('{"key": "k", "observation": "o"}\nnot json\n\n')
    with pytest.raises(NegagentError) as err:
        ToolCache(tmp_path / name if name else None, mode)
    assert str(err.value) == expected.format(dir=tmp_path)


@pytest.mark.parametrize("line", [
    '{"key": 1, "observation": "o"}',
    '{"key": "k", "observation": 2}',
    '{"key": "k"}',
    '{"observation": "o"}',
    '["k", "o"]',
    '"k"',
    "{not json",
])
def test_a_line_that_is_not_an_entry_is_an_error(tmp_path: Path, line: str) -> None:
    path = tmp_path / "tools.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(NegagentError) as err:
        ToolCache(path, "auto")
    assert str(err.value) == f"tool cache {path} line 1 is not a cache entry: fix or delete that line"


def test_default_mode_is_auto(tmp_path: Path) -> None:
    assert ToolCache(tmp_path / "tools.jsonl").mode == "auto"


@pytest.mark.parametrize("cfg, mode", [
    ({}, None),
    ({"mode": False, "path": "x.jsonl"}, None),  # YAML reads a bare `off` as false
    ({"mode": "off", "path": "x.jsonl"}, None),
    ({"mode": "record", "path": "{dir}/t.jsonl"}, "record"),
    ({"mode": "auto", "path": "{dir}/t.jsonl"}, "auto"),
])
def test_build_tool_cache(tmp_path: Path, cfg: dict, mode: str | None) -> None:
    cache = build_tool_cache({key: str(v).format(dir=tmp_path) if key == "path" else v for key, v in cfg.items()})
    if mode is None:
        assert cache is None
    else:
        assert (cache.mode, cache.path) == (mode, tmp_path / "t.jsonl")


def test_build_tool_cache_passes_mode_and_path_on(tmp_path: Path) -> None:
    with pytest.raises(NegagentError) as err:
        build_tool_cache({"mode": "replay", "path": str(tmp_path / "none.jsonl")})
    assert str(err.value) == f"tool cache {tmp_path / 'none.jsonl'} does not exist: replay mode needs a recorded file"


def test_off_mode_needs_no_file() -> None:
    toolbox, backend = _toolbox(ToolCache(None, "off"))
    assert toolbox.call("search", "a").observation == "#1: about a #2: more on a"
    assert backend.calls == ["a"]


def test_off_mode_never_touches_the_file(tmp_path: Path) -> None:
    path = tmp_path / "tools.jsonl"
    toolbox, backend = _toolbox(ToolCache(path, "off"))
    toolbox.call("search", "a")
    toolbox.call("search", "a")
    assert backend.calls == ["a", "a"] and not path.exists()


# --- toolbox -----------------------------------------------------------------------------------


def test_toolbox_results() -> None:
    toolbox, backend = _toolbox(None)
    assert toolbox.names == ("search", "calculate")
    assert toolbox.call("calculate", " 2 + 2 ") == ToolResult("4", True)
    assert toolbox.call("lookup", "x") == ToolResult("Error: unknown tool 'lookup'; available: search, calculate", False)
    assert toolbox.call("calculate", "1/0") == ToolResult("Error: division by zero", False)
    assert toolbox.call("search", " q ") == ToolResult("#1: about q #2: more on q", True)  # the argument stripped
    assert toolbox.call("search", "fail") == ToolResult("Error: service unavailable", False)
    assert toolbox.call("search", "boom") == ToolResult("Error: search failed (RuntimeError: backend exploded)", False)
    assert toolbox.call("search", "  ") == ToolResult("Error: empty search query", False)
    assert backend.calls == ["q", "fail", "boom"]  # an empty query never reaches the backend
    assert Toolbox({}).call("search", "q") == ToolResult("Error: unknown tool 'search'; available: none", False)


def test_a_long_tool_failure_is_cut_to_one_line() -> None:
    class Broken:
        identity = "broken"

        def search(self, query: str) -> str:
            raise ValueError("line one\nline two " + "x" * 400)

    result = Toolbox({"search": search_tool(Broken())}).call("search", "q")
    assert result == ToolResult("Error: search failed (" + ("ValueError: line one line two " + "x" * 400)[:300] + ")", False)


def test_calculator_is_never_cached(tmp_path: Path) -> None:
    path = tmp_path / "tools.jsonl"
    toolbox, _ = _toolbox(ToolCache(path, "auto"))
    assert toolbox.call("calculate", "6/3").observation == "2"
    assert not path.exists()
    path.write_text("")
    assert _toolbox(ToolCache(path, "replay"))[0].call("calculate", "6/3").observation == "2"


def test_build_toolbox_searches_through_the_given_cache(tmp_path: Path) -> None:
    data = tmp_path / "data" / "hotpotqa_context" / "x"
    data.mkdir(parents=True)
    (data / "dev.json").write_text(json.dumps([{"question": "q", "context": [["Alpha", ["Alpha is first."]]]}]))
    cfg = {"search": {"data_dir": str(tmp_path / "data"), "cache_dir": str(tmp_path / "index")}}
    path = tmp_path / "tools.jsonl"
    result = build_toolbox(["search"], cfg, ToolCache(path, "record")).call("search", "alpha")
    assert result == ToolResult("#1: Alpha | Alpha is first.", True)
    assert [json.loads(line)["argument"] for line in path.read_text().splitlines()] == ["alpha"]


def test_build_toolbox_for_math_needs_no_search_settings() -> None:
    toolbox = build_toolbox(["calculate"], {})
    assert toolbox.names == ("calculate",)
    assert toolbox.call("calculate", "6/3") == ToolResult("2", True)
    with pytest.raises(NegagentError) as err:
        build_toolbox(["wikipedia"], {})
    assert str(err.value) == "unknown tool 'wikipedia': known tools are calculate, search"


@pytest.mark.parametrize(
    "search, expected",
    [
        ({"backend": "bm25"}, "search.backend=bm25 needs search.data_dir: set it to the data directory"),
        ({"data_dir": "{dir}/nowhere"}, "search data directory {dir}/nowhere does not exist: set search.data_dir "
                                        "to the folder holding hotpotqa_context/ and strategyqa_evidence/"),
        ({"backend": "bing"}, "unknown search.backend 'bing': use bm25 or serper"),
        ({"data_dir": "{dir}", "top_k": 0}, "search.top_k must be at least 1, not 0"),
        ({"data_dir": "{dir}", "max_chars": 0}, "search.max_chars must be at least 1, not 0"),
    ],
)
def test_build_toolbox_reports_bad_search_settings(tmp_path: Path, search: dict, expected: str) -> None:
    search = {key: value.format(dir=tmp_path) if isinstance(value, str) else value for key, value in search.items()}
    with pytest.raises(NegagentError) as err:
        build_toolbox(["search"], {"search": search})
    assert str(err.value) == expected.format(dir=tmp_path)


def test_default_config_composes() -> None:
    cfg = OmegaConf.load(REPO / "conf" / "tools" / "default.yaml")
    assert cfg.search.backend == "bm25" and cfg.search.top_k == 3
    assert cfg.search.data_dir is None  # no top-level data_dir in this lone file
    assert build_tool_cache(cfg.cache) is None
    assert build_toolbox(["calculate"], cfg).names == ("calculate",)
