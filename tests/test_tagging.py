"""Tagging strategies: which trajectories are trained on (seeded nested mixing) and which tag each carries."""

import pytest

from negagent import tagging
from negagent.training.data import drop_overlap, find_overlap
from negagent.errors import NegagentError
from tests.helpers import make_traj

BASE = {"positive": "POS", "negative": "NEG", "seed": 0, "pos_num": None, "neg_num": None,
        "keep": "all", "placement": "prefix",
        "grade_cuts": [0.4], "grade_tags": ["G0", "G1", "G2", "G3"]}


def cfg(strategy, **kw):
    return {**BASE, "strategy": strategy, **kw}


def pool(n_pos=20, n_neg=40):
    return [make_traj(i, True) for i in range(n_pos)] + [make_traj(100 + i, False) for i in range(n_neg)]


def ids(trajs):
    return [t.id for t in trajs]


@pytest.mark.parametrize("strategy,pos_tag,neg_tag,n", [
    ("prefix", "POS", "NEG", 60), ("suffix", "POS", "NEG", 60), ("none", None, None, 60), ("positive_only", None, None, 20),
])
def test_strategies(strategy, pos_tag, neg_tag, n):
    """Each strategy's training set, the tag of positives and negatives, and the inference tag."""
    samples = tagging.tag_samples(pool(), cfg(strategy))
    assert len(samples) == n
    assert {s.tag for s in samples if s.trajectory.reward} == {pos_tag}
    if strategy != "positive_only":
        assert {s.tag for s in samples if not s.trajectory.reward} == {neg_tag}
    assert tagging.inference_tag(cfg(strategy)) == pos_tag
    assert {s.placement for s in samples} == {"suffix" if strategy == "suffix" else "prefix"}


@pytest.mark.parametrize("strategy,placement,where", [
    # prefix / suffix are their own placement, whatever tagging.placement says
    ("prefix", "suffix", "prefix"),
    ("suffix", "prefix", "suffix"),
    # the other strategies follow tagging.placement, prefix when it is unset
    ("graded", "suffix", "suffix"),
    ("graded", "prefix", "prefix"),
    ("graded", None, "prefix"),
    ("none", "suffix", "suffix"),
])
def test_placement(strategy, placement, where):
    c = cfg(strategy, placement=placement)
    if placement is None:
        del c["placement"]
    assert tagging.placement(c) == where
    assert {s.placement for s in tagging.tag_samples(pool(2, 2), c)} == {where}


@pytest.mark.parametrize("score,reward,tag", [
    (0.0, False, "Z"),
    (-0.5, False, "Z"),  # nothing below zero: still the zero class
    (1e-9, False, "B0"),  # anything above 0 leaves the zero class
    (0.2999, False, "B0"),
    (0.3, False, "B1"),  # a score on a cut belongs to the bucket above it
    (0.45, False, "B1"),
    (0.6, False, "B2"),
    (0.9999, False, "B2"),
    (1.0, False, "F"),  # a full score is the top class even without the reward (e.g. F1 1, EM 0)
    (0.5, True, "F"),  # a rewarded episode is the top class whatever its score
    (0.0, True, "F"),
])
def test_graded_buckets_at_the_cuts(score, reward, tag):
    """Classes 0, (0, 0.3), [0.3, 0.6), [0.6, 1), 1 with two cuts."""
    c = cfg("graded", grade_cuts=[0.3, 0.6], grade_tags=["Z", "B0", "B1", "B2", "F"])
    assert tagging.tag_for(make_traj(0, reward, score=score), c) == tag
    assert tagging.inference_tag(c) == "F"


def test_graded_buckets():
    """The default one-cut set-up: the paper's HotpotQA F1 classes 0, (0, 0.4), [0.4, 1), 1."""
    trajs = [make_traj(0, False, score=0.0), make_traj(1, False, score=0.2), make_traj(2, False, score=0.4),
             make_traj(3, False, score=0.99), make_traj(4, True, score=1.0)]
    c = cfg("graded")
    assert [tagging.tag_for(t, c) for t in trajs] == ["G0", "G1", "G2", "G2", "G3"]
    assert tagging.inference_tag(c) == "G3"


@pytest.mark.parametrize("tags", [["G0", "G1", "G3"], ["G0", "G1", "G2", "G3", "G4"]])
def test_graded_tags_must_match_the_cuts(tags):
    with pytest.raises(NegagentError) as excinfo:
        tagging.tag_for(make_traj(0, True), cfg("graded", grade_tags=tags))
    assert str(excinfo.value) == "tagging.grade_tags needs len(grade_cuts) + 3 tags (zero, buckets, full)"


