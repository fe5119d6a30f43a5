"""An offline rule-based teacher for the calculator tasks (`arith`, and `math` from GSM8K's notes).

It is a real backend: `complete(chats, sampling)` reads each conversation so far (the question and
the observations the real calculator returned) and writes the next turn. A correct episode follows
the question's worked solution (`Question.meta["steps"]`, [{expr, value, text}]): one
`Thought: <text>` / `Action: calculate[<expr>]` turn per step, each expression using the values the
calculator actually returned for earlier steps, then `Action: finish[<answer>]`.

At configurable rates (scaled by the sampling temperature) an episode goes wrong the way language
models go wrong, at one random step:

- wrong_operand:    one number of the expression is off; the tool computes it faithfully.
- skipped_step:     a step is silently left out; later steps use the value from before it.
- no_tool:          the step is done "in the head" with a wrong result, and the episode goes on.
- premature_finish: the episode answers with the value it has before the solution is complete.
- malformed_action: the action is written in a form the agent loop cannot parse; the teacher
                    either repeats that form or recovers on the next turn.

What an episode is decided from (seed, temperature, question) only, so a (question, sample,
temperature) always gives the same episode: the collection run puts the sample index into
`sampling.seed`. Labels never come from here: a "failure" that still reaches the gold answer is
scored a positive by the task.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from negagent.agent import Sampling
from negagent.errors import NegagentError
from negagent.tasks.base import Question, Task

FAILURES = ("wrong_operand", "skipped_step", "no_tool", "premature_finish", "malformed_action")
TASKS = ("arith", "math")
_NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?|\.\d+")
_MALFORMED = (
    "Action: calculate {expr}",
    "Action: calculate({expr})",
    "Action: [{expr}]",
    "Calculate: {expr}",
)


def _number(text: str) -> float | None:
    """The first number in `text` ("1,800" -> 1800.0), or None."""
    match = _NUMBER.search(text)
    return None if match is None else float(match.group().replace(",", ""))


def _format(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.6g}"


def _same(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and abs(a - b) <= 1e-9 * max(1.0, abs(a), abs(b))


@dataclass(frozen=True)
class Plan:
    """What goes wrong in one episode: `failure` (None: nothing) at step `step`."""

    failure: str | None
    step: int
    rng: str  # seed string for the details (which operand, which wrong value, which malformed form)
    recovers: bool  # malformed_action: the next turn is well-formed again


class ScriptedTeacher:
    """The rule-based teacher over one task's training questions (see the module docstring)."""

    def __init__(self, task: Task, rates: Mapping[str, float], *, scale_with_temperature: bool = True,
                 name: str = "scripted"):
        if task.name not in TASKS:
            raise NegagentError(
                f"teacher=scripted writes trajectories for tasks {', '.join(TASKS)} only, not "
                f"'{task.name}'; use backend@teacher=openai or backend@teacher=hf"
            )
        unknown = sorted(set(rates) - set(FAILURES))
        if unknown:
            raise NegagentError(f"teacher.failure_rates: unknown failure {unknown[0]!r}; known: {', '.join(FAILURES)}")
        if any(float(r) < 0 for r in rates.values()) or sum(float(r) for r in rates.values()) > 1:
            raise NegagentError("teacher.failure_rates: each rate must be >= 0 and together at most 1")
        self.name = name
        self.task = task
        self.rates = {k: float(rates.get(k, 0.0)) for k in FAILURES}
        self.scale_with_temperature = scale_with_temperature
        self._questions = {q.question: q for q in task.train_questions()}
        self.stats: dict[str, Any] = {"requests": 0}

    # --- reading the conversation -------------------------------------------------------------

    @staticmethod
    def _episode_start(chat: Sequence[dict]) -> int:
        """Index of the question turn: the last user turn before the episode's own turns (an
        opening may hold user turns and untrained assistant turns of its own)."""
        first_own = next((i for i, m in enumerate(chat) if m["role"] == "assistant" and m.get("train", True)), len(chat))
        return max(i for i, m in enumerate(chat[:first_own]) if m["role"] == "user")

    def _question(self, chat: Sequence[dict]) -> Question:
        asked = chat[self._episode_start(chat)]["content"]
        start = asked.find("Question: ")
        text = (asked[start + len("Question: "):] if start >= 0 else asked).strip()
        question = self._questions.get(text) or self._questions.get(text.rsplit("\n", 1)[0].strip())
        if question is None:
            raise NegagentError(
                f"teacher=scripted: a prompt holds a question that is not in task '{self.task.name}''s "
                f"training set: {text[:80]!r}"
            )
        return question

    @classmethod
    def _observations(cls, chat: Sequence[dict]) -> list[str]:
        return [m["content"].removeprefix("Observation:").strip()
                for m in chat[cls._episode_start(chat) + 1:] if m["role"] == "user"]

    # --- deciding and writing an episode ------------------------------------------------------

    def _plan(self, question: Question, sampling: Sampling) -> Plan:
        key = f"scripted|{sampling.seed}|{sampling.temperature:g}|{question.id}"
        rng = random.Random(key)
        scale = (0.5 + max(0.0, sampling.temperature)) if self.scale_with_temperature else 1.0
        rates = [(name, rate * scale) for name, rate in self.rates.items()]
        total = sum(rate for _, rate in rates)
        if total > 1:  # high temperatures: keep the mix, cap the total
            rates = [(name, rate / total) for name, rate in rates]
        draw, failure = rng.random(), None
        for name, rate in rates:
            if draw < rate:
                failure = name
                break
            draw -= rate
        n_steps = max(1, len(question.meta.get("steps") or []))
        # Finishing "early" before step 0 would be a bare guess; start at 1 when there is a step 1.
        low = 1 if failure == "premature_finish" and n_steps > 1 else 0
        return Plan(failure, rng.randrange(low, n_steps), key, rng.random() < 0.5)

    def _turn(self, question: Question, plan: Plan, observations: list[str]) -> str:
        """Replay the episode over the observations so far and write the turn that comes next."""
        steps = list(question.meta.get("steps") or [])
        rng = random.Random(plan.rng + "|details")
        correct = [_number(str(s["value"])) for s in steps]
        observed: dict[int, str] = {}  # step -> the value the episode believes it has
        gold = _number(str(question.gold))

        def substitute(text: str, upto: int) -> str:
            # Earlier results whose believed value differs from the solution's are replaced, so a
            # mistake propagates exactly as it would for a model reading its own observations.
            def swap(match: re.Match) -> str:
                value = float(match.group().replace(",", ""))
                for j in range(upto - 1, -1, -1):
                    if j in observed and _same(correct[j], value):
                        return observed[j]
                return match.group()

            return _NUMBER.sub(swap, text)

        def current_value(i: int) -> str:
            if i > 0 and i - 1 in observed:
                return observed[i - 1]
            first = _number(substitute(steps[0]["expr"], 0)) if steps else None
            return _format(first) if first is not None else "0"

        def final_answer() -> str:
            last = len(steps) - 1
            if last >= 0 and _same(correct[last], gold) and last in observed:
                return observed[last]
            return _format(gold) if gold is not None else str(question.gold)

        turn, i, malformed_turns = 0, 0, 0
        while True:
            prefix = ""
            if i < len(steps) and plan.step == i and plan.failure in ("skipped_step", "no_tool"):
                expr = substitute(steps[i]["expr"], i)
                if plan.failure == "skipped_step":
                    start = _number(expr)
                    observed[i] = _format(start) if start is not None else current_value(i)
                else:
                    value = _number(str(steps[i]["value"])) or 0.0
                    mental = _format(_wrong(value, rng))
                    prefix = f"{substitute(steps[i]['text'], i)} {expr} = {mental}. "
                    observed[i] = mental
                i += 1
            if i >= len(steps):
                answer = final_answer()
                text = f"Thought: {prefix}So the answer is {answer}.\nAction: finish[{answer}]"
                kind = "finish"
            elif plan.failure == "premature_finish" and plan.step == i:
                answer = current_value(i)
                text = f"Thought: {prefix}That gives the answer: {answer}.\nAction: finish[{answer}]"
                kind = "finish"
            else:
                expr = substitute(steps[i]["expr"], i)
                thought = f"Thought: {prefix}{substitute(steps[i]['text'], i)}"
                if plan.failure == "wrong_operand" and plan.step == i:
                    expr = _wrong_operand(expr, rng)
                if plan.failure == "malformed_action" and plan.step == i and (
                    malformed_turns == 0 or not plan.recovers
                ):
                    form = random.Random(plan.rng + "|form").choice(_MALFORMED)
                    text, kind = f"{thought}\n{form.format(expr=expr)}", "malformed"
                else:
                    text, kind = f"{thought}\nAction: calculate[{expr}]", "calculate"
            if turn >= len(observations) or kind == "finish":
                return text
            # This turn was already taken: read its observation and move on.
            if kind == "malformed":
                malformed_turns += 1
            else:
                result = observations[turn]
                value = _number(result) if not result.startswith("Error") else None
                observed[i] = result.split()[0] if value is not None else _format(correct[i] or 0.0)
                i += 1
            turn += 1

    def complete(self, chats: Sequence[list[dict]], sampling: Sampling) -> list[str]:
        self.stats["requests"] += len(chats)
        turns = []
        for chat in chats:
            question = self._question(chat)
            turns.append(self._turn(question, self._plan(question, sampling), self._observations(chat)))
        return turns


