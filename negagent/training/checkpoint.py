"""The final save of a run, and the proof that it holds the trained weights.

A ZeRO-3 model keeps only a shard of each parameter per rank; a careless save writes empty or
tiny tensors. `verify_saved_model` digests the in-memory weights and the safetensors files just
written and compares the parameter count and one checksum. It never holds the whole model: the
model is walked module by module, gathering one module's own parameters at a time (collectively,
on every rank; rank 0 digests each tensor as it goes), and the files are read one tensor at a time.
A LoRA adapter is small and is gathered whole. Only a verified save gets a `done` marker.

The checksum (`tensor_digest`) is the SHA-256 of the per-tensor SHA-256s in sorted name order, each
over `name|dtype|shape|` and the tensor's bytes; so tensors can be digested in any order, one at a time.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Iterator, Mapping

import torch

from negagent.errors import NegagentError

Records = dict[str, tuple[int, bytes]]  # name -> (elements, SHA-256 of the tensor)


def tensor_record(name: str, tensor: torch.Tensor) -> tuple[int, bytes]:
    """(elements, SHA-256 over `name|dtype|shape|` and the bytes) of one tensor."""
    t = tensor.detach().to("cpu").contiguous()
    digest = hashlib.sha256(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        digest.update(t.reshape(-1).view(torch.uint8).numpy())  # hashed in place, no bytes copy
    return t.numel(), digest.digest()


def combine(records: Mapping[str, tuple[int, bytes]]) -> tuple[int, str]:
    """(total elements, SHA-256 over the per-tensor digests in sorted name order)."""
    digest = hashlib.sha256()
    for name in sorted(records):
        digest.update(records[name][1])
    return sum(n for n, _ in records.values()), digest.hexdigest()


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> tuple[int, str]:
    """(number of elements, checksum) of a dict of tensors; equal to what `verify_saved_model` reports."""
    return combine({name: tensor_record(name, t) for name, t in tensors.items()})


@contextlib.contextmanager
def _gathered(params: list[torch.nn.Parameter]) -> Iterator[None]:
    """`params` whole on every rank inside the block (ZeRO-3 shards gathered; others as they are)."""
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def _own_state(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The module's own entries of `state_dict`: its parameters and persistent buffers."""
    for name, p in module._parameters.items():
        if p is not None:
            yield name, p
    for name, b in module._buffers.items():
        if b is not None and name not in module._non_persistent_buffers_set:
            yield name, b


def model_records(model: torch.nn.Module, *, digest: bool) -> Records:
    """Records of every `model.state_dict()` entry, one module's own parameters gathered at a time.

    Collective under ZeRO-3: every rank must call it; only where `digest` are tensors copied and
    hashed (the others return {}).
    """
    records: Records = {}
    for prefix, module in model.named_modules(remove_duplicate=False):  # shared modules under each name, as state_dict
        with _gathered(list(module.parameters(recurse=False))):
            if digest:
                for name, t in _own_state(module):
                    full = f"{prefix}.{name}" if prefix else name
                    records[full] = tensor_record(full, t)
    return records


def in_memory_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the adapter's weights (peft's state dict); call with the adapter gathered."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone().cpu() for k, v in get_peft_model_state_dict(model).items()}


def saved_records(folder: Path) -> Records:
    """Records of every tensor of the *.safetensors files in `folder`, read one at a time; a file that
    cannot be read (cut short by a full disk or a kill) is a one-line error naming it."""
    from safetensors import SafetensorError, safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise NegagentError(f"{folder}: the final save wrote no *.safetensors file")
    records: Records = {}
    for f in files:
        try:
            with safe_open(f, framework="pt") as reader:
                for name in reader.keys():
                    records[name] = tensor_record(name, reader.get_tensor(name))
        except SafetensorError as exc:
            raise NegagentError(f"{f}: the saved weights cannot be read ({' '.join(str(exc).split())})") from None
    return records


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
    """Compare the saved files in `folder` with the in-memory model (the adapter alone when `adapter`);
    collective over ranks.

    Returns {parameters, sha256} on the main rank and {} on the others; raises NegagentError on any
    mismatch. No rank holds more than one module's gathered parameters (or the adapter) at a time.
    """
    if adapter:
        with _gathered([p for p in model.parameters() if p.requires_grad]):
            memory = {k: tensor_record(k, v) for k, v in in_memory_weights(model).items()} if is_main else {}
    else:
        memory = model_records(model, digest=is_main)
    if not is_main:
        return {}
    saved = saved_records(folder)
    missing = sorted(set(saved) - set(memory))
    if missing:
        raise NegagentError(f"{folder}: saved tensor {missing[0]} is not in the in-memory model")
    expected = unique_parameter_count(model, trainable_only=adapter)
    count, checksum = combine(saved)
    memory_count, memory_checksum = combine({k: memory[k] for k in saved})
    if count != expected or memory_count != count or checksum != memory_checksum:
        raise NegagentError(
            f"{folder}: the final save does not match the trained model (saved {count} parameters, "
            f"model has {expected}; checksums {'equal' if checksum == memory_checksum else 'differ'})"
        )
    return {"parameters": count, "sha256": checksum}
