"""A local transformers model as an agent backend: left-padded batched generation with KV cache.

Prompts come from the shared `Renderer`, so the model sees exactly the token ids it was trained on.
Generation of a row stops at the end-of-turn token or at a stop string ("Observation:"); stop strings
are found by decoding only the last few new tokens of each row, which costs far less per step than
transformers' `stop_strings` (whose tables over the whole vocabulary are rebuilt on every call).

Shared-prefix cache: every prompt starts with the same instructions, and on CPU their prefill costs
as much per row as generating dozens of tokens. With `prefix_cache`, the key/value cache of the
prefix all rows of a batch share is computed once, kept, and copied into each batch; rows are laid
out as [shared prefix][padding][rest of prompt] with the padding masked, and position ids follow
the attention mask, so every row is computed exactly as its unpadded prompt would be.

The model runs with the model config's `attn_implementation` and in the generation dtype of
`negagent.models.resolve_dtype` (`backend.dtype`, else `model.dtype`; `auto`: bfloat16 on a CUDA GPU
with bf16, float32 on CPU), whichever way its weights were loaded.
"""

from __future__ import annotations

from typing import Sequence

import copy

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from negagent.agent import Sampling
from negagent.render import Renderer

_STOP_TAIL_TOKENS = 16  # new tokens decoded per row and step; far more than any stop string needs
_MIN_SHARED_PREFIX = 32  # shorter shared prefixes are not worth a cache copy


class _StopStrings(StoppingCriteria):
    """Per row: has its generated text (after `prompt_width`) come to contain a stop string?"""

    def __init__(self, tokenizer, stops: Sequence[str], prompt_width: int):
        self.tokenizer, self.stops, self.prompt_width = tokenizer, tuple(stops), prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        tails = input_ids[:, self.prompt_width:][:, -_STOP_TAIL_TOKENS:]
        texts = self.tokenizer.batch_decode(tails, skip_special_tokens=True)
        return torch.tensor([any(stop in text for stop in self.stops) for text in texts], device=input_ids.device)


class HFBackend:
    """Batched generation with a causal LM; `batch_size` rows per `generate` call."""

    def __init__(self, model, renderer: Renderer, *, batch_size: int = 16, name: str = "hf", prefix_cache: bool = True):
        self.model = model.eval()
        self.renderer = renderer
        self.tokenizer = renderer.tokenizer
        self.batch_size = batch_size
        self.name = name
        self.prefix_cache = prefix_cache
        self._prefix: tuple[list[int], object] | None = None  # (token ids, their key/value cache)

    def _shared_prefix(self, prompts: list[list[int]]) -> tuple[list[int], object] | None:
        """The cached prefix every prompt starts with (computed when the batch shares a new one)."""
        if not self.prefix_cache or len(prompts) < 2:
            return None
        if self._prefix is not None:
            cached = self._prefix[0]
            if all(len(p) > len(cached) and p[:len(cached)] == cached for p in prompts):
                return self._prefix
        shortest = min(len(p) for p in prompts) - 1  # every row keeps at least one token to process
        n = 0
        while n < shortest and all(p[n] == prompts[0][n] for p in prompts):
            n += 1
        if n < _MIN_SHARED_PREFIX:
            return None
        ids = torch.tensor([prompts[0][:n]], device=next(self.model.parameters()).device)
        self._prefix = (prompts[0][:n], self.model(input_ids=ids, use_cache=True).past_key_values)
        return self._prefix

    @torch.no_grad()
    def _generate(self, prompts: list[list[int]], sampling: Sampling) -> list[str]:
        pad = self.tokenizer.pad_token_id
        device = next(self.model.parameters()).device
        shared = self._shared_prefix(prompts)
        start = len(shared[0]) if shared else 0
        width = start + max(len(p) - start for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            # [shared prefix][padding][rest]: left padding of the rest keeps every row's last token aligned.
            ids[row, :start], mask[row, :start] = torch.tensor(prompt[:start], dtype=torch.long), 1
            ids[row, width - len(prompt) + start:] = torch.tensor(prompt[start:])
            mask[row, width - len(prompt) + start:] = 1
        cache = None
        if shared:
            cache = copy.deepcopy(shared[1])  # generate extends the cache in place
            cache.batch_repeat_interleave(len(prompts))
        greedy = sampling.temperature <= 0
        out = self.model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            past_key_values=cache,
            max_new_tokens=sampling.max_new_tokens,
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p,
            top_k=None,
            eos_token_id=self.renderer.end_of_turn_id,
            pad_token_id=pad,
            stopping_criteria=StoppingCriteriaList([_StopStrings(self.tokenizer, sampling.stop, width)]),
        )
        return self.tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)

    def complete(self, chats: Sequence[list[dict]], sampling: Sampling) -> list[str]:
        prompts = [self.renderer.prompt_ids(chat) for chat in chats]
        # Similar lengths share a batch, so little compute goes to padding.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        texts: list[str] = [""] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            for i, text in zip(idx, self._generate([prompts[i] for i in idx], sampling)):
                texts[i] = text
        return texts


def with_model_settings(model, cfg, model_cfg):
    """`model` in the generation dtype for its device and with `model_cfg`'s attention implementation.

    `negagent.models.load_model` already loads in that dtype; a full fine-tuned run's weights load in
    their saved dtype and a model moved to CPU on a GPU host is cast here.
    """
    from negagent.models import attn_implementation, check_model_settings, resolve_dtype

    check_model_settings(model_cfg)
    dtype = resolve_dtype(cfg.get("dtype") or model_cfg.get("dtype"), training=False, device=model.device)
    if model.dtype != dtype:
        model = model.to(dtype)
    attn = attn_implementation(model_cfg)
    if model.config._attn_implementation != attn:
        model.set_attn_implementation(attn)
    return model


def build(cfg, *, model, renderer: Renderer, subject=None, **_):
    """An HFBackend over an already loaded `model` (`cfg.batch_size` rows per generate call), with
    the dtype and attention implementation of `with_model_settings` (`subject`: the
    `negagent.model_source.ModelSource` whose `model_cfg` names them).

    `cfg.threads` sets torch's CPU threads (null: torch's default, one per core); on a busy machine
    fewer threads than cores avoid threads waiting on each other.
    """
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    model = with_model_settings(model, cfg, subject.model_cfg if subject is not None else {})
    return HFBackend(model, renderer, batch_size=int(cfg.get("batch_size", 16)), name=str(cfg.get("label") or "hf"),
                     prefix_cache=bool(cfg.get("prefix_cache", True)))
