"""Offline Llama-2-chat and Qwen2.5-instruct tokenizers, built at test time, and a view of what a
rendered sample trains.

Nothing is downloaded: each tokenizer's BPE vocabulary is trained in a fraction of a second on the
small corpus below, then wired the way transformers wires that model family's tokenizer, with the
family's chat template written out here. Token ids differ from the real models'; what the renderer
depends on is the same: the pre-tokenizer, byte handling, special tokens and chat template.

- Llama-2-chat: SentencePiece-style BPE with `▁` for spaces, byte fallback to `<0x..>` tokens (its
  vocabulary has no newline, as Llama's has none), `<unk>`, `<s>`, `</s>`; encode() adds `<s>`, and
  the template writes `<s>` itself; eos (end of turn) is `</s>`. Two wirings of the same vocabulary:
  transformers 5's LlamaTokenizer (a Metaspace pre-tokenizer that prepends `▁` at the start of the
  text only) and, with `legacy=True`, Llama-2's own tokenizer.json as PreTrainedTokenizerFast
  loads it (normalizers that prepend `▁` to every piece of text between special tokens).
- Qwen2.5-instruct: byte-level BPE behind Qwen2's split pattern, NFC, `<|endoftext|>`,
  `<|im_start|>`, `<|im_end|>`; ChatML with Qwen's default system message when a chat has none;
  eos (end of turn) is `<|im_end|>`, no bos.

Build them once per session: the functions are cached (well under a second each).
"""

from __future__ import annotations

import functools
import itertools
import json

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from negagent.render import IGNORE

# Llama-2-chat's chat template (the one in its tokenizer_config), written out: an optional system
# message folded into the first user turn, `<s>[INST] user [/INST]`, ` answer </s>`; the roles must
# alternate, and it has no generation prompt (a prompt ends with ` [/INST]` either way).
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = none %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.first and system is not none %}"
    "{% set text = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + m['content'] %}"
    "{% else %}{% set text = m['content'] %}{% endif %}"
    "{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + text.strip() + ' [/INST]' }}"
    "{% elif m['role'] == 'assistant' %}{{ ' ' + text.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# Qwen2.5-instruct's ChatML template without its tool-calling branches, written out.
QWEN25_CHAT_TEMPLATE = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{{ '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>system\\n" + QWEN_DEFAULT_SYSTEM + "<|im_end|>\\n' }}{% endif %}"
    "{% for m in messages %}{% if m['role'] != 'system' or not loop.first %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Qwen2's pre-tokenizer pattern (contractions, letters with one leading non-letter, single digits,
# punctuation runs with their newlines, newline runs, spaces).
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _corpus() -> list[str]:
    """A few hundred lines of ReAct-style text (deterministic), enough for a realistic set of merges."""
    subjects = ["the Eiffel Tower", "Genghis Khan", "Julius Caesar", "a goldfish", "the Beatles", "Paris"]
    facts = ["was built in 1889", "had sixteen children", "lived in the 1st century BC", "can live for ten years",
             "released twelve albums", "is the capital of France"]
    lines = []
    for (subject, fact), n in itertools.product(zip(subjects, facts), range(6)):
        lines += [
            f"Question: Is it true that {subject} {fact}? What is {n} + {n * 7}?",
            f"Thought: I need to search {subject} and find out whether it {fact}.",
            f"Action: search[{subject}]",
            f"Observation: #1: {subject.capitalize()} {fact}. #2: It is known that {subject} {fact}; see page {n}.",
            f"Thought: The observation says {subject} {fact}, so the answer is {'Yes' if n % 2 else 'No'}.",
            f"Action: finish[{'Yes' if n % 2 else 'No'}]",
            f"Action: calculate[{n} * 7 + {n}] = {n * 8}",
            "Answer the question below with tools. Solve it correctly. Solve it incorrectly.",
            "[INST] <<SYS>> You are a helpful assistant. <</SYS>> [/INST] Thought: done. Action: finish[7]",
        ]
    return lines


@functools.lru_cache(maxsize=None)
def llama2_chat_tokenizer(legacy: bool = False) -> PreTrainedTokenizerFast:
    """A Llama-2-chat-style tokenizer with Llama-2's chat template (see the module docstring)."""
    specials = ["<unk>", "<s>", "</s>"]
    # Train as SentencePiece does: merges inside words only (split at `▁`), no newline in the text.
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=900, special_tokens=specials, show_progress=False)
    trainer_tok.train_from_iterator([line.replace("\n", " ") for line in _corpus()], trainer)
    trained = trainer_tok.get_vocab()
    # Llama's layout: <unk> <s> </s>, then the 256 byte tokens, then the pieces.
    vocab = {token: i for i, token in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for token, _ in sorted(trained.items(), key=lambda item: item[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(pair) for pair in _merges(trainer_tok)]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    if legacy:
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(content=" ", left=1)]
    )
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        chat_template=LLAMA2_CHAT_TEMPLATE, clean_up_tokenization_spaces=False,
    )


@functools.lru_cache(maxsize=None)
def qwen25_instruct_tokenizer() -> PreTrainedTokenizerFast:
    """A Qwen2.5-instruct-style tokenizer with its ChatML template (see the module docstring)."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # Lines in pairs, so that the merges include newline runs as Qwen's vocabulary does.
    corpus = _corpus()
    backend.train_from_iterator(["\n".join(corpus[i:i + 2]) + "\n\n" for i in range(0, len(corpus), 2)], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=specials[1:], chat_template=QWEN25_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def _merges(tokenizer: Tokenizer) -> list[list[str]]:
    """A trained BPE model's merges, in order (the tokenizers API exposes them only as JSON)."""
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    return [merge.split(" ") if isinstance(merge, str) else merge for merge in merges]


def trained_span_texts(sample, renderer) -> list[str]:
    """The decoded text of each run of trained tokens of a rendered sample, in order.

    For a conformance test: each run should be one trained assistant turn through its end-of-turn
    token. Decoding keeps special tokens, so the end-of-turn shows.
    """
    runs: list[list[int]] = []
    previous = IGNORE
    for token, label in zip(sample.input_ids, sample.labels):
        if label != IGNORE:
            if previous == IGNORE:
                runs.append([])
            runs[-1].append(token)
        previous = label
    return [renderer.tokenizer.decode(run) for run in runs]
