import json

import pytest

from negagent.errors import NegagentError
from negagent.importers import from_fireact, from_nat, main, read_question_file
from negagent.trajectory import load_trajectories


def test_nat_strategyqa(data_dir):
    root = data_dir / "nat" / "strategyqa"
    questions = read_question_file(root / "train.jsonl")
    pos, empty_pos = from_nat(root / "strategyqa_gpt-3.5_positive.json", questions, "strategyqa")
    neg, empty_neg = from_nat(root / "strategyqa_gpt-3.5_negative.json", questions, "strategyqa")
    assert (len(pos), empty_pos, len(neg), empty_neg) == (1070, 0, 1256, 7)
    assert all(t.reward for t in pos) and not any(t.reward for t in neg)
    assert {t.failure for t in neg} <= {"wrong_answer", "max_steps", "no_finish"}
    first = pos[0]
    assert first.question == "Are more people today related to Genghis Khan than Julius Caesar?"
    assert first.gold is True and first.provenance["temperature"] == 0.5
    assert first.messages[0]["train"] and not first.messages[1]["train"]
    assert len({t.id for t in pos + neg}) == len(pos + neg)


def test_nat_id_missing_from_question_file(data_dir, tmp_path):
    root = data_dir / "nat" / "strategyqa"
    with pytest.raises(NegagentError, match="not in the question file"):
        from_nat(root / "strategyqa_gpt-3.5_positive.json", {"other": {"question": "q"}}, "strategyqa")


def test_fireact(data_dir):
    trajs = from_fireact(data_dir / "trajectories" / "fireact" / "hotpotqa.jsonl", "hotpotqa")
    assert len(trajs) == 500
    assert trajs[0].pred == "Badr Hari" and trajs[0].reward
    mixed = from_fireact(data_dir / "trajectories" / "fireact" / "hotpotqa_multimethod.jsonl", "hotpotqa")
    assert len(mixed) == 733 and sum(not t.reward for t in mixed) == 40
    assert trajs[0].messages[0]["role"] == "assistant"


def test_cli_writes_and_refuses_to_overwrite(data_dir, tmp_path, capsys):
    out = tmp_path / "fireact.jsonl"
    src = str(data_dir / "trajectories" / "fireact" / "hotpotqa.jsonl")
    main(["fireact", src, "-o", str(out), "--task", "hotpotqa"])
    loaded, _ = load_trajectories(out, task="hotpotqa")
    assert len(loaded) == 500
    before = out.read_bytes()
    with pytest.raises(SystemExit) as exc:
        main(["fireact", src, "-o", str(out), "--task", "hotpotqa"])
    assert exc.value.code == 2 and "already exists" in capsys.readouterr().err
    assert out.read_bytes() == before


def test_fireact_without_reward_line(tmp_path):
    bad = tmp_path / "f.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}) + "\n")
    with pytest.raises(NegagentError, match=r"f\.jsonl:1: the last observation does not state the reward"):
        from_fireact(bad, "hotpotqa")
