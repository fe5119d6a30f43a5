"""Micro-batches for training: which samples go together, and how they are laid out as tensors.

Every micro-batch holds `batch_size` samples (the last ones may hold fewer). Modes:
- `grouped`: samples of similar length go together (seeded shuffle, then sorted inside windows of
  `GROUP_WINDOW` micro-batches) and are padded to the longest; few pads, no cross-sample compute.
- `packed`: the samples are laid end to end in one row with no padding at all; `position_ids`
  restart at 0 for each sample, which transformers' mask builder reads as separate sequences when
  there is no attention_mask, so attention never crosses a sample boundary with sdpa or eager (tests
  check this); they still compute the masked square. For flash-attention (`varlen=True`) the row
  also carries its variable-length arguments, as transformers' `DataCollatorWithFlattening(
  return_flash_attn_kwargs=True)` lays them out: `cu_seq_lens_q/k` (int32 sample boundaries) and
  `max_length_q/k` (Python ints), so the kernel attends within each sample and computes no square.
- `padded`: random samples padded to the longest (what the paper's code does); for comparison.

Targets are shifted inside each sample (`targets[i]` is the label of token `i + 1`), so a packed
row never trains the last token of one sample to predict the first token of the next. `weights`
carries the loss normalisation: `token_mean` weighs every trained token 1, `seq_mean` weighs each
token 1 / (trained tokens of its sample), so every sample counts the same.

The plan is fixed per run (the Trainer reorders micro-batches each epoch) and its length is a
multiple of the number of ranks, so every rank runs the same number of steps and no sample is
repeated to even them out.
"""

from __future__ import annotations

import itertools
import math
import random
from typing import Any, Sequence

import torch

from negagent.errors import NegagentError
from negagent.render import IGNORE, RenderedSample

MODES = ("grouped", "packed", "padded")
LOSS_NORMS = ("token_mean", "seq_mean")
GROUP_WINDOW = 16  # micro-batches sorted together in `grouped` mode: small enough to stay random