def _wrong(value: float, rng: random.Random) -> float:
    """A plausible slip: off by a little, off by ten, or digits swapped; never the value itself."""
    for _ in range(10):
        kind = rng.choice(("off_by", "tens", "swap"))
        if kind == "off_by":
            wrong = value + rng.choice((-2, -1, 1, 2))
        elif kind == "tens":
            wrong = value + rng.choice((-10, 10))
        else:
            digits = _format(value)
            if len(digits) < 2 or not digits.isdigit() or digits[0] == digits[1]:
                continue
            wrong = float(digits[1] + digits[0] + digits[2:])
        if wrong != value and wrong >= 0:
            return wrong
    return value + 1


def _wrong_operand(expr: str, rng: random.Random) -> str:
    """`expr` with one of its numbers changed a little (kept positive, never the same)."""
    numbers = list(_NUMBER.finditer(expr))
    if not numbers:
        return expr
    match = rng.choice(numbers)
    value = float(match.group().replace(",", ""))
    delta = rng.choice((-3, -2, -1, 1, 2, 3, 10))
    new = value + delta if value + delta > 0 else value + abs(delta)
    return expr[: match.start()] + _format(new) + expr[match.end():]


def build(cfg: Mapping[str, Any], *, task: Task | None = None, **_: Any) -> ScriptedTeacher:
    """A ScriptedTeacher for `task` with `cfg.failure_rates` (see conf/backend/scripted.yaml)."""
    if task is None:
        raise NegagentError("teacher=scripted needs the task it writes trajectories for")
    rates = dict(cfg.get("failure_rates") or {})
    return ScriptedTeacher(
        task, rates, scale_with_temperature=bool(cfg.get("scale_with_temperature", True)),
        name=str(cfg.get("label") or "scripted"),
    )
