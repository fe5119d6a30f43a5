"""Model backends for the agent loop, built by name from a `backend` config (the evaluator's
`backend`, collection's `teacher`: the same config group).

Every backend has `name` and `complete(chats, sampling) -> list[str]` (see `negagent.agent.Backend`).
Modules are imported on demand, so optional dependencies (openai, vllm) load only when chosen.
`build_backend` is the one place where a local model's weights, tokenizer and renderer are loaded
for generation, for collection and evaluation alike.
"""

from __future__ import annotations

import importlib
from typing import Any, Mapping

from negagent.errors import NegagentError

_MODULES = {
    "hf": "negagent.backends.hf",  # a local transformers model, batched generation
    "openai": "negagent.backends.openai",  # any OpenAI-compatible chat server
    "scripted": "negagent.backends.scripted",  # an offline rule-based teacher (arith, math)
    "vllm": "negagent.backends.vllm",  # vLLM on GPU
}


def build_backend(cfg: Mapping[str, Any], *, task=None, source=None, render_cfg: Mapping[str, Any] | None = None):
    """The backend named by `cfg["name"]` for `task`.

    Local models (hf, vllm) need `source` (a `negagent.model_source.ModelSource`: which weights)
    and `render_cfg` (the `render` section their prompts are rendered with); API and scripted
    backends ignore both.
    """
    name = cfg.get("name")
    if name not in _MODULES:
        raise NegagentError(f"unknown backend {name!r}; choose one of: {', '.join(_MODULES)}")
    context: dict[str, Any] = {"task": task, "subject": source}
    if name in ("hf", "vllm"):
        if source is None:
            raise NegagentError(f"backend {name} runs a local model: give one (model=... or run_dir=...)")
        from negagent.model_source import load_causal_lm, load_tokenizer_for
        from negagent.render import build_renderer

        tokenizer = load_tokenizer_for(source)
        context["tokenizer"] = tokenizer
        context["renderer"] = build_renderer(tokenizer, render_cfg)
        if name == "hf":
            context["model"] = load_causal_lm(source, tokenizer, dtype=cfg.get("dtype"), device=str(cfg.get("device") or "auto"))
    return importlib.import_module(_MODULES[name]).build(cfg, **context)
