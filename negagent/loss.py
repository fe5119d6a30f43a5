"""The training loss: weighted next-token cross-entropy with an explicit normaliser.

`weights` (from `negagent.batching.collate`) encode `token_mean` or `seq_mean`; `normaliser` is the
sum of the weights over the whole optimizer step (all gradient-accumulation micro-batches and all
ranks), so the result does not depend on how a step is split into micro-batches or ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from negagent.render import IGNORE


def weighted_loss_sum(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Sum over positions of weight * cross-entropy (targets are already shifted; IGNORE is skipped)."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="none")
    return (ce * weights.flatten().to(ce.dtype)).sum()


def normalised_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, normaliser: torch.Tensor | float) -> torch.Tensor:
    return weighted_loss_sum(logits, targets, weights) / normaliser
