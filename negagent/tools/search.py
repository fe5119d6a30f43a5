"""The `search[...]` tool: a protocol and two backends.

Every backend returns its top-k passages as one observation, `#1: <passage> #2: <passage> ...`
(the format of the paper's trajectories), each passage on one line and cut to `max_chars`.
`BM25Search` is offline, over the HotpotQA and StrategyQA paragraphs of the data directory (which
hold the context of only some test questions: `corpus_questions` says which). `SerperSearch` is the
paper's pipeline: Google's organic results through serper.dev, their snippets ranked by
`negagent.tools.rerank`. Network failures become "Error: ..." observations.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import bm25s
import httpx

from negagent.errors import NegagentError
from negagent.tools.rerank import DEFAULT_RERANKER, DEFAULT_RETRIEVER, SnippetRanker

NO_RESULTS = "No results found."
SERPER_URL = "https://google.serper.dev/search"
# Bump when build_corpus changes what it extracts, so cached indexes are rebuilt.
CORPUS_FORMAT = 1
_SOURCE_GLOBS = ("hotpotqa_context/*/*.json", "hotpotqa_context/*/*.jsonl", "strategyqa_evidence/*.json")


class SearchBackend(Protocol):
    """A search engine for the agent."""

    # Everything that changes results (engine, version, corpus, k), never a secret: it keys the
    # record/replay cache.
    identity: str

    def search(self, query: str) -> str:
        """The top-k passages for `query` as `#1: ... #2: ...`, NO_RESULTS, or "Error: ..."."""


def format_passages(passages: Sequence[str], max_chars: int) -> str:
    """`#1: <passage> #2: <passage> ...`; whitespace collapsed, each cut to `max_chars` at a word."""
    parts = []
    for rank, passage in enumerate(passages, start=1):
        text = " ".join(passage.split())
        if len(text) > max_chars:
            text = text[:max_chars].rsplit(" ", 1)[0] + " ..."
        parts.append(f"#{rank}: {text}")
    return " ".join(parts) if parts else NO_RESULTS


# --- offline corpus --------------------------------------------------------------------------


def _source_files(data_dir: Path) -> list[Path]:
    return sorted({path for pattern in _SOURCE_GLOBS for path in data_dir.glob(pattern)})


def _load_json_or_jsonl(path: Path) -> Any:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError:  # some files named .json hold one record per line
            pass
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _is_title_corpus(data: Any) -> bool:
    """{title: [sentences]}, as opposed to a record or a pandas column dict."""
    return isinstance(data, dict) and all(
        isinstance(v, list) and all(isinstance(s, str) for s in v) for v in data.values()
    )


def _records(data: Any) -> Iterator[Any]:
    """Records of a file: a list, a pandas column dict ({column: {row: value}}) or one object."""
    if isinstance(data, list):
        yield from data
    elif isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
        rows = next(iter(data.values())).keys()
        for row in rows:
            yield {column: values.get(row) for column, values in data.items()}
    else:
        yield data


def _hotpot_context(context: Any) -> Iterator[tuple[str, list[str]]]:
    if isinstance(context, dict):  # {"title": [...], "sentences": [[...], ...]}
        yield from zip(context["title"], context["sentences"])
    else:  # [[title, [sentences]], ...]
        for title, sentences in context:
            yield title, sentences


def _grouped_evidence(evidence: list[str]) -> Iterator[tuple[str, list[str]]]:
    """'Title | sentence' strings grouped by title in order; an untitled sentence stands alone."""
    groups: dict[str, list[str]] = defaultdict(list)
    for item in evidence:
        title, sep, text = item.partition(" | ")
        if sep:
            groups[title].append(text)
        else:
            yield "", [item]
    yield from groups.items()


def _strategyqa_evidence(record: dict) -> Iterator[tuple[str, list[str]]]:
    """Gold sentences with the titles of the first annotator's evidence ids ("Title-3")."""
    annotations = record.get("evidence") or [[]]
    ids_per_step = [step[0] for step in annotations[0] if step and isinstance(step[0], list)]
    steps = record["golden_sentence"]
    if len(ids_per_step) != len(steps):
        ids_per_step = [[] for _ in steps]
    for ids, sentences in zip(ids_per_step, steps):
        titles = [i.rsplit("-", 1)[0] for i in ids]
        if len(titles) == len(sentences):
            yield from ((title, [s]) for title, s in zip(titles, sentences))
        elif len(set(titles)) == 1:  # several sentences of one paragraph
            yield titles[0], sentences
        else:
            yield from (("", [s]) for s in sentences)