def plan_micro_batches(
    lengths: Sequence[int], batch_size: int, mode: str, seed: int, world_size: int = 1
) -> list[list[int]]:
    """Sample indices of each micro-batch; a multiple of `world_size` micro-batches, each index once."""
    if mode not in MODES:
        raise NegagentError(f"trainer.batching={mode!r} is not one of {', '.join(MODES)}")
    if batch_size < 1:
        raise NegagentError(f"trainer.per_device_batch_size={batch_size} must be at least 1")
    # Every rank runs the same number of non-empty micro-batches and no sample repeats, so the plan
    # needs at least as many samples as micro-batches once evened out (batch size 1 on 2 ranks with 7
    # samples would otherwise leave an empty micro-batch, which cannot be collated).
    evened = math.ceil(math.ceil(len(lengths) / batch_size) / world_size) * world_size
    if evened > len(lengths):
        raise NegagentError(
            f"{len(lengths)} training samples cannot feed {world_size} ranks the same number of micro-batches of at "
            f"most {batch_size} without repeating samples; add data, use fewer ranks or a larger per_device_batch_size"
        )
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    if mode == "grouped":
        window = batch_size * GROUP_WINDOW
        order = [i for w in range(0, len(order), window) for i in sorted(order[w : w + window], key=lambda i: -lengths[i])]
    batches = [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
    # Even out the ranks by splitting the largest micro-batches rather than repeating samples.
    while len(batches) % world_size:
        largest = max(range(len(batches)), key=lambda b: (len(batches[b]), -b))
        group = batches[largest]
        batches[largest : largest + 1] = [group[: len(group) // 2], group[len(group) // 2 :]]
    return batches


def _sample_arrays(sample: RenderedSample, loss_norm: str) -> tuple[list[int], list[int], list[float]]:
    targets = list(sample.labels[1:]) + [IGNORE]
    n_trained = sum(t != IGNORE for t in targets)
    if n_trained == 0:
        raise NegagentError(f"sample {sample.id}: no trained tokens after its first token")
    weight = 1.0 if loss_norm == "token_mean" else 1.0 / n_trained
    return list(sample.input_ids), targets, [weight if t != IGNORE else 0.0 for t in targets]


def collate(samples: Sequence[RenderedSample], indices: Sequence[int], *, packed: bool, pad_id: int, loss_norm: str,
            varlen: bool = False) -> dict[str, Any]:
    """Tensors of one micro-batch: input_ids, targets, weights, sample_index, and either
    position_ids (packed, one row; with `varlen` also flash-attention's cu_seq_lens_q/k and
    max_length_q/k) or attention_mask (padded rows; `varlen` changes nothing there)."""
    if loss_norm not in LOSS_NORMS:
        raise NegagentError(f"trainer.loss_norm={loss_norm!r} is not one of {', '.join(LOSS_NORMS)}")
    arrays = [_sample_arrays(s, loss_norm) for s in samples]
    batch: dict[str, Any] = {"sample_index": torch.tensor(list(indices), dtype=torch.long)}
    if packed:
        batch["input_ids"] = torch.tensor([[t for ids, _, _ in arrays for t in ids]])
        batch["position_ids"] = torch.tensor([[p for ids, _, _ in arrays for p in range(len(ids))]])
        batch["targets"] = torch.tensor([[t for _, tg, _ in arrays for t in tg]])
        batch["weights"] = torch.tensor([[w for _, _, ws in arrays for w in ws]], dtype=torch.float32)
        if varlen:
            lengths = [len(ids) for ids, _, _ in arrays]
            bounds = [0, *itertools.accumulate(lengths)]
            for side in ("q", "k"):
                batch[f"cu_seq_lens_{side}"] = torch.tensor(bounds, dtype=torch.int32)
                batch[f"max_length_{side}"] = max(lengths)
        return batch
    width = max(len(ids) for ids, _, _ in arrays)
    rows = len(arrays)
    batch["input_ids"] = torch.full((rows, width), pad_id, dtype=torch.long)
    batch["attention_mask"] = torch.zeros((rows, width), dtype=torch.long)
    batch["targets"] = torch.full((rows, width), IGNORE, dtype=torch.long)
    batch["weights"] = torch.zeros((rows, width), dtype=torch.float32)
    for r, (ids, targets, weights) in enumerate(arrays):
        n = len(ids)
        batch["input_ids"][r, :n] = torch.tensor(ids)
        batch["attention_mask"][r, :n] = 1
        batch["targets"][r, :n] = torch.tensor(targets)
        batch["weights"][r, :n] = torch.tensor(weights)
    return batch


def processed_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Positions the model computes for this micro-batch, pads included."""
    return batch["input_ids"].numel()


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Non-pad tokens of this micro-batch."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def trained_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["targets"] != IGNORE).sum())


class MicroBatches(torch.utils.data.Dataset):
    """A dataset whose items are whole micro-batches (use with batch size 1 and `first_item`);
    `varlen`: packed rows carry flash-attention's variable-length arguments (see `collate`)."""

    def __init__(self, samples: Sequence[RenderedSample], plan: list[list[int]], *, mode: str, pad_id: int, loss_norm: str,
                 varlen: bool = False):
        self.samples, self.plan = samples, plan
        self.packed, self.pad_id, self.loss_norm, self.varlen = mode == "packed", pad_id, loss_norm, varlen
        collate([samples[0]], [0], packed=self.packed, pad_id=pad_id, loss_norm=loss_norm)  # fail early on bad settings

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, k: int) -> dict[str, Any]:
        idx = self.plan[k]
        return collate([self.samples[i] for i in idx], idx, packed=self.packed, pad_id=self.pad_id, loss_norm=self.loss_norm,
                       varlen=self.varlen)


def first_item(items: list[dict[str, Any]]) -> dict[str, Any]:
    """DataLoader collate function for `MicroBatches` (each item is already a micro-batch)."""
    return items[0]
