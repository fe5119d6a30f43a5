"""Importers from other projects' trajectory files into this project's format.

- NAT (the paper's repository): a JSON list of {conversations: [{role, content, loss}], info:
  {reward, gt, pred, f1 (HotpotQA)}, id, source (the sampling temperature)}. The question text is
  not in the file; it comes from the task's question file, matched by id. The recorded reward stays
  the label, and every episode is re-scored with this project's own task scoring, so that a user
  sees how far the two agree (`Agreement`) and `score` carries HotpotQA's F1 for graded tags.
  An episode ends on the model's last turn, as the agent loop's do.
- FireAct: JSONL with OpenAI chat `messages`; the first user message is the question and the
  last observation says `reward = True|False`.

Command line: `python -m negagent.importers {nat,fireact} IN... -o OUT --task T [--questions FILE]`;
for NAT it prints one line saying how many recorded labels the re-scoring agrees with.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from negagent.agent import parse_action
from negagent.errors import NegagentError, exit_on_user_error
from negagent.tasks import Task, get_task
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


def _failure_of(messages: list[dict], reward: bool, finished: bool) -> str | None:
    if reward:
        return None
    if finished:
        return "wrong_answer"
    turns = sum(m["role"] == "assistant" for m in messages)
    return "max_steps" if turns >= MAX_TURNS else "no_finish"


def _malformed(where: str, exc: Exception) -> NegagentError:
    """A record the importer cannot read (a missing field, a wrong type) as a user error: the
    validator's own reason, or what Python stumbled on."""
    reason = str(exc) if type(exc) is ValueError else f"{type(exc).__name__}: {exc}"
    return NegagentError(f"{where}: not a valid trajectory ({reason})")


# Why a recorded label and this project's re-scoring differ, tried in this order. The first two
# are named only when re-scoring with the file's own value instead gives back the recorded label.
ANSWER_READ_DIFFERENTLY = "answer read differently"  # the file's pred is not the finish argument as parsed here
OTHER_GOLD = "other gold"  # the file graded against another gold answer than the question file's
NO_ANSWER = "no answer"  # recorded correct, but neither the episode nor the file holds an answer
SCORING_RULE = "scoring rule"  # same answer, same gold: the two rules judge it differently
F1_TOLERANCE = 1e-6


