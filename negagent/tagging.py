"""Tagging strategies: which trajectories are trained on, and what tag each one's prompt carries.

Strategies (`tagging.strategy`):
- `prefix` / `suffix`: NAT. Positives carry `tagging.positive`, negatives `tagging.negative`,
  before or after the question.
- `graded`: NAT with fine-grained tags by score bucket (the paper's HotpotQA F1 classes): a score
  of 0 gets `grade_tags[0]`, a score of 1 the last tag, scores in between the tag of their bucket
  between `grade_cuts`.
- `none`: NUT, negatives mixed in with no tag.
- `positive_only`: negatives dropped.
At inference the prompt always carries the positive tag (the top grade), or none for `none` and
`positive_only`; `tag_modes` gives the tags an evaluation can switch between (success, failure,
none), so every rule about which tag goes where lives here.

Mixing is seeded and nested: each pool is shuffled once with the seed and the first `pos_num` /
`neg_num` are taken, so a smaller draw is always inside a larger one.
"""

from __future__ import annotations

import bisect
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from negagent.errors import NegagentError
from negagent.trajectory import Trajectory

STRATEGIES = ("prefix", "suffix", "graded", "none", "positive_only")
TAG_MODES = ("positive", "negative", "none")
# Which episodes of a question are kept: every one, or one positive (and every negative), as the
# paper's protocol does. `protocol.keep` applies it while collecting, `tagging.keep` when training
# from a file that holds every episode; both take these names.
KEEP_RULES = ("all", "one_positive")  # evaluate under the success tag, the failure tag, or none


def _strategy(cfg: Mapping[str, Any]) -> str:
    strategy = cfg["strategy"]
    if strategy not in STRATEGIES:
        raise NegagentError(f"unknown tagging strategy {strategy!r}; choose one of {STRATEGIES}")
    return strategy


def placement(cfg: Mapping[str, Any]) -> str:
    """Where the tag goes: 'prefix' or 'suffix' (graded tags use `tagging.placement`)."""
    strategy = _strategy(cfg)
    return strategy if strategy in ("prefix", "suffix") else str(cfg.get("placement", "prefix"))


def tag_for(traj: Trajectory, cfg: Mapping[str, Any]) -> str | None:
    """The training tag of one trajectory under the strategy."""
    strategy = _strategy(cfg)
    if strategy in ("none", "positive_only"):
        return None
    if strategy == "graded":
        tags, cuts = list(cfg["grade_tags"]), list(cfg["grade_cuts"])
        if len(tags) != len(cuts) + 3:
            raise NegagentError("tagging.grade_tags needs len(grade_cuts) + 3 tags (zero, buckets, full)")
        if traj.reward or traj.score >= 1.0:
            return tags[-1]
        if traj.score <= 0.0:
            return tags[0]
        return tags[1 + bisect.bisect_right(cuts, traj.score)]
    return cfg["positive"] if traj.reward else cfg["negative"]


def inference_tag(cfg: Mapping[str, Any]) -> str | None:
    """The tag used when asking the trained model for a successful trajectory."""
    strategy = _strategy(cfg)
    if strategy in ("none", "positive_only"):
        return None
    if strategy == "graded":
        return list(cfg["grade_tags"])[-1]
    return cfg["positive"]


def failure_tag(cfg: Mapping[str, Any]) -> str | None:
    """The tag the strategy trained failures with (the lowest grade for graded tags); None untagged."""
    strategy = _strategy(cfg)
    if strategy == "graded":
        return list(cfg["grade_tags"])[0]
    if strategy in ("prefix", "suffix"):
        return cfg.get("negative")
    return None


def tag_modes(mode: str, cfg: Mapping[str, Any]) -> dict[str, str | None]:
    """The tags to evaluate under: {"positive": tag, "negative": tag, "none": None} as `mode` asks
    (`mode` is one of TAG_MODES or "all").

    "positive" is the tag the strategy asks for success with (the inference tag), "negative" the
    one it trained failures with. Untagged strategies (NUT, positive-only) have only "none"; `all`
    then evaluates that one.
    """
    if mode not in (*TAG_MODES, "all"):
        raise NegagentError(f"tag_mode={mode!r}: choose one of: {', '.join((*TAG_MODES, 'all'))}")
    positive = inference_tag(cfg)
    if positive is None:  # an untagged strategy: there is nothing to switch on or off
        if mode == "negative":
            raise NegagentError(f"tag_mode=negative: tagging strategy '{cfg['strategy']}' trains without tags")
        return {"none": None} if mode in ("all", "none") else {"positive": None}
    available = {"positive": positive, "negative": failure_tag(cfg), "none": None}
    return dict(available) if mode == "all" else {mode: available[mode]}


def select(trajectories: Sequence[Trajectory], cfg: Mapping[str, Any]) -> list[Trajectory]:
    """The trajectories the strategy trains on, after seeded nested mixing."""
    strategy = _strategy(cfg)
    rng_pos, rng_neg = random.Random(f"{cfg.get('seed', 0)}-pos"), random.Random(f"{cfg.get('seed', 0)}-neg")
    positives = [t for t in trajectories if t.reward]
    negatives = [t for t in trajectories if not t.reward]
    rng_pos.shuffle(positives)
    rng_neg.shuffle(negatives)
    keep = cfg.get("keep") or "all"
    if keep not in KEEP_RULES:
        raise NegagentError(f"tagging.keep={keep!r}: choose one of: {', '.join(KEEP_RULES)}")
    if keep == "one_positive":
        seen: set[str] = set()
        positives = [t for t in positives if not (t.question_id in seen or seen.add(t.question_id))]
    pos_num, neg_num = cfg.get("pos_num"), cfg.get("neg_num")
    positives = positives[: int(pos_num)] if pos_num is not None else positives
    negatives = negatives[: int(neg_num)] if neg_num is not None else negatives
    if strategy == "positive_only":
        negatives = []
        if not positives:
            raise NegagentError("tagging=positive_only but the trajectories hold no positive episode")
    chosen = positives + negatives
    if not chosen:
        raise NegagentError("no trajectories left after mixing; check tagging.pos_num and tagging.neg_num")
    random.Random(f"{cfg.get('seed', 0)}-mix").shuffle(chosen)
    return chosen


@dataclass
class TaggedSample:
    """One training sample before rendering: the trajectory, its tag and where the tag goes."""

    trajectory: Trajectory
    tag: str | None
    placement: str


def tag_samples(trajectories: Sequence[Trajectory], cfg: Mapping[str, Any]) -> list[TaggedSample]:
    """Select and tag: the training set of one strategy."""
    where = placement(cfg)
    return [TaggedSample(t, tag_for(t, cfg), where) for t in select(trajectories, cfg)]


def tag_counts(samples: Iterable[TaggedSample]) -> dict[str, int]:
    """How many samples carry each tag ('<none>' for untagged), for the run manifest."""
    return dict(Counter(s.tag if s.tag is not None else "<none>" for s in samples))
