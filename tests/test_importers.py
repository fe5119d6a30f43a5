"""Importers: NAT and FireAct files into this project's format, on made-up files and on the real releases."""

import json
from collections import Counter
from types import SimpleNamespace

import pytest

from negagent.errors import NegagentError
from negagent.importers import Agreement, from_fireact, from_nat, main, read_question_file
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
        {"id": "q2", "info": {"gt": False}, "conversations": _nat_turns("search[y]")},  # no reward: not rewarded
        {"id": "q2", "info": {"reward": True}, "conversations": [{"role": "assistant", "content": "Action: finish[Z]"}]},
    ]
    path = tmp_path / "run.json"
    path.write_text(json.dumps(records))
    trajs, empty = from_nat(path, questions, "strategyqa")
    assert empty == 2
    # The question file's gold wins over the file's; `pred` is the finish argument as the agent loop reads it.
    assert [(t.id, t.reward, t.failure, t.pred, t.gold, t.provenance["rescored_reward"]) for t in trajs] == [
        ("q1-run-0", True, None, "Yes", True, True),
        ("q1-run-1", False, "wrong_answer", "No", True, False),
        ("q2-run-0", False, "max_steps", None, None, None),  # seven turns without finish[...]; no gold to re-score
        ("q2-run-1", False, "no_finish", None, False, False),  # the file's gold where the question file has none
        ("q2-run-2", True, None, "Z", None, None),  # one model turn is an episode
    ]
    first = trajs[0]
    assert first.question == "Is it?" and first.task == "strategyqa" and first.score == 1.0
    assert [t.score for t in trajs] == [1.0, 0.0, 0.0, 0.0, 1.0]  # the label: StrategyQA reports no F1
    assert [len(t.messages) for t in trajs] == [3, 1, 13, 1, 1]  # the observation after the last turn is dropped
    assert first.messages[:2] == [{"role": "assistant", "content": "Thought: t0\nAction: search[x]", "train": True},
                                  {"role": "user", "content": "Observation: o0", "train": False}]
    assert first.provenance == {"question_id": "q1", "teacher": "gpt-3.5-turbo (NAT release)", "temperature": 0.2,
                                "sample_index": 0, "source_file": "run.json", "rescored_reward": True}
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


def _nat_record(qid, reward, *actions, **info):
    return {"id": qid, "info": {"reward": reward, **info}, "conversations": _nat_turns(*actions)}


def test_nat_rescoring_names_the_cause_of_each_disagreement(tmp_path):
    """Each episode is re-scored with the task's own rule; a disagreement is explained by the value
    (the file's answer or gold) that gives back the recorded label, else by the rule itself."""
    questions = {q: {"question": "Is it?", "answer": True} for q in ("a", "b", "c", "d", "e")}
    questions["nogold"] = {"question": "Who?"}
    records = [
        _nat_record("a", True, "finish[Yes]", pred="Yes", gt=True),  # agrees
        _nat_record("b", False, "finish[Yes]\n\nSo it is.", pred="Yes]\n\nSo it is", gt=True),  # NAT's own reading
        _nat_record("c", True, "finish[No]", pred="No", gt=False),  # graded against another gold
        _nat_record("d", False, "finish[Yes.]", pred="Yes.", gt=True),  # the paper's exact yes/no rule
        _nat_record("e", True, "search[x]"),  # recorded correct without an answer
        _nat_record("nogold", True, "finish[Bob]", pred="Bob"),  # nothing to re-score against
        _nat_record("e", False, "search[x]"),  # unfinished: agrees
    ]
    path = tmp_path / "run.json"
    path.write_text(json.dumps(records))
    agreement = Agreement()
    trajs, _ = from_nat(path, questions, "strategyqa", agreement)
    assert [t.provenance["rescored_reward"] for t in trajs] == [True, True, False, True, False, None, False]
    assert [t.reward for t in trajs] == [True, False, True, False, True, True, False]  # the label is the file's
    assert (agreement.checked, agreement.agree, agreement.no_gold) == (6, 2, 1)
    assert agreement.causes == {"answer read differently": 1, "other gold": 1, "scoring rule": 1, "no answer": 1}
    assert agreement.disagreements[0] == (
        f"{path}: trajectory 1 (b): recorded reward False, re-scored True (answer read differently; answer 'Yes', "
        "file's answer 'Yes]\\n\\nSo it is', gold True, file's gold True)")
    assert [line.split("(")[2].split(";")[0] for line in agreement.disagreements] == [
        "answer read differently", "other gold", "scoring rule", "no answer"]
    assert agreement.summary() == (
        "re-scored 6 episodes: labels agree on 2 (33.3%); disagreements: 1 answer read differently, 1 other gold, "
        "1 scoring rule, 1 no answer; 1 without a gold answer not re-scored")
    # One Agreement collects several files.
    from_nat(path, questions, "strategyqa", agreement)
    assert (agreement.checked, agreement.agree, len(agreement.disagreements)) == (12, 4, 8)


