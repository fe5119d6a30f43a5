"""Web search (serper): the paper's pipeline against a local server that answers like serper.dev,
ranked by tiny randomly initialised sentence-transformers models built here; record/replay; the
refusal of a web search that could not run. Nothing is downloaded."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from negagent.errors import NegagentError
from negagent.tools import SerperSearch, ToolCache, build_toolbox
from negagent.tools.rerank import DEFAULT_RERANKER, DEFAULT_RETRIEVER, SnippetRanker, model_label
from negagent.tools.search import NO_RESULTS, SERPER_URL, build_search_backend
from negagent.tools.toolbox import ToolResult, check_search_access
from tests.servers import free_port

KEY = "sk-test-DO-NOT-LEAK-4242"
KEY_ENV = "NEGAGENT_TEST_SERPER_KEY"
QUERY = "Corliss Archer actress government position"

# What serper.dev answers for a search with "num": 10 (shape as documented; text written here).
# The answer box is not shown (the paper shows ranked organic snippets only), and the result
# without a snippet is dropped: 9 snippets reach the ranker.
ORGANIC = [
    ("Kiss and Tell (1945 film)", "Kiss and Tell is a 1945 American comedy film starring Shirley Temple as Corliss Archer."),
    ("Shirley Temple", "Shirley Temple Black was an American actress, singer and diplomat."),
    ("Shirley Temple - Chief of Protocol", "In 1976 she became the first female Chief of Protocol of the United States."),
    ("Meet Corliss Archer", "Meet Corliss Archer is an American radio and television comedy series."),
    ("A Kiss for Corliss", "A Kiss for Corliss is a 1949 film, the sequel to Kiss and Tell."),
    ("Janet Waldo", "Janet Waldo was an American actress who voiced Corliss Archer on radio."),
    ("Ambassador to Ghana", "Shirley Temple Black served as United States Ambassador to Ghana from 1974."),
    ("Corliss Archer - Wikipedia", "Corliss Archer is a fictional teenage girl created by F. Hugh Herbert."),
    ("Protocol office", "The Chief of Protocol is a government position in the State Department."),
]
SERPER_ANSWER = {
    "searchParameters": {"q": QUERY, "type": "search", "num": 10, "engine": "google"},
    "answerBox": {"title": "Shirley Temple", "answer": "Chief of Protocol"},
    "organic": [{"title": title, "link": f"https://example.org/{i}", "snippet": snippet, "position": i + 1}
                for i, (title, snippet) in enumerate(ORGANIC[:6])]
               + [{"title": "No snippet here", "link": "https://example.org/x", "position": 7}]
               + [{"title": title, "link": f"https://example.org/{i + 6}", "snippet": snippet, "position": i + 8}
                  for i, (title, snippet) in enumerate(ORGANIC[6:])],
    "relatedSearches": [{"query": "Shirley Temple diplomat"}],
}
SECOND_QUERY = "Kiss and Tell sequel"
SECOND_ANSWER = {"organic": [{"title": "A Kiss for Corliss", "snippet": "A Kiss for Corliss is the 1949 sequel."}]}


# --- a server that answers like serper.dev -----------------------------------------------------


class _FakeSerper(BaseHTTPRequestHandler):
    received: list[tuple[str, str | None, dict]] = []
    # "/slow" answers only once this is set (at the fixture's teardown): the client's timeout fires first.
    release = threading.Event()

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _FakeSerper.received.append((self.path, self.headers.get("X-API-KEY"), body))
        if self.path == "/slow":
            _FakeSerper.release.wait(timeout=120)
        status = {"/search": 200, "/slow": 200, "/denied": 403, "/unauthorized": 401, "/broken": 500,
                  "/garbage": 200, "/odd": 200, "/list": 200}[self.path]
        if self.path == "/garbage":
            payload = b"<html>not json</html>"
        elif self.path == "/odd":  # entries of the wrong shape are skipped
            payload = json.dumps({"organic": ["x", {"title": "no snippet"}, {"snippet": " "}, {"snippet": "Ok."}]}).encode()
        elif self.path == "/list":
            payload = b"[]"
        else:
            payload = json.dumps(SECOND_ANSWER if body.get("q") == SECOND_QUERY else SERPER_ANSWER).encode()
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


class _Server:
    """The fake serper.dev on 127.0.0.1 in a thread; `stop()` shuts it down (and frees the port)."""

    def __init__(self) -> None:
        _FakeSerper.release = threading.Event()  # a fresh one: an earlier test in this process set its own
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeSerper)
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        _FakeSerper.release.set()
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def serper() -> Iterator[_Server]:
    server = _Server()
    yield server
    server.stop()


# --- tiny models, made offline --------------------------------------------------------------------


def _vocab(texts: list[str]) -> list[str]:
    words = sorted({w for text in texts for w in re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())})
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]


def _tiny_models(root: Path, seed: int) -> tuple[Path, Path]:
    """A bi-encoder (BERT + mean pooling) and a cross-encoder (BERT + one-logit head), randomly
    initialised from `seed`, with a WordPiece tokenizer over the words of this file's texts."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizer

    texts = [QUERY, SECOND_QUERY, *(f"{t} | {s}" for t, s in ORGANIC)]
    tokenizer = BertTokenizer(vocab={word: i for i, word in enumerate(_vocab(texts))}, do_lower_case=True)
    # Wide initial weights spread the random scores apart, so no two passages tie.
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=128, initializer_range=INIT_RANGE, num_labels=1)
    torch.manual_seed(seed)
    encoder, bi, cross = root / "encoder", root / "tiny-bi", root / "tiny-cross"
    BertModel(config).save_pretrained(encoder)
    tokenizer.save_pretrained(encoder)
    SentenceTransformer(modules=[Transformer(str(encoder)), Pooling(16, "mean")], device="cpu").save(str(bi))
    BertForSequenceClassification(config).save_pretrained(cross)
    tokenizer.save_pretrained(cross)
    return bi, cross


