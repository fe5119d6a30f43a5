"""Trajectory collection: a teacher answers a task's training questions through the shared agent loop.

A run is (questions x samples): sample `s` is drawn at temperature `temperatures[s //
samples_per_temperature]` with `sampling.seed = seed * 100003 + s`, so every (question, sample)
has its own fixed sampling settings. Episodes are labelled by the task's scoring inside
`run_episodes`; nothing here looks at how an episode was produced.

Files in the output directory:

    collection.json     what the directory holds (task, teacher, protocol, seed); a run with other
                        settings refuses the directory instead of mixing data
    episodes.jsonl      every episode, append-only, flushed and fsynced per record: the resume ledger
    trajectories.jsonl  the training set under the protocol's `keep` rule (append-only too):
                        `all`, or `one_positive` (the paper: one positive of each question, a
                        seeded random one of its samples, and every negative)
    stats.json          positives, negatives, failure types, length distribution, teacher usage

Re-running the same command resumes: episodes already in episodes.jsonl are not run again, and
trajectories.jsonl is brought up to date with them first (a kill between the two writes is healed).
"""

from __future__ import annotations

import json
import os
import random
import statistics
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from negagent import rundir
from negagent.agent import Sampling, run_episodes
from negagent.render import ChatOpening, chat_opening, instructions_role
from negagent.tagging import KEEP_RULES
from negagent.files import write_json_atomic
from negagent.errors import NegagentError
from negagent.trajectory import Trajectory, TrajectoryWriter, load_trajectories

EPISODES, TRAJECTORIES, IDENTITY, STATS = rundir.EPISODES, rundir.TRAJECTORIES, rundir.COLLECTION, rundir.STATS
_SEED_STRIDE = 100_003  # sample seeds of different run seeds never coincide (fewer samples than this)


# --- configuration ------------------------------------------------------------------------------


_WHOLE_SECTIONS = ("task", "teacher", "protocol", "model")  # group choices: replaced, never merged


def with_defaults(cfg: Mapping[str, Any]) -> dict:
    """`cfg` over conf/generate.yaml's composed defaults (scripted teacher, paper protocol, default
    tools), so callers outside generate.py (train.py collecting its default data) pass only what
    they have. Group sections that `cfg` gives replace the default whole; the rest merge key by key."""
    from omegaconf import OmegaConf

    from negagent.config import compose, plain

    given = plain(cfg)
    defaults = compose("generate")
    merged = plain(OmegaConf.merge(OmegaConf.create({k: v for k, v in defaults.items() if k not in given or k not in _WHOLE_SECTIONS}),
                                   OmegaConf.create({k: v for k, v in given.items() if k not in _WHOLE_SECTIONS})))
    merged.update({k: given[k] for k in _WHOLE_SECTIONS if k in given})
    return merged


def protocol_settings(protocol: Mapping[str, Any]) -> tuple[list[float], int, str]:
    """(temperatures, samples per temperature, keep rule) of the `protocol` config, checked."""
    temperatures = protocol.get("temperatures")
    if isinstance(temperatures, (int, float)):
        temperatures = [temperatures]
    if not temperatures or not all(isinstance(t, (int, float)) and t >= 0 for t in temperatures):
        raise NegagentError(f"protocol.temperatures={temperatures!r}: expected a list of numbers >= 0")
    per = protocol.get("samples_per_temperature", 1)
    if isinstance(per, bool) or not isinstance(per, int) or per < 1:
        raise NegagentError(f"protocol.samples_per_temperature={per!r}: expected an integer >= 1")
    keep = protocol.get("keep", "all")
    if keep not in KEEP_RULES:
        raise NegagentError(f"protocol.keep={keep!r}: choose one of: {', '.join(KEEP_RULES)}")
    return [float(t) for t in temperatures], per, keep


