"""The final save of a run, and the proof that it holds the trained weights.

A ZeRO-3 model keeps only a shard of each parameter per rank; a careless save writes empty or
tiny tensors. `verify_saved_model` gathers the full in-memory weights (collectively, on every
rank), reads back the safetensors files just written, and compares the parameter count and a
SHA-256 over the exact tensor bytes (names sorted). Only a verified save gets a `done` marker.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Iterator

import torch

from negagent.errors import NegagentError


def tensor_digest(tensors: dict[str, torch.Tensor]) -> tuple[int, str]:
    """(number of elements, SHA-256 over names, dtypes, shapes and bytes in sorted name order)."""
    digest = hashlib.sha256()
    count = 0
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        count += t.numel()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return count, digest.hexdigest()


@contextlib.contextmanager
def gathered(model: torch.nn.Module) -> Iterator[None]:
    """Full parameters on every rank inside the block (ZeRO-3 shards are gathered; else a no-op)."""
    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def in_memory_weights(model: torch.nn.Module, adapter: bool) -> dict[str, torch.Tensor]:
    """What the final save should contain: the adapter (LoRA) or every named parameter/buffer.

    Call inside `gathered(model)`.
    """
    if adapter:
        from peft import get_peft_model_state_dict

        return {k: v.detach().clone().cpu() for k, v in get_peft_model_state_dict(model).items()}
    return {k: v.detach().clone().cpu() for k, v in model.state_dict().items()}


def saved_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the *.safetensors files in `folder`; a file that cannot be read (cut short by a
    full disk or a kill) is a one-line error naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise NegagentError(f"{folder}: the final save wrote no *.safetensors file")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            out.update(load_file(f))
        except SafetensorError as exc:
            raise NegagentError(f"{f}: the saved weights cannot be read ({' '.join(str(exc).split())})") from None
    return out


def unique_parameter_count(model: torch.nn.Module, trainable_only: bool) -> int:
    """Elements of the model's distinct parameters (tied weights once; ZeRO-3 full sizes)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.ds_numel if hasattr(p, "ds_numel") else p.numel()
    return total


def verify_saved_model(model: torch.nn.Module, folder: Path, *, adapter: bool, is_main: bool) -> dict[str, object]:
    """Compare the saved files in `folder` with the in-memory model; collective over ranks.

    Returns {parameters, sha256} (on every rank); raises NegagentError on any mismatch.
    """
    with gathered(model):
        memory = in_memory_weights(model, adapter) if is_main else {}
    if not is_main:
        return {}
    saved = saved_weights(folder)
    missing = sorted(set(saved) - set(memory))
    if missing:
        raise NegagentError(f"{folder}: saved tensor {missing[0]} is not in the in-memory model")
    expected = unique_parameter_count(model, trainable_only=adapter)
    count, checksum = tensor_digest(saved)
    memory_count, memory_checksum = tensor_digest({k: memory[k] for k in saved})
    if count != expected or memory_count != count or checksum != memory_checksum:
        raise NegagentError(
            f"{folder}: the final save does not match the trained model (saved {count} parameters, "
            f"model has {expected}; checksums {'equal' if checksum == memory_checksum else 'differ'})"
        )
    return {"parameters": count, "sha256": checksum}
