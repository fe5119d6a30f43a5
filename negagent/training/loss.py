"""The training loss: weighted next-token cross-entropy with an explicit normaliser.

`weights` (from `negagent.training.batching.collate`) encode `token_mean` or `seq_mean`; `normaliser` is the
sum of the weights over the whole optimizer step (all gradient-accumulation micro-batches and all
ranks), so the result does not depend on how a step is split into micro-batches or ranks.

Only trained positions (target != IGNORE, about a third of the tokens of a ReAct trajectory) enter
the loss, so `trained_logits` projects only those hidden states onto the vocabulary: the LM head
(49k-wide for SmolLM2) otherwise dominates the compute of small models.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from negagent.render import IGNORE


def weighted_loss_sum(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Sum over positions of weight * cross-entropy (targets are already shifted; IGNORE is skipped).

    `logits` are either at every position (`targets.shape + (vocab,)`) or only at the trained
    positions (`(n_trained, vocab)`, in row-major order, as `trained_logits` returns them).
    """
    if logits.dim() == 2 and logits.shape[0] != targets.numel():
        keep = targets != IGNORE
        targets, weights = targets[keep], weights[keep]
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE, reduction="none")
    return (ce * weights.reshape(-1).to(ce.dtype)).sum()


def normalised_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, normaliser: torch.Tensor | float) -> torch.Tensor:
    return weighted_loss_sum(logits, targets, weights) / normaliser


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the causal LM under any peft/DeepSpeed wrappers takes `logits_to_keep`."""
    inner = getattr(model, "module", model)  # DeepSpeed engine or DDP wrapper
    if hasattr(inner, "get_base_model"):  # peft
        inner = inner.get_base_model()
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def trained_logits(model: torch.nn.Module, inputs: Mapping[str, Any], targets: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """(logits, model output) for a micro-batch; logits are `(n_trained, vocab)` at the trained
    positions where the model supports a boolean `logits_to_keep` (transformers' causal LMs),
    otherwise at every position. Either shape goes straight into `weighted_loss_sum`.

    `inputs` reach the model as given: a packed row's position_ids and, for flash-attention, its
    variable-length arguments (cu_seq_lens_q/k, max_length_q/k) are what keep samples apart.
    """
    if accepts_logits_to_keep(model):
        outputs = model(**inputs, use_cache=False, logits_to_keep=(targets != IGNORE).to(targets.device))
    else:
        outputs = model(**inputs, use_cache=False)
    return outputs.logits, outputs