def teacher_label(cfg: Mapping[str, Any]) -> str:
    """The teacher's name in provenance and in the directory's identity, e.g. `openai:gpt-4o-mini`."""
    teacher = cfg["teacher"]
    if teacher.get("label"):
        return str(teacher["label"])
    name = teacher.get("name")
    if name == "openai":
        return f"openai:{teacher.get('model')}"
    if name == "hf":
        return f"hf:{(cfg.get('model') or {}).get('name', 'model')}"
    return str(name)


# --- the run's directory ------------------------------------------------------------------------


def _check_identity(out_dir: Path, identity: dict) -> None:
    """Refuse a directory collected with other settings (it is only read here)."""
    path = out_dir / IDENTITY
    if not path.is_file():
        return
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise NegagentError(f"{path}: not valid JSON ({exc.msg}); this directory cannot be resumed") from None
    for key, value in identity.items():
        if stored.get(key) != value:
            raise NegagentError(
                f"{out_dir / EPISODES} was collected with {key}={stored.get(key)!r}, this run has "
                f"{key}={value!r}: choose another output directory (hydra.run.dir) or the same settings"
            )


def _write_identity(out_dir: Path, identity: dict) -> None:
    path = out_dir / IDENTITY
    if path.is_file():
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, identity)


def _load(path: Path, task: str) -> list[Trajectory]:
    if not path.is_file() or not path.read_bytes().strip():
        return []
    try:
        records, stats = load_trajectories(path, skip_bad=True, task=task)
    except NegagentError as exc:
        if "no valid trajectories" in str(exc):  # only a torn line: nothing collected yet
            return []
        raise
    if stats.skipped:
        raise NegagentError(f"{stats.skipped[0]}; fix or remove that line, then re-run to resume")
    return records


def _check_records(path: Path, records: Iterable[Trajectory], teacher: str) -> None:
    for traj in records:
        other = traj.provenance.get("teacher")
        if other != teacher:
            raise NegagentError(
                f"{path}: episode {traj.id} comes from teacher {other!r}, this run's teacher is "
                f"{teacher!r}: choose another output directory (hydra.run.dir)"
            )


def _sample_order(seed: int, question_id: str, n_samples: int) -> list[int]:
    """The seeded random order in which `one_positive` prefers the samples of one question."""
    # A string seed is hashed with SHA-512: the same order on every run, whatever PYTHONHASHSEED.
    return random.Random(f"negagent-keep-{seed}-{question_id}").sample(range(n_samples), n_samples)


class _Keeper:
    """The protocol's keep rule, applied the same way online and when healing after a kill.

    `one_positive` keeps every negative and, of each question, the positive that comes first in a
    seeded random order of its samples: a uniform draw among its positives, so the kept positives
    spread over the temperatures as the paper's do (the first positive would mostly be a 0.2 one).
    The draw depends on the seed and on which samples succeeded only, never on the order episodes
    end in, so a resumed run keeps what an uninterrupted one keeps. A positive is released once
    every sample ahead of it in that order has ended as a negative. A trajectory without a trained
    turn (its only turn was left out under task.on_parse_error=end) has nothing to train: never kept.
    """

    def __init__(self, keep: str, kept: Iterable[Trajectory], *, seed: int, n_samples: int):
        self.keep, self.seed, self.n_samples = keep, seed, n_samples
        kept = list(kept)
        self.kept_ids = {traj.id for traj in kept}
        # Questions whose positive is decided; one kept by an earlier rule stays the only one.
        self.settled = {traj.question_id for traj in kept if traj.reward}
        # Undecided questions: sample index -> the positive, or None for a negative.
        self.ended: dict[str, dict[int, Trajectory | None]] = defaultdict(dict)

    def admit(self, traj: Trajectory) -> list[Trajectory]:
        """What to append to the training file now that `traj` has ended: `traj`, a positive that
        waited for it, both, or nothing."""
        chosen = [traj] if self.keep == "all" or not traj.reward else []
        if self.keep == "one_positive":
            chosen += self._positive(traj)
        fresh = [t for t in chosen if t.id not in self.kept_ids and any(m.get("train") for m in t.messages)]
        self.kept_ids.update(t.id for t in fresh)
        return fresh

    def _positive(self, traj: Trajectory) -> list[Trajectory]:
        question = traj.question_id
        if question in self.settled:
            return []
        ended = self.ended[question]
        ended[int(traj.provenance["sample_index"])] = traj if traj.reward else None
        chosen = []
        for sample in _sample_order(self.seed, question, self.n_samples):
            if sample not in ended:
                return []  # a sample ahead in the order may still succeed
            if ended[sample] is not None:
                chosen = [ended[sample]]
                break
        self.settled.add(question)
        del self.ended[question]
        return chosen


