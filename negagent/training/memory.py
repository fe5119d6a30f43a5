"""The memory a training run's model states need: one line before the model is built, and a
refusal when they cannot fit.

Model states are the weights, gradients and optimizer states; activations come on top (they grow
with batch and sequence length and are not estimated). Parameter counts come from the model's
config on the meta device, so no weights are loaded; run this before DeepSpeed's config is set up,
or ZeRO-3 would try to partition the meta model.

- Full fine-tuning with DeepSpeed: DeepSpeed's own estimate for the stage, offload and ranks
  (`estimate_zero2_model_states_mem_needs`, `estimate_zero3_model_states_mem_needs`: 16-bit weights
  and gradients, float32 master weights and two AdamW moments; its CPU figures are per node).
- Full fine-tuning without DeepSpeed: AdamW keeps weights, gradients and two moments in the weights'
  dtype on every rank: 4 x 4 = 16 bytes per parameter in float32 (mixed precision adds no copy).
- LoRA: the frozen weights at their dtype's size (16-bit under DeepSpeed with bf16, which casts the
  model; split over the ranks under ZeRO-3, in CPU memory with offload) plus 16 bytes per adapter
  parameter (float32 weight, gradient and two moments).

On a GPU the per-GPU figure is compared with the GPU's total memory. On CPU ranks every rank's
"device" states are host memory too, so the ranks of this node times the per-rank figure, plus the
CPU figure, is compared with the host's available memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from negagent.errors import NegagentError

GIB = 2**30
ADAM_STATES = 4  # weight, gradient and two AdamW moments, each the size of the weight
ADAPTER_BYTES = 16  # a float32 adapter parameter with its gradient and two AdamW moments


@dataclass(frozen=True)
class ParameterCounts:
    """Distinct parameters (tied ones once), the largest module's own parameters, LoRA parameters."""

    total: int
    largest_layer: int
    adapter: int


@dataclass(frozen=True)
class Estimate:
    """Bytes of model states per rank's device and per node's CPU memory, and how they were reckoned."""

    device_bytes: int
    cpu_bytes: int
    basis: str


