"""Micro-batch plans, packing without cross-sample attention, and loss normalisation."""

from __future__ import annotations

import random

import pytest
import torch

from negagent.batching import GROUP_WINDOW, MicroBatches, collate, plan_micro_batches, processed_tokens, real_tokens
from negagent.errors import NegagentError
from negagent.loss import normalised_loss
from negagent.render import IGNORE, RenderedSample
from tests.helpers import TINY_MODEL


def fake_sample(i: int, length: int, vocab: int = 1000, trained_from: int | None = None) -> RenderedSample:
    rng = random.Random(i)
    ids = [rng.randrange(3, vocab) for _ in range(length)]
    start = trained_from if trained_from is not None else length // 2
    labels = [IGNORE] * start + ids[start:]
    return RenderedSample(f"s{i}", ids, labels, positive=bool(i % 2))


@pytest.fixture(scope="module")
def tiny_model():
    from negagent.models import load_model

    model = load_model(TINY_MODEL)
    model.eval()
    return model


@pytest.mark.parametrize("mode", ["grouped", "packed", "padded"])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_plan_uses_every_sample_once_and_evens_out_ranks(mode, world):
    lengths = [random.Random(k).randrange(50, 900) for k in range(37)]
    plan = plan_micro_batches(lengths, 4, mode, seed=1, world_size=world)
    assert sorted(i for batch in plan for i in batch) == list(range(37))
    assert len(plan) % world == 0 and all(1 <= len(b) <= 4 for b in plan)
    assert plan == plan_micro_batches(lengths, 4, mode, seed=1, world_size=world)  # seeded


def test_plan_rejects_bad_settings():
    with pytest.raises(NegagentError, match="trainer.batching='bogus'"):
        plan_micro_batches([10, 20], 2, "bogus", seed=0)
    with pytest.raises(NegagentError, match="cannot feed 4 ranks"):
        plan_micro_batches([10, 20], 2, "grouped", seed=0, world_size=4)


@pytest.fixture(scope="module")
def nat_lengths(data_dir):
    """Token lengths of the NAT StrategyQA trajectories (positives and negatives) as rendered for training."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from train_throughput import load_samples

    samples, _ = load_samples(data_dir, 4096)
    return [len(s.input_ids) for s in samples]


@pytest.mark.parametrize("batch_size", [4, 8, 16])
def test_grouped_batches_pad_under_ten_percent_on_real_lengths(nat_lengths, batch_size):
    plan = plan_micro_batches(nat_lengths, batch_size, "grouped", seed=0)
    processed = sum(len(b) * max(nat_lengths[i] for i in b) for b in plan)
    pad_fraction = 1 - sum(nat_lengths) / processed
    naive = plan_micro_batches(nat_lengths, batch_size, "padded", seed=0)
    naive_fraction = 1 - sum(nat_lengths) / sum(len(b) * max(nat_lengths[i] for i in b) for b in naive)
    assert pad_fraction < 0.10 < naive_fraction, (pad_fraction, naive_fraction)
    assert GROUP_WINDOW >= 8


def test_packed_layout_restarts_positions_and_never_targets_across_samples():
    samples = [fake_sample(0, 7, trained_from=2), fake_sample(1, 5, trained_from=1)]
    batch = collate(samples, [0, 1], packed=True, pad_id=0, loss_norm="token_mean")
    assert batch["input_ids"].shape == (1, 12) and "attention_mask" not in batch
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4]]
    # The last token of each sample has no target: it must not learn to predict the next sample.
    assert batch["targets"][0, 6] == IGNORE and batch["targets"][0, 11] == IGNORE
    assert batch["targets"][0, :6].tolist() == [IGNORE, samples[0].input_ids[2], *samples[0].input_ids[3:7]]
    assert real_tokens(batch) == processed_tokens(batch) == 12


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_sample_logits_equal_its_logits_alone(tiny_model, attn):
    tiny_model.config._attn_implementation = attn
    samples = [fake_sample(k, n) for k, n in enumerate([9, 23, 4, 15])]
    packed = collate(samples, range(4), packed=True, pad_id=0, loss_norm="token_mean")
    with torch.no_grad():
        logits = tiny_model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits[0]
        start = 0
        for s in samples:
            alone = tiny_model(input_ids=torch.tensor([s.input_ids]), use_cache=False).logits[0]
            assert torch.allclose(logits[start : start + len(s.input_ids)], alone, atol=1e-5), s.id
            start += len(s.input_ids)
        # Control: with positions that do not restart, the samples do attend to each other.
        flat = tiny_model(input_ids=packed["input_ids"], use_cache=False).logits[0]
        assert not torch.allclose(flat[9:32], logits[9:32], atol=1e-3)
    tiny_model.config._attn_implementation = "sdpa"


@pytest.mark.parametrize("loss_norm", ["token_mean", "seq_mean"])
def test_packed_and_padded_batches_give_the_same_loss(tiny_model, loss_norm):
    samples = [fake_sample(k, n, trained_from=t) for k, (n, t) in enumerate([(9, 3), (23, 20), (4, 1), (15, 5)])]

    def loss_of(batch):
        extra = {"position_ids": batch["position_ids"]} if "position_ids" in batch else {"attention_mask": batch["attention_mask"]}
        with torch.no_grad():
            logits = tiny_model(input_ids=batch["input_ids"], use_cache=False, **extra).logits
        return normalised_loss(logits, batch["targets"], batch["weights"], batch["weights"].sum()).item()

    packed = loss_of(collate(samples, range(4), packed=True, pad_id=0, loss_norm=loss_norm))
    padded = loss_of(collate(samples, range(4), packed=False, pad_id=0, loss_norm=loss_norm))
    assert packed == pytest.approx(padded, abs=1e-5)
    # Reference: per-sample mean cross-entropy, averaged by tokens or by samples.
    sums, counts = [], []
    with torch.no_grad():
        for s in samples:
            logits = tiny_model(input_ids=torch.tensor([s.input_ids]), use_cache=False).logits[0, :-1]
            ce = torch.nn.functional.cross_entropy(logits, torch.tensor(s.labels[1:]), ignore_index=IGNORE, reduction="sum")
            sums.append(ce.item())
            counts.append(sum(t != IGNORE for t in s.labels[1:]))
    expected = sum(sums) / sum(counts) if loss_norm == "token_mean" else sum(a / n for a, n in zip(sums, counts)) / len(samples)
    assert packed == pytest.approx(expected, rel=1e-5)


def test_loss_does_not_depend_on_how_a_step_is_split(tiny_model):
    """Two micro-batches with the step's normaliser sum to the loss of one big micro-batch."""
    samples = [fake_sample(k, n) for k, n in enumerate([12, 30, 7, 19])]
    for loss_norm in ("token_mean", "seq_mean"):
        whole = collate(samples, range(4), packed=True, pad_id=0, loss_norm=loss_norm)
        halves = [collate(samples[:1], [0], packed=True, pad_id=0, loss_norm=loss_norm),
                  collate(samples[1:], [1, 2, 3], packed=True, pad_id=0, loss_norm=loss_norm)]
        norm = sum(h["weights"].sum() for h in halves)
        with torch.no_grad():
            def run(b):
                logits = tiny_model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits
                return normalised_loss(logits, b["targets"], b["weights"], norm).item()
            assert sum(run(h) for h in halves) == pytest.approx(run(whole), rel=1e-5)


