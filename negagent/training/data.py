"""Training data: trajectories file -> tagged, rendered samples and the manifest that describes them.

The manifest (`manifest.json` in a run directory) is how a reader checks what a model was trained
on: positives and negatives per tag, trained-token counts and shares, truncations, train/test
overlap, and a hash of the trajectory file.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from negagent import tagging
from negagent.errors import NegagentError
from negagent.render import ChatOpening, RenderedSample, Renderer, build_chat, chat_opening
from negagent.trajectory import Trajectory, load_trajectories


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _normalize_question(text: str) -> str:
    return re.sub(r"\W+", " ", text.lower()).strip()


@dataclass
class Overlap:
    """Train trajectories whose question also appears in a test set (by normalized text)."""

    questions: int  # distinct test questions also in train
    test_size: int
    trajectories: int  # train trajectories on those questions


def find_overlap(trajectories: Sequence[Trajectory], test_questions: Iterable[str]) -> tuple[Overlap, set[str]]:
    """Count train/test overlap; returns the counts and the normalized overlapping questions."""
    test = {_normalize_question(q) for q in test_questions}
    train = {_normalize_question(t.question) for t in trajectories}
    shared = test & train
    n_traj = sum(1 for t in trajectories if _normalize_question(t.question) in shared)
    return Overlap(len(shared), len(test), n_traj), shared


def drop_overlap(trajectories: Sequence[Trajectory], shared: set[str]) -> list[Trajectory]:
    """The trajectories whose question is not among `shared` (from `find_overlap`)."""
    return [t for t in trajectories if _normalize_question(t.question) not in shared]


def render_samples(
    tagged: list[tagging.TaggedSample],
    renderer: Renderer,
    opening: ChatOpening | str,
) -> list[RenderedSample]:
    """Render tagged samples for training, each chat opened by `opening` (a ChatOpening, or the task's
    instructions as the system turn); errors name the sample."""
    out = []
    for sample in tagged:
        traj = sample.trajectory
        chat = build_chat(opening, traj.question, traj.messages, tag=sample.tag, placement=sample.placement)
        out.append(renderer.training(chat, traj.id, positive=traj.reward))
    return out


def sample_stats(samples: list[RenderedSample]) -> dict[str, Any]:
    """Counts and trained-token shares for positives and negatives separately."""
    stats: dict[str, Any] = {}
    for name, group in (("positive", [s for s in samples if s.positive]), ("negative", [s for s in samples if not s.positive])):
        tokens = sum(len(s.input_ids) for s in group)
        trained = sum(s.n_trained for s in group)
        stats[name] = {
            "samples": len(group),
            "tokens": tokens,
            "trained_tokens": trained,
            "trained_share": round(trained / tokens, 4) if tokens else 0.0,
            "truncated": sum(s.truncated for s in group),
        }
    return stats


def prepare(
    cfg: Mapping[str, Any], task, renderer: Renderer
) -> tuple[list[RenderedSample], dict[str, Any]]:
    """Load `cfg.data.trajectories`, check overlap with the task's test sets, tag and render.

    Returns the rendered samples and the manifest dict.
    """
    path = cfg["data"]["trajectories"]
    if not path:
        raise NegagentError("data.trajectories is not set: pass data.trajectories=<trajectories.jsonl>")
    trajectories, load_stats = load_trajectories(
        path, skip_bad=bool(cfg["data"].get("skip_bad_lines")), task=task.name
    )
    test_questions = [q.question for qs in task.test_sets().values() for q in qs]
    overlap, shared = find_overlap(trajectories, test_questions)
    if overlap.questions and cfg["data"].get("drop_test_overlap"):
        trajectories = drop_overlap(trajectories, shared)
        if not trajectories:
            raise NegagentError(f"{path}: every trajectory's question is in a test set; nothing left to train on")
    tag_cfg = cfg["tagging"]
    chosen = tagging.tag_samples(trajectories, tag_cfg)
    samples = render_samples(chosen, renderer, chat_opening(cfg["render"], task.instructions))
    manifest = {
        "trajectories": str(path),
        "trajectories_sha256": file_sha256(path),
        "task": task.name,
        "strategy": tag_cfg["strategy"],
        "inference_tag": tagging.inference_tag(tag_cfg),
        "available": {"positive": sum(t.reward for t in trajectories), "negative": sum(not t.reward for t in trajectories)},
        "skipped_bad_lines": len(load_stats.skipped),
        "torn_tail": load_stats.torn_tail,
        "tags": tagging.tag_counts(chosen),
        "samples": sample_stats(samples),
        "test_overlap": {
            "questions": overlap.questions,
            "test_questions": overlap.test_size,
            "train_trajectories": overlap.trajectories,
            "dropped": bool(cfg["data"].get("drop_test_overlap")) and overlap.questions > 0,
        },
    }
    return samples, manifest