# With these, the ranking differs from Google's order, from the bi-encoder's order and from the
# cross-encoder over all snippets (the ranking test checks that it does).
SEED = 2
INIT_RANGE = 0.5


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _tiny_models(tmp_path_factory.mktemp("models"), SEED)


def _cfg(url: str, retriever: Path | str | None, reranker: Path | str | None, **search: object) -> dict:
    serper = {"url": f"{url}/search", "api_key_env": KEY_ENV, "timeout_s": 5,
              "retriever": str(retriever) if retriever else None, "reranker": str(reranker) if reranker else None}
    return {"search": {"backend": "serper", **search, "serper": serper}}


def _search(monkeypatch: pytest.MonkeyPatch, url: str, retriever: Path | None = None,
            reranker: Path | None = None, **kwargs: object) -> SerperSearch:
    monkeypatch.setenv(KEY_ENV, KEY)
    ranker = SnippetRanker(str(retriever) if retriever else None, 5, str(reranker) if reranker else None)
    return SerperSearch(url=url, api_key_env=KEY_ENV, ranker=ranker, **kwargs)


def _snippets(observation: str) -> list[str]:
    return re.split(r" ?#\d: ", observation)[1:]


# --- the pipeline ----------------------------------------------------------------------------------


def test_asks_for_ten_results_and_shows_organic_snippets(monkeypatch: pytest.MonkeyPatch, serper: _Server) -> None:
    """Without models the engine's order stands: the first three organic snippets, no answer box."""
    observation = _search(monkeypatch, f"{serper.url}/search").search(QUERY)
    assert observation == " ".join(f"#{i + 1}: {snippet}" for i, (_, snippet) in enumerate(ORGANIC[:3]))
    assert _FakeSerper.received[-1] == ("/search", KEY, {"q": QUERY, "num": 10})
    _search(monkeypatch, f"{serper.url}/search", num_results=7).search(QUERY)
    assert _FakeSerper.received[-1][2] == {"q": QUERY, "num": 7}


