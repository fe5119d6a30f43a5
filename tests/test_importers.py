"""Importers: NAT and FireAct files into this project's format, on made-up files and on the real releases."""

import json
from collections import Counter
from types import SimpleNamespace

import pytest

from negagent.errors import NegagentError
from negagent.importers import from_fireact, from_nat, main, read_question_file
from negagent.trajectory import load_trajectories
from tests.helpers import assert_one_line_error


def _nat_turns(*actions: str) -> list[dict]:
    turns = []
    for k, action in enumerate(actions):
        turns.append({"role": "assistant", "content": f"Thought: t{k}\nAction: {action}", "loss": True})
        turns.append({"role": "user", "content": f"Observation: o{k}", "loss": False})
    return turns


def _fireact_line(question: str, *turns: str) -> str:
    messages = [{"role": "user", "content": question}]
    messages += [{"role": "assistant" if k % 2 == 0 else "user", "content": text} for k, text in enumerate(turns)]
    return json.dumps({"messages": messages})


# --- made-up files ------------------------------------------------------------------------------


def test_nat_ids_labels_and_failure_types(tmp_path):
    questions = {"q1": {"id": "q1", "question": "Is it?", "answer": True}, "q2": {"id": "q2", "question": "Who?"}}
    records = [
        {"id": "q1", "source": "0.2", "info": {"reward": 1, "gt": "yes (the file's own gold)", "pred": "Yes"},
         "conversations": _nat_turns("search[x]", "finish[Yes]")},
        {"id": "q1", "source": "0.7", "info": {"reward": 0, "pred": 3}, "conversations": _nat_turns("finish[No]")},
        {"id": "q2", "conversations": []},  # an empty episode: skipped and counted
        {"id": "q2", "conversations": [{"role": "user", "content": "Observation: o"}]},  # no model turn: empty too
        {"id": "q2", "info": {"reward": False}, "conversations": _nat_turns(*["search[y]"] * 7)},
        {"id": "q2", "conversations": _nat_turns("search[y]")},  # no info: not rewarded
        {"id": "q2", "info": {"reward": True}, "conversations": [{"role": "assistant", "content": "Action: finish[Z]"}]},
    ]
    path = tmp_path / "run.json"
    path.write_text(json.dumps(records))
    trajs, empty = from_nat(path, questions, "strategyqa")
    assert empty == 2
    assert [(t.id, t.reward, t.failure, t.pred, t.gold) for t in trajs] == [
        ("q1-run-0", True, None, "Yes", "yes (the file's own gold)"),
        ("q1-run-1", False, "wrong_answer", "3", True),  # the gold falls back to the question file's answer
        ("q2-run-0", False, "max_steps", None, None),  # seven turns without finish[...]
        ("q2-run-1", False, "no_finish", None, None),
        ("q2-run-2", True, None, None, None),  # one model turn is an episode
    ]
    first = trajs[0]
    assert first.question == "Is it?" and first.task == "strategyqa" and first.score == 1.0
    assert first.messages[:2] == [{"role": "assistant", "content": "Thought: t0\nAction: search[x]", "train": True},
                                  {"role": "user", "content": "Observation: o0", "train": False}]
    assert first.provenance == {"question_id": "q1", "teacher": "gpt-3.5-turbo (NAT release)", "temperature": 0.2,
                                "sample_index": 0, "source_file": "run.json"}
    assert [t.provenance["temperature"] for t in trajs] == [0.2, 0.7, None, None, None]
    assert [t.provenance["sample_index"] for t in trajs] == [0, 1, 0, 1, 2]


def test_nat_train_flags_follow_the_loss_field(tmp_path):
    path = tmp_path / "run.json"
    conversation = [{"role": "assistant", "content": "Action: finish[1]", "loss": False},
                    {"role": "user", "content": "Observation: 1"},
                    {"role": "assistant", "content": "Action: finish[2]"}]
    path.write_text(json.dumps([{"id": 1, "info": {"reward": True}, "conversations": conversation}]))
    (traj,), _ = from_nat(path, {"1": {"question": "q"}}, "math")
    assert [m["train"] for m in traj.messages] == [False, False, True]  # without a loss field: assistant turns train


def test_fireact_reward_prediction_and_failure(tmp_path):
    path = tmp_path / "runs.jsonl"
    path.write_text("\n".join([
        _fireact_line("Q one?", "Action: search[a]", "Observation: x", "Action: finish[ Paris ]",
                      "Observation: Episode finished, reward = True"),
        "",  # a blank line: skipped, but counted in line numbers and ids
        _fireact_line("Q two?", "Action: finish[Rome]", "Observation: reward=0"),
        _fireact_line("Q three?", "Action: search[b]", "Observation: reward = 1"),
    ]) + "\n")
    trajs = from_fireact(path, "hotpotqa")
    assert [(t.id, t.question, t.reward, t.pred, t.failure) for t in trajs] == [
        ("fireact-runs-1", "Q one?", True, "Paris", None),
        ("fireact-runs-3", "Q two?", False, "Rome", "wrong_answer"),
        ("fireact-runs-4", "Q three?", True, None, None),
    ]
    # The question is not a turn of the episode.
    assert [m["role"] for m in trajs[0].messages] == ["assistant", "user", "assistant", "user"]
    assert trajs[0].provenance == {"teacher": "gpt-4 (FireAct release)", "source_file": "runs.jsonl"}