# --- statistics ---------------------------------------------------------------------------------


def _distribution(values: list[int]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)

    def pct(p: float) -> int:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))]

    return {"min": ordered[0], "p50": pct(0.5), "p90": pct(0.9), "max": ordered[-1],
            "mean": round(statistics.fmean(ordered), 2)}


def summarize(episodes: list[Trajectory], kept: list[Trajectory]) -> dict:
    """Counts and length distributions of the collected episodes and of the kept training set."""
    by_temperature: dict[str, Counter] = defaultdict(Counter)
    for traj in episodes:
        by_temperature[f"{float(traj.provenance.get('temperature', 0)):g}"][
            "positives" if traj.reward else "negatives"] += 1
    questions = {t.question_id for t in episodes}
    solved = {t.question_id for t in episodes if t.reward}
    turns = [int(t.stats.get("turns", 0)) for t in episodes]
    chars = [sum(len(m["content"]) for m in t.messages if m["role"] == "assistant") for t in episodes]
    return {
        "episodes": {
            "total": len(episodes),
            "positives": sum(t.reward for t in episodes),
            "negatives": sum(not t.reward for t in episodes),
            "failure_types": dict(Counter(t.failure for t in episodes if not t.reward).most_common()),
            "by_temperature": {k: dict(v) for k, v in sorted(by_temperature.items())},
            "turns": {**_distribution(turns), "histogram": dict(sorted(Counter(turns).items()))},
            "assistant_chars": _distribution(chars),
        },
        "questions": {"total": len(questions), "solved": len(solved), "unsolved": len(questions - solved)},
        "kept": {
            "total": len(kept),
            "positives": sum(t.reward for t in kept),
            "negatives": sum(not t.reward for t in kept),
        },
    }


def _add_usage(total: dict, run: Mapping[str, Any]) -> dict:
    out = dict(total)
    for key, value in run.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = round(out.get(key, 0) + value, 6)
        elif isinstance(value, dict):
            out[key] = _add_usage(out.get(key, {}), value)
    return out


def print_stats(stats: Mapping[str, Any]) -> None:
    ep, kept, run = stats["episodes"], stats["kept"], stats["this_run"]
    usage = run.get("teacher_usage", {})
    lines = [
        f"episodes: {ep['total']} (positives {ep['positives']}, negatives {ep['negatives']}); "
        f"this run collected {run['collected']} in {run['seconds']:.1f}s",
        f"failure types: {json.dumps(ep['failure_types'])}",
        f"turns: {json.dumps({k: v for k, v in ep['turns'].items() if k != 'histogram'})}; "
        f"assistant chars: {json.dumps(ep['assistant_chars'])}",
        f"kept ({stats['protocol']['keep']}): {kept['total']} (positives {kept['positives']}, "
        f"negatives {kept['negatives']})",
    ]
    if "prompt_tokens" in usage:
        cost = f", cost ${usage['cost_usd']:.4f}" if "cost_usd" in usage else ""
        lines.append(
            f"teacher: {usage['requests']} requests, {usage.get('retries', 0)} retries "
            f"{json.dumps(usage.get('retry_reasons', {}))}, tokens in/out "
            f"{usage.get('prompt_tokens', 0)}/{usage.get('completion_tokens', 0)}{cost}"
        )
    print("\n".join(lines), flush=True)