@dataclass
class Agreement:
    """Recorded rewards (and F1s) of imported episodes against this project's re-scoring of them.

    `checked` counts the episodes re-scored (those with a gold answer; `no_gold` the others) and
    `agree` those whose recorded reward equals the re-scored one. Every disagreement is one line in
    `disagreements` (file, record, id, cause, answers) and counted by cause in `causes`; a recorded
    F1 is checked the same way (`f1_checked`, `f1_disagreements`). Pass one to `from_nat` to fill it;
    one Agreement may collect several files.
    """

    checked: int = 0
    agree: int = 0
    no_gold: int = 0
    causes: Counter = field(default_factory=Counter)
    disagreements: list[str] = field(default_factory=list)
    f1_checked: int = 0
    f1_disagreements: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: `re-scored N episodes: labels agree on M (x.x%); disagreements: ...`."""
        share = f" ({100 * self.agree / self.checked:.1f}%)" if self.checked else ""
        causes = ", ".join(f"{n:,} {cause}" for cause, n in self.causes.most_common()) or "none"
        line = f"re-scored {self.checked:,} episodes: labels agree on {self.agree:,}{share}; disagreements: {causes}"
        if self.f1_checked:
            line += f"; recorded F1 agrees on {self.f1_checked - len(self.f1_disagreements):,} of {self.f1_checked:,}"
        if self.no_gold:
            line += f"; {self.no_gold:,} without a gold answer not re-scored"
        return line


def from_nat(path: str | Path, questions: Mapping[str, dict], task: str,
             agreement: Agreement | None = None) -> tuple[list[Trajectory], int]:
    """Trajectories from a NAT JSON file; returns them and the number of empty episodes skipped.

    Turns after the last assistant turn are dropped. `task` names a task of `negagent.tasks`, whose
    `score` re-scores every episode: `pred` is the last turn's finish argument as the agent loop
    parses it, `reward` stays the file's label, `score` is the file's F1 where it has one, else the
    task's F1 where it reports one (HotpotQA), else the label, and `provenance["rescored_reward"]`
    is the re-scored reward (None without a gold answer). The comparison is added to `agreement`
    when one is given.

    Every id must be in `questions` (else NegagentError naming the id and the file); a record that
    cannot be read is a NegagentError naming the file and the record's index.
    """
    path = Path(path)
    scorer = get_task({"name": task})
    records = _read_json(path)
    if not isinstance(records, list):
        raise NegagentError(f"{path}: expected a JSON list of NAT trajectories")
    agreement = Agreement() if agreement is None else agreement
    out: list[Trajectory] = []
    empty = 0
    sample_index: dict[str, int] = {}
    for i, rec in enumerate(records):
        try:
            traj = _nat_record(rec, i, path, questions, scorer, sample_index, agreement)
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise _malformed(f"{path}: trajectory {i}", exc) from None
        if traj is None:
            empty += 1
        else:
            out.append(traj)
    return out, empty


def _nat_record(rec: Any, i: int, path: Path, questions: Mapping[str, dict], scorer: Task,
                sample_index: dict[str, int], agreement: Agreement) -> Trajectory | None:
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
    # The episode's last word is the model's, as in the agent loop's trajectories: NAT's closing
    # "Observation: Episode finished" (or an unfinished episode's last observation) is not kept.
    while messages[-1]["role"] != "assistant":
        messages.pop()
    reward = bool(info.get("reward"))
    q = questions[qid]
    # The question file's answer first: HotpotQA's files record a normalised `gt` for finished
    # episodes only, so the file's own would differ between episodes of one question.
    gold = q["answer"] if q.get("answer") is not None else info.get("gt")
    last = next(m["content"] for m in reversed(messages) if m["role"] == "assistant")
    action = parse_action(last)
    pred = action.argument if action is not None and action.name == "finish" else None
    recorded_f1 = _recorded_f1(info)
    rescored = None if gold is None else scorer.score(pred, gold)
    where = f"{path}: trajectory {i} ({qid})"
    if rescored is None:
        agreement.no_gold += 1
    else:
        _compare(agreement, where, scorer, reward, rescored, pred, gold, info, recorded_f1)
    if recorded_f1 is not None:
        score = recorded_f1
    elif rescored is not None and "f1" in rescored:
        score = float(rescored["f1"])
    else:
        score = float(reward)
    n = sample_index[qid] = sample_index.get(qid, -1) + 1
    return validate_record(
        {
            "id": f"{qid}-{path.stem}-{n}",
            "task": scorer.name,
            "question": q["question"],
            "gold": gold,
            "messages": messages,
            "reward": reward,
            "score": score,
            "pred": pred,
            "failure": _failure_of(messages, reward, pred is not None),
            "provenance": {
                "question_id": qid,
                "teacher": "gpt-3.5-turbo (NAT release)",
                "temperature": float(rec["source"]) if rec.get("source") else None,
                "sample_index": n,
                "source_file": path.name,
                "rescored_reward": None if rescored is None else bool(rescored["reward"]),
            },
        }
    )


def _recorded_f1(info: Mapping[str, Any]) -> float | None:
    value = info.get("f1")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"info.f1 must be a number from 0 to 1, got {value!r}")
    return float(value)


def _compare(agreement: Agreement, where: str, scorer: Task, reward: bool, rescored: dict, pred: str | None,
             gold: Any, info: Mapping[str, Any], recorded_f1: float | None) -> None:
    """Add one re-scored episode to `agreement`, naming the cause of a disagreement."""
    agreement.checked += 1
    ours = bool(rescored["reward"])
    file_pred, file_gold = info.get("pred"), info.get("gt")
    answers = f"answer {pred!r}, file's answer {file_pred!r}, gold {gold!r}, file's gold {file_gold!r}"
    if ours == reward:
        agreement.agree += 1
    else:
        if file_pred is not None and str(file_pred) != pred and \
                bool(scorer.score(str(file_pred), gold)["reward"]) == reward:
            cause = ANSWER_READ_DIFFERENTLY
        elif file_gold is not None and file_gold != gold and bool(scorer.score(pred, file_gold)["reward"]) == reward:
            cause = OTHER_GOLD
        elif pred is None and file_pred is None:
            cause = NO_ANSWER
        else:
            cause = SCORING_RULE
        agreement.causes[cause] += 1
        agreement.disagreements.append(f"{where}: recorded reward {reward}, re-scored {ours} ({cause}; {answers})")
    if recorded_f1 is not None and "f1" in rescored:
        agreement.f1_checked += 1
        if not math.isclose(recorded_f1, rescored["f1"], abs_tol=F1_TOLERANCE):
            agreement.f1_disagreements.append(
                f"{where}: recorded F1 {recorded_f1:.4f}, re-scored {rescored['f1']:.4f} ({answers})")


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
            "failure": _failure_of(turns, reward, pred is not None),
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
    if args.format == "nat" and not args.questions:
        raise NegagentError("NAT files carry no question text: pass --questions")
    trajectories: list[Trajectory] = []
    agreement = Agreement()
    for name in args.inputs:
        if args.format == "nat":
            got, empty = from_nat(name, read_question_file(args.questions), args.task, agreement)
            if empty:
                print(f"{name}: skipped {empty} empty episodes")
        else:
            got = from_fireact(name, args.task)
        trajectories.extend(got)
    if args.format == "nat":
        print(agreement.summary())
    n = write_trajectories(out, trajectories)
    pos = sum(t.reward for t in trajectories)
    print(f"wrote {n} trajectories ({pos} positive, {n - pos} negative) to {out}")


if __name__ == "__main__":
    main()
