import pytest

from negagent import tagging
from negagent.errors import NegagentError
from tests.helpers import make_traj

BASE = {"positive": "POS", "negative": "NEG", "seed": 0, "pos_num": None, "neg_num": None,
        "one_positive_per_question": False, "placement": "prefix",
        "grade_cuts": [0.4], "grade_tags": ["G0", "G1", "G2", "G3"]}


def cfg(strategy, **kw):
    return {**BASE, "strategy": strategy, **kw}


def pool(n_pos=20, n_neg=40):
    return [make_traj(i, True) for i in range(n_pos)] + [make_traj(100 + i, False) for i in range(n_neg)]


@pytest.mark.parametrize("strategy,pos_tag,neg_tag,n", [
    ("prefix", "POS", "NEG", 60), ("suffix", "POS", "NEG", 60), ("none", None, None, 60), ("positive_only", None, None, 20),
])
def test_strategies(strategy, pos_tag, neg_tag, n):
    samples = tagging.tag_samples(pool(), cfg(strategy))
    assert len(samples) == n
    assert {s.tag for s in samples if s.trajectory.reward} == {pos_tag}
    if strategy != "positive_only":
        assert {s.tag for s in samples if not s.trajectory.reward} == {neg_tag}
    assert tagging.inference_tag(cfg(strategy)) == pos_tag
    assert samples[0].placement == ("suffix" if strategy == "suffix" else "prefix")


def test_graded_buckets():
    trajs = [make_traj(0, False, score=0.0), make_traj(1, False, score=0.2), make_traj(2, False, score=0.4),
             make_traj(3, False, score=0.99), make_traj(4, True, score=1.0)]
    c = cfg("graded")
    assert [tagging.tag_for(t, c) for t in trajs] == ["G0", "G1", "G2", "G2", "G3"]
    assert tagging.inference_tag(c) == "G3"


def test_nested_and_seeded_mixing():
    trajs = pool(50, 200)
    small = tagging.select(trajs, cfg("prefix", pos_num=10, neg_num=20))
    large = tagging.select(trajs, cfg("prefix", pos_num=10, neg_num=100))
    assert {t.id for t in small} <= {t.id for t in large}
    assert sum(not t.reward for t in small) == 20 and sum(t.reward for t in large) == 10
    again = tagging.select(trajs, cfg("prefix", pos_num=10, neg_num=20))
    assert [t.id for t in again] == [t.id for t in small]
    other_seed = tagging.select(trajs, cfg("prefix", pos_num=10, neg_num=20, seed=1))
    assert {t.id for t in other_seed} != {t.id for t in small}


def test_one_positive_per_question():
    trajs = [make_traj(i, True) for i in range(6)]
    for t in trajs:
        t.provenance["question_id"] = f"q{t.id[-1] in '012'}"
    chosen = tagging.select(trajs, cfg("prefix", one_positive_per_question=True))
    assert len(chosen) == 2


def test_positive_only_without_positives_is_an_error():
    with pytest.raises(NegagentError, match="no positive"):
        tagging.select(pool(0, 5), cfg("positive_only"))


def test_unknown_strategy():
    with pytest.raises(NegagentError, match="unknown tagging strategy 'bogus'"):
        tagging.select(pool(), cfg("bogus"))


def test_overlap_counts_and_drop():
    trajs = [make_traj(0, True, question="Is the sky blue?"), make_traj(1, False, question="Is the sky  blue"),
             make_traj(2, True, question="Other?")]
    overlap, shared = tagging.find_overlap(trajs, ["is the sky blue?", "Unrelated question"])
    assert (overlap.questions, overlap.test_size, overlap.trajectories) == (1, 2, 2)
    assert [t.id for t in tagging.drop_overlap(trajs, shared)] == ["t2"]
