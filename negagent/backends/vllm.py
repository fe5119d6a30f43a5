"""vLLM as an agent backend, for users with GPUs (`backend=vllm`; `pip install vllm` first).

vLLM is imported only here, only when this backend is chosen. Prompts are token ids from the
shared `Renderer` (never vLLM's own chat templating), so the model sees exactly what it was trained
on; generation stops at the end-of-turn token or a stop string ("Observation:"). A LoRA adapter is
served on top of its base model with vLLM's LoRA support, without merging; a full fine-tuned
model is loaded from its folder. Models must be on disk: the `tiny` random model cannot be used.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from negagent.agent import Sampling
from negagent.errors import NegagentError
from negagent.render import Renderer


class VLLMBackend:
    """Continuous batching over every chat of a step; `sampling.seed` seeds each request."""

    def __init__(self, llm, renderer: Renderer, *, lora_path: str | None = None, name: str = "vllm"):
        self.llm = llm
        self.renderer = renderer
        self.name = name
        self._lora = None
        if lora_path is not None:
            from vllm.lora.request import LoRARequest

            self._lora = LoRARequest("adapter", 1, lora_path)

    def complete(self, chats: Sequence[list[dict]], sampling: Sampling) -> list[str]:
        from vllm import SamplingParams

        params = [
            SamplingParams(
                temperature=sampling.temperature,
                top_p=sampling.top_p if sampling.temperature > 0 else 1.0,
                max_tokens=sampling.max_new_tokens,
                stop=list(sampling.stop),
                stop_token_ids=[self.renderer.end_of_turn_id],
                seed=sampling.seed * 100_003 + row,  # distinct, reproducible streams per row
                skip_special_tokens=True,
            )
            for row in range(len(chats))
        ]
        prompts = [{"prompt_token_ids": self.renderer.prompt_ids(chat)} for chat in chats]
        outputs = self.llm.generate(prompts, params, lora_request=self._lora, use_tqdm=False)
        return [out.outputs[0].text for out in outputs]


def _model_location(subject) -> str:
    if subject.weights_dir is not None:
        return str(subject.weights_dir)
    if subject.model_cfg.get("source") == "tiny":
        raise NegagentError("backend=vllm needs a model stored on disk; the random `tiny` model is for backend=hf")
    from negagent.models import _pretrained_location  # converts the GGUF package model once, if needed

    return _pretrained_location(subject.model_cfg)


def build(cfg: Mapping[str, Any], *, subject, renderer: Renderer, **_: Any) -> VLLMBackend:
    """A VLLMBackend for the evaluated model (`subject`, a negagent.model_source.ModelSource)."""
    try:
        from vllm import LLM
    except ImportError:
        raise NegagentError(
            "backend=vllm needs the vllm package (GPU only): run `pip install vllm`, or use backend=hf"
        ) from None
    adapter = str(subject.adapter_dir) if subject.adapter_dir is not None else None
    options: dict[str, Any] = {
        "model": _model_location(subject),
        "tokenizer": _model_location(subject),
        "dtype": str(cfg.get("dtype") or "auto"),
        "gpu_memory_utilization": float(cfg.get("gpu_memory_utilization", 0.85)),
        "tensor_parallel_size": int(cfg.get("tensor_parallel_size", 1)),
        "seed": int(cfg.get("seed", 0)),
        "enable_lora": adapter is not None,
    }
    if cfg.get("max_model_len"):
        options["max_model_len"] = int(cfg["max_model_len"])
    if adapter is not None:
        options["max_lora_rank"] = int(cfg.get("max_lora_rank", 64))
    try:
        llm = LLM(**options)
    except Exception as exc:  # no GPU, out of memory, unsupported architecture: one line, not a traceback
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise NegagentError(f"vLLM could not load {options['model']}: {reason}") from None
    return VLLMBackend(llm, renderer, lora_path=adapter, name=str(cfg.get("label") or "vllm"))
