"""Offline search: the corpus formats, BM25 on the real data, the questions whose context the corpus
holds and the HotpotQA evaluation on those (web search: test_serper.py)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import bm25s
import pytest

from negagent.errors import NegagentError
from negagent.tools import BM25Search, ToolCache, build_corpus, build_toolbox
from negagent.tools.search import NO_RESULTS, build_search_backend, corpus_questions, format_passages, question_key

OBSERVATION = re.compile(r"^#1: (?P<p1>.+) #2: (?P<p2>.+) #3: (?P<p3>.+)$")


def test_format_passages() -> None:
    assert format_passages(["a\n b", "c"], 400) == "#1: a b #2: c"
    assert format_passages([], 400) == NO_RESULTS
    # Cut at the last whole word within 30 characters ("word word word word word word " is 30).
    assert format_passages(["word " * 200], 30) == "#1: word word word word word word ..."
    assert format_passages(["abcde fghij"], 11) == "#1: abcde fghij"  # exactly max_chars: not cut
    assert format_passages(["abcde fghij"], 10) == "#1: abcde ..."


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
    """Whole paragraphs first (files in path order), then the evidence sentences not inside one."""
    _write_mini_data(tmp_path)
    assert build_corpus(tmp_path) == [
        "Theta | Theta is eighth.",
        "Eta | Eta is seventh.",
        "Delta | Delta is a river mouth.",
        "Alpha | Alpha is a letter. It comes first.",
        "Beta | Beta follows alpha.",
        "Gamma | Gamma is third. Greek.",
        "Epsilon | Epsilon is fifth. Small e.",
        "Zeta is sixth.",
        "Kappa | Kappa is tenth.",
        "Lambda | Lambda is eleventh. Lambda is Greek.",
    ]


def test_build_corpus_odd_records(tmp_path: Path) -> None:
    """A file holding one record, non-record items, empty evidence, " | " inside a sentence,
    hyphenated StrategyQA titles, and evidence ids that do not match the sentences."""
    hotpot = tmp_path / "hotpotqa_context"
    for folder in ("single", "mixed", "ecm"):
        (hotpot / folder).mkdir(parents=True)
    (tmp_path / "strategyqa_evidence").mkdir()
    (hotpot / "single" / "one.json").write_text(json.dumps({"question": "q", "context": [["Nu", ["Nu is 13th."]]]}))
    (hotpot / "mixed" / "x.json").write_text(json.dumps([5, "text", {"context": [["Xi", ["Xi is 14th."]]]}]))
    ecm = [{"evidence": []}, {"evidence": ["Omicron | It reads O | o.", "Omicron | Round."]}]
    (hotpot / "ecm" / "test.json").write_text(json.dumps(ecm))
    strategyqa = [
        {"evidence": [[[["Spider-Man-3"]]]], "golden_sentence": [["Spider-Man is a hero."]]},
        # Two steps of sentences but one step of ids: the sentences stand alone, untitled.
        {"evidence": [[[["Pi-1"]]]], "golden_sentence": [["Pi is a number."], ["Rho follows pi."]]},
    ]
    (tmp_path / "strategyqa_evidence" / "train.json").write_text(json.dumps(strategyqa))
    assert build_corpus(tmp_path) == [
        "Xi | Xi is 14th.",
        "Nu | Nu is 13th.",
        "Omicron | It reads O | o. Round.",
        "Spider-Man | Spider-Man is a hero.",
        "Pi is a number.",
        "Rho follows pi.",
    ]


def test_bm25_on_a_small_corpus_caches_and_rebuilds_on_change(tmp_path: Path) -> None:
    data, cache = tmp_path / "data", tmp_path / "cache" / "deeper"  # made with its parents
    _write_mini_data(data)
    search = BM25Search(data, cache)
    assert search.built and (search.top_k, search.max_chars) == (3, 400)
    assert re.fullmatch(r"bm25-[0-9a-f]{16}", search.index_dir.name) and search.index_dir.parent == cache
    # The corpus is named by its content: the sha256 of the passages, one a line.
    corpus = hashlib.sha256("\n".join(build_corpus(data)).encode()).hexdigest()[:16]
    assert search.identity == f"bm25s-{bm25s.__version__}:corpus-{corpus}:k3:chars400"
    # Only passages sharing a word with the query are returned, best first.
    assert search.search("river mouth") == "#1: Delta | Delta is a river mouth."
    assert search.search("qwxyz") == NO_RESULTS
    assert search.search("it is a") == NO_RESULTS  # stop words only: nothing to look for
    assert [p.name for p in cache.glob("bm25-*")] == [search.index_dir.name]
    again = BM25Search(data, cache)
    assert not again.built and again.identity == search.identity
    (data / "hotpotqa_context" / "corpus" / "corpus.json").write_text(json.dumps({"Mu": ["Mu is twelfth."]}))
    changed = BM25Search(data, cache)
    assert changed.built and changed.index_dir != search.index_dir
    assert sorted(p.name for p in cache.glob("bm25-*")) == sorted([search.index_dir.name, changed.index_dir.name])
    assert changed.identity != search.identity
    assert changed.search("twelfth") == "#1: Mu | Mu is twelfth."


def test_a_build_that_loses_the_race_leaves_nothing_behind(tmp_path: Path) -> None:
    """Two processes building the same index: the second finds the folder taken when it renames
    its own into place, removes its copy and uses the first one's."""
    _write_mini_data(tmp_path / "data")
    search = BM25Search(tmp_path / "data", tmp_path / "cache")
    before = {p.name: p.stat().st_mtime_ns for p in search.index_dir.iterdir()}
    search._build(tmp_path / "data")  # the late builder
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [search.index_dir.name]
    assert {p.name: p.stat().st_mtime_ns for p in search.index_dir.iterdir()} == before


