"""The evaluator: a model on a task's test sets with the shared agent loop, and the metrics.

`evaluate(cfg, out_dir)` runs every (tag mode, test set, question, seed, sample) episode that is not
already in `out_dir/trajectories.jsonl`, appending each as it finishes, then recomputes
`metrics.json` from the file; a re-run skips finished episodes. Prompts come from the shared
renderer (`build_chat` inside `run_episodes`), tools from the task through the record/replay cache
(`tool_cache.jsonl` next to the results unless `tools.cache.path` says otherwise).

Output directory:
    trajectories.jsonl   one labelled episode a line; provenance has test_set, tag_mode, tag, seed, setup
    metrics.json         see `negagent.metrics.summarize`; versions, sampling, the evaluated model and its training run
    tool_cache.jsonl     recorded tool observations (search), replayable offline

`evaluate_run(run_dir, overrides)` is the same for a training run directory with conf/evaluate.yaml's
defaults (train.py calls it at the end of training); results go to `<run_dir>/eval/`.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import platform
import random
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from negagent import __version__, rundir, tagging
from negagent.agent import STOP, Sampling, run_episodes
from negagent.config import plain
from negagent.errors import NegagentError
from negagent.files import write_json_atomic
from negagent.metrics import BOOTSTRAP_RESAMPLES, summarize
from negagent.model_source import ModelSource, base_model, from_run_dir
from negagent.render import ChatOpening, chat_opening, instructions_role
from negagent.tasks import get_task
from negagent.tasks.base import Question, Task
from negagent.trajectory import Trajectory, TrajectoryWriter, load_trajectories


# --- scoring contract ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _task_by_name(name: str) -> Task:
    return get_task({"name": name, "data_dir": None})


def score(task: str | Task, prediction: str | None, gold: Any) -> dict:
    """The task's own scoring of one prediction: `reward` (bool) plus the task's metrics.

    `task` is a task name ("arith", "math", "hotpotqa", "strategyqa") or a built `Task`; the rules
    live in the task and `negagent.scoring`, so this is what the agent loop labels episodes with.
    """
    if isinstance(task, str):
        task = _task_by_name(task)
    return task.score(prediction, gold)


# --- configuration ------------------------------------------------------------------------------


def _subject(cfg: Mapping[str, Any]) -> ModelSource:
    if cfg.get("run_dir"):
        return from_run_dir(cfg["run_dir"])
    backend = cfg.get("backend") or {}
    if backend.get("name") == "openai":
        label = backend.get("label") or f"openai:{backend.get('model')}"
        return ModelSource(label=label, model_cfg={"name": label}, tagging_cfg=dict(cfg.get("tagging") or {"strategy": "none"}),
                              render_cfg=dict(cfg.get("render") or {}), training={"strategy": "base", "model": label})
    return base_model(cfg["model"], cfg.get("tagging") or {"strategy": "none"}, cfg.get("render") or {})


def _task_cfg(cfg: Mapping[str, Any], subject: ModelSource) -> dict:
    """The task to evaluate on: the run's own (when `task_from_run`), with this config's data and limits."""
    task_cfg = dict(cfg["task"])
    if subject.task_cfg and cfg.get("task_from_run", True):
        own = dict(subject.task_cfg)
        for key in ("limit_test", "data_dir", "source"):
            if task_cfg.get(key) is not None:
                own[key] = task_cfg[key]
        task_cfg = own
    if cfg.get("test_sets") and "test_sets" in task_cfg:
        names = cfg["test_sets"]
        task_cfg["test_sets"] = [names] if isinstance(names, str) else list(names)
    return task_cfg


def _test_sets(task: Task, wanted: Sequence[str] | str | None) -> dict[str, list[Question]]:
    sets = task.test_sets()
    if not wanted:
        return sets
    wanted = [wanted] if isinstance(wanted, str) else list(wanted)
    unknown = [name for name in wanted if name not in sets]
    if unknown:
        raise NegagentError(f"test_sets={wanted}: task {task.name} has test sets: {', '.join(sets)}")
    return {name: sets[name] for name in wanted}


def _searchable(task: Task, task_cfg: Mapping[str, Any], test_sets: dict[str, list[Question]],
                cfg: Mapping[str, Any]) -> tuple[dict[str, list[Question]], dict | None]:
    """The test sets the configured search can serve, and the coverage counts when that is a subset.

    Refuses at once a web search that could not run (no key, no replay cache). A context-bound task
    (HotpotQA) on offline search keeps the questions whose context the corpus holds, `limit_test`
    then counting among those: the others cannot be answered from it.
    """
    from negagent.tools.search import corpus_questions, question_key
    from negagent.tools.toolbox import check_search_access

    tools_cfg = cfg.get("tools") or {}
    check_search_access(task.tools, tools_cfg)
    search = tools_cfg.get("search") or {}
    offline = "search" in task.tools and search.get("backend", "bm25") == "bm25"
    if not (offline and getattr(task, "context_bound", False)):
        return test_sets, None
    covered = corpus_questions(search.get("data_dir"))
    every = _test_sets(get_task({**task_cfg, "limit_test": None}), list(test_sets))
    limit = task_cfg.get("limit_test")
    kept = {name: [q for q in questions if question_key(q.question) in covered] for name, questions in every.items()}
    coverage = {"questions": sum(map(len, every.values())), "with_context": sum(map(len, kept.values()))}
    if not coverage["with_context"]:
        raise NegagentError(
            f"no {task.name} test question has its context in the search corpus of {search.get('data_dir')}: "
            "add hotpotqa_context/ files there, or search the web (tools.search.backend=serper)"
        )
    kept = {name: questions[:limit] if limit is not None else questions for name, questions in kept.items()}
    coverage["evaluated"] = sum(map(len, kept.values()))
    print(f"note: offline search (tools.search.backend=bm25) holds the context of {coverage['with_context']} of "
          f"{coverage['questions']} {task.name} test questions; evaluating {coverage['evaluated']} of those only "
          "(metrics.json: corpus_coverage)", flush=True)
    return kept, coverage


def _sampling(cfg: Mapping[str, Any]) -> tuple[Sampling, int, list[int]]:
    s = cfg.get("sampling") or {}
    n, seeds = int(s.get("n", 1)), [int(x) for x in (s.get("seeds") or [0])]
    temperature, max_new = float(s.get("temperature", 0.2)), int(s.get("max_new_tokens", 256))
    if n < 1 or max_new < 1 or temperature < 0 or len(set(seeds)) != len(seeds):
        raise NegagentError(
            f"sampling: need n >= 1, max_new_tokens >= 1, temperature >= 0 and distinct seeds (got n={n}, "
            f"max_new_tokens={max_new}, temperature={temperature}, seeds={seeds})"
        )
    if n > 1 and temperature == 0:
        print("note: sampling.temperature=0 (greedy) makes the n samples of a question nearly identical", flush=True)
    sampling = Sampling(temperature=temperature, max_new_tokens=max_new, top_p=float(s.get("top_p", 1.0)), stop=tuple(STOP))
    return sampling, n, seeds


def _versions(tool_identities: Mapping[str, str | None], backend_name: str) -> dict:
    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "negagent": __version__,
        "python": platform.python_version(),
        **{pkg: version(pkg) for pkg in ("torch", "transformers", "peft", "vllm", "openai", "bm25s")},
        "backend": backend_name,
        "tools": dict(tool_identities),
    }


# --- the run ------------------------------------------------------------------------------------


def _key(tag_mode: str, test_set: str, question_id: str, seed: int, sample: int) -> tuple:
    return (tag_mode, test_set, str(question_id), int(seed), int(sample))


def _record_key(traj: Trajectory) -> tuple:
    p = traj.provenance
    return _key(p.get("tag_mode"), p.get("test_set"), traj.question_id, p.get("seed", 0), p.get("sample_index", 0))


def _existing(path: Path, setup: str) -> dict[tuple, Trajectory]:
    """Finished episodes in `path` by key; records of another evaluation setup are an error."""
    if not path.is_file() or b"\n" not in path.read_bytes():
        return {}  # empty, or one line torn by a kill: the writer cuts it
    records, _ = load_trajectories(path)
    found: dict[tuple, Trajectory] = {}
    for traj in records:
        if traj.provenance.get("setup") != setup:
            raise NegagentError(
                f"{path} holds episodes of another evaluation setup (model, sampling or turn limit "
                f"differ: {traj.provenance.get('setup_desc')}); use another output directory (hydra.run.dir=...)"
            )
        found.setdefault(_record_key(traj), traj)
    return found


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    if "torch" in sys.modules:  # only the local backends use torch; API runs never import it
        sys.modules["torch"].manual_seed(seed)


@dataclass
class _Evaluation:
    """One evaluation: what is evaluated, how, and where; the backend and tools are built on first
    use, so a complete re-run loads no model."""

    cfg: dict
    subject: ModelSource
    task: Task
    out_dir: Path
    sampling: Sampling
    modes: dict[str, str | None]  # tag mode -> tag
    placement: str
    render_cfg: dict  # this config's render section under the run's frozen one: resolved once
    max_turns: int
    backend_override: Any = None
    _backend: Any = None
    _toolbox: Any = None

    @property
    def backend_cfg(self) -> dict:
        return dict(self.cfg.get("backend") or {"name": "hf"})

    @property
    def instructions_role(self) -> str:
        return instructions_role(self.render_cfg)

    @property
    def opening(self) -> ChatOpening:
        return chat_opening(self.render_cfg, self.task.instructions)

    def setup(self) -> tuple[str, str]:
        """A hash (and its text) of what decides episode outcomes besides an episode's key: the model,
        backend, sampling, turn limit and prompt layout. Resumed episodes must share it."""
        desc = (
            f"model={self.subject.label} ({self.subject.fingerprint()}) backend={self.backend_name()} "
            f"temperature={self.sampling.temperature} top_p={self.sampling.top_p} "
            f"max_new_tokens={self.sampling.max_new_tokens} max_turns={self.max_turns} "
            f"instructions_role={self.instructions_role}"
        )
        if self.render_cfg.get("opening") is not None:  # a prompt file's opening: name which one ran
            desc += f" prompt={self.opening.digest()}"
        if self.task.on_parse_error != "observe":  # the paper's loop: episodes end at an unusable turn
            desc += f" on_parse_error={self.task.on_parse_error}"
        return hashlib.sha256(desc.encode()).hexdigest()[:16], desc

    def backend(self):
        if self.backend_override is not None:
            return self.backend_override
        if self._backend is None:
            from negagent.backends import build_backend

            self._backend = build_backend(self.backend_cfg, task=self.task, source=self.subject, render_cfg=self.render_cfg)
        return self._backend

    def backend_name(self) -> str:
        # A backend brought by the caller runs the episodes, whatever cfg.backend names.
        return getattr(self.backend_override, "name", None) or self.backend_cfg.get("name") or "hf"

    def toolbox(self):
        if self._toolbox is None:
            from negagent.tools import ToolCache, build_toolbox

            tools_cfg = dict(self.cfg.get("tools") or {})
            cache_cfg = dict(tools_cfg.get("cache") or {})
            mode = str(cache_cfg.get("mode") or "off")
            cache = None
            if mode != "off":
                cache = ToolCache(cache_cfg.get("path") or self.out_dir / rundir.TOOL_CACHE, mode)
            self._toolbox = build_toolbox(self.task.tools, tools_cfg, cache)
        return self._toolbox

    def tool_identities(self) -> dict[str, str | None]:
        # Tool identity (engine, corpus, k) decides observations, so it goes into every result.
        tools = getattr(self.toolbox(), "_tools", {})
        return {name: getattr(tool, "identity", None) for name, tool in tools.items()}

    def call_tool(self, name: str, argument: str) -> tuple[str, bool]:
        result = self.toolbox().call(name, argument)
        return result.observation, result.ok


def evaluate(cfg: Mapping[str, Any], out_dir: str | Path, *, backend=None) -> dict:
    """Evaluate as `cfg` (conf/evaluate.yaml's keys) says; write results to `out_dir`; return metrics.

    `backend` (any object with `name` and `complete(chats, sampling)`) replaces the configured one,
    for programs that bring their own model.
    """
    cfg = plain(cfg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    subject = _subject(cfg)
    task_cfg = _task_cfg(cfg, subject)
    task = get_task(task_cfg)
    test_sets, coverage = _searchable(task, task_cfg, _test_sets(task, cfg.get("test_sets")), cfg)
    sampling, n_samples, seeds = _sampling(cfg)
    tag_mode = str(cfg.get("tag_mode") or "positive")
    run = _Evaluation(
        cfg=cfg, subject=subject, task=task, out_dir=out_dir, sampling=sampling,
        modes=tagging.tag_modes(tag_mode, subject.tagging_cfg),
        placement=tagging.placement(subject.tagging_cfg) if subject.tagging_cfg.get("strategy") else "prefix",
        # The run's frozen render settings win: the model is prompted exactly as it was trained.
        render_cfg={**(cfg.get("render") or {}), **subject.render_cfg},
        max_turns=task.max_turns if cfg.get("max_turns") is None else int(cfg["max_turns"]),
        backend_override=backend,
    )
    if run.max_turns < 1:
        raise NegagentError(f"max_turns={run.max_turns} must be at least 1")
    setup, setup_desc = run.setup()

    path = out_dir / rundir.TRAJECTORIES
    done = _existing(path, setup)
    wanted: list[tuple] = []
    todo: list[tuple[str, int, str, Question, int]] = []  # (mode, seed, test set, question, sample)
    for mode in run.modes:
        for seed in seeds:
            for set_name, questions in test_sets.items():
                for q in questions:
                    for s in range(n_samples):
                        key = _key(mode, set_name, q.id, seed, s)
                        wanted.append(key)
                        if key not in done:
                            todo.append((mode, seed, set_name, q, s))
    if done and todo:
        print(f"resuming: {len(wanted) - len(todo)} of {len(wanted)} episodes already in {path}", flush=True)
    if todo:
        _run(run, todo, path, setup, setup_desc, done)
    records = [done[key] for key in wanted]
    metrics = summarize(records, run.modes, test_sets, pass_k=cfg.get("pass_k") or [1],
                        resamples=int(cfg.get("bootstrap_resamples") or BOOTSTRAP_RESAMPLES))
    metrics.update({
        "task": task.name,
        "model": subject.label,
        "training": subject.training,
        "backend": run.backend_name(),
        "sampling": {"temperature": sampling.temperature, "top_p": sampling.top_p,
                     "max_new_tokens": sampling.max_new_tokens, "n": n_samples, "seeds": seeds},
        "max_turns": run.max_turns,
        "instructions_role": run.instructions_role,
        "tag_mode": tag_mode,
        "setup": setup_desc,
        "versions": _versions(run.tool_identities(), run.backend_name()),
        "files": {"trajectories": rundir.TRAJECTORIES,
                  "tool_cache": rundir.TOOL_CACHE if (out_dir / rundir.TOOL_CACHE).exists() else None},
    })
    if coverage is not None:
        metrics["corpus_coverage"] = coverage
    write_json_atomic(out_dir / rundir.METRICS, metrics)
    return metrics


def _run(run: _Evaluation, todo, path: Path, setup: str, setup_desc: str, done: dict) -> None:
    from tqdm import tqdm

    chunk_size = max(1, int(run.cfg.get("chunk_size") or 256))
    backend = run.backend()
    groups: dict[tuple[str, int], list] = defaultdict(list)
    for mode, seed, set_name, q, s in todo:
        groups[(mode, seed)].append((set_name, q, s))
    bar = tqdm(total=len(todo), desc="episodes", unit="ep", disable=not run.cfg.get("progress", True), file=sys.stderr)
    with TrajectoryWriter(path) as writer:
        for (mode, seed), items in groups.items():
            for start in range(0, len(items), chunk_size):
                chunk = items[start:start + chunk_size]
                # Question ids are unique within a test set; the chunk maps each episode back to its set.
                set_of = {(q.id, s): name for name, q, s in chunk}
                if len(set_of) != len(chunk):
                    raise NegagentError("two test sets share a question id; evaluate them one at a time (test_sets=...)")
                _seed_everything(seed * 1_000_003 + start)

                def show_turn(turn: int, finished: int, total: int, mode: str = mode) -> None:
                    # Batched episodes mostly finish together at the end; the turn shows the run moving.
                    bar.set_postfix_str(f"{mode} tag, turn {turn}/{run.max_turns}, {total - finished} running")

                sampling = run.sampling
                trajectories = run_episodes(
                    backend, run.task, [(q, s) for _, q, s in chunk], run.call_tool,
                    sampling=Sampling(sampling.temperature, sampling.max_new_tokens, sampling.top_p, seed, sampling.stop),
                    max_turns=run.max_turns, tag=run.modes[mode], placement=run.placement, opening=run.opening,
                    provenance={"tag_mode": mode, "tag": run.modes[mode], "seed": seed, "setup": setup, "setup_desc": setup_desc},
                    on_step=show_turn,
                )
                for traj in trajectories:
                    traj.provenance["test_set"] = set_of[(traj.question_id, traj.provenance["sample_index"])]
                    writer.write(traj)
                    done[_record_key(traj)] = traj
                    bar.update(1)
    bar.close()


# --- a training run -----------------------------------------------------------------------------


def default_config():
    """conf/evaluate.yaml composed with its defaults (hf backend, default tools), as evaluate.py
    would, as a DictConfig to merge overrides into."""
    from omegaconf import OmegaConf

    from negagent.config import compose

    return OmegaConf.create(compose("evaluate"))


def evaluate_run(run_dir: str | Path, overrides: Mapping[str, Any] | None = None, out_dir: str | Path | None = None) -> dict:
    """Evaluate the model trained in `run_dir` on its own task; results in `out_dir` (default `<run_dir>/eval`).

    `overrides` are evaluate.yaml keys (nested dicts), e.g. {"sampling": {"max_new_tokens": 128},
    "task": {"limit_test": 50}, "data_dir": ..., "cache_dir": ...}. Returns the metrics dict.
    """
    from omegaconf import OmegaConf

    cfg = OmegaConf.merge(default_config(), OmegaConf.create(dict(overrides or {})), {"run_dir": str(run_dir)})
    return evaluate(cfg, out_dir if out_dir is not None else Path(run_dir) / rundir.EVAL)