def test_read_question_file_from_json_or_jsonl(tmp_path):
    rows = [{"id": 1, "question": "a"}, {"question": "no id"}, {"id": "b", "question": "c"}]
    (tmp_path / "q.json").write_text(json.dumps(rows))
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    expected = {"1": {"id": 1, "question": "a"}, "b": {"id": "b", "question": "c"}}
    assert read_question_file(tmp_path / "q.json") == expected
    assert read_question_file(tmp_path / "q.jsonl") == expected


@pytest.mark.parametrize("name, content, message", [
    ("f.jsonl", _fireact_line("q", "Action: finish[a]", "Observation: done"),
     "{path}:1: the last observation does not state the reward"),
    ("f.jsonl", _fireact_line("q", "Action: finish[a]"), "{path}:1: the last observation does not state the reward"),
    ("f.jsonl", _fireact_line("q", "Action: finish[a]", "Observation: reward = True") + "\n" + json.dumps([1]),
     "{path}:2: not a valid trajectory (AttributeError: 'list' object has no attribute 'get')"),
    ("f.jsonl", json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]}),
     "{path}:1: not a valid trajectory (KeyError: 'content')"),
    ("f.jsonl", json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "reward = 1"}]}),
     "{path}:1: not a valid trajectory (no assistant turn)"),
    ("f.jsonl", "\n" + json.dumps({"messages": [{"role": "user", "content": "q"}]}),
     "{path}:2: expected messages starting with the user's question"),
    ("f.jsonl", json.dumps({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}),
     "{path}:1: expected messages starting with the user's question"),
    ("f.jsonl", _fireact_line("q", "Action: finish[a]", "Observation: reward = True") + "\n{oops\n",
     "{path}:2: not valid JSON (Expecting property name enclosed in double quotes)"),
    ("missing.jsonl", None, "{path}: file not found"),
])
def test_fireact_bad_files(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(NegagentError) as err:
        from_fireact(path, "hotpotqa")
    assert str(err.value) == message.format(path=path)


@pytest.mark.parametrize("content, message", [
    ('{"id": 1}', "{path}: expected a JSON list of NAT trajectories"),
    ("[5]", "{path}: trajectory 0: not a valid trajectory (AttributeError: 'int' object has no attribute 'get')"),
    ('[{"id": "q1", "conversations": [{"role": "assistant"}]}]',
     "{path}: trajectory 0: not a valid trajectory (KeyError: 'content')"),
    ('[{"id": "q1", "conversations": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]}]',
     "{path}: trajectory 0: not a valid trajectory (message 0 has role 'system'; expected one of "
     "('assistant', 'user'))"),
    ('[{"id": "q1", "source": "hot", "conversations": [{"role": "assistant", "content": "a"}]}]',
     "{path}: trajectory 0: not a valid trajectory (could not convert string to float: 'hot')"),
    ('[{"id": 1},\n]', "{path}: not valid JSON (Expecting value at line 2)"),
    ('[{"id": "q9", "conversations": []}]',
     "{path}: trajectory 0 has id 'q9', which is not in the question file; "
     "pass the question file this trajectory file was collected on"),
    (None, "{path}: file not found"),
])
def test_nat_bad_files(tmp_path, content, message):
    path = tmp_path / "run.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(NegagentError) as err:
        from_nat(path, {"q1": {"question": "q"}}, "strategyqa")
    assert str(err.value) == message.format(path=path)


def _cli(capsys, *argv: str) -> SimpleNamespace:
    """Run the importer's command line in-process, as a finished process would report it."""
    try:
        main(list(argv))
        code = 0
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=captured.out, stderr=captured.err)


def test_cli_imports_nat_with_its_question_file(tmp_path, capsys):
    (tmp_path / "q.jsonl").write_text(json.dumps({"id": "q1", "question": "Is it?", "answer": True}) + "\n")
    records = [{"id": "q1", "info": {"reward": 1}, "conversations": _nat_turns("finish[Yes]")},
               {"id": "q1", "info": {"reward": 0}, "conversations": _nat_turns("finish[No]")},
               {"id": "q1", "conversations": []}]
    (tmp_path / "run.json").write_text(json.dumps(records))
    out = tmp_path / "out.jsonl"
    result = _cli(capsys, "nat", str(tmp_path / "run.json"), "-o", str(out), "--questions", str(tmp_path / "q.jsonl"),
                  "--task", "strategyqa")
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.splitlines() == [f"{tmp_path / 'run.json'}: skipped 1 empty episodes",
                                          f"wrote 2 trajectories (1 positive, 1 negative) to {out}"]
    loaded, _ = load_trajectories(out, task="strategyqa")
    assert [(t.id, t.reward) for t in loaded] == [("q1-run-0", True), ("q1-run-1", False)]


