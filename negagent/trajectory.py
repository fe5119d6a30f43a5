"""The trajectory format: one JSONL record per episode, and its validating store.

A record (see `Trajectory`) holds the question, the gold answer, the episode's turns after the
question (`messages`: assistant turns and `user` observations, each with a `train` flag), the
label from the task's own scoring (`reward`, `score`), the prediction, a failure type, and
provenance. The instructions and the question are not in `messages`: the renderer adds them,
with the tag, so that one stored episode can be rendered under every tagging strategy.

Writing is append-only and flushed per record, so a killed writer loses at most the line it was
writing; `load_trajectories` ignores such a torn last line and reports it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from negagent.errors import NegagentError

FAILURE_TYPES = ("wrong_answer", "parse_error", "tool_error", "max_steps", "no_finish")
ROLES = ("assistant", "user")


@dataclass
class Trajectory:
    """One labelled episode. `failure` is None exactly when `reward` is True."""

    id: str
    task: str
    question: str
    gold: Any
    messages: list[dict]
    reward: bool
    score: float
    pred: str | None = None
    failure: str | None = None
    provenance: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)  # episode counts: actions, parse_errors, tool_errors, turns

    @property
    def question_id(self) -> str:
        """The id of the question this episode answers (several samples share one)."""
        return str(self.provenance.get("question_id", self.id))

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


def validate_record(record: Any) -> Trajectory:
    """Turn a decoded JSON value into a `Trajectory`, or raise ValueError saying what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    for key in ("id", "task", "question", "messages", "reward"):
        if key not in record:
            raise ValueError(f"missing field '{key}'")
    if not isinstance(record["reward"], bool):
        raise ValueError("'reward' must be true or false")
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("content"), str):
            raise ValueError(f"message {i} needs a string 'content'")
        if msg.get("role") not in ROLES:
            raise ValueError(f"message {i} has role {msg.get('role')!r}; expected one of {ROLES}")
        msg.setdefault("train", msg["role"] == "assistant")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant turn")
    failure = record.get("failure")
    if failure is not None and failure not in FAILURE_TYPES:
        raise ValueError(f"unknown failure type {failure!r}; expected one of {FAILURE_TYPES}")
    score = record.get("score", float(record["reward"]))
    if not isinstance(score, (int, float)):
        raise ValueError("'score' must be a number")
    return Trajectory(
        id=str(record["id"]),
        task=str(record["task"]),
        question=str(record["question"]),
        gold=record.get("gold"),
        messages=messages,
        reward=record["reward"],
        score=float(score),
        pred=record.get("pred"),
        failure=failure if not record["reward"] else None,
        provenance=dict(record.get("provenance") or {}),
        stats=dict(record.get("stats") or {}),
    )


@dataclass
class LoadStats:
    """What `load_trajectories` saw: records kept, lines skipped (with reasons), torn tail."""

    kept: int = 0
    skipped: list[str] = field(default_factory=list)
    torn_tail: bool = False


def load_trajectories(
    path: str | os.PathLike, *, skip_bad: bool = False, task: str | None = None
) -> tuple[list[Trajectory], LoadStats]:
    """Read and validate a trajectory JSONL file.

    A bad line raises `NegagentError` naming file, line and reason, unless `skip_bad`, when it is
    counted in `LoadStats.skipped`. An unterminated last line (a writer killed mid-record) is
    dropped and flagged as `torn_tail`. With `task`, records of another task are an error.
    """
    path = Path(path)
    if not path.is_file():
        raise NegagentError(f"{path}: trajectory file not found")
    stats = LoadStats()
    trajectories: list[Trajectory] = []
    # Lines are decoded one by one: a writer killed mid-line can cut a UTF-8 character in two.
    lines = path.read_bytes().split(b"\n")
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        is_last = lineno == len(lines)  # no newline after it: possibly torn
        try:
            traj = validate_record(json.loads(line.decode("utf-8")))
        except (json.JSONDecodeError, ValueError) as exc:
            if is_last and isinstance(exc, (json.JSONDecodeError, UnicodeDecodeError)):
                stats.torn_tail = True
                continue
            reason = f"{path}:{lineno}: bad trajectory record: {exc}"
            if not skip_bad:
                raise NegagentError(reason + " (set data.skip_bad_lines=true to skip such lines)")
            stats.skipped.append(reason)
            continue
        if task is not None and traj.task != task:
            raise NegagentError(
                f"{path}:{lineno}: trajectory is for task '{traj.task}', but this run's task is "
                f"'{task}'; pass a file collected for '{task}' or set task={traj.task}"
            )
        trajectories.append(traj)
    stats.kept = len(trajectories)
    if not trajectories:
        raise NegagentError(f"{path}: no valid trajectories in the file")
    return trajectories, stats


class TrajectoryWriter:
    """Append-only JSONL writer, flushed and fsynced per record so a crash loses at most one line."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair_torn_tail()
        self._fh = self.path.open("a", encoding="utf-8")

    def _repair_torn_tail(self) -> None:
        # A killed writer can leave a partial last line; cut it so appends start on a fresh line.
        # A last line that is complete JSON and only lacks its newline is a record `load_trajectories`
        # reads (and a resume counts as done): end it instead of cutting it.
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        data = self.path.read_bytes()
        if not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            try:
                json.loads(data[cut:])
            except ValueError:  # JSONDecodeError, or bytes that are not UTF-8
                with self.path.open("r+b") as fh:
                    fh.truncate(cut)
            else:
                with self.path.open("ab") as fh:
                    fh.write(b"\n")

    def write(self, traj: Trajectory | dict) -> None:
        line = traj.to_json() if isinstance(traj, Trajectory) else json.dumps(traj, ensure_ascii=False)
        self._fh.write(line + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "TrajectoryWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_trajectories(path: str | os.PathLike, trajectories: Iterable[Trajectory]) -> int:
    """Append every trajectory to `path`; returns how many were written."""
    n = 0
    with TrajectoryWriter(path) as writer:
        for traj in trajectories:
            writer.write(traj)
            n += 1
    return n
