import json

import pytest

from negagent.errors import NegagentError
from negagent.trajectory import TrajectoryWriter, load_trajectories, write_trajectories
from tests.helpers import make_traj


def test_roundtrip(tmp_path):
    path = tmp_path / "t.jsonl"
    trajs = [make_traj(i, i % 2 == 0) for i in range(5)]
    assert write_trajectories(path, trajs) == 5
    loaded, stats = load_trajectories(path)
    assert [t.id for t in loaded] == [t.id for t in trajs]
    assert loaded[1].failure == "wrong_answer" and loaded[0].failure is None
    assert stats.kept == 5 and not stats.skipped


def test_bad_line_names_file_and_line(tmp_path):
    path = tmp_path / "t.jsonl"
    write_trajectories(path, [make_traj(0, True)])
    with path.open("a") as fh:
        fh.write(json.dumps({"id": "x", "task": "arith", "question": "q", "messages": [], "reward": True}) + "\n")
    with pytest.raises(NegagentError, match=r"t\.jsonl:2: .*'messages' must be a non-empty list"):
        load_trajectories(path)
    loaded, stats = load_trajectories(path, skip_bad=True)
    assert len(loaded) == 1 and len(stats.skipped) == 1


def test_wrong_role_and_reward_type(tmp_path):
    path = tmp_path / "t.jsonl"
    rec = json.loads(make_traj(0, True).to_json())
    bad_role = dict(rec, messages=[{"role": "tool", "content": "x"}])
    bad_reward = dict(rec, reward="yes")
    path.write_text(json.dumps(bad_role) + "\n" + json.dumps(bad_reward) + "\n" + json.dumps(rec) + "\n")
    _, stats = load_trajectories(path, skip_bad=True)
    assert any("role 'tool'" in s for s in stats.skipped) and any("'reward'" in s for s in stats.skipped)


def test_empty_and_missing_file(tmp_path):
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(NegagentError, match="no valid trajectories"):
        load_trajectories(tmp_path / "e.jsonl")
    with pytest.raises(NegagentError, match="not found"):
        load_trajectories(tmp_path / "missing.jsonl")


def test_other_task_rejected(tmp_path):
    path = tmp_path / "t.jsonl"
    write_trajectories(path, [make_traj(0, True)])
    with pytest.raises(NegagentError, match="task 'arith'.*'hotpotqa'"):
        load_trajectories(path, task="hotpotqa")


def test_torn_tail_is_ignored_and_repaired(tmp_path):
    path = tmp_path / "t.jsonl"
    write_trajectories(path, [make_traj(0, True), make_traj(1, False)])
    with path.open("a") as fh:
        fh.write(make_traj(2, True).to_json()[:40])  # a writer killed mid-line
    loaded, stats = load_trajectories(path)
    assert len(loaded) == 2 and stats.torn_tail
    with TrajectoryWriter(path) as writer:  # appending cuts the torn line first
        writer.write(make_traj(3, True))
    loaded, stats = load_trajectories(path)
    assert [t.id for t in loaded] == ["t0", "t1", "t3"] and not stats.torn_tail