@pytest.mark.parametrize("argv, fragment", [
    (["fireact", "{dir}/in.jsonl", "-o", "{dir}/exists.jsonl", "--task", "hotpotqa"],
     "{dir}/exists.jsonl: already exists; choose a new output file"),
    (["nat", "{dir}/run.json", "-o", "{dir}/out.jsonl", "--task", "strategyqa"],
     "NAT files carry no question text: pass --questions"),
    (["fireact", "{dir}/none.jsonl", "-o", "{dir}/out.jsonl", "--task", "hotpotqa"],
     "{dir}/none.jsonl: file not found"),
])
def test_cli_user_errors_write_nothing(tmp_path, capsys, argv, fragment):
    (tmp_path / "in.jsonl").write_text(_fireact_line("q", "Action: finish[a]", "Observation: reward = True") + "\n")
    (tmp_path / "run.json").write_text("[]")
    (tmp_path / "exists.jsonl").write_text("keep me\n")
    result = _cli(capsys, *(arg.format(dir=tmp_path) for arg in argv))
    assert_one_line_error(result, fragment.format(dir=tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.jsonl", "in.jsonl", "run.json"]
    assert (tmp_path / "exists.jsonl").read_text() == "keep me\n"


# --- the real releases ------------------------------------------------------------------------


def test_nat_strategyqa(data_dir):
    root = data_dir / "nat" / "strategyqa"
    questions = read_question_file(root / "train.jsonl")
    pos, empty_pos = from_nat(root / "strategyqa_gpt-3.5_positive.json", questions, "strategyqa")
    neg, empty_neg = from_nat(root / "strategyqa_gpt-3.5_negative.json", questions, "strategyqa")
    assert (len(questions), len(pos), empty_pos, len(neg), empty_neg) == (1290, 1070, 0, 1256, 7)
    assert all(t.reward for t in pos) and not any(t.reward for t in neg)
    assert Counter(t.failure for t in neg) == {"wrong_answer": 1243, "no_finish": 10, "max_steps": 3}
    assert Counter(t.provenance["temperature"] for t in pos + neg) == {0.7: 784, 0.5: 775, 0.2: 767}
    first = pos[0]
    assert first.id == "b8677742616fef051f00-strategyqa_gpt-3.5_positive-0"
    assert first.question == "Are more people today related to Genghis Khan than Julius Caesar?"
    assert (first.gold, first.pred, first.provenance["temperature"]) == (True, "Yes", 0.5)
    assert [m["train"] for m in first.messages] == [True, False] * 4
    assert len({t.id for t in pos + neg}) == len(pos + neg)


def test_nat_id_missing_from_question_file(data_dir):
    path = data_dir / "nat" / "strategyqa" / "strategyqa_gpt-3.5_positive.json"
    with pytest.raises(NegagentError) as err:
        from_nat(path, {"other": {"question": "q"}}, "strategyqa")
    assert str(err.value) == (f"{path}: trajectory 0 has id 'b8677742616fef051f00', which is not in the question "
                              "file; pass the question file this trajectory file was collected on")


def test_fireact(data_dir):
    trajs = from_fireact(data_dir / "trajectories" / "fireact" / "hotpotqa.jsonl", "hotpotqa")
    assert len(trajs) == 500 and all(t.reward for t in trajs)
    first = trajs[0]
    assert (first.id, first.pred, first.failure, len(first.messages)) == ("fireact-hotpotqa-1", "Badr Hari", None, 4)
    assert first.messages[0]["role"] == "assistant"
    mixed = from_fireact(data_dir / "trajectories" / "fireact" / "hotpotqa_multimethod.jsonl", "hotpotqa")
    assert len(mixed) == 733 and Counter(t.failure for t in mixed) == {None: 693, "wrong_answer": 40}


def test_cli_writes_and_refuses_to_overwrite(data_dir, tmp_path, capsys):
    out = tmp_path / "fireact.jsonl"
    src = str(data_dir / "trajectories" / "fireact" / "hotpotqa.jsonl")
    result = _cli(capsys, "fireact", src, "-o", str(out), "--task", "hotpotqa")
    assert result.returncode == 0 and result.stdout == f"wrote 500 trajectories (500 positive, 0 negative) to {out}\n"
    loaded, _ = load_trajectories(out, task="hotpotqa")
    assert len(loaded) == 500
    before = out.read_bytes()
    again = _cli(capsys, "fireact", src, "-o", str(out), "--task", "hotpotqa")
    assert_one_line_error(again, f"{out}: already exists; choose a new output file")
    assert out.read_bytes() == before
