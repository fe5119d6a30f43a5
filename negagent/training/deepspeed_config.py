"""DeepSpeed JSON generated from the `trainer` config.

Batch sizes are explicit (never "auto" for train_batch_size): one micro-batch (a whole planned
group of samples, see `negagent.training.batching`) per rank per forward, `grad_accum` micro-batches per
optimizer step. ZeRO-3 saves gather the 16-bit weights so the final save holds the full model.
With CPU offload the optimizer is DeepSpeed's own (its CPU Adam); otherwise the Trainer's AdamW.

Sizes follow the model's hidden size h as transformers' "auto" values do: reduce buckets of h*h
elements, ZeRO-3 prefetch buckets of 0.9*h*h, and parameters under 10*h elements kept whole on
every rank (norms and biases: gathering them would cost more than holding them). `h` is read from
the model's config before the model is loaded (`negagent.models.model_config`), since ZeRO-3
partitions the weights while they load.
"""

from __future__ import annotations

from typing import Any, Mapping

from negagent.errors import NegagentError

STAGES = {"zero2": 2, "zero3": 3, "zero3_offload": 3}


def check_stage(name: str | None) -> None:
    if name is not None and name not in STAGES:
        raise NegagentError(f"trainer.deepspeed={name!r} is not a DeepSpeed setting; choose null or one of: {', '.join(STAGES)}")


def hidden_size(config: Any) -> int:
    """The hidden size transformers' "auto" DeepSpeed values read: `hidden_size`, else the largest of
    `hidden_sizes`, on the config or its `text_config`."""
    for c in (config, getattr(config, "text_config", None)):
        if getattr(c, "hidden_size", None):
            return int(c.hidden_size)
        if getattr(c, "hidden_sizes", None):
            return int(max(c.hidden_sizes))
    raise NegagentError(f"{type(config).__name__} has neither hidden_size nor hidden_sizes: DeepSpeed's bucket sizes cannot be set")


def build(trainer: Mapping[str, Any], *, world_size: int, bf16: bool, hidden_size: int, on_gpu: bool) -> dict[str, Any] | None:
    """The DeepSpeed config dict for `trainer.deepspeed`, or None when DeepSpeed is off; buckets sized
    from the model's `hidden_size`; `on_gpu`: the ranks run on GPUs (else DeepSpeed's CPU accelerator)."""
    name = trainer.get("deepspeed")
    check_stage(name)
    if name is None:
        return None
    grad_accum = int(trainer["grad_accum"])
    h = int(hidden_size)
    zero: dict[str, Any] = {
        "stage": STAGES[name],
        # On GPUs gradient reduction runs on its own CUDA stream, beside the backward pass. DeepSpeed's
        # CPU accelerator has no streams (Stream() is None, a synchronized device): nothing could
        # overlap, and ZeRO-3 would be handed a None stream.
        "overlap_comm": bool(on_gpu),
        "contiguous_gradients": True,
        "reduce_bucket_size": h * h,
    }
    if STAGES[name] == 3:
        zero.update({"stage3_gather_16bit_weights_on_model_save": True, "stage3_prefetch_bucket_size": int(0.9 * h * h),
                     "stage3_param_persistence_threshold": 10 * h})
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": grad_accum * world_size,
        "gradient_clipping": float(trainer["max_grad_norm"]),
        "bf16": {"enabled": bf16},
        "zero_optimization": zero,
        "steps_per_print": 10**9,  # the Trainer logs; DeepSpeed's own prints would duplicate it
        "wall_clock_breakdown": False,
    }
    if name == "zero3_offload":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": float(trainer["lr"]), "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": float(trainer["weight_decay"])},
        }
    return config
