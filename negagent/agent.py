"""The ReAct agent loop, shared by trajectory collection (teacher) and evaluation (student).

Each model turn writes `Thought: ...` and `Action: tool[argument]`; the loop runs the tool and
answers with `Observation: ...`; `Action: finish[answer]` ends the episode. All unfinished
episodes advance one turn together: the backend gets every prompt of the step at once (batched
generation, or concurrent API calls), and episodes finish independently.

Every episode ends as a labelled `Trajectory` (reward from the task's own scoring) with one of the
failure types: wrong_answer (finished, scored wrong), parse_error (last turn had no valid action),
tool_error (last tool call failed), max_steps (turn limit reached), no_finish (the model stopped
writing: an empty turn).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, Sequence

from negagent.render import ChatOpening, build_chat
from negagent.tasks.base import Question, Task
from negagent.trajectory import Trajectory

STOP = ["\nObservation:", "Observation:"]  # the model must not write the tool's answer itself
_ACTION = re.compile(r"Action\s*\d*\s*:\s*([A-Za-z_]\w*)\s*\[")  # up to the argument's opening bracket


@dataclass(frozen=True)
class Sampling:
    """Generation settings of one run."""

    temperature: float = 0.2  # 0 = greedy
    max_new_tokens: int = 256
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = tuple(STOP)


class Backend(Protocol):
    """A model that continues chats. `complete` returns one assistant turn per chat, in order."""

    name: str

    def complete(self, chats: Sequence[list[dict]], sampling: Sampling) -> list[str]: ...


@dataclass(frozen=True)
class Action:
    name: str
    argument: str


def clean_turn(text: str) -> str:
    """The model's turn, cut before any observation it wrote itself."""
    for stop in STOP:
        cut = text.find(stop)
        if cut >= 0:
            text = text[:cut]
    return text.strip()


def parse_action(text: str) -> Action | None:
    """The last `Action: name[argument]` in a turn, or None if there is none.

    The argument is everything between the first `[` after the name and the last `]` of the turn,
    so brackets inside arguments (nested expressions, titles) survive.
    """
    # One regex with a greedy argument would match the first action and swallow the rest of the turn.
    end = text.rfind("]")
    matches = [m for m in _ACTION.finditer(text) if m.end() <= end]
    if not matches:
        return None
    match = matches[-1]
    return Action(match.group(1).lower(), text[match.end():end].strip())


@dataclass
class _Episode:
    question: Question
    sample_index: int
    messages: list[dict] = field(default_factory=list)
    pred: str | None = None
    finished: bool = False
    ended: bool = False
    last_error: str | None = None  # parse_error / tool_error of the most recent turn
    dropped: dict | None = None  # the turn that ended the episode under on_parse_error=end
    actions: int = 0
    parse_errors: int = 0
    tool_errors: int = 0


INVALID_ACTION = (
    "Observation: Invalid action. End the turn with 'Action: {tools}[argument]' or 'Action: finish[answer]'."
)


def _step(ep: _Episode, text: str, task: Task, call_tool: Callable[[str, str], tuple[str, bool]]) -> None:
    """Advance `ep` by the model's turn `text`.

    A turn the loop cannot act on (no valid action, or empty) goes as `task.on_parse_error` says:
    `observe` answers "Invalid action" and the episode goes on, the turn stored and trained like any
    other; `end` is the paper's loop: the episode ends and the turn is left out of `messages`, so it
    is never trained. Under `end` an action naming a tool the task lacks (the paper's tool dispatcher
    raises on it) ends the episode the same way, as a tool_error. The turn is counted in the stats
    either way, so the action error rate (`metrics.behaviour`: parse and tool errors per attempted
    action) keeps its definition under both settings; under `end` an invalid action is always the
    last attempt of its episode (no retries after it), so rates of the two settings do not compare.
    """
    turn = {"role": "assistant", "content": text, "train": True}
    # Tasks built outside negagent.tasks may lack the setting: today's loop is the default.
    end_on_error = getattr(task, "on_parse_error", "observe") == "end"
    action = parse_action(text) if text else None
    if end_on_error and (action is None or (action.name != "finish" and action.name not in task.tools)):
        ep.ended, ep.dropped = True, turn
        if not text:
            ep.last_error = "no_finish"
        elif action is None:
            ep.parse_errors, ep.last_error = ep.parse_errors + 1, "parse_error"
        else:
            ep.actions, ep.tool_errors, ep.last_error = ep.actions + 1, ep.tool_errors + 1, "tool_error"
        return
    ep.messages.append(turn)
    if not text:
        ep.ended, ep.last_error = True, "no_finish"
        return
    if action is None:
        ep.parse_errors += 1
        ep.last_error = "parse_error"
        obs = INVALID_ACTION.format(tools="|".join(task.tools))
    elif action.name == "finish":
        ep.actions += 1
        ep.pred, ep.finished, ep.ended, ep.last_error = action.argument, True, True, None
        return
    else:
        ep.actions += 1
        observation, ok = call_tool(action.name, action.argument)
        ep.last_error = None if ok else "tool_error"
        ep.tool_errors += 0 if ok else 1
        obs = f"Observation: {observation}"
    ep.messages.append({"role": "user", "content": obs, "train": False})