def test_tag_counts():
    """The manifest's tag histogram; untagged samples count under '<none>'."""
    assert tagging.tag_counts(tagging.tag_samples(pool(3, 5), cfg("prefix"))) == {"POS": 3, "NEG": 5}
    assert tagging.tag_counts(tagging.tag_samples(pool(3, 5), cfg("none"))) == {"<none>": 8}
    trajs = [make_traj(0, False, score=0.0), make_traj(1, False, score=0.5), make_traj(2, True)]
    assert tagging.tag_counts(tagging.tag_samples(trajs, cfg("graded"))) == {"G0": 1, "G2": 1, "G3": 1}
    assert tagging.tag_counts([]) == {}


def test_nested_and_seeded_mixing():
    trajs = pool(50, 200)
    small = tagging.select(trajs, cfg("prefix", pos_num=10, neg_num=20))
    large = tagging.select(trajs, cfg("prefix", pos_num=10, neg_num=100))
    assert {t.id for t in small} <= {t.id for t in large}
    assert sum(not t.reward for t in small) == 20 and sum(t.reward for t in large) == 10
    again = tagging.select(trajs, cfg("prefix", pos_num=10, neg_num=20))
    assert ids(again) == ids(small)
    other_seed = tagging.select(trajs, cfg("prefix", pos_num=10, neg_num=20, seed=1))
    assert {t.id for t in other_seed} != {t.id for t in small}


POS_IDS = {f"t{i}" for i in range(30)}  # the positives of pool(30, 60)


@pytest.mark.parametrize("seed", range(5))
def test_mixing_is_nested_across_sizes(seed):
    """For every seed, each (pos_num, neg_num) draw holds exactly that many of each kind and lies
    inside every larger draw; the draws are not simply the pools' first elements."""
    trajs = pool(30, 60)
    sizes = [(0, 5), (3, 5), (3, 20), (10, 20), (30, 60), (None, None)]
    draws = [set(ids(tagging.select(trajs, cfg("prefix", seed=seed, pos_num=p, neg_num=n)))) for p, n in sizes]
    for (p, n), drawn in zip(sizes, draws):
        assert len(drawn & POS_IDS) == (30 if p is None else p)
        assert len(drawn - POS_IDS) == (60 if n is None else n)
    for smaller, larger in zip(draws, draws[1:]):
        assert smaller <= larger
    assert draws[2] != {f"t{i}" for i in range(3)} | {f"t{100 + i}" for i in range(20)}


def test_seed_defaults_to_zero():
    """A config without `seed` draws and orders exactly as seed 0; each of the three seeded draws
    (positives, negatives, final order) changes with the seed."""
    trajs = pool(30, 60)

    def unseeded(c):
        return {k: v for k, v in c.items() if k != "seed"}

    drawn = ids(tagging.select(trajs, unseeded(cfg("prefix", pos_num=10, neg_num=20))))
    assert len(drawn) == 30
    assert drawn == ids(tagging.select(trajs, cfg("prefix", pos_num=10, neg_num=20, seed=0)))
    seed1 = ids(tagging.select(trajs, cfg("prefix", pos_num=10, neg_num=20, seed=1)))
    assert set(seed1) & POS_IDS != set(drawn) & POS_IDS
    assert set(seed1) - POS_IDS != set(drawn) - POS_IDS
    everything = ids(tagging.select(trajs, unseeded(cfg("prefix"))))
    assert everything == ids(tagging.select(trajs, cfg("prefix")))
    assert everything != ids(tagging.select(trajs, cfg("prefix", seed=1)))


def test_selection_mixes_positives_and_negatives():
    """The training order interleaves the kinds instead of putting all positives first, and where the
    positives fall in it depends on the seed (a fixed final shuffle would keep their positions)."""
    patterns = [[t.reward for t in tagging.select(pool(), cfg("prefix", seed=seed))] for seed in range(3)]
    for rewards in patterns:
        assert sum(rewards) == 20 and rewards != sorted(rewards, reverse=True) and rewards != sorted(rewards)
    assert patterns[0] != patterns[1] and patterns[1] != patterns[2]


