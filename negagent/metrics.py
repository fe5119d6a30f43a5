"""Statistics over evaluation episodes: means with bootstrap intervals, pass@k, paired tests.

Everything works on per-question values, because episodes of one question (several samples,
several seeds) are not independent: intervals resample questions, never single episodes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

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
