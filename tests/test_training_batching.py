"""Micro-batch plans, packing without cross-sample attention, and loss normalisation."""

from __future__ import annotations

import random

import pytest
import torch

from negagent.training.batching import (GROUP_WINDOW, MicroBatches, collate, first_item, plan_micro_batches, processed_tokens,
                               real_tokens, trained_tokens)
from negagent.errors import NegagentError
from negagent.training.loss import normalised_loss
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

    from negagent.training.loss import accepts_logits_to_keep, trained_logits, weighted_loss_sum
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


# -- exact plans, layouts and counts of small cases ----------------------------------------------

LENGTHS = [5, 9, 3, 7, 1, 8, 2]  # random.Random(0) shuffles range(7) to [4, 2, 1, 0, 5, 3, 6]


@pytest.mark.parametrize(("mode", "world", "plan"), [
    # grouped: longest first (one window holds them all), so neighbours have similar lengths
    ("grouped", 1, [[1, 5], [3, 0], [2, 6], [4]]),
    # packed and padded: the seeded shuffle, cut into micro-batches
    ("packed", 1, [[4, 2], [1, 0], [5, 3], [6]]),
    ("padded", 1, [[4, 2], [1, 0], [5, 3], [6]]),
    # 3 ranks: the first largest micro-batches are halved until the count is a multiple of 3
    ("grouped", 3, [[1], [5], [3], [0], [2, 6], [4]]),
    ("padded", 3, [[4], [2], [1], [0], [5, 3], [6]]),
    ("packed", 2, [[4, 2], [1, 0], [5, 3], [6]]),  # already even
])
def test_plan_of_a_small_case_is_exact(mode, world, plan):
    assert plan_micro_batches(LENGTHS, 2, mode, seed=0, world_size=world) == plan


def test_plan_seed_changes_the_order_and_one_rank_is_the_default():
    # random.Random(1) shuffles range(7) to [3, 6, 5, 2, 0, 4, 1]; 3 micro-batches, left uneven for one rank
    assert plan_micro_batches(LENGTHS, 3, "padded", seed=1) == [[3, 6, 5], [2, 0, 4], [1]]


def test_plan_evens_out_ranks_by_halving_the_largest_batches():
    """4 ranks, 9 samples in batches of 4: [4, 4, 1] becomes [2, 2, 4, 1], the first largest halved."""
    plan = plan_micro_batches(list(range(9)), 4, "grouped", seed=0, world_size=4)
    assert [len(b) for b in plan] == [2, 2, 4, 1]
    assert plan == [[8, 7], [6, 5], [4, 3, 2, 1], [0]]
    # batch size 1 and as many samples as ranks (or a multiple): one sample each
    assert plan_micro_batches([3, 1, 2], 1, "grouped", seed=0, world_size=3) == [[0], [2], [1]]
    assert plan_micro_batches([3, 1, 2, 4], 1, "grouped", seed=0, world_size=2) == [[3], [0], [2], [1]]


def test_grouped_sorts_inside_windows_of_group_window_batches():
    """Batch size 2: windows of 32 samples; each window is sorted longest first, windows stay apart."""
    plan = plan_micro_batches(list(range(40)), 2, "grouped", seed=0)
    order = [i for b in plan for i in b]
    assert GROUP_WINDOW == 16
    assert order == [39, 38, 37, 36, 35, 34, 33, 30, 29, 28, 27, 23, 22, 21, 20, 18, 17, 15, 14, 13, 12, 11, 10, 9,
                     8, 7, 6, 5, 4, 3, 1, 0, 32, 31, 26, 25, 24, 19, 16, 2]