def test_nat_hotpotqa_score_is_the_f1_for_graded_tags(tmp_path):
    """HotpotQA's `score` is the F1 (the file's where it records one, checked against the task's),
    so a near miss lands in a middle graded class; the label stays the file's exact match."""
    questions = {"1": {"question": "Who?", "answer": "Barack Obama"}, "2": {"question": "When?", "answer": "May 1999"}}
    records = [
        # NAT's HotpotQA files keep the normalised answers next to EM and F1.
        _nat_record("1", False, "finish[President Obama]", pred="president obama", gt="barack obama", em=False,
                    f1=0.5),
        _nat_record("1", True, "finish[Barack Obama]", pred="barack obama", gt="barack obama", em=True, f1=1.0),
        _nat_record("2", False, "finish[May]"),  # no recorded F1: the task's
        _nat_record("2", False, "finish[in 1999]", f1=0.9),  # a recorded F1 wins, and disagrees (the task's: 0.5)
        _nat_record("2", False, "search[x]"),  # unfinished
    ]
    path = tmp_path / "hotpot.json"
    path.write_text(json.dumps(records))
    agreement = Agreement()
    trajs, _ = from_nat(path, questions, "hotpotqa", agreement)
    assert [t.score for t in trajs] == [0.5, 1.0, pytest.approx(2 / 3), 0.9, 0.0]
    assert [(t.reward, t.pred, t.gold) for t in trajs][:2] == [(False, "President Obama", "Barack Obama"),
                                                              (True, "Barack Obama", "Barack Obama")]
    assert (agreement.checked, agreement.agree, agreement.f1_checked) == (5, 5, 3)
    assert agreement.f1_disagreements == [
        f"{path}: trajectory 3 (2): recorded F1 0.9000, re-scored 0.5000 (answer 'in 1999', file's answer None, "
        "gold 'May 1999', file's gold None)"]
    assert agreement.summary() == (
        "re-scored 5 episodes: labels agree on 5 (100.0%); disagreements: none; recorded F1 agrees on 2 of 3")


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
    ('[{"id": "q1", "info": {"f1": "high"}, "conversations": [{"role": "assistant", "content": "a"}]}]',
     "{path}: trajectory 0: not a valid trajectory (info.f1 must be a number from 0 to 1, got 'high')"),
    ('[{"id": "q1", "info": {"f1": 1.5}, "conversations": [{"role": "assistant", "content": "a"}]}]',
     "{path}: trajectory 0: not a valid trajectory (info.f1 must be a number from 0 to 1, got 1.5)"),
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
                                          "re-scored 2 episodes: labels agree on 2 (100.0%); disagreements: none",
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
    (["nat", "{dir}/run.json", "-o", "{dir}/out.jsonl", "--questions", "{dir}/in.jsonl", "--task", "trivia"],
     "unknown task 'trivia'; choose one of: arith, math, hotpotqa, strategyqa"),
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
    # NAT's closing "Observation: Episode finished" is dropped: the episode ends on the model's turn.
    assert [m["train"] for m in first.messages] == [True, False] * 3 + [True]
    assert first.messages[-1]["content"].endswith("Action: finish[Yes]")
    assert all(t.messages[-1]["role"] == "assistant" for t in pos + neg)
    assert len({t.id for t in pos + neg}) == len(pos + neg)


def test_nat_strategyqa_labels_agree_with_rescoring(data_dir):
    """The release's labels against this project's StrategyQA scoring: the two disagree only where
    NAT's parser kept the text after `finish[...]` as the answer (the paper's exact yes/no rule and
    `scoring.yes_no` judge every answer in these files alike)."""
    root = data_dir / "nat" / "strategyqa"
    questions = read_question_file(root / "train.jsonl")
    agreement = Agreement()
    for name in ("positive", "negative"):
        from_nat(root / f"strategyqa_gpt-3.5_{name}.json", questions, "strategyqa", agreement)
    assert agreement.summary() == ("re-scored 2,326 episodes: labels agree on 2,324 (99.9%); "
                                   "disagreements: 2 answer read differently")
    negative = root / "strategyqa_gpt-3.5_negative.json"
    assert [line.split(": recorded")[0] for line in agreement.disagreements] == [
        f"{negative}: trajectory 729 (64f18d020f552f7dd4ec)", f"{negative}: trajectory 911 (5a83f0148ac78b495f2f)"]
    assert all("recorded reward False, re-scored True" in line for line in agreement.disagreements)


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
