"""The renderer: masks, end-of-turn training, truncation, and train/inference parity."""

import pytest

from negagent import tagging
from negagent.data import render_samples
from negagent.errors import NegagentError
from negagent.importers import from_nat, read_question_file
from negagent.render import IGNORE, Renderer, build_chat
from tests.helpers import make_traj

STRATEGY_CFG = {"positive": "Solve it correctly.", "negative": "Solve it incorrectly.", "seed": 0,
                "placement": "prefix", "grade_cuts": [0.4], "grade_tags": ["G0", "G1", "G2", "G3"]}


@pytest.fixture(scope="module")
def nat_strategyqa(data_dir):
    root = data_dir / "nat" / "strategyqa"
    questions = read_question_file(root / "train.jsonl")
    trajs = []
    for name in ("positive", "negative"):
        got, _ = from_nat(root / f"strategyqa_gpt-3.5_{name}.json", questions, "strategyqa")
        trajs += got
    return trajs


def trained_runs(sample):
    runs, current = [], []
    for tok, label in zip(sample.input_ids, sample.labels):
        if label != IGNORE:
            current.append(tok)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def check_masks(sample, chat, renderer):
    """Trained runs are exactly the trained assistant turns, each ending with end-of-turn."""
    assistant = [m for m in chat if m["role"] == "assistant" and m["train"]]
    runs = trained_runs(sample)
    assert len(runs) == len(assistant), sample.id
    for run, msg in zip(runs, assistant):
        assert run[-1] == renderer.end_of_turn_id, sample.id
        decoded = renderer.tokenizer.decode(run)
        assert decoded.endswith(renderer.end_of_turn), sample.id
        assert decoded[: -len(renderer.end_of_turn)].strip() == msg["content"].strip(), sample.id


@pytest.mark.parametrize("strategy", ["prefix", "suffix", "none", "positive_only", "graded"])
def test_nat_strategyqa_masks_under_every_strategy(nat_strategyqa, tokenizer, strategy):
    assert len(nat_strategyqa) == 1070 + 1256  # 7 empty negatives skipped
    renderer = Renderer(tokenizer, max_length=4096)
    cfg = {**STRATEGY_CFG, "strategy": strategy}
    tagged = tagging.tag_samples(nat_strategyqa, cfg)
    samples = render_samples(tagged, renderer, "Answer with tools.")
    assert len(samples) == (1070 if strategy == "positive_only" else 2326)
    for tagged_sample, sample in zip(tagged, samples):
        traj = tagged_sample.trajectory
        chat = build_chat("Answer with tools.", traj.question, traj.messages, tag=tagged_sample.tag,
                          placement=tagged_sample.placement)
        check_masks(sample, chat, renderer)
        # Instructions, question and tag are never trained.
        first_trained = next(i for i, label in enumerate(sample.labels) if label != IGNORE)
        prompt = renderer.prompt_ids(chat[:2])
        assert first_trained == len(prompt)
        if tagged_sample.tag:
            assert tagged_sample.tag in tokenizer.decode(sample.input_ids[:first_trained])


def test_parity_every_sample_every_turn(nat_strategyqa, tokenizer):
    """The inference prompt at turn k is the training sample's prefix, and the template's own."""
    renderer = Renderer(tokenizer, max_length=4096)
    cfg = {**STRATEGY_CFG, "strategy": "prefix"}
    for tagged_sample in tagging.tag_samples(nat_strategyqa, cfg):
        traj = tagged_sample.trajectory
        chat = build_chat("Answer with tools.", traj.question, traj.messages, tag=tagged_sample.tag)
        sample = renderer.training(chat, traj.id)
        for k, msg in enumerate(chat):
            if msg["role"] != "assistant":
                continue
            prompt = renderer.prompt_ids(chat[:k])
            assert sample.input_ids[: len(prompt)] == prompt, (traj.id, k)
            plain = [{"role": m["role"], "content": m["content"]} for m in chat[:k]]
            reference = tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=True, return_dict=False)
            assert prompt == reference, (traj.id, k)


def test_untrained_turns_and_zero_trained_is_an_error(tokenizer):
    renderer = Renderer(tokenizer)
    traj = make_traj(0, True, turns=3)
    traj.messages[0]["train"] = False
    chat = build_chat("I", traj.question, traj.messages)
    sample = renderer.training(chat, traj.id)
    assert len(trained_runs(sample)) == 2
    for msg in traj.messages:
        msg["train"] = False
    with pytest.raises(NegagentError, match="sample t0: no trained tokens"):
        renderer.training(build_chat("I", traj.question, traj.messages), traj.id)


def test_truncation_is_counted_and_total_truncation_is_an_error(tokenizer):
    traj = make_traj(0, True, turns=4)
    chat = build_chat("Instructions " * 20, traj.question, traj.messages)
    full = Renderer(tokenizer).training(chat, "a")
    cut_at = len(full.input_ids) - 5
    cut = Renderer(tokenizer, max_length=cut_at).training(chat, "a")
    assert cut.truncated and len(cut.input_ids) == cut_at and not full.truncated
    with pytest.raises(NegagentError, match="no trained tokens after truncation"):
        Renderer(tokenizer, max_length=30).training(chat, "a")


def test_tokenization_mismatch_is_a_hard_error(tokenizer):
    # Newlines at the start of a turn merge with the template's newline when tokenized whole.
    chat = build_chat("I", "q", [{"role": "assistant", "content": "\n\n\nThought: x\nAction: finish[1]"}])
    with pytest.raises(NegagentError, match="tokenization mismatch"):
        Renderer(tokenizer).training(chat, "odd-sample")


def test_debug_view_marks_trained_spans(tokenizer):
    renderer = Renderer(tokenizer)
    traj = make_traj(7, True, turns=2)
    view = renderer.debug_view(renderer.training(build_chat("I", traj.question, traj.messages, tag="TAG"), "x"))
    assert "[[Thought: done.\nAction: finish[7]<|im_end|>]]" in view
    assert "[[TAG" not in view and "Observation: 1" in view and "[[Observation" not in view