@pytest.mark.parametrize(("args", "message"), [
    (([10, 20], 2, "bogus", 0, 1), "trainer.batching='bogus' is not one of grouped, packed, padded"),
    (([10, 20], 0, "grouped", 0, 1), "trainer.per_device_batch_size=0 must be at least 1"),
    (([10, 20], 2, "grouped", 0, 4), "2 training samples cannot feed 4 ranks the same number of micro-batches of "
                                      "at most 2 without repeating samples; add data, use fewer ranks or a larger "
                                      "per_device_batch_size"),
    # One sample per micro-batch: 7 samples cannot make 8 micro-batches (it used to plan an empty one).
    (([5] * 7, 1, "packed", 0, 2), "7 training samples cannot feed 2 ranks the same number of micro-batches of "
                                   "at most 1 without repeating samples; add data, use fewer ranks or a larger "
                                   "per_device_batch_size"),
])
def test_plan_rejects_bad_settings_exactly(args, message):
    with pytest.raises(NegagentError) as err:
        plan_micro_batches(*args)
    assert str(err.value) == message


# Sample "a": 4 tokens, the last 3 trained; "b": 3 tokens, the last 2 trained; "c": only its first token trained.
SAMPLE_A = RenderedSample("a", [10, 11, 12, 13], [IGNORE, 11, 12, 13])
SAMPLE_B = RenderedSample("b", [20, 21, 22], [IGNORE, 21, 22])
SAMPLE_C = RenderedSample("c", [30, 31], [30, IGNORE])
X = IGNORE


@pytest.mark.parametrize(("loss_norm", "weights"), [
    ("token_mean", [1, 1, 1, 0, 1, 1, 0]),  # shifted: each sample's last position has no target
    ("seq_mean", [1 / 3, 1 / 3, 1 / 3, 0, 1 / 2, 1 / 2, 0]),  # each sample weighs 1 in all
])
def test_packed_batch_is_exact(loss_norm, weights):
    """One row without pads; positions restart per sample; targets shifted inside each sample."""
    batch = collate([SAMPLE_A, SAMPLE_B], [5, 2], packed=True, pad_id=99, loss_norm=loss_norm)
    assert sorted(batch) == ["input_ids", "position_ids", "sample_index", "targets", "weights"]
    assert batch["sample_index"].tolist() == [5, 2]
    assert batch["input_ids"].tolist() == [[10, 11, 12, 13, 20, 21, 22]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2]]
    assert batch["targets"].tolist() == [[11, 12, 13, X, 21, 22, X]]
    assert [batch[k].dtype for k in ("input_ids", "position_ids", "targets", "sample_index")] == [torch.long] * 4
    assert batch["weights"].dtype == torch.float32
    assert torch.equal(batch["weights"], torch.tensor([weights]))


