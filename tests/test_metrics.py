"""Evaluation statistics: question-level bootstrap intervals, pass@k, the exact sign test, paired runs.

Expected values are computed here independently of negagent.metrics: bootstrap bounds by pooling the
episodes of each drawn question with numpy (same generator draws, numpy's own percentile), pass@k
and sign-test p-values by hand from binomial coefficients.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from negagent.metrics import (
    BOOTSTRAP_RESAMPLES, PairedComparison, _quantile, mean_ci, paired_comparison, pass_at_k, pass_at_ks, sign_test,
)

# Questions with very different numbers of episodes: one question with many samples dominates the
# pooled mean, so resampling whole questions and resampling single episodes give different intervals.
UNEVEN = [[1, 1, 1, 1, 1, 1, 1, 1, 0, 0], [0], [1], [0, 0, 0, 1], [0.5, 1.0]]


def _question_bootstrap(per_question, resamples, seed):
    """Reference: draw questions with the generator's draws, pool their episodes, take numpy percentiles."""
    groups = [np.asarray(g, dtype=float) for g in per_question if len(g)]
    picks = np.random.default_rng(seed).integers(0, len(groups), size=(resamples, len(groups)))
    means = [np.concatenate([groups[i] for i in row]).mean() for row in picks]
    return tuple(np.percentile(means, [2.5, 97.5]))  # numpy's default percentile interpolates linearly


def _episode_bootstrap(per_question, resamples, seed):
    """The wrong interval: single episodes resampled as if they were independent."""
    episodes = np.concatenate([np.asarray(g, dtype=float) for g in per_question if len(g)])
    picks = np.random.default_rng(seed).integers(0, len(episodes), size=(resamples, len(episodes)))
    return tuple(np.percentile(episodes[picks].mean(axis=1), [2.5, 97.5]))


@pytest.mark.parametrize("seed", [0, 7])
@pytest.mark.parametrize("resamples", [200, 1000])
def test_mean_ci_resamples_whole_questions(seed, resamples):
    """The interval is the percentile bootstrap over questions, pooled episode mean per draw."""
    lo, hi = _question_bootstrap(UNEVEN, resamples, seed)
    # The fixture must tell the two bootstraps apart, or this test could not catch an episode-level one.
    assert (lo, hi) != pytest.approx(_episode_bootstrap(UNEVEN, resamples, seed), abs=1e-3)
    ci = mean_ci(UNEVEN, resamples=resamples, seed=seed)
    assert ci == {"mean": pytest.approx(11.5 / 18, rel=1e-12), "lo": pytest.approx(lo, rel=1e-12),
                  "hi": pytest.approx(hi, rel=1e-12), "n_questions": 5, "n_episodes": 18}
    assert ci["lo"] < ci["mean"] < ci["hi"]


def test_mean_ci_defaults_are_1000_resamples_and_seed_0():
    """Without arguments the interval is the 1000-draw bootstrap of seed 0, and the seed changes it."""
    assert BOOTSTRAP_RESAMPLES == 1000
    lo, hi = _question_bootstrap(UNEVEN, 1000, 0)
    ci = mean_ci(UNEVEN)
    assert (ci["lo"], ci["hi"]) == (pytest.approx(lo, rel=1e-12), pytest.approx(hi, rel=1e-12))
    other = mean_ci(UNEVEN, seed=1)
    assert (other["lo"], other["hi"]) != (ci["lo"], ci["hi"])


@pytest.mark.parametrize("seed", range(5))
def test_mean_ci_enumerated_two_question_case(seed):
    """Two questions, A = three successes, B = one failure: a draw is (B,B), mixed or (A,A), each end
    with probability 1/4, so the 2.5% and 97.5% points are exactly 0 and 1 for any seed. Resampling the
    four episodes instead puts only 1/256 of the draws at 0, which would move the lower bound to 0.25."""
    ci = mean_ci([[1, 1, 1], [0]], seed=seed)
    assert ci == {"mean": 0.75, "lo": 0.0, "hi": 1.0, "n_questions": 2, "n_episodes": 4}


def test_mean_ci_weights_episodes_not_questions():
    """The mean is over episodes (9 of 10 right), not the mean of per-question means (0.5)."""
    ci = mean_ci([[1] * 9, [0]], resamples=50)
    assert ci["mean"] == 0.9 and (ci["n_questions"], ci["n_episodes"]) == (2, 10)


def test_mean_ci_skips_questions_without_episodes():
    """A question with no episodes is not a question of the sample, and takes no part in the draws."""
    with_empty = mean_ci([[], *UNEVEN[:2], [], *UNEVEN[2:]], resamples=300, seed=3)
    assert with_empty == mean_ci(UNEVEN, resamples=300, seed=3)
    assert (with_empty["n_questions"], with_empty["n_episodes"]) == (5, 18)


