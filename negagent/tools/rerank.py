"""Ranking of web-search snippets: the paper's retrieve-then-rerank step after a Google search.

`SnippetRanker.rank(query, passages, k)` orders (title, snippet) passages: a bi-encoder keeps the
`retrieve_k` snippets closest to the query (cosine of sentence-transformers embeddings), a
cross-encoder scores (query, "title | snippet") pairs and the best `k` come first. Either model may
be None (that stage is skipped; with neither, the engine's own order stands).

The paper reranks with DPR's reader (facebook/dpr-reader-multiset-base, relevance logit over
question, title and snippet); a cross-encoder is its maintained counterpart in sentence-transformers
and sees the same inputs. Models load on first use (a replayed run needs none), once, from a hub
name or a local directory.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from negagent.errors import NegagentError

DEFAULT_RETRIEVER = "sentence-transformers/all-mpnet-base-v2"  # the paper's bi-encoder
DEFAULT_RERANKER = "cross-encoder/ms-marco-MiniLM-L-6-v2"
# Bump when what the models see or how scores are combined changes, so recorded searches miss.
RANKING_FORMAT = 1
_HUB_ID = re.compile(r"[\w][\w.-]*(/[\w][\w.-]*)?")  # "name" or "owner/name"; anything else is a path


def model_label(name: str) -> str:
    """The name a model goes by in cache keys: its last path part, so a hub name and a local copy
    in a folder of the same name (`sentence-transformers/all-mpnet-base-v2`, `/models/all-mpnet-base-v2`)
    replay each other's recordings, and no machine's paths reach a cache file."""
    return Path(name).name or name


class SnippetRanker:
    """Retrieve with `retriever` (a bi-encoder), rerank with `reranker` (a cross-encoder).

    `device`: where the models run (None: sentence-transformers' choice, a GPU when there is one).
    `config_key` prefixes the keys named in errors (the models' config keys are
    `<config_key>.retriever` and `<config_key>.reranker`). Thread-safe: the agent loop may search
    from several threads; models are small, so ranking runs one query at a time.
    """

    def __init__(self, retriever: str | None = DEFAULT_RETRIEVER, retrieve_k: int = 5,
                 reranker: str | None = DEFAULT_RERANKER, device: str | None = None,
                 config_key: str = "search.serper") -> None:
        if retrieve_k < 1:
            raise NegagentError(f"{config_key}.retrieve_k must be at least 1, not {retrieve_k}")
        self.retriever, self.retrieve_k, self.reranker = retriever or None, retrieve_k, reranker or None
        self.device, self.config_key = device, config_key
        stages = []
        if self.retriever:
            stages.append(f"retrieve{retrieve_k}-{model_label(self.retriever)}")
        if self.reranker:
            stages.append(f"rerank-{model_label(self.reranker)}")
        self.identity = f"rank{RANKING_FORMAT}:" + ("+".join(stages) or "engine-order")
        self._models: dict[str, Any] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"SnippetRanker(retriever={self.retriever!r}, retrieve_k={self.retrieve_k}, reranker={self.reranker!r})"

    def rank(self, query: str, passages: Sequence[tuple[str, str]], k: int) -> list[int]:
        """Indices of the best `k` (title, snippet) passages, best first; ties keep the engine's order."""
        order = list(range(len(passages)))
        if not order:
            return []
        with self._lock:
            if self.retriever:
                similarity = self._similarities(query, [snippet for _, snippet in passages])
                order = sorted(order, key=lambda i: (-similarity[i], i))[: self.retrieve_k]
            if self.reranker:
                pairs = [(query, f"{passages[i][0]} | {passages[i][1]}" if passages[i][0] else passages[i][1])
                         for i in order]
                scores = self._relevance(pairs)
                position = {i: n for n, i in enumerate(order)}
                order = sorted(order, key=lambda i: (-scores[position[i]], i))
        return order[:k]

    def _similarities(self, query: str, snippets: list[str]) -> list[float]:
        model = self._model("retriever", self.retriever)
        vectors = model.encode([query, *snippets], normalize_embeddings=True, convert_to_numpy=True,
                               show_progress_bar=False)
        return [float(score) for score in vectors[1:] @ vectors[0]]

    def _relevance(self, pairs: list[tuple[str, str]]) -> list[float]:
        import torch

        model = self._model("reranker", self.reranker)
        # Raw logits: a sigmoid would only squash them (ranking is the same) and could tie them.
        scores = model.predict(pairs, activation_fn=torch.nn.Identity(), convert_to_numpy=True,
                               show_progress_bar=False)
        return [float(score) for score in scores]

    def _model(self, role: str, name: str) -> Any:
        if role in self._models:
            return self._models[role]
        key = f"{self.config_key}.{role}"
        try:
            from sentence_transformers import CrossEncoder, SentenceTransformer
        except ImportError:
            raise NegagentError(
                f"{key}={name!r} needs the sentence-transformers package: pip install -r requirements.txt"
            ) from None
        kind = SentenceTransformer if role == "retriever" else CrossEncoder
        advice = f"offline, point {key} at a local directory holding the model (or set it to null to skip that step)"
        try:
            try:  # a local directory, or a copy in the Hugging Face cache: no network at all
                model = kind(name, device=self.device, local_files_only=True)
            except Exception:
                if Path(name).expanduser().exists() or not _HUB_ID.fullmatch(name):
                    raise  # a local model that does not load is broken or missing: say why
                # Unreachable, the hub client retries each file for tens of seconds: find out in a few.
                _probe_hub(key, name, advice)
                model = kind(name, device=self.device)
        except NegagentError:
            raise
        except Exception as exc:  # hub errors, missing or broken files: all one line for the user
            reason = " ".join(f"{type(exc).__name__}: {exc}".split())
            reason = reason if len(reason) <= 200 else reason[:200].rsplit(" ", 1)[0] + " ..."
            raise NegagentError(f"cannot load {key}={name!r} ({reason}); {advice}") from None
        self._models[role] = model
        return model


def _probe_hub(key: str, name: str, advice: str, timeout_s: float = 5.0) -> None:
    """Raise the one-line error at once when the Hugging Face hub cannot be reached."""
    import httpx
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return  # the hub client itself fails at once
    try:
        httpx.head(constants.ENDPOINT, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise NegagentError(
            f"cannot load {key}={name!r}: not on this machine, and the hub ({constants.ENDPOINT}) cannot be "
            f"reached ({type(exc).__name__}); {advice}"
        ) from None
