"""Prompt files in the NAT repository's format (prompts/<task>/<task>_conversation.json), read at run
time so that a run can use the paper's own prompts without the project holding their text.

A file maps entry names ("zero-shot", "one-shot", "zero-shot-target-aware", ...) to either
{"conversations": [messages], "<x>_question_prompt": "... {question} ..."} or a plain list of
messages. `read_part(file, entry, part)` returns the entry's messages (part `conversations`) or one
of its question lines (any other part, e.g. `correct_question_prompt`, `class_4_question_prompt`).
Config files reach it through the resolver registered in negagent.config:
`${nat_prompt:<file>,<entry>,<part>}`.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from negagent.errors import NegagentError
from negagent.render import QUESTION_LINE

CONVERSATIONS = "conversations"
QUESTION_PROMPT = "question_prompt"  # the untagged question line; entries without one ask "Question: {question}"


@functools.lru_cache(maxsize=16)
def _read(path: str, mtime: float) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise NegagentError(f"{path}: not a valid prompt file ({exc})") from None
    if not isinstance(data, dict):
        raise NegagentError(f"{path}: a prompt file maps entry names to prompts; this one is not a JSON object")
    return data


def read_part(file: str, entry: str, part: str) -> Any:
    """Part `part` of entry `entry` of the prompt file `file` (see the module docstring).

    Raises NegagentError naming the file and listing what it has when the file, the entry or the
    part is missing, or when a question line lacks "{question}".
    """
    path = Path(str(file)).expanduser()
    if str(file).startswith("None/"):  # ${data_dir}/... with data_dir unset
        raise NegagentError(f"{file}: data_dir is not set; pass data_dir=<data> (it holds nat/prompts/...)")
    if not path.is_file():
        raise NegagentError(
            f"{path}: prompt file not found; point render.prompt_file at the NAT repository's "
            "prompts/<task>/<task>_conversation.json (under <data_dir>/nat/prompts)"
        )
    prompts = _read(str(path), path.stat().st_mtime)
    if entry not in prompts:
        raise NegagentError(f"{path}: no entry {entry!r}; it has: {', '.join(prompts)}")
    value = prompts[entry]
    messages = value if isinstance(value, list) else value.get(CONVERSATIONS) if isinstance(value, dict) else None
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    ):
        raise NegagentError(f"{path}: entry {entry!r} holds no list of {{role, content}} messages")
    if part == CONVERSATIONS:
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    lines = value if isinstance(value, dict) else {}
    if part == QUESTION_PROMPT and part not in lines:
        return QUESTION_LINE
    if part not in lines:
        have = [key for key in lines if key != CONVERSATIONS]
        raise NegagentError(f"{path}: entry {entry!r} has no {part!r}; it has: {', '.join(have) or 'messages only'}")
    line = lines[part]
    if not isinstance(line, str) or "{question}" not in line:
        raise NegagentError(f"{path}: {entry}.{part} is not a question line with {{question}} in it")
    return line