@pytest.mark.parametrize("key", ["top_k", "max_chars"])
def test_build_search_backend_checks_k_and_length(key: str) -> None:
    with pytest.raises(NegagentError) as err:
        build_search_backend({"backend": "serper", key: 0})
    assert str(err.value) == f"search.{key} must be at least 1, not 0"


def test_build_search_backend_bm25_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """bm25 is the default backend, k=3 and 400 characters, its index in ~/.cache/negagent."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    _write_mini_data(tmp_path / "data")
    backend = build_search_backend({"data_dir": str(tmp_path / "data")})
    assert isinstance(backend, BM25Search) and (backend.top_k, backend.max_chars) == (3, 400)
    assert backend.index_dir.parent == tmp_path / "home" / ".cache" / "negagent"
    custom = build_search_backend({"data_dir": str(tmp_path / "data"), "cache_dir": str(tmp_path / "c"), "top_k": 1})
    assert (custom.top_k, custom.index_dir.parent) == (1, tmp_path / "c")
    with pytest.raises(NegagentError) as err:
        build_search_backend({"backend": "bing"})
    assert str(err.value) == "unknown search.backend 'bing': use bm25 or serper"


def test_bm25_needs_a_writable_cache(tmp_path: Path) -> None:
    _write_mini_data(tmp_path / "data")
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(NegagentError) as err:
        BM25Search(tmp_path / "data", tmp_path / "file" / "cache")
    assert str(err.value) == (f"cannot write the search index under {tmp_path / 'file' / 'cache'} (Not a directory): "
                              "set search.cache_dir to a writable folder")


def test_bm25_needs_a_data_dir(tmp_path: Path) -> None:
    with pytest.raises(NegagentError) as err:
        BM25Search(None, tmp_path)
    assert str(err.value) == "search.backend=bm25 needs search.data_dir: set it to the data directory"


@pytest.mark.parametrize(
    "broken, data, expected",
    [
        (None, "nowhere", "search data directory {dir}/nowhere does not exist: set search.data_dir to the folder "
                          "holding hotpotqa_context/ and strategyqa_evidence/"),
        (None, ".", "no search corpus in {dir}: expected hotpotqa_context/*/*.json(l) or strategyqa_evidence/*.json"),
        ("[not json", ".", "cannot read search corpus file {dir}/hotpotqa_context/x/broken.json (JSONDecodeError: "
                           "Expecting value: line 1 column 2 (char 1))"),
    ],
)
def test_bm25_reports_missing_empty_or_broken_data(
    tmp_path: Path, broken: str | None, data: str, expected: str
) -> None:
    if broken is not None:
        path = tmp_path / "hotpotqa_context" / "x" / "broken.json"
        path.parent.mkdir(parents=True)
        path.write_text(broken)
    with pytest.raises(NegagentError) as err:
        BM25Search(tmp_path / data, tmp_path / "cache")
    assert str(err.value) == expected.format(dir=tmp_path)
    assert not (tmp_path / "cache").exists()  # nothing half-built is left behind


# --- BM25 on the real data -------------------------------------------------------------------


@pytest.fixture(scope="session")
def index_cache() -> Path:
    """The user's cache, as the tools use it (NEGAGENT_CACHE, else ~/.cache/negagent): the real
    corpus's index takes 30-60 s to build on 2 cores, so it is built once per data version, not
    once per session. Building and rebuilding are tested on the small corpus above."""
    return Path(os.environ.get("NEGAGENT_CACHE") or "~/.cache/negagent").expanduser()


@pytest.fixture(scope="session")
def bm25(data_dir: Path, index_cache: Path) -> BM25Search:
    return BM25Search(data_dir, index_cache)


def test_real_corpus_size(data_dir: Path, bm25: BM25Search) -> None:
    """Every paragraph of the data directory, each once (titled ones are HotpotQA's)."""
    assert (len(bm25.passages), sum(" | " in p for p in bm25.passages)) == (21_790, 20_466)
    assert len(set(bm25.passages)) == len(bm25.passages)


def test_second_construction_loads_the_cached_index(data_dir: Path, index_cache: Path, bm25: BM25Search) -> None:
    """A second construction loads the index the first one built: nothing is rebuilt or rewritten."""
    files = {p.name: p.stat() for p in bm25.index_dir.iterdir()}
    cache_entries = sorted(p.name for p in index_cache.iterdir())
    again = BM25Search(data_dir, index_cache)
    assert not again.built and again.index_dir == bm25.index_dir
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in again.index_dir.iterdir()} == {
        name: (stat.st_ino, stat.st_mtime_ns) for name, stat in files.items()}
    assert sorted(p.name for p in index_cache.iterdir()) == cache_entries  # no (temporary) build folder
    assert again.identity == bm25.identity and again.passages == bm25.passages