# --- the collection run -------------------------------------------------------------------------


def _build_teacher(cfg: Mapping[str, Any], task, label: str):
    from negagent.backends import build_backend

    teacher = {**cfg["teacher"], "label": label}
    source = None
    if teacher.get("name") in ("hf", "vllm"):
        from negagent.model_source import base_model

        if not cfg.get("model"):
            raise NegagentError(f"backend@teacher={teacher['name']} needs a model config (model=...)")
        source = base_model(cfg["model"], {"strategy": "none"}, cfg.get("render") or {})
    return build_backend(teacher, task=task, source=source, render_cfg=cfg.get("render"))


def collect(cfg: Mapping[str, Any], out_dir: str | os.PathLike, *, backend=None) -> dict:
    """Collect the trajectories `cfg` describes into `out_dir`, resuming what is there; returns stats.

    `cfg` is a generate config (generate.yaml) as a dict or DictConfig: `task` is required; `teacher`,
    `protocol` and `tools` default to scripted / paper / default; `seed`, `generation.max_new_tokens`,
    `generation.top_p`, `generation.chunk_size`, `generation.progress`, `render` (the prompt: `opening`,
    `question`, `instructions_role`) are
    optional. `backend` replaces the one the teacher config would build (it must carry the same
    label). The training file is `out_dir/trajectories.jsonl`.
    """
    from negagent.tasks import get_task
    from negagent.tools import build_tool_cache, build_toolbox

    cfg = with_defaults(cfg)
    out_dir = Path(out_dir)
    task = get_task(cfg["task"])
    temperatures, per_temperature, keep = protocol_settings(cfg["protocol"])
    label = backend.name if backend is not None else teacher_label(cfg)
    seed = int(cfg.get("seed") or 0)
    generation = cfg.get("generation") or {}
    render = cfg.get("render") or {}
    opening = chat_opening(render, task.instructions)  # the teacher's prompt: own wording or a prompt file's
    identity = {
        "task": task.name, "teacher": label, "temperatures": temperatures,
        "samples_per_temperature": per_temperature, "seed": seed, "keep": keep, "prompt": opening.digest(),
        "on_parse_error": task.on_parse_error,
    }
    _check_identity(out_dir, identity)  # before anything is read or written
    episodes_path, kept_path = out_dir / EPISODES, out_dir / TRAJECTORIES
    episodes = _load(episodes_path, task.name)
    kept = _load(kept_path, task.name)
    _check_records(episodes_path, episodes, label)
    _check_records(kept_path, kept, label)

    questions = task.train_questions()
    done = {traj.id for traj in episodes}
    samples = range(len(temperatures) * per_temperature)
    pending = {s: [q for q in questions if f"{q.id}-s{s}" not in done] for s in samples}
    n_pending = sum(len(qs) for qs in pending.values())

    tools_cfg = cfg.get("tools") or {}
    toolbox = build_toolbox(task.tools, tools_cfg, build_tool_cache(tools_cfg.get("cache") or {}))

    def call_tool(name: str, argument: str) -> tuple[str, bool]:
        result = toolbox.call(name, argument)
        return result.observation, result.ok

    provenance = {
        "teacher": label,
        "protocol": cfg["protocol"].get("name", keep),
        "tools": list(task.tools),
        "tool_backend": (tools_cfg.get("search") or {}).get("backend") if "search" in task.tools else None,
        "prompt": opening.digest(),
        "instructions_role": instructions_role(render),
    }
    # The teacher is built before anything is written: a wrong URL, model or key leaves no trace.
    teacher = None
    if n_pending:
        teacher = backend if backend is not None else _build_teacher(cfg, task, label)
    keeper = _Keeper(keep, kept, seed=seed, n_samples=len(temperatures) * per_temperature)
    started, collected = time.monotonic(), 0
    try:
        _write_identity(out_dir, identity)
        with TrajectoryWriter(episodes_path) as all_writer, TrajectoryWriter(kept_path) as kept_writer:
            for traj in episodes:  # heal: episodes a kill left out of the training file
                for record in keeper.admit(traj):
                    kept_writer.write(record)
            if n_pending:
                plan = _Plan(task, teacher, call_tool, pending, temperatures, per_temperature, seed, generation,
                             opening, provenance)
                collected = _run(plan, all_writer, kept_writer, keeper)
    finally:
        usage = dict(getattr(teacher, "stats", {}) or {})
        if teacher is not None and backend is None and hasattr(teacher, "close"):
            teacher.close()
        stats = _write_stats(out_dir, task.name, label, identity, cfg["protocol"], collected,
                             len(done), time.monotonic() - started, usage)
    return stats


