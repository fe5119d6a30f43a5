"""Model backends for the agent loop, built by name from the `backend`/`teacher` config.

Every backend has `name` and `complete(chats, sampling) -> list[str]` (see `negagent.agent.Backend`).
Modules are imported on demand, so optional dependencies (openai, vllm) load only when chosen.
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


def build_backend(cfg: Mapping[str, Any], **context: Any):
    """The backend named by `cfg["name"]`; `context` carries what some need (model, renderer, task)."""
    name = cfg.get("name")
    if name not in _MODULES:
        raise NegagentError(f"unknown backend {name!r}; choose one of: {', '.join(_MODULES)}")
    return importlib.import_module(_MODULES[name]).build(cfg, **context)
