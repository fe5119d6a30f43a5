"""The trajectory format: validation of records, the JSONL store, torn tails after a killed writer."""

import json

import pytest

from negagent.errors import NegagentError
from negagent.trajectory import Trajectory, TrajectoryWriter, load_trajectories, validate_record, write_trajectories
from tests.helpers import make_traj


def _record(**changes) -> dict:
    """A valid record (trajectory t0) with some fields replaced; a None value removes the field."""
    record = json.loads(make_traj(0, True).to_json())
    record.update(changes)
    return {key: value for key, value in record.items() if value is not None}


def test_roundtrip(tmp_path):
    path = tmp_path / "t.jsonl"
    trajs = [make_traj(i, i % 2 == 0) for i in range(5)]
    trajs[1].stats = {"turns": 2}
    assert write_trajectories(path, trajs) == 5
    loaded, stats = load_trajectories(path)
    assert loaded == trajs  # every field, in order
    assert stats.kept == 5 and stats.skipped == [] and not stats.torn_tail


def test_minimal_record_gets_its_defaults():
    """Optional fields default: train follows the role, score follows the reward, no failure."""
    traj = validate_record({"id": 7, "task": "arith", "question": "q", "reward": False,
                            "messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "o"}]})
    assert traj == Trajectory(id="7", task="arith", question="q", gold=None, reward=False, score=0.0, pred=None,
                              failure=None, provenance={}, stats={},
                              messages=[{"role": "assistant", "content": "a", "train": True},
                                        {"role": "user", "content": "o", "train": False}])
    assert validate_record(_record(score=None)).score == 1.0  # reward true: score 1
    # A successful episode has no failure type, whatever the record says.
    assert validate_record(_record(failure="wrong_answer")).failure is None
    assert validate_record(_record(reward=False, failure="max_steps")).failure == "max_steps"
    assert validate_record(_record(score=1)).score == 1.0 and isinstance(validate_record(_record(score=1)).score, float)


@pytest.mark.parametrize("record, reason", [
    ([1], "expected a JSON object, got list"),
    (_record(id=None), "missing field 'id'"),
    (_record(task=None), "missing field 'task'"),
    (_record(question=None), "missing field 'question'"),
    (_record(messages=None), "missing field 'messages'"),
    (_record(reward=None), "missing field 'reward'"),
    (_record(reward="yes"), "'reward' must be true or false"),
    (_record(reward=1), "'reward' must be true or false"),
    (_record(messages=[]), "'messages' must be a non-empty list"),
    (_record(messages={"role": "assistant"}), "'messages' must be a non-empty list"),
    (_record(messages=["hi"]), "message 0 needs a string 'content'"),
    (_record(messages=[{"role": "assistant", "content": "a"}, {"role": "user", "content": 3}]),
     "message 1 needs a string 'content'"),
    (_record(messages=[{"role": "tool", "content": "x"}]),
     "message 0 has role 'tool'; expected one of ('assistant', 'user')"),
    (_record(messages=[{"role": "user", "content": "x"}]), "no assistant turn"),
    (_record(reward=False, failure="crash"),
     "unknown failure type 'crash'; expected one of ('wrong_answer', 'parse_error', 'tool_error', 'max_steps', "
     "'no_finish')"),
    (_record(score="high"), "'score' must be a number"),
])
def test_bad_records_say_what_is_wrong(record, reason):
    with pytest.raises(ValueError) as err:
        validate_record(record)
    assert str(err.value) == reason


def test_bad_line_names_file_and_line(tmp_path):
    path = tmp_path / "t.jsonl"
    write_trajectories(path, [make_traj(0, True)])
    with path.open("a") as fh:
        fh.write("\n")  # blank lines count in the line numbers but are not records
        fh.write(json.dumps({"id": "x", "task": "arith", "question": "q", "messages": [], "reward": True}) + "\n")
    reason = f"{path}:3: bad trajectory record: 'messages' must be a non-empty list"
    with pytest.raises(NegagentError) as err:
        load_trajectories(path)
    assert str(err.value) == reason + " (set data.skip_bad_lines=true to skip such lines)"
    loaded, stats = load_trajectories(path, skip_bad=True)
    assert [t.id for t in loaded] == ["t0"] and stats.kept == 1 and stats.skipped == [reason]


def test_skipped_lines_are_listed_with_their_reasons(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(_record(messages=[{"role": "tool", "content": "x"}])) + "\n"
                    + "{not json\n" + json.dumps(_record(reward="yes")) + "\n" + json.dumps(_record()) + "\n")
    loaded, stats = load_trajectories(path, skip_bad=True)
    assert [t.id for t in loaded] == ["t0"] and not stats.torn_tail
    assert stats.skipped == [
        f"{path}:1: bad trajectory record: message 0 has role 'tool'; expected one of ('assistant', 'user')",
        f"{path}:2: bad trajectory record: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)",
        f"{path}:3: bad trajectory record: 'reward' must be true or false",
    ]


@pytest.mark.parametrize("name, content, message", [
    ("e.jsonl", "", "{path}: no valid trajectories in the file"),
    ("blank.jsonl", "\n\n", "{path}: no valid trajectories in the file"),
    ("torn.jsonl", '{"id": "t0", "ta', "{path}: no valid trajectories in the file"),
    ("missing.jsonl", None, "{path}: trajectory file not found"),
])
def test_empty_and_missing_file(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(NegagentError) as err:
        load_trajectories(path)
    assert str(err.value) == message.format(path=path)


def test_other_task_rejected(tmp_path):
    path = tmp_path / "t.jsonl"
    write_trajectories(path, [make_traj(0, True)])
    with pytest.raises(NegagentError) as err:
        load_trajectories(path, task="hotpotqa")
    assert str(err.value) == (f"{path}:1: trajectory is for task 'arith', but this run's task is 'hotpotqa'; "
                              "pass a file collected for 'hotpotqa' or set task=arith")
    assert [t.id for t in load_trajectories(path, task="arith")[0]] == ["t0"]


def test_torn_tail_is_ignored_and_repaired(tmp_path):
    path = tmp_path / "t.jsonl"
    write_trajectories(path, [make_traj(0, True), make_traj(1, False)])
    with path.open("a") as fh:
        fh.write(make_traj(2, True).to_json()[:40])  # a writer killed mid-line
    loaded, stats = load_trajectories(path)
    assert [t.id for t in loaded] == ["t0", "t1"] and stats.torn_tail
    with TrajectoryWriter(path) as writer:  # appending cuts the torn line first
        writer.write(make_traj(3, True))
    loaded, stats = load_trajectories(path)
    assert [t.id for t in loaded] == ["t0", "t1", "t3"] and not stats.torn_tail


def test_a_bad_line_before_the_end_is_not_a_torn_tail(tmp_path):
    """Only the very last line may be torn: a broken line followed by others is an error."""
    path = tmp_path / "t.jsonl"
    path.write_text(make_traj(0, True).to_json()[:40] + "\n" + make_traj(1, True).to_json() + "\n")
    with pytest.raises(NegagentError) as err:
        load_trajectories(path)
    assert str(err.value).startswith(f"{path}:1: bad trajectory record: ")


def test_finished_last_line_without_newline_is_kept_by_the_writer(tmp_path):
    """A complete last record that only lacks its newline (a file written by another tool) is read,
    and appending keeps it instead of cutting it as torn."""
    path = tmp_path / "t.jsonl"
    path.write_text(make_traj(0, True).to_json() + "\n" + make_traj(1, False).to_json())
    loaded, stats = load_trajectories(path)
    assert [t.id for t in loaded] == ["t0", "t1"] and not stats.torn_tail
    with TrajectoryWriter(path) as writer:
        writer.write(make_traj(2, True))
    assert [t.id for t in load_trajectories(path)[0]] == ["t0", "t1", "t2"]
    assert path.read_text().count("\n") == 3


def test_writer_creates_folders_and_writes_text_as_it_is(tmp_path):
    path = tmp_path / "new" / "deeper" / "t.jsonl"
    record = json.loads(make_traj(1, False, question="Wie viel kostet ein Brötchen?").to_json())
    with TrajectoryWriter(path) as writer:
        writer.write(make_traj(0, True, question="Combien coûte un café ?"))
        writer.write(record)  # a plain record is written as it is
    # UTF-8 text, not \u escapes: the files stay readable and greppable.
    first = make_traj(0, True, question="Combien coûte un café ?").to_json()
    assert path.read_bytes().decode("utf-8") == first + "\n" + json.dumps(record, ensure_ascii=False) + "\n"
    assert "Brötchen" in path.read_text(encoding="utf-8") and "café" in path.read_text(encoding="utf-8")


@pytest.mark.parametrize("before", ["", "{", '{"id": "t9", "ta'])
def test_writer_cuts_a_torn_first_line(tmp_path, before):
    """A file that holds nothing but a torn line (even one byte of it) is cut before appending."""
    path = tmp_path / "t.jsonl"
    path.write_text(before)
    with TrajectoryWriter(path) as writer:
        writer.write(make_traj(0, True))
    assert path.read_text() == make_traj(0, True).to_json() + "\n"


def test_tail_torn_inside_a_character_is_a_torn_tail(tmp_path):
    """A writer killed mid-line can cut a multi-byte UTF-8 character: still a torn tail, repaired."""
    path = tmp_path / "t.jsonl"
    write_trajectories(path, [make_traj(0, True)])
    line = make_traj(1, True, question="Qu'est-ce que l'été ?").to_json().encode()
    with path.open("ab") as fh:
        fh.write(line[: line.index("é".encode()) + 1])  # the first of the two bytes of "é"
    loaded, stats = load_trajectories(path)
    assert [t.id for t in loaded] == ["t0"] and stats.torn_tail
    with TrajectoryWriter(path) as writer:
        writer.write(make_traj(2, True, question="l'été"))
    loaded, stats = load_trajectories(path)
    assert [(t.id, t.question) for t in loaded] == [("t0", "What is 0?"), ("t2", "l'été")] and not stats.torn_tail


def test_undecodable_line_inside_the_file_names_its_line(tmp_path):
    path = tmp_path / "t.jsonl"
    good = [make_traj(i, True).to_json().encode() for i in range(2)]
    path.write_bytes(good[0] + b"\n\xff\xfe\n" + good[1] + b"\n")
    with pytest.raises(NegagentError) as err:
        load_trajectories(path)
    assert str(err.value) == (f"{path}:2: bad trajectory record: 'utf-8' codec can't decode byte 0xff in position 0: "
                              "invalid start byte (set data.skip_bad_lines=true to skip such lines)")