def _record_passages(record: dict) -> Iterator[tuple[str, list[str], bool]]:
    """(title, sentences, is_whole_paragraph) for every passage one question record carries."""
    if record.get("context"):
        for title, sentences in _hotpot_context(record["context"]):
            yield title, sentences, True
    elif record.get("contexts"):
        for context in record["contexts"]:
            yield context["title"], [context["paragraph_text"]], True
    elif record.get("golden_sentence"):
        for title, sentences in _strategyqa_evidence(record):
            yield title, sentences, False
    elif record.get("evidence") and isinstance(record["evidence"][0], str):
        for title, sentences in _grouped_evidence(record["evidence"]):
            yield title, sentences, False


def _file_passages(data: Any) -> Iterator[tuple[str, list[str], bool]]:
    """(title, sentences, is_whole_paragraph) for every passage in one file, whatever its format."""
    if _is_title_corpus(data):
        for title, sentences in data.items():
            yield title, sentences, True
        return
    for record in _records(data):
        if isinstance(record, dict):
            yield from _record_passages(record)


def _key(text: str) -> str:
    """Letters and digits only, lowercased: copies that differ in spacing or punctuation meet."""
    return "".join(ch for ch in text.lower() if ch.isalnum())


def question_key(question: str) -> str:
    """How `corpus_questions` names a question: its letters and digits, lowercased."""
    return _key(question)


def corpus_questions(data_dir: str | Path) -> set[str]:
    """`question_key`s of the questions whose context (paragraphs or gold evidence) the corpus holds.

    The source files are question records carrying their passages; the corpus is their union, so a
    question is covered when a record of it carries any. Records are matched by question text: ids
    differ between the files (official hashes, row numbers, none).
    """
    data_dir = _existing_data_dir(data_dir)
    keys: set[str] = set()
    for path in _source_files(data_dir):
        try:
            data = _load_json_or_jsonl(path)
            if _is_title_corpus(data):  # passages without questions
                continue
            for record in _records(data):
                if not isinstance(record, dict):
                    continue
                question = record.get("question") or record.get("question_text")
                if isinstance(question, str) and next(_record_passages(record), None) is not None:
                    keys.add(_key(question))
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise NegagentError(f"cannot read search corpus file {path} ({type(exc).__name__}: {exc})") from None
    return keys


def build_corpus(data_dir: str | Path) -> list[str]:
    """Unique passages ("Title | text", or the text alone when untitled) from the data directory.

    Whole paragraphs (`hotpotqa_context/*`) come first, deduplicated by their letters and digits;
    evidence sentences (ECM, StrategyQA) follow, minus those already inside a kept paragraph.
    """
    data_dir = _existing_data_dir(data_dir)
    passages: list[str] = []
    seen: set[str] = set()
    by_title: dict[str, list[str]] = defaultdict(list)  # title key -> paragraph text keys
    sentence_keys: set[str] = set()  # for untitled evidence, which has no title to look under
    fragments: list[tuple[str, list[str]]] = []

    def keep(title: str, text: str) -> bool:
        key = _key(f"{title} {text}")
        if key in seen:
            return False
        seen.add(key)
        passages.append(f"{title} | {text}" if title else text)
        return True

    for path in _source_files(data_dir):
        try:
            file_passages = list(_file_passages(_load_json_or_jsonl(path)))
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise NegagentError(f"cannot read search corpus file {path} ({type(exc).__name__}: {exc})") from None
        for title, sentences, whole in file_passages:
            title = title.strip()
            if not whole:
                fragments.append((title, sentences))
                continue
            # Raw HotpotQA sentences keep their own leading spaces, so they join with "".
            text = " ".join("".join(sentences).split())
            if text and keep(title, text):
                by_title[_key(title)].append(_key(text))
                sentence_keys.update(_key(s) for s in sentences)
    for title, sentences in fragments:
        text = " ".join(" ".join(sentences).split())
        if not text:
            continue
        if title:
            inside = any(_key(text) in paragraph for paragraph in by_title.get(_key(title), ()))
        else:
            inside = all(_key(s) in sentence_keys for s in sentences)
        if not inside:
            keep(title, text)
    return passages


def _existing_data_dir(data_dir: str | Path | None) -> Path:
    if data_dir is None:
        raise NegagentError("search.backend=bm25 needs search.data_dir: set it to the data directory")
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise NegagentError(
            f"search data directory {path} does not exist: set search.data_dir to the folder holding "
            "hotpotqa_context/ and strategyqa_evidence/"
        )
    if not _source_files(path):
        raise NegagentError(
            f"no search corpus in {path}: expected hotpotqa_context/*/*.json(l) or strategyqa_evidence/*.json"
        )
    return path