def test_bm25_observation_format(bm25: BM25Search) -> None:
    observation = bm25.search("Kiss and Tell Corliss Archer")
    match = OBSERVATION.match(observation)
    assert match, observation
    assert [p.split(" | ")[0] for p in match.groups()] == [
        "Kiss and Tell (1945 film)", "A Kiss for Corliss", "Meet Corliss Archer (TV series)"]
    # Passages of at most 400 characters come whole; a longer one is cut at a word, marked " ...".
    assert match["p1"] in bm25.passages and match["p3"] in bm25.passages
    assert len(match["p2"]) == 397 and match["p2"].endswith(" in the title sequence. The film was ...")
    assert bm25.search("qqqzzzxxx") == NO_RESULTS


@pytest.mark.parametrize(
    "question, titles",
    [
        (
            "What government position was held by the woman who portrayed Corliss Archer in the film Kiss and Tell?",
            ["Kiss and Tell (1945 film)", "A Kiss for Corliss", "Meet Corliss Archer (TV series)"],
        ),
        (
            "What is the name of the fight song of the university whose main campus is in Lawrence, Kansas and "
            "whose branch campuses are in the Kansas City metropolitan area?",
            ["University of Kansas", "University of Missouri–Kansas City", "Wichita, Kansas"],
        ),
        ("VIVA Media AG changed it's name in 2004. What does their new acronym stand for?",
         ["VIVA Media", "VIVA Poland", "WWE One Night Stand"]),
    ],
)
def test_bm25_finds_the_gold_paragraph_first(bm25: BM25Search, question: str, titles: list[str]) -> None:
    """The gold paragraph (the first title) ranks first; the ranking is deterministic."""
    assert re.findall(r"#\d: ([^|]+?) \| ", bm25.search(question)) == titles


