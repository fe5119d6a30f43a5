"""Search backends: the corpus formats, BM25 on the real data, serper against a local fake server."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from negagent.errors import NegagentError
from negagent.tools import BM25Search, SerperSearch, ToolCache, build_corpus, build_toolbox
from negagent.tools.search import NO_RESULTS, format_passages

OBSERVATION = re.compile(r"^#1: (?P<p1>.+) #2: (?P<p2>.+) #3: (?P<p3>.+)$")


def test_format_passages() -> None:
    assert format_passages(["a\n b", "c"], 400) == "#1: a b #2: c"
    assert format_passages([], 400) == NO_RESULTS
    long = "word " * 200
    cut = format_passages([long], 30)
    assert cut.startswith("#1: word") and cut.endswith(" ...") and len(cut) <= len("#1: ") + 30 + 4


# --- the corpus formats, on a tiny made-up data directory -------------------------------------


def _write_mini_data(root: Path) -> None:
    hotpot = root / "hotpotqa_context"
    for folder in ("raw", "lines", "reflexion", "ircot", "ecm", "corpus", "columns"):
        (hotpot / folder).mkdir(parents=True)
    (root / "strategyqa_evidence").mkdir()
    raw_context = [["Alpha", ["Alpha is a letter.", " It comes first."]], ["Beta", ["Beta follows alpha."]]]
    (hotpot / "raw" / "dev.json").write_text(json.dumps([{"question": "q", "context": raw_context}]))
    # A .json file that holds one record per line, and the same paragraph spaced differently.
    line = {"question": "q", "context": [["Alpha", ["Alpha is a letter. ", "It comes  first."]]]}
    (hotpot / "lines" / "test.json").write_text(json.dumps(line) + "\n" + json.dumps(line) + "\n")
    reflexion = {"title": ["Gamma"], "sentences": [["Gamma is third.", " Greek."]]}
    (hotpot / "reflexion" / "sample.json").write_text(json.dumps([{"context": reflexion}]))
    ircot = {"contexts": [{"id": "0", "title": "Delta", "paragraph_text": "Delta is a river mouth."}]}
    (hotpot / "ircot" / "dev.jsonl").write_text(json.dumps(ircot) + "\n")
    ecm = [
        {"evidence": ["Alpha | It comes first.", "Epsilon | Epsilon is fifth.", "Epsilon | Small e."]},
        {"evidence": ["Beta follows alpha.", "Zeta is sixth."]},
    ]
    (hotpot / "ecm" / "test.json").write_text(json.dumps(ecm))
    (hotpot / "corpus" / "corpus.json").write_text(json.dumps({"Eta": ["Eta is seventh."]}))
    columns = {"id": {"0": "1"}, "context": {"0": [["Theta", ["Theta is eighth."]]]}}
    (hotpot / "columns" / "sampled.json").write_text(json.dumps(columns))
    strategyqa = {
        "question": "q",
        "evidence": [[[["Iota-1", "Kappa-2"]], [["Lambda-3"]], ["operation"]]],
        "golden_sentence": [["", "Kappa is tenth."], ["Lambda is eleventh.", "Lambda is Greek."]],
    }
    (root / "strategyqa_evidence" / "dev.json").write_text(json.dumps([strategyqa]))


def test_build_corpus_reads_every_format_and_dedupes(tmp_path: Path) -> None:
    _write_mini_data(tmp_path)
    assert sorted(build_corpus(tmp_path)) == sorted(
        [
            "Alpha | Alpha is a letter. It comes first.",
            "Beta | Beta follows alpha.",
            "Gamma | Gamma is third. Greek.",
            "Delta | Delta is a river mouth.",
            "Epsilon | Epsilon is fifth. Small e.",
            "Zeta is sixth.",
            "Eta | Eta is seventh.",
            "Theta | Theta is eighth.",
            "Kappa | Kappa is tenth.",
            "Lambda | Lambda is eleventh. Lambda is Greek.",
        ]
    )


def test_bm25_on_a_small_corpus_caches_and_rebuilds_on_change(tmp_path: Path) -> None:
    data, cache = tmp_path / "data", tmp_path / "cache"
    _write_mini_data(data)
    search = BM25Search(data, cache)
    assert search.search("river mouth").startswith("#1: Delta | Delta is a river mouth.")
    assert search.search("qwxyz") == NO_RESULTS
    assert len(list(cache.glob("bm25-*"))) == 1
    assert BM25Search(data, cache).identity == search.identity
    (data / "hotpotqa_context" / "corpus" / "corpus.json").write_text(json.dumps({"Mu": ["Mu is twelfth."]}))
    changed = BM25Search(data, cache)
    assert len(list(cache.glob("bm25-*"))) == 2
    assert changed.identity != search.identity
    assert changed.search("twelfth").startswith("#1: Mu | Mu is twelfth.")


def test_bm25_reports_missing_empty_or_broken_data(tmp_path: Path) -> None:
    with pytest.raises(NegagentError, match="does not exist"):
        BM25Search(tmp_path / "nowhere", tmp_path / "cache")
    with pytest.raises(NegagentError, match="no search corpus"):
        BM25Search(tmp_path, tmp_path / "cache")
    broken = tmp_path / "hotpotqa_context" / "x" / "broken.json"
    broken.parent.mkdir(parents=True)
    broken.write_text("{not json")
    with pytest.raises(NegagentError, match="cannot read search corpus file"):
        BM25Search(tmp_path, tmp_path / "cache")
    with pytest.raises(NegagentError, match="top_k must be at least 1"):
        build_toolbox(["search"], {"search": {"data_dir": str(tmp_path), "top_k": 0}})


# --- BM25 on the real data -------------------------------------------------------------------


@pytest.fixture(scope="session")
def index_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("search-cache")


@pytest.fixture(scope="session")
def bm25(data_dir: Path, index_cache: Path) -> BM25Search:
    """Built once per session (the slow part, a few seconds) in a temporary cache folder."""
    return BM25Search(data_dir, index_cache)


def test_real_corpus_size(data_dir: Path, bm25: BM25Search) -> None:
    hotpot = [p for p in bm25.passages if " | " in p]
    assert len(hotpot) > 14_500
    assert len(set(bm25.passages)) == len(bm25.passages)


def test_second_construction_loads_the_cached_index_fast(data_dir: Path, index_cache: Path, bm25: BM25Search) -> None:
    start = time.perf_counter()
    again = BM25Search(data_dir, index_cache)
    assert time.perf_counter() - start < 1.0
    assert again.identity == bm25.identity


def test_bm25_observation_format(bm25: BM25Search) -> None:
    observation = bm25.search("Kiss and Tell Corliss Archer")
    match = OBSERVATION.match(observation)
    assert match, observation
    assert "\n" not in observation
    for passage in match.groups():
        assert len(passage) <= 400 + len(" ...")
    assert bm25.search("qqqzzzxxx") == NO_RESULTS


@pytest.mark.parametrize(
    "question, gold_title",
    [
        (
            "What government position was held by the woman who portrayed Corliss Archer in the film Kiss and Tell?",
            "Kiss and Tell (1945 film)",
        ),
        (
            "What is the name of the fight song of the university whose main campus is in Lawrence, Kansas and "
            "whose branch campuses are in the Kansas City metropolitan area?",
            "University of Kansas",
        ),
        ("VIVA Media AG changed it's name in 2004. What does their new acronym stand for?", "VIVA Media"),
    ],
)
def test_bm25_finds_the_gold_paragraph(bm25: BM25Search, question: str, gold_title: str) -> None:
    assert f": {gold_title} | " in bm25.search(question)


def test_bm25_recall_on_real_questions(data_dir: Path, bm25: BM25Search) -> None:
    """A gold supporting title is among the top 3 for most HotpotQA questions (about 86% here)."""
    lines = (data_dir / "hotpotqa_context" / "amor" / "test.json").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines[:100]]
    hits = 0
    for row in rows:
        observation = bm25.search(row["question"])
        hits += any(f": {title} | " in observation for title, _ in row["supporting_facts"])
    assert hits >= 0.75 * len(rows)


def test_toolbox_search_from_config_replays(data_dir: Path, index_cache: Path, tmp_path: Path) -> None:
    cfg = {"search": {"backend": "bm25", "data_dir": str(data_dir), "cache_dir": str(index_cache), "top_k": 2}}
    path = tmp_path / "tools.jsonl"
    live = build_toolbox(["search"], cfg, ToolCache(path, "record")).call("search", "Shirley Temple")
    assert live.ok and live.observation.startswith("#1: ") and " #3: " not in live.observation
    replayed = build_toolbox(["search"], cfg, ToolCache(path, "replay")).call("search", "Shirley Temple")
    assert replayed == live


# --- serper against a local fake server ------------------------------------------------------

KEY = "sk-test-DO-NOT-LEAK-4242"


class _FakeSerper(BaseHTTPRequestHandler):
    received: list[tuple[str, str | None, dict]] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _FakeSerper.received.append((self.path, self.headers.get("X-API-KEY"), body))
        if self.path == "/slow":
            time.sleep(1.0)
        status = {"/search": 200, "/slow": 200, "/denied": 403, "/broken": 500, "/garbage": 200}[self.path]
        if self.path == "/garbage":
            payload = b"<html>not json</html>"
        else:
            payload = json.dumps(
                {
                    "answerBox": {"answer": "Chief of Protocol"},
                    "organic": [
                        {"title": "Shirley Temple", "snippet": "Shirley Temple Black was an actress\nand diplomat."},
                        {"title": "Kiss and Tell", "snippet": "Kiss and Tell is a 1945 film. " * 30},
                        {"title": "Other", "snippet": "A fourth snippet."},
                    ],
                }
            ).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        try:
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (the timeout test)
            pass

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def fake_serper() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeSerper)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _serper(monkeypatch: pytest.MonkeyPatch, url: str, **kwargs: object) -> SerperSearch:
    monkeypatch.setenv("NEGAGENT_TEST_SERPER_KEY", KEY)
    return SerperSearch(url=url, api_key_env="NEGAGENT_TEST_SERPER_KEY", **kwargs)


def test_serper_formats_answer_and_snippets(monkeypatch: pytest.MonkeyPatch, fake_serper: str) -> None:
    observation = _serper(monkeypatch, f"{fake_serper}/search").search("Corliss Archer actress")
    match = OBSERVATION.match(observation)
    assert match, observation
    assert match["p1"] == "Chief of Protocol"
    assert match["p2"] == "Shirley Temple Black was an actress and diplomat."
    assert match["p3"].endswith(" ...") and len(match["p3"]) <= 404
    path, key, body = _FakeSerper.received[-1]
    assert (path, key, body) == ("/search", KEY, {"q": "Corliss Archer actress"})


@pytest.mark.parametrize(
    "path, expected",
    [
        ("/denied", "Error: search service answered HTTP 403; check the key in NEGAGENT_TEST_SERPER_KEY"),
        ("/broken", "Error: search service answered HTTP 500"),
        ("/garbage", "Error: search service answered with invalid JSON"),
        ("/slow", "Error: search timed out after 0.2 s"),
    ],
)
def test_serper_failures_are_error_observations(
    monkeypatch: pytest.MonkeyPatch, fake_serper: str, path: str, expected: str
) -> None:
    assert _serper(monkeypatch, fake_serper + path, timeout_s=0.2).search("q") == expected


def test_serper_unreachable_is_an_error_observation(monkeypatch: pytest.MonkeyPatch) -> None:
    observation = _serper(monkeypatch, "http://127.0.0.1:9/search", timeout_s=1).search("q")
    assert observation.startswith("Error: search request failed") and KEY not in observation


def test_serper_needs_its_key_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SERPER_API_KEY", raising=False)
    with pytest.raises(NegagentError, match="set the environment variable SERPER_API_KEY"):
        build_toolbox(["search"], {"search": {"backend": "serper"}})


def test_serper_key_never_leaks(monkeypatch: pytest.MonkeyPatch, fake_serper: str, tmp_path: Path) -> None:
    backend = _serper(monkeypatch, f"{fake_serper}/denied")
    assert KEY not in repr(backend) and KEY not in str(backend) and KEY not in backend.identity
    assert KEY not in backend.search("q")
    cfg = {
        "search": {
            "backend": "serper",
            "serper": {"url": f"{fake_serper}/search", "api_key_env": "NEGAGENT_TEST_SERPER_KEY"},
        }
    }
    cache = tmp_path / "tools.jsonl"
    result = build_toolbox(["search"], cfg, ToolCache(cache, "record")).call("search", "q")
    assert result.ok
    assert KEY not in cache.read_text()