def parameter_counts(cfg: Mapping[str, Any]) -> ParameterCounts:
    """Counts for `cfg.model` (and, for LoRA, `cfg.trainer.lora.r` over `model.lora_target_modules`),
    from the model built on the meta device."""
    from transformers import AutoModelForCausalLM

    from negagent.models import model_config

    config = model_config(cfg["model"])
    config._attn_implementation = "eager"  # counting needs no attention kernel, nor its checks
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum({id(p): p.numel() for p in model.parameters()}.values())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    targets = cfg["model"].get("lora_target_modules") or ["q_proj", "k_proj", "v_proj", "o_proj"]
    rank = int(cfg["trainer"]["lora"]["r"])
    adapter = sum(rank * (m.in_features + m.out_features) for name, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets))
    return ParameterCounts(total, largest, adapter)


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def estimate(cfg: Mapping[str, Any], counts: ParameterCounts, *, world_size: int, local_ranks: int, bf16: bool) -> Estimate:
    """Model-state memory for `cfg.trainer`'s method and DeepSpeed stage on `world_size` ranks, of
    which `local_ranks` share this node."""
    from negagent.models import resolve_dtype
    from negagent.training.deepspeed_config import STAGES

    trainer = cfg["trainer"]
    stage_name = trainer.get("deepspeed")
    stage = STAGES.get(stage_name) if stage_name else None
    offload = stage_name == "zero3_offload"
    nodes = max(1, world_size // local_ranks)
    ranks = f"{world_size} rank{'s' if world_size > 1 else ''}"
    if trainer["method"] == "lora":
        itemsize = (2 if bf16 else 4) if stage else resolve_dtype(cfg["model"].get("dtype"), training=True).itemsize
        frozen = itemsize * (counts.total - counts.adapter)
        adapter = ADAPTER_BYTES * counts.adapter
        where = "the frozen weights"
        if stage == 3:
            frozen //= world_size
            where += f" split over {ranks}"
        if offload:
            device, cpu, where = adapter, frozen * local_ranks, where + " in CPU memory"
        else:
            device, cpu = frozen + adapter, 0
        basis = (f"LoRA: {where} at {itemsize} bytes per parameter ({_millions(counts.total)}) "
                 f"+ {ADAPTER_BYTES} bytes per adapter parameter ({_millions(counts.adapter)})")
        return Estimate(device, cpu, basis)
    if stage is None:
        itemsize = resolve_dtype(cfg["model"].get("dtype"), training=True).itemsize
        per_param = ADAM_STATES * itemsize
        basis = (f"full fine-tuning with AdamW: weights, gradients and two moments at {itemsize} bytes each, "
                 f"{per_param} bytes per parameter ({_millions(counts.total)})")
        return Estimate(per_param * counts.total, 0, basis)
    how = f"{local_ranks} per node, {nodes} node{'s' if nodes > 1 else ''}"
    if stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        cpu, device = estimate_zero2_model_states_mem_needs(counts.total, num_gpus_per_node=local_ranks, num_nodes=nodes,
                                                            cpu_offload=False)
        basis = f"DeepSpeed's estimate for ZeRO-2 on {ranks} ({how}): {_millions(counts.total)} parameters"
        return Estimate(device, cpu, basis)
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    # The `tiny` source builds its model directly, outside zero.Init; from_pretrained loads under it.
    zero_init = cfg["model"].get("source") != "tiny"
    cpu, device, _ = estimate_zero3_model_states_mem_needs(counts.total, counts.largest_layer, num_gpus_per_node=local_ranks,
                                                           num_nodes=nodes, cpu_offload=offload, cpu_offload_params=offload,
                                                           zero_init=zero_init)
    basis = (f"DeepSpeed's estimate for ZeRO-3{' with CPU offload' if offload else ''} on {ranks} ({how}), "
             f"zero_init={int(zero_init)}: {_millions(counts.total)} parameters, largest layer {_millions(counts.largest_layer)}")
    return Estimate(device, cpu, basis)


def gpu_memory_bytes() -> int:
    """Total memory of this rank's GPU."""
    return int(torch.cuda.mem_get_info()[1])


def host_available_bytes() -> int:
    """Memory this host can still give (psutil's `available`)."""
    import psutil

    return int(psutil.virtual_memory().available)


def _gib(n: int) -> str:
    return f"{n / GIB:.3f} GiB"


def check_fits(est: Estimate, *, on_gpu: bool, local_ranks: int) -> str:
    """The memory line for `est`; a one-line NegagentError saying what to change when it cannot fit."""
    if on_gpu:
        has = gpu_memory_bytes()
        if est.device_bytes > has:
            raise NegagentError(
                f"the model states need about {_gib(est.device_bytes)} per GPU ({est.basis}), more than this GPU's "
                f"{_gib(has)}: use trainer=zero3_offload, more ranks (trainer.nproc_per_node) or trainer.method=lora")
        return (f"memory: model states need about {_gib(est.device_bytes)} per GPU and {_gib(est.cpu_bytes)} of CPU memory "
                f"per node ({est.basis}); this GPU has {_gib(has)}")
    need = local_ranks * est.device_bytes + est.cpu_bytes
    has = host_available_bytes()
    if need > has:
        raise NegagentError(
            f"the model states need about {_gib(need)} of host memory ({est.basis}), more than the {_gib(has)} available: "
            f"use trainer.method=lora, a smaller model, or GPUs")
    return (f"memory: model states need about {_gib(need)} of host memory ({local_ranks} x {_gib(est.device_bytes)} per rank "
            f"+ {_gib(est.cpu_bytes)} CPU; {est.basis}); {_gib(has)} available")


def report(cfg: Mapping[str, Any], *, world_size: int, bf16: bool, is_main: bool) -> str:
    """Estimate, check and (on the main rank) print the memory line; returns it. Every rank checks its
    own device."""
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    est = estimate(cfg, parameter_counts(cfg), world_size=world_size, local_ranks=local_ranks, bf16=bf16)
    line = check_fits(est, on_gpu=torch.cuda.is_available(), local_ranks=local_ranks)
    if is_main:
        print(line, flush=True)
    return line