def test_ranking_keeps_the_five_closest_then_reranks_them(
    monkeypatch: pytest.MonkeyPatch, serper: _Server, models: tuple[Path, Path]
) -> None:
    """The bi-encoder keeps the 5 snippets closest to the query (cosine), the cross-encoder orders
    those by its score of (query, "title | snippet"); the best 3 are shown, best first."""
    import torch
    from sentence_transformers import CrossEncoder, SentenceTransformer

    retriever, reranker = models
    vectors = SentenceTransformer(str(retriever), device="cpu").encode(
        [QUERY, *(snippet for _, snippet in ORGANIC)], normalize_embeddings=True)
    cosine = [float(v) for v in vectors[1:] @ vectors[0]]
    scores = [float(v) for v in CrossEncoder(str(reranker), device="cpu").predict(
        [(QUERY, f"{title} | {snippet}") for title, snippet in ORGANIC], activation_fn=torch.nn.Identity())]
    closest = sorted(range(len(ORGANIC)), key=lambda i: -cosine[i])[:5]
    expected = sorted(closest, key=lambda i: -scores[i])[:3]
    # The case discriminates: skipping either step, or reranking all nine, would show other snippets.
    assert expected != [0, 1, 2] and expected != closest[:3]
    assert expected != sorted(range(len(ORGANIC)), key=lambda i: -scores[i])[:3]
    for values in (sorted(cosine), sorted(scores[i] for i in closest)):  # no near-ties that float noise could flip
        assert min(b - a for a, b in zip(values, values[1:])) > 1e-4

    observation = _search(monkeypatch, f"{serper.url}/search", retriever, reranker).search(QUERY)
    assert _snippets(observation) == [ORGANIC[i][1] for i in expected]


def test_a_model_that_cannot_be_loaded_stops_the_run(
    monkeypatch: pytest.MonkeyPatch, serper: _Server, tmp_path: Path, models: tuple[Path, Path]
) -> None:
    """Models load on first use; one that cannot be loaded is one error line naming the key, and it
    stops the run rather than becoming an observation of every search."""
    monkeypatch.setenv(KEY_ENV, KEY)
    toolbox = build_toolbox(["search"], _cfg(serper.url, tmp_path / "all-mpnet-base-v2", models[1]))  # built: nothing loaded
    with pytest.raises(NegagentError) as err:
        toolbox.call("search", QUERY)
    message = str(err.value)
    assert message.startswith(f"cannot load search.serper.retriever='{tmp_path / 'all-mpnet-base-v2'}' (")
    assert "\n" not in message and "FileNotFoundError" in message
    assert message.endswith("; offline, point search.serper.retriever at a local directory holding the model "
                            "(or set it to null to skip that step)")


def test_an_unreachable_hub_is_reported_in_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub name that is not cached, with the hub out of reach: one line at once, not a minute of
    the hub client's retries (the hub here is a closed port on 127.0.0.1)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")
    ranker = SnippetRanker(None, 5, "negagent-tests/not-a-cached-model")
    with pytest.raises(NegagentError) as err:
        ranker.rank(QUERY, [("t", "s")], 1)
    assert str(err.value) == (
        f"cannot load search.serper.reranker='negagent-tests/not-a-cached-model': not on this machine, and the hub "
        f"({constants.ENDPOINT}) cannot be reached (ConnectError); offline, point search.serper.reranker at a local "
        "directory holding the model (or set it to null to skip that step)")


@pytest.mark.parametrize(
    "path, expected",
    [
        ("/denied", f"Error: search service answered HTTP 403; check the key in {KEY_ENV}"),
        ("/unauthorized", f"Error: search service answered HTTP 401; check the key in {KEY_ENV}"),
        ("/odd", "#1: Ok."),
        ("/list", NO_RESULTS),
        ("/broken", "Error: search service answered HTTP 500"),
        ("/garbage", "Error: search service answered with invalid JSON"),
        ("/slow", "Error: search timed out after 0.2 s"),
    ],
)
def test_failures_are_error_observations(
    monkeypatch: pytest.MonkeyPatch, serper: _Server, path: str, expected: str
) -> None:
    assert _search(monkeypatch, serper.url + path, timeout_s=0.2).search("q") == expected