def test_mean_ci_accepts_booleans():
    """Per-episode 0/1 rewards arrive as booleans."""
    assert mean_ci([[True, False], [True]], resamples=10) == mean_ci([[1.0, 0.0], [1.0]], resamples=10)


def test_mean_ci_of_one_question_is_a_point():
    """Every draw of a single question is that question: the interval collapses onto the mean."""
    assert mean_ci([[1, 0, 0, 0]], resamples=20) == {"mean": 0.25, "lo": 0.25, "hi": 0.25, "n_questions": 1,
                                                     "n_episodes": 4}


@pytest.mark.parametrize("per_question", [[], [[]], [[], []]])
def test_mean_ci_without_episodes(per_question):
    """No episodes: NaN statistics and zero counts, not an exception."""
    ci = mean_ci(per_question)
    assert sorted(ci) == ["hi", "lo", "mean", "n_episodes", "n_questions"]
    assert math.isnan(ci["mean"]) and math.isnan(ci["lo"]) and math.isnan(ci["hi"])
    assert (ci["n_questions"], ci["n_episodes"]) == (0, 0)


@pytest.mark.parametrize(("values", "q", "expected"), [
    ([1.0, 2.0, 3.0, 4.0], 0.0, 1.0),
    ([1.0, 2.0, 3.0, 4.0], 1.0, 4.0),
    ([1.0, 2.0, 3.0, 4.0], 0.5, 2.5),  # halfway between the two middle values
    ([0.0, 10.0], 0.25, 2.5),
    ([0.0, 10.0, 20.0], 0.975, 19.5),
    ([5.0], 0.025, 5.0),
])
def test_quantile_interpolates_linearly(values, q, expected):
    """The bootstrap quantile is numpy's default (linear) percentile."""
    assert _quantile(values, q) == pytest.approx(expected, rel=1e-12)
    assert _quantile(values, q) == pytest.approx(float(np.percentile(values, 100 * q)), rel=1e-12)


def test_quantile_of_nothing_is_nan():
    assert math.isnan(_quantile([], 0.5))


@pytest.mark.parametrize(("n", "c", "k", "expected"), [
    (5, 0, 1, 0.0),
    (5, 5, 3, 1.0),
    (5, 2, 1, 2 / 5),  # pass@1 is the fraction correct
    (4, 1, 2, 1 - 3 / 6),  # 1 - C(3,2)/C(4,2)
    (4, 2, 2, 1 - 1 / 6),  # n - c == k: one all-wrong subset is left, so not 1
    (4, 3, 2, 1.0),  # n - c < k: every subset of 2 holds a correct one
    (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
    (3, 0, 3, 0.0),  # k == n is allowed
    (3, 1, 3, 1.0),
])
def test_pass_at_k(n, c, k, expected):
    """The unbiased estimator 1 - C(n-c, k) / C(n, k), with 1 when fewer than k episodes failed."""
    assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-12)


def test_pass_at_k_needs_k_episodes():
    with pytest.raises(ValueError) as excinfo:
        pass_at_k(3, 1, 4)
    assert str(excinfo.value) == "pass@4 needs at least 4 episodes per question, got 3"


def test_pass_at_ks():
    """Mean pass@k over questions, for each distinct k in 1..(fewest episodes of a question), sorted."""
    per_question = [[True, False, False, False], [False, False, True], [True, True, True], []]
    # pass@3 of the first question is 1 - C(3,3)/C(4,3): its three failures can make up the whole draw
    expected = {"pass@1": (1 / 4 + 1 / 3 + 1) / 3, "pass@2": (1 / 2 + 2 / 3 + 1) / 3, "pass@3": (3 / 4 + 1 + 1) / 3}
    result = pass_at_ks(per_question, [3, 0, 2, 1, 2, 4, -1])
    assert list(result) == ["pass@1", "pass@2", "pass@3"]  # k=0, k<0 and k=4 (> 3 episodes) are left out
    assert result == {key: pytest.approx(value, rel=1e-12) for key, value in expected.items()}


def test_pass_at_ks_counts_truthy_episodes_and_converts_ks():
    """Scores 0/1 count like booleans; ks may come from a config as strings or floats."""
    assert pass_at_ks([[1, 0], [0, 0]], ["2", 1.0]) == {"pass@1": 0.25, "pass@2": 0.5}


@pytest.mark.parametrize("per_question", [[], [[]], [[], []]])
def test_pass_at_ks_without_episodes(per_question):
    assert pass_at_ks(per_question, [1, 2]) == {}


