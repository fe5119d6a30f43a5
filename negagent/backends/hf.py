"""A local transformers model as an agent backend: left-padded batched generation with KV cache.

Prompts come from the shared `Renderer`, so the model sees exactly the token ids it was trained on.
Generation of a row stops at the end-of-turn token or at a stop string ("Observation:").
"""

from __future__ import annotations

from typing import Sequence

import torch

from negagent.agent import Sampling
from negagent.render import Renderer


class HFBackend:
    """Batched generation with a causal LM; `batch_size` rows per `generate` call."""

    def __init__(self, model, renderer: Renderer, *, batch_size: int = 16, name: str = "hf"):
        self.model = model.eval()
        self.renderer = renderer
        self.tokenizer = renderer.tokenizer
        self.batch_size = batch_size
        self.name = name

    @torch.no_grad()
    def _generate(self, prompts: list[list[int]], sampling: Sampling) -> list[str]:
        pad = self.tokenizer.pad_token_id
        width = max(len(p) for p in prompts)
        device = next(self.model.parameters()).device
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):  # left padding keeps every row's last token aligned
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        greedy = sampling.temperature <= 0
        out = self.model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=sampling.max_new_tokens,
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p,
            top_k=None,
            eos_token_id=self.renderer.end_of_turn_id,
            pad_token_id=pad,
            stop_strings=list(sampling.stop),
            tokenizer=self.tokenizer,
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


def build(cfg, *, model, renderer: Renderer, **_):
    """An HFBackend over an already loaded `model` (`cfg.batch_size` rows per generate call)."""
    return HFBackend(model, renderer, batch_size=int(cfg.get("batch_size", 16)), name=str(cfg.get("label", "hf")))