def _to_trajectory(ep: _Episode, task: Task, provenance: dict) -> Trajectory:
    scores = task.score(ep.pred, ep.question.gold)
    reward = bool(scores["reward"])
    if reward:
        failure = None
    elif ep.finished:
        failure = "wrong_answer"
    else:
        failure = ep.last_error or "max_steps"
    # Drop a trailing observation: the episode's last word is the model's.
    messages = ep.messages[:-1] if ep.messages and ep.messages[-1]["role"] == "user" else ep.messages
    if not messages and ep.dropped is not None:
        # The first turn was left out (on_parse_error=end), but a record needs an assistant turn:
        # it keeps that one untrained, and so has nothing to train on.
        messages = [{**ep.dropped, "train": False}]
    return Trajectory(
        id=f"{ep.question.id}-s{ep.sample_index}",
        task=task.name,
        question=ep.question.question,
        gold=ep.question.gold,
        messages=messages,
        reward=reward,
        score=float(scores.get("f1", scores["reward"])),
        pred=ep.pred,
        failure=failure,
        provenance={**provenance, "question_id": ep.question.id, "sample_index": ep.sample_index},
        stats={
            "turns": sum(m["role"] == "assistant" for m in ep.messages) + (ep.dropped is not None),
            "actions": ep.actions,
            "parse_errors": ep.parse_errors,
            "tool_errors": ep.tool_errors,
            "metrics": {k: v for k, v in scores.items() if k != "reward"},
        },
    )


def run_episodes(
    backend: Backend,
    task: Task,
    jobs: Sequence[tuple[Question, int]],
    call_tool: Callable[[str, str], tuple[str, bool]],
    *,
    sampling: Sampling,
    max_turns: int | None = None,
    tag: str | None = None,
    placement: str = "prefix",
    opening: ChatOpening | None = None,
    provenance: dict[str, Any] | None = None,
    on_step: Callable[[int, int, int], None] | None = None,
) -> Iterator[Trajectory]:
    """Run (question, sample index) jobs to the end, yielding each trajectory as it finishes.

    `call_tool(name, argument) -> (observation, ok)` runs a tool. The prompt of every turn comes from
    `build_chat` (the renderer's chat builder) with the given opening (default: the task's
    instructions as the system turn) and tag, exactly as in training.
    `on_step(turn, finished, total)` is called after every turn and once at the end (for progress bars).
    `max_turns` defaults to the task's own limit (`task.max_turns`).
    """
    max_turns = task.max_turns if max_turns is None else max_turns
    opening = opening or ChatOpening.from_instructions(task.instructions)
    episodes = [_Episode(q, i) for q, i in jobs]
    provenance = {"backend": backend.name, "temperature": sampling.temperature, **(provenance or {})}
    done = turns = 0
    for _turn in range(max_turns):
        active = [ep for ep in episodes if not ep.ended]
        if not active:
            break
        turns += 1
        chats = [
            build_chat(opening, ep.question.question, ep.messages, tag=tag, placement=placement)
            for ep in active
        ]
        outputs = backend.complete(chats, sampling)
        for ep, out in zip(active, outputs):
            _step(ep, clean_turn(out), task, call_tool)
            if ep.ended:
                done += 1
                yield _to_trajectory(ep, task, provenance)
        if on_step:
            on_step(turns, done, len(episodes))
    for ep in episodes:
        if not ep.ended:
            ep.ended = True
            yield _to_trajectory(ep, task, provenance)
    if on_step:
        on_step(turns, len(episodes), len(episodes))
