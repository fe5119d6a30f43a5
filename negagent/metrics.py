"""Statistics over evaluation episodes: means with bootstrap intervals, pass@k, paired tests, the
per-question and per-test-set summaries of labelled episodes, and how an interval is printed.

Everything works on per-question values, because episodes of one question (several samples,
several seeds) are not independent: intervals resample questions, never single episodes.
Imports only the trajectory format: the evaluator, reports and sweeps all read statistics here.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from negagent.trajectory import Trajectory

BOOTSTRAP_RESAMPLES = 1000


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile of already sorted values."""
    if not sorted_values:
        return float("nan")
    pos = q * (len(sorted_values) - 1)
    low, high = math.floor(pos), math.ceil(pos)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (pos - low)


def mean_ci(
    per_question: Sequence[Sequence[float]], *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> dict:
    """Mean over all episodes and a 95% percentile-bootstrap interval that resamples questions.

    `per_question[i]` holds the values of question i's episodes (its samples across seeds). The
    interval of the episode mean is drawn by resampling whole questions with replacement, so
    the spread between samples of one question is kept inside each draw.
    Returns {mean, lo, hi, n_questions, n_episodes}; mean is NaN without episodes.
    """
    groups = [list(map(float, g)) for g in per_question if len(g)]
    n_episodes = sum(len(g) for g in groups)
    if not n_episodes:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n_questions": 0, "n_episodes": 0}
    sums = np.array([sum(g) for g in groups])
    counts = np.array([len(g) for g in groups])
    mean = float(sums.sum() / n_episodes)
    n = len(groups)
    picks = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    draws = sorted((sums[picks].sum(axis=1) / counts[picks].sum(axis=1)).tolist())
    return {
        "mean": mean,
        "lo": _quantile(draws, 0.025),
        "hi": _quantile(draws, 0.975),
        "n_questions": n,
        "n_episodes": n_episodes,
    }


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one question with `c` correct out of `n` episodes (Chen et al., 2021)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} episodes per question, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_at_ks(per_question: Sequence[Sequence[bool]], ks: Sequence[int]) -> dict[str, float]:
    """Mean pass@k over questions for each k that every question has enough episodes for."""
    groups = [g for g in per_question if len(g)]
    if not groups:
        return {}
    fewest = min(len(g) for g in groups)
    out = {}
    for k in sorted({int(k) for k in ks if 1 <= int(k) <= fewest}):
        out[f"pass@{k}"] = sum(pass_at_k(len(g), sum(map(bool, g)), k) for g in groups) / len(groups)
    return out