def _sources_fingerprint(data_dir: Path) -> str:
    """Changes when a source file is added, removed or modified (names, sizes, mtimes): cheap."""
    digest = hashlib.sha256(f"{CORPUS_FORMAT} bm25s-{bm25s.__version__}".encode())
    for path in _source_files(data_dir):
        stat = path.stat()
        digest.update(f"\n{path.relative_to(data_dir).as_posix()} {stat.st_size} {stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def _tokenize(texts: list[str]) -> list[list[str]]:
    return bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)


class BM25Search:
    """BM25 (bm25s) over `build_corpus(data_dir)`, its index cached in `cache_dir`.

    The first construction builds the index (tens of seconds on 2 cores); later ones load it from
    `{cache_dir}/bm25-<fingerprint of the source files>/` in well under a second.
    """

    def __init__(self, data_dir: str | Path, cache_dir: str | Path, top_k: int = 3, max_chars: int = 400) -> None:
        data_dir = _existing_data_dir(data_dir)
        self.top_k, self.max_chars = top_k, max_chars
        self.index_dir = Path(cache_dir).expanduser() / f"bm25-{_sources_fingerprint(data_dir)}"
        # Whether this construction built the index (False: it was loaded from the cache).
        self.built = not (self.index_dir / "passages.json").is_file()
        if self.built:
            self._build(data_dir)
        self._retriever = bm25s.BM25.load(str(self.index_dir), mmap=True, show_progress=False)
        meta = json.loads((self.index_dir / "passages.json").read_text(encoding="utf-8"))
        self.passages: list[str] = meta["passages"]
        # Content, not file dates, names the corpus: a copy of the same data replays the same cache.
        self.identity = f"bm25s-{bm25s.__version__}:corpus-{meta['sha256'][:16]}:k{top_k}:chars{max_chars}"

    def _build(self, data_dir: Path) -> None:
        passages = build_corpus(data_dir)
        retriever = bm25s.BM25()
        retriever.index(_tokenize(passages), show_progress=False)
        try:
            self.index_dir.parent.mkdir(parents=True, exist_ok=True)
            # Build beside the final folder and rename it into place, so a killed build or a
            # concurrent one never leaves a half-written index behind.
            tmp = Path(tempfile.mkdtemp(prefix=".bm25-build-", dir=self.index_dir.parent))
        except OSError as exc:
            raise NegagentError(
                f"cannot write the search index under {self.index_dir.parent} ({exc.strerror}): "
                "set search.cache_dir to a writable folder"
            ) from None
        retriever.save(str(tmp), show_progress=False)
        sha = hashlib.sha256("\n".join(passages).encode()).hexdigest()
        (tmp / "passages.json").write_text(json.dumps({"sha256": sha, "passages": passages}), encoding="utf-8")
        try:
            tmp.rename(self.index_dir)
        except OSError:  # another process finished the same index first
            shutil.rmtree(tmp, ignore_errors=True)

    def search(self, query: str) -> str:
        vocab = self._retriever.vocab_dict
        tokens = [token for token in _tokenize([query])[0] if token in vocab]
        if not tokens:
            return NO_RESULTS
        scores = self._retriever.get_scores(tokens)
        k = min(self.top_k, len(scores))
        best = scores.argpartition(-k)[-k:]
        ranked = sorted((i for i in best if scores[i] > 0), key=lambda i: (-scores[i], i))
        return format_passages([self.passages[i] for i in ranked], self.max_chars)


# --- online search -----------------------------------------------------------------------------


def missing_key_message(api_key_env: str) -> str:
    """The one line that stops a serper run with neither an API key nor a recording to replay."""
    return (
        f"tools.search.backend=serper needs a serper.dev API key in the environment variable {api_key_env}: "
        "set it, or replay a recorded run (tools.cache.mode=replay tools.cache.path=<its tool_cache.jsonl>), "
        "or choose tools.search.backend=bm25 for an offline search that deviates from the paper"
    )


