"""The one renderer: chat messages -> token ids (+ labels) with the tokenizer's own chat template.

Training samples and inference prompts both come from `Renderer`, so their formats cannot drift:
the inference prompt before assistant turn k is, token for token, the training sample's prefix up
to that turn (tests check this for every sample and turn).

How the ids are made: the chat template renders the whole conversation to text; each assistant
turn's trained span (its content plus the end-of-turn token, which must be trained or the model
never learns to stop) is located by rendering the conversation up to that turn with a generation
prompt. A sample's ids are the tokenizer's tokenization of the whole text, and an inference prompt's
the tokenization of its own text (what a text backend sends too). At every span boundary the text
before it must tokenize as the first tokens of the whole text; otherwise the sample is rejected with
its id ("tokenization mismatch"), never silently masked. That check is the parity: the prompt before
turn k is exactly the text before span k. (Tokenizing each piece on its own would not do: a
SentencePiece-style tokenizer such as Llama-2's prepends `▁` to each piece it is given.)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from negagent.errors import NegagentError

IGNORE = -100
MAX_LENGTH = 4096  # tokens per training sample when `render.max_length` is not set
INSTRUCTIONS_ROLES = ("system", "user")
QUESTION_LINE = "Question: {question}"  # the question turn unless `render.question` says otherwise
_ROLES = ("system", "user", "assistant")


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


@dataclass(frozen=True)
class ChatOpening:
    """What every chat of a run starts with, before the episode's own turns.

    `messages` come first and are never trained (instructions as a system turn; or, from a prompt
    file, the instructions as a user turn the assistant acknowledges, and any solved example). Then
    one user turn: `preamble` followed by the question line `question` ("{question}" marks where the
    question goes).
    """

    messages: tuple[dict, ...] = ()
    question: str = QUESTION_LINE
    preamble: str = ""

    @classmethod
    def from_instructions(cls, instructions: str, role: str = "system") -> "ChatOpening":
        """This project's own layout: the task's instructions as the system turn, or (role `user`)
        before the question in the user turn."""
        if role == "system":
            return cls(messages=({"role": "system", "content": instructions},))
        if role == "user":
            return cls(preamble=f"{instructions}\n\n")
        raise NegagentError(f"instructions_role {role!r} is not 'system' or 'user'")

    def question_turn(self, question: str, tag: str | None = None, placement: str = "prefix") -> str:
        """The user turn that asks `question` under `tag`.

        A tag holding "{question}" is a whole question line (the paper's prompt files word their
        tags so); any other tag goes on its own line before (prefix) or after (suffix) the line.
        """
        if tag and "{question}" in tag:
            return self.preamble + tag.replace("{question}", question)
        line = self.question.replace("{question}", question)
        if tag:
            if placement == "prefix":
                line = f"{tag}\n{line}"
            elif placement == "suffix":
                line = f"{line}\n{tag}"
            else:
                raise NegagentError(f"tag placement {placement!r} is not 'prefix' or 'suffix'")
        return self.preamble + line

    def digest(self) -> str:
        """A short hash of the opening, to tell prompts apart in provenance and evaluation setups."""
        text = json.dumps([list(self.messages), self.question, self.preamble], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def chat_opening(render_cfg: Mapping[str, Any] | None, instructions: str) -> ChatOpening:
    """The opening a `render` section describes: `render.opening` (a list of {role, content}
    messages, e.g. read from the paper's prompt file) with `render.question`, or, when
    `render.opening` is null, the task's `instructions` placed by `render.instructions_role`."""
    render_cfg = render_cfg or {}
    opening = render_cfg.get("opening")
    question = render_cfg.get("question") or QUESTION_LINE
    if "{question}" not in question:
        raise NegagentError(f"render.question={question!r} must contain {{question}} where the question goes")
    if opening is None:
        base = ChatOpening.from_instructions(instructions, instructions_role(render_cfg))
        return ChatOpening(base.messages, question, base.preamble)
    if not isinstance(opening, (list, tuple)) or not all(
        isinstance(m, Mapping) and m.get("role") in _ROLES and isinstance(m.get("content"), str) for m in opening
    ):
        raise NegagentError("render.opening must be a list of messages {role: system|user|assistant, content: text}")
    return ChatOpening(tuple({"role": m["role"], "content": m["content"]} for m in opening), question)


def build_chat(
    opening: ChatOpening | str,
    question: str,
    messages: Sequence[dict],
    *,
    tag: str | None = None,
    placement: str = "prefix",
    instructions_role: str = "system",
) -> list[dict]:
    """The chat for one episode: the opening, the (tagged) question, then the episode's turns.

    `opening` is a ChatOpening, or the task's instructions placed by `instructions_role`. The
    opening's messages are never trained; the episode's messages keep their `train` flag (default:
    assistant turns are trained) for `Renderer.training`.
    """
    if isinstance(opening, str):
        opening = ChatOpening.from_instructions(opening, instructions_role)
    chat = [{**m, "train": False} if m["role"] == "assistant" else dict(m) for m in opening.messages]
    chat.append({"role": "user", "content": opening.question_turn(question, tag, placement)})
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

    def _encode(self, text: str) -> list[int]:
        # No special tokens added: the template writes its own (Llama's writes the BOS).
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _boundary(self, text: str, cut: int, ids: list[int], sample_id: str) -> int:
        """How many of `ids` (the whole text's) stand for text[:cut]; the text before the cut must
        tokenize as exactly those first tokens."""
        prefix = self._encode(text[:cut])
        if ids[: len(prefix)] != prefix:
            at = next((i for i, (a, b) in enumerate(zip(prefix, ids)) if a != b), min(len(prefix), len(ids)))
            raise NegagentError(
                f"sample {sample_id}: tokenization mismatch at token {at}: the text tokenizes "
                "differently across a turn boundary, so its loss mask would be wrong"
            )
        return len(prefix)

    # -- public -------------------------------------------------------------------------------
    def prompt_ids(self, chat: Sequence[dict], sample_id: str = "?") -> list[int]:
        """Inference prompt: the chat (ending with a user turn) plus the generation prompt.

        Earlier assistant turns are checked as in training (a template that rewrites them is an
        error); the ids are the prompt text's own tokenization, which `training` proves to be the
        training sample's prefix.
        """
        text = self._template(chat, generation_prompt=True)
        self._spans(chat, text, sample_id)
        return self._encode(text)

    def prompt_text(self, chat: Sequence[dict]) -> str:
        """The inference prompt as text (for backends that take text, and for debugging)."""
        return self._template(chat, generation_prompt=True)

    def training(self, chat: Sequence[dict], sample_id: str, positive: bool | None = None) -> RenderedSample:
        """Ids and labels: only assistant turns with `train` set are trained, end-of-turn included.

        Raises NegagentError (naming the sample) on a tokenization mismatch at a span boundary or
        when no token is trained (after truncation to `max_length`, counted in
        `RenderedSample.truncated`).
        """
        text = self._template(chat, generation_prompt=False)
        spans = self._spans(chat, text, sample_id)
        ids = self._encode(text)
        labels = [IGNORE] * len(ids)
        for start, end, trained in spans:
            # Every span start is checked, trained or not: it is where an inference prompt ends.
            first = self._boundary(text, start, ids, sample_id)
            if trained:
                if not text[start:end].endswith(self.end_of_turn):
                    raise NegagentError(f"sample {sample_id}: an assistant turn lacks its end-of-turn token")
                last = self._boundary(text, end, ids, sample_id)
                labels[first:last] = ids[first:last]
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