def test_unreachable_is_an_error_observation(monkeypatch: pytest.MonkeyPatch) -> None:
    observation = _search(monkeypatch, f"http://127.0.0.1:{free_port()}/search", timeout_s=1).search("q")
    assert observation == "Error: search request failed (ConnectError)"


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """The paper's numbers: 10 results, the 5 closest by all-mpnet-base-v2, the best 3 shown."""
    monkeypatch.setenv("SERPER_API_KEY", KEY)
    backend = build_search_backend({"backend": "serper"})
    assert isinstance(backend, SerperSearch)
    assert (backend.top_k, backend.max_chars, backend.url, backend.api_key_env, backend.timeout_s,
            backend.num_results) == (3, 400, SERPER_URL, "SERPER_API_KEY", 10.0, 10)
    assert (backend.ranker.retriever, backend.ranker.retrieve_k, backend.ranker.reranker) == (
        "sentence-transformers/all-mpnet-base-v2", 5, "cross-encoder/ms-marco-MiniLM-L-6-v2")
    assert (DEFAULT_RETRIEVER, DEFAULT_RERANKER, backend.ranker.device) == (
        backend.ranker.retriever, backend.ranker.reranker, None)
    assert backend._client.timeout == httpx.Timeout(10.0)  # the timeout reaches the HTTP client
    assert backend.identity == (f"serper:{SERPER_URL}:num10:rank1:retrieve5-all-mpnet-base-v2+"
                                "rerank-ms-marco-MiniLM-L-6-v2:k3:chars400")


def test_config_keys_reach_the_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    backend = build_search_backend({"backend": "serper", "top_k": 2, "max_chars": 50, "serper": {
        "url": "http://127.0.0.1:1/s", "api_key_env": KEY_ENV, "timeout_s": 2, "num_results": 20,
        "retriever": "org/bi", "retrieve_k": 8, "reranker": None, "device": "cpu"}})
    assert (backend.top_k, backend.max_chars, backend.url, backend.timeout_s, backend.num_results) == (
        2, 50, "http://127.0.0.1:1/s", 2.0, 20)
    assert (backend.ranker.retriever, backend.ranker.retrieve_k, backend.ranker.reranker, backend.ranker.device) == (
        "org/bi", 8, None, "cpu")
    assert backend._client.timeout == httpx.Timeout(2.0)


@pytest.mark.parametrize("serper, expected", [
    ({"num_results": 0}, "search.serper.num_results must be at least 1, not 0"),
    ({"retrieve_k": 0}, "search.serper.retrieve_k must be at least 1, not 0"),
    ({"retrieve_k": "5"}, "search.serper.retrieve_k must be at least 1, not '5'"),
    ({"retrieve_k": 2}, "search.serper.retrieve_k=2 keeps fewer snippets than search.top_k=3 shows"),
])
def test_bad_serper_settings_are_one_line(monkeypatch: pytest.MonkeyPatch, serper: dict, expected: str) -> None:
    monkeypatch.setenv("SERPER_API_KEY", KEY)
    with pytest.raises(NegagentError) as err:
        build_search_backend({"backend": "serper", "serper": serper})
    assert str(err.value) == expected


# --- record and replay -----------------------------------------------------------------------------


def test_a_recorded_run_replays_with_no_server_key_or_model(
    monkeypatch: pytest.MonkeyPatch, serper: _Server, models: tuple[Path, Path], tmp_path: Path
) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    retriever, reranker = models
    path = tmp_path / "tool_cache.jsonl"
    recording = build_toolbox(["search"], _cfg(serper.url, retriever, reranker), ToolCache(path, "record"))
    live = [recording.call("search", query) for query in (QUERY, SECOND_QUERY)]
    assert all(result.ok for result in live) and len(_snippets(live[0].observation)) == 3
    assert live[1] == ToolResult("#1: A Kiss for Corliss is the 1949 sequel.", True)
    requests = len(_FakeSerper.received)
    serper.stop()
    monkeypatch.delenv(KEY_ENV)
    # The models are named by their folder names: copies elsewhere (here: none at all) replay the recording.
    gone = tmp_path / "elsewhere"
    replaying = build_toolbox(["search"], _cfg(serper.url, gone / retriever.name, gone / reranker.name),
                              ToolCache(path, "replay"))
    assert [replaying.call("search", query) for query in (QUERY, SECOND_QUERY)] == live
    assert replaying.call("search", "never recorded") == ToolResult(
        "Error: no recorded observation for search[never recorded] (replay mode)", False)
    assert len(_FakeSerper.received) == requests  # nothing was asked of the (stopped) server
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    identity = f"serper:{serper.url}/search:num10:rank1:retrieve5-tiny-bi+rerank-tiny-cross:k3:chars400"
    assert [(line["argument"], line["backend"]) for line in lines] == [(QUERY, identity), (SECOND_QUERY, identity)]
    assert KEY not in path.read_text() and str(tmp_path) not in path.read_text()