def test_micro_batches_dataset_yields_planned_groups():
    samples = [fake_sample(k, 5 + k) for k in range(6)]
    plan = plan_micro_batches([len(s.input_ids) for s in samples], 4, "grouped", seed=0, world_size=2)
    dataset = MicroBatches(samples, plan, mode="grouped", pad_id=0, loss_norm="seq_mean")
    assert len(dataset) == len(plan) == 2
    for k, batch in enumerate(dataset):
        assert batch["sample_index"].tolist() == plan[k]
        assert batch["input_ids"].shape[0] == len(plan[k])
        # seq_mean: each sample's weights sum to 1
        assert batch["weights"].sum(dim=1).tolist() == pytest.approx([1.0] * len(plan[k]))
    with pytest.raises(NegagentError, match="loss_norm"):
        MicroBatches(samples, plan, mode="grouped", pad_id=0, loss_norm="mean")


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("loss_norm", ["token_mean", "seq_mean"])
@pytest.mark.parametrize("mode", ["grouped", "packed"])
def test_trained_position_logits_give_the_full_logits_loss_and_gradients(mode, loss_norm, lora):
    """The training forward projects only trained positions onto the vocabulary; loss and every
    gradient equal those of the full-logits computation."""
    from peft import LoraConfig, get_peft_model

    from negagent.loss import accepts_logits_to_keep, trained_logits, weighted_loss_sum
    from negagent.models import load_model

    model = load_model(TINY_MODEL)
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                                 task_type="CAUSAL_LM", init_lora_weights=False))
    model.train()
    assert accepts_logits_to_keep(model)
    samples = [fake_sample(k, n, trained_from=t) for k, (n, t) in enumerate([(9, 3), (23, 20), (4, 1), (15, 5)])]
    batch = collate(samples, range(4), packed=mode == "packed", pad_id=0, loss_norm=loss_norm)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    norm = batch["weights"].sum()
    trainable = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads(only_trained: bool):
        model.zero_grad(set_to_none=True)
        if only_trained:
            logits, _ = trained_logits(model, inputs, batch["targets"])
            assert logits.shape == (int((batch["targets"] != IGNORE).sum()), model.config.vocab_size)
        else:
            logits = model(**inputs, use_cache=False).logits
            assert logits.shape[:2] == batch["targets"].shape
        loss = weighted_loss_sum(logits, batch["targets"], batch["weights"]) / norm
        loss.backward()
        return loss.item(), [p.grad.clone() for p in trainable]

    full_loss, full_grads = loss_and_grads(False)
    kept_loss, kept_grads = loss_and_grads(True)
    assert kept_loss == pytest.approx(full_loss, abs=1e-5)
    for full, kept in zip(full_grads, kept_grads):
        assert torch.allclose(full, kept, atol=1e-5, rtol=1e-4)