def test_bm25_recall_on_real_questions(data_dir: Path, bm25: BM25Search) -> None:
    """A gold supporting title is among the top 3 for most HotpotQA questions (88 of the first 100)."""
    lines = (data_dir / "hotpotqa_context" / "amor" / "test.json").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines[:100]]
    hits = 0
    for row in rows:
        observation = bm25.search(row["question"])
        hits += any(f": {title} | " in observation for title, _ in row["supporting_facts"])
    assert hits == 88


def test_toolbox_search_from_config_replays(
    bm25: BM25Search, data_dir: Path, index_cache: Path, tmp_path: Path
) -> None:
    """The config-built toolbox finds the index of the `bm25` fixture and searches it with its own k."""
    cfg = {"search": {"backend": "bm25", "data_dir": str(data_dir), "cache_dir": str(index_cache), "top_k": 2}}
    path = tmp_path / "tools.jsonl"
    live = build_toolbox(["search"], cfg, ToolCache(path, "record")).call("search", "Shirley Temple")
    titles = re.findall(r"#\d: ([^|]+?) \| ", live.observation)
    assert live.ok and titles == ["Shirley Temple", "Kiss and Tell (1945 film)"]
    replayed = build_toolbox(["search"], cfg, ToolCache(path, "replay")).call("search", "Shirley Temple")
    assert replayed == live


# --- which questions the corpus holds the context of --------------------------------------------


def test_corpus_questions_are_those_whose_records_carry_passages(tmp_path: Path) -> None:
    """Every record format that adds passages names its question; records without passages and
    title corpora (passages without questions) name none; spelling differences meet."""
    hotpot = tmp_path / "hotpotqa_context"
    for folder in ("raw", "ircot", "ecm", "corpus"):
        (hotpot / folder).mkdir(parents=True)
    (tmp_path / "strategyqa_evidence").mkdir()
    (hotpot / "raw" / "dev.json").write_text(json.dumps([
        {"question": "Who is Alpha?", "context": [["Alpha", ["Alpha is a letter."]]]},
        {"question": "Who is nobody?", "context": []},
        "not a record",
    ]))
    (hotpot / "ircot" / "dev.jsonl").write_text(json.dumps(
        {"question_text": "Where is Delta?", "contexts": [{"title": "Delta", "paragraph_text": "A river mouth."}]}) + "\n")
    (hotpot / "ecm" / "test.json").write_text(json.dumps([
        {"question": "What is Epsilon?", "evidence": ["Epsilon | Epsilon is fifth."]}, {"question": "Empty?", "evidence": []}]))
    (hotpot / "corpus" / "corpus.json").write_text(json.dumps({"Eta": ["Eta is seventh."]}))
    (tmp_path / "strategyqa_evidence" / "dev.json").write_text(json.dumps([
        {"question": "Is Kappa Greek?", "evidence": [[[["Kappa-1"]]]], "golden_sentence": [["Kappa is Greek."]]}]))
    assert corpus_questions(tmp_path) == {
        question_key(q) for q in ("who is alpha ?", "Where is Delta?", "What is Epsilon?", "Is Kappa Greek?")}
    assert question_key(" Who is  Alpha? ") == question_key("who is alpha") == "whoisalpha"


def test_corpus_questions_reports_a_broken_file(tmp_path: Path) -> None:
    path = tmp_path / "hotpotqa_context" / "x" / "broken.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps([{"question": "q", "contexts": [{"title": "no text"}]}]))
    with pytest.raises(NegagentError) as err:
        corpus_questions(tmp_path)
    assert str(err.value) == f"cannot read search corpus file {path} (KeyError: 'paragraph_text')"


def test_the_real_corpus_holds_the_context_of_137_nat_dev_questions(data_dir: Path) -> None:
    """Matched by question text (the files' ids differ): 80 with paragraphs, 57 with gold evidence only."""
    from negagent.tasks import get_task

    questions = get_task({"name": "hotpotqa", "data_dir": str(data_dir)}).test_sets()["hotpotqa"]
    covered = corpus_questions(data_dir)
    assert (len(questions), sum(question_key(q.question) in covered for q in questions)) == (500, 137)