@pytest.mark.parametrize("change", [
    {"top_k": 2}, {"max_chars": 300}, {"serper": {"num_results": 20}}, {"serper": {"retrieve_k": 6}},
    {"serper": {"retriever": "org/other-bi"}}, {"serper": {"reranker": "org/other-cross"}},
    {"serper": {"retriever": None}}, {"serper": {"reranker": None}}, {"serper": {"url": "http://127.0.0.1:2/s"}},
])
def test_identity_names_everything_that_changes_results(monkeypatch: pytest.MonkeyPatch, change: dict) -> None:
    monkeypatch.setenv("SERPER_API_KEY", KEY)
    base = {"backend": "serper", "serper": {}}
    changed = {**base, **change, "serper": change.get("serper", {})}
    assert build_search_backend(changed).identity != build_search_backend(base).identity


def test_the_key_is_not_part_of_the_identity_and_never_leaks(
    monkeypatch: pytest.MonkeyPatch, serper: _Server, tmp_path: Path
) -> None:
    cfg = _cfg(serper.url, None, None)
    monkeypatch.setenv(KEY_ENV, "another-key")
    other = build_search_backend(cfg["search"]).identity
    backend = _search(monkeypatch, f"{serper.url}/denied")
    assert model_label("sentence-transformers/all-mpnet-base-v2") == "all-mpnet-base-v2"
    assert build_search_backend(cfg["search"]).identity == other
    assert KEY not in repr(backend) and KEY not in str(backend) and KEY not in backend.identity
    assert KEY not in backend.search("q")
    cache = tmp_path / "tools.jsonl"
    assert build_toolbox(["search"], cfg, ToolCache(cache, "record")).call("search", "q").ok
    assert KEY not in cache.read_text()


# --- no key, no replay: refused before any work ----------------------------------------------------

REFUSAL = (f"tools.search.backend=serper needs a serper.dev API key in the environment variable {KEY_ENV}: set it, "
           "or replay a recorded run (tools.cache.mode=replay tools.cache.path=<its tool_cache.jsonl>), or choose "
           "tools.search.backend=bm25 for an offline search that deviates from the paper")


@pytest.mark.parametrize("mode, key, refused", [
    ("off", None, True), ("auto", None, True), ("record", None, True), (None, None, True),
    ("replay", None, False), ("auto", KEY, False),
])
def test_web_search_without_key_or_replay_is_refused(
    monkeypatch: pytest.MonkeyPatch, mode: str | None, key: str | None, refused: bool
) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    if key:
        monkeypatch.setenv(KEY_ENV, key)
    cfg = {**_cfg("http://127.0.0.1:1", None, None), "cache": {"mode": mode}}
    if refused:
        with pytest.raises(NegagentError) as err:
            check_search_access(["search"], cfg)
        assert str(err.value) == REFUSAL
    else:
        check_search_access(["search"], cfg)
    check_search_access(["calculate"], cfg)  # a task without search needs no key
    check_search_access(["search"], {"search": {"backend": "bm25"}})


