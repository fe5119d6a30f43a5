"""The task contract: questions, instructions, tools and scoring of one benchmark.

Each task lives in its own module of `negagent.tasks` and is built by `negagent.tasks.get_task`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

MAX_TURNS = 7  # the paper's limit on model turns per episode; `task.max_turns` overrides it
# What the agent loop does with a turn it cannot act on (`task.on_parse_error`): `observe` answers
# "Invalid action" and goes on; `end` is the paper's loop: the episode ends and the turn is not stored.
PARSE_ERROR_RULES = ("observe", "end")


@dataclass(frozen=True)
class Question:
    """One question: a stable id (unique within its split), the text and the gold answer."""

    id: str
    question: str
    gold: Any
    meta: dict = field(default_factory=dict, compare=False, hash=False)


class Task(Protocol):
    """What the agent loop, the renderer and the scorer need from a task."""

    name: str
    tools: tuple[str, ...]  # tool names the agent may call, besides finish[...]
    instructions: str  # the system text: the ReAct protocol and the tools, in this project's words
    max_turns: int  # model turns per episode before it ends unsolved (collection and evaluation alike)
    on_parse_error: str  # one of PARSE_ERROR_RULES (collection and evaluation alike)

    def train_questions(self) -> list[Question]:
        """The questions trajectories are collected on."""

    def test_sets(self) -> dict[str, list[Question]]:
        """Named test sets (math has four); each a list of questions."""

    def score(self, prediction: str | None, gold: Any) -> dict:
        """`reward` (bool, the label used for training) plus the task's metrics."""