class _Finisher:
    """A stand-in model that answers every question at once."""

    name = "finisher"

    def complete(self, chats: list, sampling: object) -> list[str]:
        return ["Thought: done.\nAction: finish[x]"] * len(chats)


@pytest.mark.parametrize("limit, evaluated", [(None, ["1", "2"]), (1, ["1"])])
def test_offline_hotpotqa_evaluates_the_questions_with_context(
    tmp_path: Path, capsys: pytest.CaptureFixture, limit: int | None, evaluated: list[str]
) -> None:
    """With bm25, HotpotQA runs the questions whose context the corpus holds (limit_test counts
    among those), says so in one line and in metrics.json."""
    from omegaconf import OmegaConf

    from negagent.evaluation import evaluate
    from negagent.evaluation.evaluator import default_config
    from tests.helpers import TINY_MODEL

    data = tmp_path / "data"
    (data / "nat" / "hotpotqa").mkdir(parents=True)
    questions = [{"question": f"Question number {n}?", "answer": "x", "type": "bridge", "id": n} for n in range(4)]
    (data / "nat" / "hotpotqa" / "dev_random_500.json").write_text(json.dumps(questions))
    (data / "hotpotqa_context" / "raw").mkdir(parents=True)
    (data / "hotpotqa_context" / "raw" / "dev.json").write_text(json.dumps([
        {"question": "question number 2 ?", "context": [["Two", ["Two is a number."]]]},  # spelled differently
        {"question": "Question number 1?", "context": [["One", ["One is a number."]]]},
        {"question": "Question number 9?", "context": [["Nine", ["Nine is not asked."]]]},
    ]))
    cfg = OmegaConf.merge(default_config(), {
        "model": TINY_MODEL, "progress": False,
        "task": {"name": "hotpotqa", "data_dir": str(data), "limit_test": limit, "max_turns": 2},
        "tools": {"search": {"data_dir": str(data), "cache_dir": str(tmp_path / "index")}}})
    metrics = evaluate(cfg, tmp_path / "out", backend=_Finisher())
    assert metrics["corpus_coverage"] == {"questions": 4, "with_context": 2, "evaluated": len(evaluated)}
    episodes = [json.loads(line) for line in (tmp_path / "out" / "trajectories.jsonl").read_text().splitlines()]
    assert [e["provenance"]["question_id"] for e in episodes] == evaluated
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["corpus_coverage"] == metrics["corpus_coverage"]
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: offline search")]
    assert notes == [f"note: offline search (tools.search.backend=bm25) holds the context of 2 of 4 hotpotqa test "
                     f"questions; evaluating {len(evaluated)} of those only (metrics.json: corpus_coverage)"]


def test_offline_hotpotqa_without_any_context_is_refused(tmp_path: Path) -> None:
    from negagent.evaluation import evaluate
    from negagent.evaluation.evaluator import default_config
    from tests.helpers import TINY_MODEL

    data = tmp_path / "data"
    (data / "nat" / "hotpotqa").mkdir(parents=True)
    (data / "nat" / "hotpotqa" / "dev_random_500.json").write_text(json.dumps(
        [{"question": "Unseen?", "answer": "x", "type": "bridge", "id": 0}]))
    (data / "hotpotqa_context" / "raw").mkdir(parents=True)
    (data / "hotpotqa_context" / "raw" / "dev.json").write_text(json.dumps(
        [{"question": "Other?", "context": [["A", ["A."]]]}]))
    cfg = default_config()
    cfg.model, cfg.task = dict(TINY_MODEL), {"name": "hotpotqa", "data_dir": str(data)}
    cfg.tools.search.data_dir = str(data)
    with pytest.raises(NegagentError) as err:
        evaluate(cfg, tmp_path / "out", backend=_Finisher())
    assert str(err.value) == (f"no hotpotqa test question has its context in the search corpus of {data}: add "
                              "hotpotqa_context/ files there, or search the web (tools.search.backend=serper)")
