"""Importers from other projects' trajectory files into this project's format.

- NAT (the paper's repository): a JSON list of {conversations: [{role, content, loss}], info:
  {reward, gt, pred}, id, source (the sampling temperature)}. The question text is not in the
  file; it comes from the task's question file, matched by id.
- FireAct: JSONL with OpenAI chat `messages`; the first user message is the question and the
  last observation says `reward = True|False`.

Command line: `python -m negagent.importers {nat,fireact} IN OUT [--questions FILE] [--task T]`.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any, Mapping

from negagent.errors import NegagentError, exit_on_user_error
from negagent.trajectory import Trajectory, validate_record, write_trajectories

_FINISH = re.compile(r"finish\[(.*)\]", re.S)
MAX_TURNS = 7  # the paper's limit on model turns


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise NegagentError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise NegagentError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def _read_jsonl(path: Path) -> list[tuple[int, Any]]:
    """(line number, decoded value) of every non-blank line: numbers count the blank lines too."""
    if not path.is_file():
        raise NegagentError(f"{path}: file not found")
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append((lineno, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise NegagentError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
    return rows


def read_question_file(path: str | Path) -> dict[str, dict]:
    """Questions by string id from a JSON list or JSONL file of {id, question, answer}."""
    path = Path(path)
    rows = _read_json(path) if path.suffix == ".json" else [row for _, row in _read_jsonl(path)]
    return {str(r["id"]): r for r in rows if isinstance(r, dict) and "id" in r}


def _failure_of(messages: list[dict], reward: bool) -> str | None:
    if reward:
        return None
    actions = [m["content"] for m in messages if m["role"] == "assistant"]
    if actions and _FINISH.search(actions[-1]):
        return "wrong_answer"
    return "max_steps" if len(actions) >= MAX_TURNS else "no_finish"


def _malformed(where: str, exc: Exception) -> NegagentError:
    """A record the importer cannot read (a missing field, a wrong type) as a user error: the
    validator's own reason, or what Python stumbled on."""
    reason = str(exc) if type(exc) is ValueError else f"{type(exc).__name__}: {exc}"
    return NegagentError(f"{where}: not a valid trajectory ({reason})")


def from_nat(path: str | Path, questions: Mapping[str, dict], task: str) -> tuple[list[Trajectory], int]:
    """Trajectories from a NAT JSON file; returns them and the number of empty episodes skipped.

    Every id must be in `questions` (else NegagentError naming the id and the file); a record that
    cannot be read is a NegagentError naming the file and the record's index.
    """
    path = Path(path)
    records = _read_json(path)
    if not isinstance(records, list):
        raise NegagentError(f"{path}: expected a JSON list of NAT trajectories")
    out: list[Trajectory] = []
    empty = 0
    sample_index: dict[str, int] = {}
    for i, rec in enumerate(records):
        try:
            traj = _nat_record(rec, i, path, questions, task, sample_index)
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise _malformed(f"{path}: trajectory {i}", exc) from None
        if traj is None:
            empty += 1
        else:
            out.append(traj)
    return out, empty


def _nat_record(rec: Any, i: int, path: Path, questions: Mapping[str, dict], task: str,
                sample_index: dict[str, int]) -> Trajectory | None:
    """One NAT record as a trajectory; None for an episode without an assistant turn."""
    qid = str(rec.get("id"))
    if qid not in questions:
        raise NegagentError(
            f"{path}: trajectory {i} has id {qid!r}, which is not in the question file; "
            "pass the question file this trajectory file was collected on"
        )
    conv = rec.get("conversations") or []
    if not any(m.get("role") == "assistant" for m in conv):
        return None
    info = rec.get("info", {})
    messages = [{"role": m["role"], "content": m["content"], "train": bool(m.get("loss", m["role"] == "assistant"))} for m in conv]
    reward = bool(info.get("reward"))
    n = sample_index[qid] = sample_index.get(qid, -1) + 1
    q = questions[qid]
    return validate_record(
        {
            "id": f"{qid}-{path.stem}-{n}",
            "task": task,
            "question": q["question"],
            "gold": info.get("gt", q.get("answer")),
            "messages": messages,
            "reward": reward,
            "score": float(reward),
            "pred": None if info.get("pred") is None else str(info.get("pred")),
            "failure": _failure_of(messages, reward),
            "provenance": {
                "question_id": qid,
                "teacher": "gpt-3.5-turbo (NAT release)",
                "temperature": float(rec["source"]) if rec.get("source") else None,
                "sample_index": n,
                "source_file": path.name,
            },
        }
    )


def from_fireact(path: str | Path, task: str) -> list[Trajectory]:
    """Trajectories from a FireAct chat-format JSONL file; reward read from the last observation.
    A record that cannot be read is a NegagentError naming the file and line."""
    path = Path(path)
    out = []
    for lineno, rec in _read_jsonl(path):
        try:
            out.append(_fireact_record(rec, lineno, path, task))
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise _malformed(f"{path}:{lineno}", exc) from None
    return out


def _fireact_record(rec: Any, lineno: int, path: Path, task: str) -> Trajectory:
    msgs = rec.get("messages") or []
    if len(msgs) < 2 or msgs[0].get("role") != "user":
        raise NegagentError(f"{path}:{lineno}: expected messages starting with the user's question")
    question = msgs[0]["content"]
    turns = [{"role": m["role"], "content": m["content"]} for m in msgs[1:] if m["role"] in ("assistant", "user")]
    last_obs = next((m["content"] for m in reversed(turns) if m["role"] == "user"), "")
    found = re.search(r"reward\s*=\s*(True|False|1|0)\b", last_obs)
    if not found:
        raise NegagentError(f"{path}:{lineno}: the last observation does not state the reward")
    reward = found.group(1) in ("True", "1")
    actions = [m["content"] for m in turns if m["role"] == "assistant"]
    pred = _FINISH.search(actions[-1]) if actions else None
    return validate_record(
        {
            "id": f"fireact-{path.stem}-{lineno}",
            "task": task,
            "question": question,
            "gold": None,
            "messages": turns,
            "reward": reward,
            "score": float(reward),
            "pred": pred.group(1).strip() if pred else None,
            "failure": _failure_of(turns, reward),
            "provenance": {"teacher": "gpt-4 (FireAct release)", "source_file": path.name},
        }
    )


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("format", choices=["nat", "fireact"])
    parser.add_argument("inputs", nargs="+", help="input files")
    parser.add_argument("-o", "--output", required=True, help="output JSONL (must not exist)")
    parser.add_argument("--questions", help="question file (NAT: JSON list or JSONL with id/question/answer)")
    parser.add_argument("--task", required=True, help="task name stored in every record")
    args = parser.parse_args(argv)
    out = Path(args.output)
    if out.exists():
        raise NegagentError(f"{out}: already exists; choose a new output file")
    trajectories: list[Trajectory] = []
    for name in args.inputs:
        if args.format == "nat":
            if not args.questions:
                raise NegagentError("NAT files carry no question text: pass --questions")
            got, empty = from_nat(name, read_question_file(args.questions), args.task)
            if empty:
                print(f"{name}: skipped {empty} empty episodes")
        else:
            got = from_fireact(name, args.task)
        trajectories.extend(got)
    n = write_trajectories(out, trajectories)
    pos = sum(t.reward for t in trajectories)
    print(f"wrote {n} trajectories ({pos} positive, {n - pos} negative) to {out}")


if __name__ == "__main__":
    main()