@dataclass
class PairedComparison:
    """Two runs on the same questions: per-question score differences and an exact paired test."""

    n_common: int
    mean_a: float
    mean_b: float
    diff: float  # mean_b - mean_a
    diff_lo: float
    diff_hi: float
    better_in_b: list[str]  # question ids where B scores higher than A ("flipped to correct")
    better_in_a: list[str]
    p_value: float  # exact two-sided sign test on the flips (McNemar's exact test for 0/1 scores)

    def to_dict(self) -> dict:
        return dict(vars(self))


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided binomial test of wins vs losses at p=0.5 (ties dropped); 1.0 with no flips."""
    n = wins + losses
    if n == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(binomtest(wins, n, 0.5, alternative="two-sided").pvalue)


def paired_comparison(
    a: Mapping[str, float], b: Mapping[str, float], *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> PairedComparison:
    """Compare per-question scores (mean over a question's episodes) on the question ids both have.

    A question "flips" when its score differs between the runs; with one 0/1 episode per question
    the sign test is exactly McNemar's exact test. The interval of the mean difference resamples
    questions (paired bootstrap).
    """
    common = sorted(set(a) & set(b))
    if not common:
        raise ValueError("the two runs share no question ids")
    diffs = [b[q] - a[q] for q in common]
    n = len(common)
    picks = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    draws = sorted(np.asarray(diffs)[picks].mean(axis=1).tolist())
    better_b = [q for q, d in zip(common, diffs) if d > 0]
    better_a = [q for q, d in zip(common, diffs) if d < 0]
    return PairedComparison(
        n_common=n,
        mean_a=sum(a[q] for q in common) / n,
        mean_b=sum(b[q] for q in common) / n,
        diff=sum(diffs) / n,
        diff_lo=_quantile(draws, 0.025),
        diff_hi=_quantile(draws, 0.975),
        better_in_b=better_b,
        better_in_a=better_a,
        p_value=sign_test(len(better_b), len(better_a)),
    )


def format_ci(stat: Mapping[str, Any] | None, *, scale: float = 100.0, digits: int = 1) -> str:
    """A mean with its interval as text, "12.5 [3.1, 25.0]" (fractions shown in percent by default);
    "-" for a missing or NaN mean; the mean alone when there is no interval. Accepts `diff` for `mean`
    (paired differences)."""
    mean = stat.get("mean", stat.get("diff")) if isinstance(stat, Mapping) else None
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    text = f"{mean * scale:.{digits}f}"
    if stat.get("lo") is not None and stat.get("hi") is not None:
        text += f" [{stat['lo'] * scale:.{digits}f}, {stat['hi'] * scale:.{digits}f}]"
    return text


# --- episode statistics ------------------------------------------------------------------------


def episode_metrics(traj: Trajectory) -> dict[str, float]:
    """An episode's numeric task metrics (`em`, `f1`, `strict`, ...) and its `reward` as floats."""
    values = {name: float(value) for name, value in (traj.stats.get("metrics") or {}).items()
              if isinstance(value, (bool, int, float))}
    values["reward"] = float(traj.reward)
    return values


def set_summary(records: Sequence[Trajectory], pass_k: Sequence[int], resamples: int) -> dict:
    """One test set's summary: each metric's mean with its question-level interval, pass@k, behaviour,
    steps per episode and, with several seeds, the reward of each seed."""
    by_question: dict[str, list[Trajectory]] = defaultdict(list)
    for traj in records:
        by_question[traj.question_id].append(traj)
    names = sorted({name for traj in records for name in episode_metrics(traj)})
    out: dict[str, Any] = {"n_questions": len(by_question), "n_episodes": len(records)}
    for name in names:
        out[name] = mean_ci([[episode_metrics(t).get(name, 0.0) for t in ts] for ts in by_question.values()],
                            resamples=resamples)
    out.update(pass_at_ks([[t.reward for t in ts] for ts in by_question.values()], pass_k))
    out.update(behaviour(records))
    out["mean_steps"] = mean_ci([[t.stats.get("turns", 0) for t in ts] for ts in by_question.values()], resamples=resamples)
    seeds = sorted({t.provenance.get("seed", 0) for t in records})
    if len(seeds) > 1:
        out["reward_by_seed"] = {str(s): sum(t.reward for t in records if t.provenance.get("seed", 0) == s)
                                 / max(1, sum(1 for t in records if t.provenance.get("seed", 0) == s)) for s in seeds}
    return out


def behaviour(records: Iterable[Trajectory]) -> dict:
    """Action error rate (the paper's Table 6): failed parses and failed tool calls per attempted action."""
    records = list(records)
    actions = sum(t.stats.get("actions", 0) for t in records)
    parse_errors = sum(t.stats.get("parse_errors", 0) for t in records)
    tool_errors = sum(t.stats.get("tool_errors", 0) for t in records)
    attempts = actions + parse_errors  # a turn without a parsable action is an attempted action too
    return {
        "action_error_rate": (parse_errors + tool_errors) / attempts if attempts else 0.0,
        "actions": {"attempted": attempts, "parse_errors": parse_errors, "tool_errors": tool_errors},
        "failures": dict(Counter(t.failure or "solved" for t in records)),
    }


def question_scores(records: Iterable[Trajectory], metric: str = "reward") -> dict[str, float]:
    """Per question ("<test set>/<question id>"): the mean of `metric` over its episodes."""
    sums: dict[str, list[float]] = defaultdict(list)
    for traj in records:
        sums[f"{traj.provenance.get('test_set')}/{traj.question_id}"].append(episode_metrics(traj).get(metric, 0.0))
    return {q: sum(v) / len(v) for q, v in sums.items()}


def summarize(records: Sequence[Trajectory], modes: Mapping[str, str | None],
              test_sets: Iterable[str], *, pass_k: Sequence[int] = (1,),
              resamples: int = BOOTSTRAP_RESAMPLES) -> dict:
    """metrics.json's results: per tag mode, per test set every task metric as {mean, lo, hi, ...}.

    Each test set has `reward` (the task's label), the task's metrics (`strict`/`numeric` for math,
    `em`/`f1` for HotpotQA, `acc` for StrategyQA), pass@k, `action_error_rate`, `mean_steps` and
    failure counts; `average` is the unweighted mean over test sets of each metric's mean, and
    `overall` pools every episode for behaviour. With both tags evaluated, `control_strength` is
    positive-tag minus negative-tag reward per test set (paired over questions).
    """
    test_sets = list(test_sets)
    results: dict[str, Any] = {}
    for mode, tag in modes.items():
        mine = [t for t in records if t.provenance.get("tag_mode") == mode]
        per_set = {name: set_summary([t for t in mine if t.provenance.get("test_set") == name], pass_k, resamples)
                   for name in test_sets}
        metric_names = sorted({k for s in per_set.values() for k, v in s.items() if isinstance(v, dict) and "mean" in v})
        average = {name: sum(s[name]["mean"] for s in per_set.values() if name in s) / len(per_set)
                   for name in metric_names if all(name in s for s in per_set.values())}
        results[mode] = {"tag": tag, "test_sets": per_set, "average": average, "overall": behaviour(mine)}
    out: dict[str, Any] = {"results": results, "primary": next(iter(modes))}
    if "positive" in results and "negative" in results:
        strength = {}
        for name in test_sets:
            pos = question_scores(t for t in records if t.provenance.get("tag_mode") == "positive" and t.provenance.get("test_set") == name)
            neg = question_scores(t for t in records if t.provenance.get("tag_mode") == "negative" and t.provenance.get("test_set") == name)
            if pos and neg:
                cmp = paired_comparison(neg, pos, resamples=resamples)
                strength[name] = {"diff": cmp.diff, "lo": cmp.diff_lo, "hi": cmp.diff_hi, "p_value": cmp.p_value,
                                  "positive": cmp.mean_b, "negative": cmp.mean_a}
        out["control_strength"] = {"per_test_set": strength,
                                   "mean": sum(v["diff"] for v in strength.values()) / len(strength) if strength else None}
    return out