@dataclass
class _Plan:
    """What a collection run still has to do, and with what: the questions each sample index lacks,
    the teacher and tools, and the protocol's sampling settings."""

    task: Any
    teacher: Any
    call_tool: Callable[[str, str], tuple[str, bool]]
    pending: dict[int, list]  # sample index -> questions without that sample yet
    temperatures: list[float]
    per_temperature: int
    seed: int
    generation: dict
    opening: ChatOpening
    provenance: dict

    @property
    def n_pending(self) -> int:
        return sum(len(qs) for qs in self.pending.values())

    def sampling(self, sample: int) -> Sampling:
        return Sampling(
            temperature=self.temperatures[sample // self.per_temperature],
            max_new_tokens=int(self.generation.get("max_new_tokens", 256)),
            top_p=float(self.generation.get("top_p", 1.0)),
            seed=self.seed * _SEED_STRIDE + sample,
        )


def _run(plan: _Plan, all_writer, kept_writer, keeper) -> int:
    from tqdm import tqdm

    chunk = int(plan.generation.get("chunk_size") or 256)
    collected = 0
    bar = tqdm(total=plan.n_pending, desc=f"collecting ({plan.teacher.name})", unit="ep",
               disable=not plan.generation.get("progress", True), dynamic_ncols=True)
    try:
        for sample, questions in plan.pending.items():
            for start in range(0, len(questions), chunk):
                jobs = [(q, sample) for q in questions[start:start + chunk]]
                for traj in run_episodes(
                    plan.teacher, plan.task, jobs, plan.call_tool, sampling=plan.sampling(sample), tag=None,
                    opening=plan.opening, provenance=plan.provenance,
                ):
                    all_writer.write(traj)
                    for record in keeper.admit(traj):
                        kept_writer.write(record)
                    collected += 1
                    bar.update(1)
    finally:
        bar.close()
    return collected


def _write_stats(out_dir: Path, task: str, label: str, identity: dict, protocol: Mapping[str, Any],
                 collected: int, resumed: int, seconds: float, usage: dict) -> dict:
    episodes = _load(out_dir / EPISODES, task)
    kept = _load(out_dir / TRAJECTORIES, task)
    previous: dict = {}
    stats_path = out_dir / STATS
    if stats_path.is_file():
        try:
            previous = json.loads(stats_path.read_text(encoding="utf-8")).get("teacher_usage_total", {})
        except (json.JSONDecodeError, AttributeError):
            previous = {}
    stats = {
        "task": task,
        "teacher": label,
        "protocol": {**{k: v for k, v in protocol.items()}, "keep": identity["keep"]},
        **summarize(episodes, kept),
        "this_run": {
            "collected": collected,
            "already_there": resumed,
            "seconds": round(seconds, 3),
            "episodes_per_s": round(collected / seconds, 3) if seconds > 0 else None,
            "teacher_usage": usage,
        },
        # Usage of runs that ended (a killed run's usage is not known).
        "teacher_usage_total": _add_usage(previous, usage),
    }
    write_json_atomic(stats_path, stats)
    print_stats(stats)
    return stats