def test_the_toolbox_refuses_too_unless_it_replays(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    cfg = _cfg("http://127.0.0.1:1", None, None)
    for cache in (None, ToolCache(tmp_path / "c.jsonl", "auto")):
        with pytest.raises(NegagentError) as err:
            build_toolbox(["search"], cfg, cache)
        assert str(err.value) == REFUSAL
    (tmp_path / "c.jsonl").write_text("")
    toolbox = build_toolbox(["search"], cfg, ToolCache(tmp_path / "c.jsonl", "replay"))
    assert not toolbox.call("search", "q").ok  # a miss: an error observation, no request, no key needed


def _hotpotqa_data(root: Path) -> Path:
    """A data directory with three NAT-style HotpotQA dev questions, the second and third with
    context (as raw HotpotQA and as gold evidence, spelled a little differently)."""
    (root / "nat" / "hotpotqa").mkdir(parents=True)
    questions = [{"question": f"Question number {n}?", "answer": "x", "type": "bridge", "id": n} for n in range(3)]
    (root / "nat" / "hotpotqa" / "dev_random_500.json").write_text(json.dumps(questions))
    (root / "hotpotqa_context" / "raw").mkdir(parents=True)
    (root / "hotpotqa_context" / "raw" / "dev.json").write_text(json.dumps([
        {"question": "Question number 1 ?", "context": [["One", ["One is a number."]]]},
        {"question": "Question number 0?", "context": []},  # no context: not covered
    ]))
    (root / "hotpotqa_context" / "raw" / "ecm.json").write_text(json.dumps([
        {"question": "question number 2?", "evidence": ["Two | Two is a number."]}]))
    return root


class _Finisher:
    """A stand-in model that answers at once (no search), counting its calls."""

    name = "finisher"

    def __init__(self) -> None:
        self.calls = 0

    def complete(self, chats: list, sampling: object) -> list[str]:
        self.calls += 1
        return ["Thought: done.\nAction: finish[x]"] * len(chats)


def _eval_cfg(data: Path, tmp_path: Path, **tools: object):
    from omegaconf import OmegaConf

    from negagent.evaluation.evaluator import default_config
    from tests.helpers import TINY_MODEL

    cfg = default_config()
    cfg.model = dict(TINY_MODEL)
    cfg.progress = False
    cfg.task = {"name": "hotpotqa", "data_dir": str(data), "max_turns": 2}
    cfg.tools.search.data_dir = str(data)
    cfg.tools.search.cache_dir = str(tmp_path / "index")
    return OmegaConf.merge(cfg, {"tools": tools})


def test_evaluation_refuses_web_search_before_any_work(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SERPER_API_KEY", raising=False)
    from negagent.evaluation import evaluate

    model = _Finisher()
    cfg = _eval_cfg(_hotpotqa_data(tmp_path / "data"), tmp_path, search={"backend": "serper"})
    with pytest.raises(NegagentError) as err:
        evaluate(cfg, tmp_path / "out", backend=model)
    assert str(err.value) == REFUSAL.replace(KEY_ENV, "SERPER_API_KEY")
    assert model.calls == 0 and list((tmp_path / "out").iterdir()) == []


def test_evaluation_with_web_search_keeps_every_question(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Replaying a recording: no key needed, and no corpus coverage applies (the web has every question)."""
    monkeypatch.delenv("SERPER_API_KEY", raising=False)
    from negagent.evaluation import evaluate

    (tmp_path / "recorded.jsonl").write_text("")
    cfg = _eval_cfg(_hotpotqa_data(tmp_path / "data"), tmp_path, search={"backend": "serper"},
                    cache={"mode": "replay", "path": str(tmp_path / "recorded.jsonl")})
    metrics = evaluate(cfg, tmp_path / "out", backend=_Finisher())
    assert metrics["results"]["positive"]["test_sets"]["hotpotqa"]["n_questions"] == 3
    assert "corpus_coverage" not in metrics
    assert metrics["versions"]["tools"]["search"].startswith("serper:")


def test_the_shipped_config_is_the_paper_pipeline(monkeypatch: pytest.MonkeyPatch) -> None:
    """conf/tools/default.yaml's serper section says what the code's defaults say."""
    from omegaconf import OmegaConf

    monkeypatch.setenv("SERPER_API_KEY", KEY)
    search = OmegaConf.to_container(OmegaConf.load(Path(__file__).parents[1] / "conf" / "tools" / "default.yaml").search)
    assert build_search_backend({**search, "backend": "serper"}).identity == build_search_backend(
        {"backend": "serper"}).identity