@pytest.mark.parametrize(("wins", "losses", "expected"), [
    (0, 0, 1.0),  # no flips: no evidence either way
    (1, 0, 1.0),
    (2, 1, 1.0),
    (5, 0, 2 / 32),  # two-sided: both all-wins and all-losses
    (0, 5, 2 / 32),
    (8, 2, 2 * (1 + 10 + 45) / 1024),  # 2 * P(X <= 2), X ~ Bin(10, 1/2)
    (2, 8, 2 * (1 + 10 + 45) / 1024),
    (6, 0, 2 / 64),
])
def test_sign_test_exact_p_values(wins, losses, expected):
    assert sign_test(wins, losses) == pytest.approx(expected, rel=1e-9)


def _paired_bootstrap(a, b, resamples, seed):
    common = sorted(set(a) & set(b))
    picks = np.random.default_rng(seed).integers(0, len(common), size=(resamples, len(common)))
    means = [np.mean([b[common[i]] - a[common[i]] for i in row]) for row in picks]
    return tuple(np.percentile(means, [2.5, 97.5]))


# Per-question scores of two runs; "x" is only in A and "y" only in B, so they are ignored.
RUN_A = {"q1": 0.0, "q2": 0.0, "q3": 1.0, "q4": 1.0, "q5": 0.5, "q6": 0.0, "q7": 1.0, "x": 1.0}
RUN_B = {"q1": 1.0, "q2": 1.0, "q3": 1.0, "q4": 0.0, "q5": 0.75, "q6": 1.0, "q7": 1.0, "y": 0.0}


@pytest.mark.parametrize(("resamples", "seed"), [(BOOTSTRAP_RESAMPLES, 0), (300, 5)])
def test_paired_comparison(resamples, seed):
    """Means, difference and its paired-bootstrap interval on the common ids, flips both ways, and the
    sign test on the flips (ties such as q3 and q7 are not flips)."""
    lo, hi = _paired_bootstrap(RUN_A, RUN_B, resamples, seed)
    cmp = paired_comparison(RUN_A, RUN_B, resamples=resamples, seed=seed)
    assert isinstance(cmp, PairedComparison)
    assert cmp.to_dict() == {
        "n_common": 7, "mean_a": pytest.approx(3.5 / 7, rel=1e-12), "mean_b": pytest.approx(5.75 / 7, rel=1e-12),
        "diff": pytest.approx(2.25 / 7, rel=1e-12), "diff_lo": pytest.approx(lo, rel=1e-12),
        "diff_hi": pytest.approx(hi, rel=1e-12), "better_in_b": ["q1", "q2", "q5", "q6"], "better_in_a": ["q4"],
        "p_value": pytest.approx(2 * (1 + 5) / 32, rel=1e-9),  # 4 vs 1 flips: 2 * P(X <= 1), X ~ Bin(5, 1/2)
    }
    assert cmp.diff_lo < cmp.diff < cmp.diff_hi


def test_paired_comparison_defaults_and_direction():
    """Defaults are 1000 draws of seed 0; swapping the runs mirrors every statistic."""
    lo, hi = _paired_bootstrap(RUN_A, RUN_B, 1000, 0)
    cmp = paired_comparison(RUN_A, RUN_B)
    assert (cmp.diff_lo, cmp.diff_hi) == (pytest.approx(lo, rel=1e-12), pytest.approx(hi, rel=1e-12))
    assert paired_comparison(RUN_A, RUN_B, seed=1).diff_lo != cmp.diff_lo
    back = paired_comparison(RUN_B, RUN_A)
    assert (back.mean_a, back.mean_b, back.better_in_b, back.better_in_a) == (
        cmp.mean_b, cmp.mean_a, cmp.better_in_a, cmp.better_in_b)
    assert (back.diff_lo, back.diff_hi) == (pytest.approx(-cmp.diff_hi), pytest.approx(-cmp.diff_lo))


def test_paired_comparison_mcnemar_on_binary_scores():
    """With one 0/1 episode per question the p-value is McNemar's exact test on the discordant pairs."""
    a = {f"q{i}": 0.0 for i in range(8)} | {"r1": 1.0, "s1": 1.0, "s2": 0.0}
    b = {f"q{i}": 1.0 for i in range(8)} | {"r1": 0.0, "s1": 1.0, "s2": 0.0}
    cmp = paired_comparison(a, b, resamples=100)
    assert (len(cmp.better_in_b), cmp.better_in_a) == (8, ["r1"])
    assert cmp.p_value == pytest.approx(2 * (1 + 9) / 512, rel=1e-9)  # 8 vs 1: 2 * P(X <= 1), X ~ Bin(9, 1/2)


def test_paired_comparison_needs_common_questions():
    with pytest.raises(ValueError) as excinfo:
        paired_comparison({"a": 1.0}, {"b": 1.0})
    assert str(excinfo.value) == "the two runs share no question ids"
