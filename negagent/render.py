"""The one renderer: chat messages -> token ids (+ labels) with the tokenizer's own chat template.

Training samples and inference prompts both come from `Renderer`, so their formats cannot drift:
the inference prompt before assistant turn k is, token for token, the training sample's prefix up
to that turn (tests check this for every sample and turn).

How the ids are made: the chat template renders the whole conversation to text; each assistant
turn's trained span (its content plus the end-of-turn token, which must be trained or the model
never learns to stop) is located by rendering the conversation up to that turn with a generation
prompt. The text is cut at span boundaries and each piece is tokenized on its own, so a prompt cut
at a turn boundary tokenizes exactly like the training sample's prefix. The result must equal the
tokenizer's tokenization of the whole text; otherwise the sample is rejected with its id
("tokenization mismatch"), never silently masked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from negagent.errors import NegagentError

IGNORE = -100
MAX_LENGTH = 4096  # tokens per training sample when `render.max_length` is not set
INSTRUCTIONS_ROLES = ("system", "user")


def instructions_role(render_cfg: Mapping[str, Any] | None) -> str:
    """Where the task instructions go (`render.instructions_role`: system, the default, or user)."""
    role = (render_cfg or {}).get("instructions_role") or "system"
    if role not in INSTRUCTIONS_ROLES:
        raise NegagentError(f"render.instructions_role={role!r} is not one of: {', '.join(INSTRUCTIONS_ROLES)}")
    return role


def build_renderer(tokenizer, render_cfg: Mapping[str, Any] | None) -> "Renderer":
    """The Renderer a `render` config section describes (`max_length`, `end_of_turn`); training,
    collection and evaluation all build theirs here."""
    render_cfg = render_cfg or {}
    max_length = render_cfg.get("max_length")
    max_length = MAX_LENGTH if max_length is None else int(max_length)
    if max_length < 1:
        raise NegagentError(f"render.max_length={max_length} must be at least 1")
    return Renderer(tokenizer, max_length=max_length, end_of_turn=render_cfg.get("end_of_turn"))


def build_chat(
    instructions: str,
    question: str,
    messages: Sequence[dict],
    *,
    tag: str | None = None,
    placement: str = "prefix",
    instructions_role: str = "system",
) -> list[dict]:
    """The chat for one episode: instructions, the (tagged) question, then the episode's turns.

    Messages keep their `train` flag (default: assistant turns are trained) for `Renderer.training`.
    """
    text = f"Question: {question}"
    if tag:
        if placement == "prefix":
            text = f"{tag}\n{text}"
        elif placement == "suffix":
            text = f"{text}\n{tag}"
        else:
            raise NegagentError(f"tag placement {placement!r} is not 'prefix' or 'suffix'")
    if instructions_role == "system":
        chat = [{"role": "system", "content": instructions}, {"role": "user", "content": text}]
    elif instructions_role == "user":
        chat = [{"role": "user", "content": f"{instructions}\n\n{text}"}]
    else:
        raise NegagentError(f"instructions_role {instructions_role!r} is not 'system' or 'user'")
    for msg in messages:
        turn = {"role": msg["role"], "content": msg["content"]}
        turn["train"] = bool(msg.get("train", msg["role"] == "assistant"))
        chat.append(turn)
    return chat


@dataclass
class RenderedSample:
    """Token ids and labels (IGNORE where not trained) of one training sample."""

    id: str
    input_ids: list[int]
    labels: list[int]
    positive: bool | None = None
    truncated: bool = False

    @property
    def n_trained(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)


class Renderer:
    """Renders chats to ids with `tokenizer`'s chat template; see the module docstring."""

    def __init__(self, tokenizer, *, max_length: int = MAX_LENGTH, end_of_turn: str | None = None):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.end_of_turn = end_of_turn or tokenizer.eos_token
        if not self.end_of_turn:
            raise NegagentError("the tokenizer has no eos token; set render.end_of_turn")
        self.end_of_turn_id = tokenizer.convert_tokens_to_ids(self.end_of_turn)

    # -- text ---------------------------------------------------------------------------------
    def _template(self, chat: Sequence[dict], generation_prompt: bool) -> str:
        plain = [{"role": m["role"], "content": m["content"]} for m in chat]
        return self.tokenizer.apply_chat_template(
            plain, tokenize=False, add_generation_prompt=generation_prompt
        )

    def _spans(self, chat: Sequence[dict], text: str, sample_id: str) -> list[tuple[int, int, bool]]:
        """(start, end, trained) character spans of each assistant turn's content + end-of-turn."""
        spans = []
        for k, msg in enumerate(chat):
            if msg["role"] != "assistant":
                continue
            prompt = self._template(chat[:k], generation_prompt=True)
            content = msg["content"].strip()
            rest = text[len(prompt):]
            # Some templates (Llama 2) put a space before the content or strip it.
            lead = len(rest) - len(rest.lstrip())
            if not text.startswith(prompt) or not rest.startswith(content, lead):
                raise NegagentError(
                    f"sample {sample_id}: the chat template does not render turn {k} as the "
                    "generation prompt followed by the message; this template cannot be trained safely"
                )
            eot = text.find(self.end_of_turn, len(prompt) + lead + len(content))
            if eot < 0:
                raise NegagentError(
                    f"sample {sample_id}: end-of-turn token {self.end_of_turn!r} not found after turn {k}"
                )
            spans.append((len(prompt), eot + len(self.end_of_turn), bool(msg.get("train", True))))
        return spans

    def _pieces_to_ids(self, text: str, cuts: list[int]) -> list[list[int]]:
        bounds = [0, *cuts, len(text)]
        return [
            self.tokenizer.encode(text[a:b], add_special_tokens=False) if b > a else []
            for a, b in zip(bounds, bounds[1:])
        ]

    # -- public -------------------------------------------------------------------------------
    def prompt_ids(self, chat: Sequence[dict], sample_id: str = "?") -> list[int]:
        """Inference prompt: the chat (ending with a user turn) plus the generation prompt."""
        text = self._template(chat, generation_prompt=True)
        cuts = [c for start, end, _ in self._spans(chat, text, sample_id) for c in (start, end)]
        return [tok for piece in self._pieces_to_ids(text, cuts) for tok in piece]

    def prompt_text(self, chat: Sequence[dict]) -> str:
        """The inference prompt as text (for backends that take text, and for debugging)."""
        return self._template(chat, generation_prompt=True)

    def training(self, chat: Sequence[dict], sample_id: str, positive: bool | None = None) -> RenderedSample:
        """Ids and labels: only assistant turns with `train` set are trained, end-of-turn included.

        Raises NegagentError (naming the sample) on a tokenization mismatch or when no token is
        trained (after truncation to `max_length`, counted in `RenderedSample.truncated`).
        """
        text = self._template(chat, generation_prompt=False)
        spans = self._spans(chat, text, sample_id)
        cuts = [c for start, end, _ in spans for c in (start, end)]
        pieces = self._pieces_to_ids(text, cuts)
        ids: list[int] = []
        labels: list[int] = []
        for i, piece in enumerate(pieces):
            trained = i % 2 == 1 and spans[i // 2][2]  # odd pieces are assistant spans
            ids.extend(piece)
            labels.extend(piece if trained else [IGNORE] * len(piece))
        whole = self.tokenizer.encode(text, add_special_tokens=False)
        if whole != ids:
            at = next((i for i, (a, b) in enumerate(zip(whole, ids)) if a != b), min(len(whole), len(ids)))
            raise NegagentError(
                f"sample {sample_id}: tokenization mismatch at token {at}: the text tokenizes "
                "differently across a turn boundary, so its loss mask would be wrong"
            )
        for start, end, trained in spans:
            if trained and not text[start:end].endswith(self.end_of_turn):
                raise NegagentError(f"sample {sample_id}: an assistant turn lacks its end-of-turn token")
        truncated = len(ids) > self.max_length
        if truncated:
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        sample = RenderedSample(sample_id, ids, labels, positive, truncated)
        if sample.n_trained == 0:
            why = " after truncation to max_length" if truncated else ""
            raise NegagentError(
                f"sample {sample_id}: no trained tokens{why}; check the trajectory's assistant turns "
                "and render.max_length"
            )
        return sample

    def debug_view(self, sample: RenderedSample) -> str:
        """The sample as text with trained spans wrapped in [[ ]]; shows exactly what is learned."""
        out: list[str] = []
        run: list[int] = []
        trained_run = False
        for tok, label in zip(sample.input_ids, sample.labels):
            trained = label != IGNORE
            if trained != trained_run and run:
                text = self.tokenizer.decode(run)
                out.append(f"[[{text}]]" if trained_run else text)
                run = []
            trained_run = trained
            run.append(tok)
        if run:
            text = self.tokenizer.decode(run)
            out.append(f"[[{text}]]" if trained_run else text)
        return "".join(out)