@pytest.mark.parametrize(("loss_norm", "weights"), [
    ("token_mean", [[1, 1, 1, 0], [1, 1, 0, 0]]),
    ("seq_mean", [[1 / 3, 1 / 3, 1 / 3, 0], [1 / 2, 1 / 2, 0, 0]]),
])
def test_padded_batch_is_exact(loss_norm, weights):
    """Rows padded on the right with pad_id, masked out, without targets or weight."""
    batch = collate([SAMPLE_A, SAMPLE_B], [5, 2], packed=False, pad_id=99, loss_norm=loss_norm)
    assert sorted(batch) == ["attention_mask", "input_ids", "sample_index", "targets", "weights"]
    assert batch["sample_index"].tolist() == [5, 2]
    assert batch["input_ids"].tolist() == [[10, 11, 12, 13], [20, 21, 22, 99]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch["targets"].tolist() == [[11, 12, 13, X], [21, 22, X, X]]
    # integer ids, mask and targets (the mask is a 0/1 padding mask, not an additive float mask)
    assert [batch[k].dtype for k in ("input_ids", "attention_mask", "targets", "sample_index")] == [torch.long] * 4
    assert batch["weights"].dtype == torch.float32
    assert torch.equal(batch["weights"], torch.tensor(weights))


@pytest.mark.parametrize(("packed", "counts"), [(True, (7, 7, 5)), (False, (8, 7, 5))])
def test_token_counts(packed, counts):
    """processed includes pads, real excludes them, trained counts the targets."""
    batch = collate([SAMPLE_A, SAMPLE_B], [0, 1], packed=packed, pad_id=0, loss_norm="token_mean")
    assert (processed_tokens(batch), real_tokens(batch), trained_tokens(batch)) == counts


@pytest.mark.parametrize(("samples", "loss_norm", "message"), [
    ([SAMPLE_A], "mean", "trainer.loss_norm='mean' is not one of token_mean, seq_mean"),
    ([SAMPLE_A, SAMPLE_C], "token_mean", "sample c: no trained tokens after its first token"),
])
@pytest.mark.parametrize("packed", [True, False])
def test_collate_rejects_bad_settings_and_samples(samples, loss_norm, message, packed):
    """An unknown loss_norm is an error, and so is a sample whose only trained token is its first: it
    has no target once shifted (seq_mean would divide by 0)."""
    with pytest.raises(NegagentError) as err:
        collate(samples, range(len(samples)), packed=packed, pad_id=0, loss_norm=loss_norm)
    assert str(err.value) == message


@pytest.mark.parametrize("mode", ["packed", "padded"])
def test_micro_batches_collate_each_planned_group_with_the_settings(mode):
    """Item k is the collated micro-batch k of the plan, in the mode's layout with the run's pad id."""
    samples = [SAMPLE_B, SAMPLE_A, SAMPLE_B]
    dataset = MicroBatches(samples, [[2], [1, 0]], mode=mode, pad_id=99, loss_norm="seq_mean")
    assert len(dataset) == 2
    for k, idx in enumerate([[2], [1, 0]]):
        expected = collate([samples[i] for i in idx], idx, packed=mode == "packed", pad_id=99, loss_norm="seq_mean")
        got = dataset[k]
        assert sorted(got) == sorted(expected)
        assert all(torch.equal(got[key], expected[key]) for key in expected), k
    assert ("position_ids" in dataset[1]) == (mode == "packed")
    if mode == "padded":
        assert dataset[1]["input_ids"].tolist() == [[10, 11, 12, 13], [20, 21, 22, 99]]
    items = [dataset[1], dataset[0]]
    assert first_item(items) is items[0]  # the DataLoader's batch of one micro-batch is that micro-batch
    # a one-sample data set is a valid one
    single = MicroBatches([SAMPLE_A], [[0]], mode=mode, pad_id=99, loss_norm="token_mean")
    assert single[0]["input_ids"].tolist() == [[10, 11, 12, 13]]


# -- flash-attention's variable-length arguments, and packed training without cross-sample attention ----
def test_packed_varlen_arguments_are_those_of_transformers_flattening_collator():
    """With `varlen`, a packed row carries cu_seq_lens_q/k and max_length_q/k exactly as transformers'
    DataCollatorWithFlattening(return_flash_attn_kwargs=True) builds them (int32 boundaries, Python ints)."""
    from transformers import DataCollatorWithFlattening

    samples = [SAMPLE_A, SAMPLE_B, RenderedSample("d", [40, 41], [IGNORE, 41])]
    ours = collate(samples, [0, 1, 2], packed=True, pad_id=0, loss_norm="token_mean", varlen=True)
    theirs = DataCollatorWithFlattening(return_flash_attn_kwargs=True)([{"input_ids": s.input_ids} for s in samples])
    for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
        assert ours[key].dtype == theirs[key].dtype == torch.int32
        assert ours[key].tolist() == theirs[key].tolist() == [0, 4, 7, 9]
    assert ours["max_length_q"] == ours["max_length_k"] == theirs["max_length_q"] == 4 and type(ours["max_length_q"]) is int
    assert torch.equal(ours["input_ids"], theirs["input_ids"]) and torch.equal(ours["position_ids"], theirs["position_ids"])
    # without varlen (sdpa, eager), and in padded rows, there are none
    assert sorted(collate(samples, [0, 1, 2], packed=True, pad_id=0, loss_norm="token_mean")) == [
        "input_ids", "position_ids", "sample_index", "targets", "weights"]
    assert sorted(collate(samples, [0, 1, 2], packed=False, pad_id=0, loss_norm="token_mean", varlen=True)) == [
        "attention_mask", "input_ids", "sample_index", "targets", "weights"]
    dataset = MicroBatches(samples, [[2, 0]], mode="packed", pad_id=0, loss_norm="token_mean", varlen=True)
    assert dataset[0]["cu_seq_lens_k"].tolist() == [0, 2, 6] and dataset[0]["max_length_k"] == 4


def test_varlen_arguments_reach_the_attention_through_the_training_loss(monkeypatch):
    """The Trainer's compute_loss (and trained_logits under it) hands a packed row's variable-length
    arguments to every attention layer unchanged; recorded by an attention function that runs sdpa."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    from negagent.models import load_model
    from negagent.training import recipe

    seen = []

    def recording(module, query, key, value, attention_mask, **kwargs):
        seen.append({k: v.tolist() if torch.is_tensor(v) else v for k, v in kwargs.items() if k.startswith(("cu_seq_lens", "max_length"))})
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, "negagent_recording", recording)
    monkeypatch.setitem(AttentionMaskInterface._global_mapping, "negagent_recording", sdpa_mask)
    model = load_model(TINY_MODEL)
    model.set_attn_implementation("negagent_recording")
    samples = [fake_sample(k, n, trained_from=t) for k, (n, t) in enumerate([(9, 3), (23, 20), (4, 1)])]
    batch = collate(samples, range(3), packed=True, pad_id=0, loss_norm="token_mean", varlen=True)
    trainer = object.__new__(recipe._trainer_class())  # compute_loss alone: no Trainer set-up needed
    trainer.order_log, trainer.token_counts = None, torch.zeros(2, dtype=torch.float64)
    trainer.accelerator = type("Accelerator", (), {"num_processes": 1})()
    loss = trainer.compute_loss(model, dict(batch))
    assert seen == [{"cu_seq_lens_q": [0, 9, 32, 36], "cu_seq_lens_k": [0, 9, 32, 36], "max_length_q": 23, "max_length_k": 23}] * 2
    model.set_attn_implementation("sdpa")
    plain = {k: batch[k] for k in ("input_ids", "position_ids")}
    with torch.no_grad():
        logits = model(**plain, use_cache=False).logits
    assert loss.item() == pytest.approx(normalised_loss(logits, batch["targets"], batch["weights"], batch["weights"].sum()).item(),
                                        rel=1e-5)


def _losses_of_a_run(tmp_path, trajectories, *overrides):
    """Per-step losses and grad norms of a short in-process training run."""
    import json

    from negagent.training import recipe
    from tests.test_training_units import composed

    run_dir = tmp_path / "-".join(o.split("=")[-1] for o in overrides)
    run_dir.mkdir()
    cfg = composed("debug=smoke", f"data.trajectories={trajectories}", "trainer=full", "trainer.lr=1e-3", "trainer.max_steps=3",
                   "trainer.logging_steps=1", "trainer.per_device_batch_size=6", "trainer.save_steps=100", *overrides)
    recipe.train(cfg, run_dir)
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(m["loss"], m["grad_norm"]) for m in logged if "loss" in m]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_and_grouped_training_steps_give_the_same_losses(tmp_path, attn):
    """Real optimizer steps (full fine-tuning, one micro-batch of all 6 samples per step): packed rows
    without an attention mask train exactly as padded rows with one, with sdpa and with eager, so
    transformers keeps packed samples apart from their position_ids alone."""
    from negagent.trajectory import write_trajectories
    from tests.helpers import make_traj

    trajectories = tmp_path / "arith.jsonl"
    write_trajectories(trajectories, [make_traj(i, i % 3 != 0, turns=2 + i % 3) for i in range(6)])
    packed = _losses_of_a_run(tmp_path, trajectories, "trainer.batching=packed", f"model.attn_implementation={attn}")
    grouped = _losses_of_a_run(tmp_path, trajectories, "trainer.batching=grouped", f"model.attn_implementation={attn}")
    assert len(packed) == len(grouped) == 3
    for (loss_p, norm_p), (loss_g, norm_g) in zip(packed, grouped):
        # attention across samples moves the loss by about 1e-4 and the gradient norm by 1e-3 (relative) here
        assert loss_p == pytest.approx(loss_g, rel=1e-6) and norm_p == pytest.approx(norm_g, rel=1e-5)
    assert packed[-1][0] < packed[0][0]  # the steps did train