class SerperSearch:
    """The paper's web search: Google's top `num_results` organic results through serper.dev, their
    snippets ranked by `ranker` (bi-encoder keeps 5, cross-encoder orders them), the best `top_k` shown.

    The API key is read from the environment variable `api_key_env` only and lives in the HTTP
    client's headers, which neither repr, identity nor errors show. `replay_only`: a run whose
    observations all come from a recording may go without a key (a live call is then an error).
    As in the paper, Google's answer box is not shown; unlike it, a result without a snippet is
    dropped rather than ranked as an empty passage.
    """

    def __init__(
        self,
        top_k: int = 3,
        max_chars: int = 400,
        url: str = SERPER_URL,
        api_key_env: str = "SERPER_API_KEY",
        timeout_s: float = 10.0,
        num_results: int = 10,
        ranker: SnippetRanker | None = None,
        replay_only: bool = False,
    ) -> None:
        key = os.environ.get(api_key_env)
        if not key and not replay_only:
            raise NegagentError(missing_key_message(api_key_env))
        self.top_k, self.max_chars, self.url, self.api_key_env = top_k, max_chars, url, api_key_env
        self.timeout_s, self.num_results = timeout_s, num_results
        self.ranker = ranker if ranker is not None else SnippetRanker()
        # Everything that changes what a query returns, never the key: it keys the record/replay cache.
        self.identity = f"serper:{url}:num{num_results}:{self.ranker.identity}:k{top_k}:chars{max_chars}"
        self._client = httpx.Client(timeout=timeout_s, headers={"X-API-KEY": key}) if key else None

    def __repr__(self) -> str:
        return (f"SerperSearch(url={self.url!r}, top_k={self.top_k}, api_key_env={self.api_key_env!r}, "
                f"ranker={self.ranker!r})")

    def search(self, query: str) -> str:
        if self._client is None:
            return f"Error: no serper.dev API key in {self.api_key_env}, and no recorded observation for this query"
        try:
            response = self._client.post(self.url, json={"q": query, "num": self.num_results})
            response.raise_for_status()
            data = response.json()
        except httpx.TimeoutException:
            return f"Error: search timed out after {self.timeout_s:g} s"
        except httpx.HTTPStatusError as exc:
            status = exc.response.status_code
            hint = f"; check the key in {self.api_key_env}" if status in (401, 403) else ""
            return f"Error: search service answered HTTP {status}{hint}"
        except httpx.HTTPError as exc:  # its message names the URL at most, never the headers
            return f"Error: search request failed ({type(exc).__name__})"
        except ValueError:
            return "Error: search service answered with invalid JSON"
        results = _organic_results(data)[: self.num_results]
        best = self.ranker.rank(query, results, self.top_k)
        return format_passages([results[i][1] for i in best], self.max_chars)


def _organic_results(data: Any) -> list[tuple[str, str]]:
    """(title, snippet) of the organic results in Google's order; those without a snippet are dropped."""
    if not isinstance(data, dict):
        return []
    results = []
    for result in data.get("organic") or []:
        if isinstance(result, dict) and isinstance(result.get("snippet"), str) and result["snippet"].strip():
            title = result.get("title")
            results.append((title.strip() if isinstance(title, str) else "", result["snippet"]))
    return results


def _at_least_one(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise NegagentError(f"{key} must be at least 1, not {value!r}")
    return value


def build_search_backend(cfg: Mapping[str, Any], *, replay_only: bool = False) -> SearchBackend:
    """The backend named by `cfg["backend"]` (bm25 | serper), from the `search` config group.

    `replay_only`: every observation will come from a recording (tools.cache.mode=replay), so
    serper needs no API key.
    """
    backend = cfg.get("backend", "bm25")
    common = {"top_k": int(cfg.get("top_k", 3)), "max_chars": int(cfg.get("max_chars", 400))}
    for name, value in common.items():
        if value < 1:
            raise NegagentError(f"search.{name} must be at least 1, not {value}")
    if backend == "bm25":
        return BM25Search(cfg.get("data_dir"), cfg.get("cache_dir") or "~/.cache/negagent", **common)
    if backend == "serper":
        serper = cfg.get("serper") or {}
        retrieve_k = _at_least_one(serper.get("retrieve_k", 5), "search.serper.retrieve_k")
        retriever = serper.get("retriever", DEFAULT_RETRIEVER)
        if retriever and retrieve_k < common["top_k"]:
            raise NegagentError(
                f"search.serper.retrieve_k={retrieve_k} keeps fewer snippets than search.top_k={common['top_k']} shows"
            )
        ranker = SnippetRanker(retriever, retrieve_k, serper.get("reranker", DEFAULT_RERANKER), serper.get("device"))
        return SerperSearch(
            url=serper.get("url", SERPER_URL),
            api_key_env=serper.get("api_key_env", "SERPER_API_KEY"),
            timeout_s=float(serper.get("timeout_s", 10.0)),
            num_results=_at_least_one(serper.get("num_results", 10), "search.serper.num_results"),
            ranker=ranker,
            replay_only=replay_only,
            **common,
        )
    raise NegagentError(f"unknown search.backend {backend!r}: use bm25 or serper")