def _multi_sample_pool():
    """Questions q0..q4 with 4 positive and 4 negative samples each, q5 with one positive, q6 with
    negatives only; in file order the samples of one question are interleaved with the others'."""
    def traj(i, reward, question):
        t = make_traj(i, reward)
        t.provenance["question_id"] = question
        return t

    trajs = [traj(100 * reward + 10 * q + k, reward, f"q{q}") for k in range(4) for q in range(5)
             for reward in (True, False)]
    return trajs + [traj(60, True, "q5")] + [traj(70 + k, False, "q6") for k in range(3)]


def test_one_positive_per_question():
    """Across seeds: exactly one positive for each question that has any, all negatives kept, and the
    positive kept for a question depends on the seed (not the first in the file, not the first N)."""
    trajs = _multi_sample_pool()
    kept: dict[str, set[str]] = {f"q{q}": set() for q in range(6)}
    for seed in range(10):
        chosen = tagging.select(trajs, cfg("prefix", seed=seed, keep="one_positive"))
        positives = [t for t in chosen if t.reward]
        assert sorted(t.question_id for t in positives) == [f"q{q}" for q in range(6)]
        assert sorted(ids(t for t in chosen if not t.reward)) == sorted(ids(t for t in trajs if not t.reward))
        for t in positives:
            kept[t.question_id].add(t.id)
    assert kept["q5"] == {"t60"}
    assert all(len(kept[f"q{q}"]) > 1 for q in range(5))


@pytest.mark.parametrize("seed", range(5))
def test_one_positive_per_question_before_pos_num(seed):
    """pos_num counts positives after de-duplication: 3 positives from 3 questions, inside the draw of 5."""
    trajs = _multi_sample_pool()
    c = cfg("prefix", seed=seed, keep="one_positive", neg_num=0)
    three = tagging.select(trajs, {**c, "pos_num": 3})
    assert len(three) == 3 and len({t.question_id for t in three}) == 3 and all(t.reward for t in three)
    five = tagging.select(trajs, {**c, "pos_num": 5})
    assert len({t.question_id for t in five}) == 5 and set(ids(three)) <= set(ids(five))


def test_all_positives_per_question_by_default():
    trajs = _multi_sample_pool()
    assert sum(t.reward for t in tagging.select(trajs, cfg("prefix"))) == 21
    unset = {k: v for k, v in cfg("prefix").items() if k != "one_positive_per_question"}
    assert sum(t.reward for t in tagging.select(trajs, unset)) == 21


def test_positive_only_without_positives_is_an_error():
    with pytest.raises(NegagentError) as excinfo:
        tagging.select(pool(0, 5), cfg("positive_only"))
    assert str(excinfo.value) == "tagging=positive_only but the trajectories hold no positive episode"


@pytest.mark.parametrize("strategy,kw,n_neg", [
    ("prefix", {"pos_num": 0, "neg_num": 0}, 5),
    ("none", {"pos_num": 0, "neg_num": 0}, 5),
    ("prefix", {"pos_num": 0}, 0),
    ("positive_only", {"pos_num": 0}, 5),  # positives exist, but none is drawn
])
def test_nothing_left_after_mixing_is_an_error(strategy, kw, n_neg):
    """An empty training set is a configuration error that names the knobs to check."""
    with pytest.raises(NegagentError) as excinfo:
        tagging.select(pool(5, n_neg), cfg(strategy, **kw))
    expected = ("tagging=positive_only but the trajectories hold no positive episode" if strategy == "positive_only"
                else "no trajectories left after mixing; check tagging.pos_num and tagging.neg_num")
    assert str(excinfo.value) == expected


@pytest.mark.parametrize("call", [
    lambda c: tagging.select(pool(), c),
    lambda c: tagging.tag_for(make_traj(0, True), c),
    tagging.inference_tag,
    tagging.placement,
])
def test_unknown_strategy(call):
    with pytest.raises(NegagentError) as excinfo:
        call(cfg("bogus"))
    assert str(excinfo.value) == ("unknown tagging strategy 'bogus'; "
                                  "choose one of ('prefix', 'suffix', 'graded', 'none', 'positive_only')")


def test_overlap_counts_and_drop():
    trajs = [make_traj(0, True, question="Is the sky blue?"), make_traj(1, False, question="Is the sky  blue"),
             make_traj(2, True, question="Other?")]
    overlap, shared = find_overlap(trajs, ["is the sky blue?", "Unrelated question"])
    assert (overlap.questions, overlap.test_size, overlap.trajectories) == (1, 2, 2)
    assert shared == {"is the sky blue"}  # lower-cased, runs of non-word characters to one space, stripped
    assert ids(drop_overlap(trajs, shared)) == ["t2"]
