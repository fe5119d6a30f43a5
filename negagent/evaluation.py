"""The evaluator: a model on a task's test sets with the shared agent loop, and the metrics.

`evaluate(cfg, out_dir)` runs every (tag mode, test set, question, seed, sample) episode that is not
already in `out_dir/trajectories.jsonl`, appending each as it finishes, then recomputes
`metrics.json` from the file; a re-run skips finished episodes. Prompts come from the shared
renderer (`build_chat` inside `run_episodes`), tools from the task through the record/replay cache
(`tool_cache.jsonl` next to the results unless `tools.cache.path` says otherwise).

Output directory:
    trajectories.jsonl   one labelled episode a line; provenance has test_set, tag_mode, tag, seed, setup
    metrics.json         see `summarize`; versions, sampling, the evaluated model and its training run
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
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from negagent import __version__, tagging
from negagent.agent import STOP, Sampling, run_episodes
from negagent.config import plain
from negagent.errors import NegagentError
from negagent.evaluated_model import EvaluatedModel, base_model, from_run_dir
from negagent.files import write_json_atomic
from negagent.metrics import BOOTSTRAP_RESAMPLES, mean_ci, paired_comparison, pass_at_ks
from negagent.tasks import get_task
from negagent.tasks.base import Question, Task
from negagent.trajectory import Trajectory, TrajectoryWriter, load_trajectories

TAG_MODES = ("positive", "negative", "none")
TRAJECTORIES = "trajectories.jsonl"
METRICS = "metrics.json"
TOOL_CACHE = "tool_cache.jsonl"
EVAL_SUBDIR = "eval"  # where evaluate_run writes inside a training run directory


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


# --- tags ---------------------------------------------------------------------------------------


def tag_modes(mode: str, tagging_cfg: Mapping[str, Any]) -> dict[str, str | None]:
    """The tags to evaluate under: {"positive": tag, "negative": tag, "none": None} as `mode` asks.

    "positive" is the tag the strategy asks for success with (the inference tag), "negative" the
    one it trained failures with (the lowest grade for graded tags). Untagged strategies (NUT,
    positive-only) have only "none"; `all` then evaluates that one.
    """
    if mode not in (*TAG_MODES, "all"):
        raise NegagentError(f"tag_mode={mode!r}: choose one of: {', '.join((*TAG_MODES, 'all'))}")
    strategy = tagging_cfg.get("strategy")
    positive = tagging.inference_tag(tagging_cfg)
    if strategy == "graded":
        negative = list(tagging_cfg["grade_tags"])[0]
    elif strategy in ("prefix", "suffix"):
        negative = tagging_cfg.get("negative")
    else:
        negative = None
    if positive is None:  # an untagged strategy: there is nothing to switch on or off
        if mode == "negative":
            raise NegagentError(f"tag_mode=negative: tagging strategy '{strategy}' trains without tags")
        return {"none": None} if mode in ("all", "none") else {"positive": None}
    available = {"positive": positive, "negative": negative, "none": None}
    return dict(available) if mode == "all" else {mode: available[mode]}


# --- configuration ------------------------------------------------------------------------------


def _subject(cfg: Mapping[str, Any]) -> EvaluatedModel:
    if cfg.get("run_dir"):
        return from_run_dir(cfg["run_dir"])
    backend = cfg.get("backend") or {}
    if backend.get("name") == "openai":
        label = backend.get("label") or f"openai:{backend.get('model')}"
        return EvaluatedModel(label=label, model_cfg={"name": label}, tagging_cfg=dict(cfg.get("tagging") or {"strategy": "none"}),
                              render_cfg=dict(cfg.get("render") or {}), training={"strategy": "base", "model": label})
    return base_model(cfg["model"], cfg.get("tagging") or {"strategy": "none"}, cfg.get("render") or {})


def _task_cfg(cfg: Mapping[str, Any], subject: EvaluatedModel) -> dict:
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


class _Runtime:
    """Backend, renderer and tools, built on first use: a complete re-run loads no model."""

    def __init__(self, cfg: Mapping[str, Any], subject: EvaluatedModel, task: Task, out_dir: Path, backend=None):
        self.cfg, self.subject, self.task, self.out_dir = cfg, subject, task, out_dir
        self._backend = backend
        self._toolbox = None

    @property
    def backend_cfg(self) -> dict:
        return dict(self.cfg.get("backend") or {"name": "hf"})

    def render_cfg(self) -> dict:
        return {**(self.cfg.get("render") or {}), **self.subject.render_cfg}

    def backend(self):
        if self._backend is None:
            from negagent.backends import build_backend

            context: dict[str, Any] = {"task": self.task, "subject": self.subject}
            name = self.backend_cfg.get("name")
            if name in ("hf", "vllm"):
                from negagent.evaluated_model import load_causal_lm, load_tokenizer_for
                from negagent.render import Renderer

                tokenizer = load_tokenizer_for(self.subject)
                render = self.render_cfg()
                context["renderer"] = Renderer(
                    tokenizer, max_length=int(render.get("max_length") or 4096), end_of_turn=render.get("end_of_turn")
                )
                context["tokenizer"] = tokenizer
                if name == "hf":
                    b = self.backend_cfg
                    context["model"] = load_causal_lm(self.subject, tokenizer, dtype=b.get("dtype"), device=str(b.get("device") or "auto"))
            self._backend = build_backend(self.backend_cfg, **context)
        return self._backend

    def toolbox(self):
        if self._toolbox is None:
            from negagent.tools import ToolCache, build_toolbox

            tools_cfg = dict(self.cfg.get("tools") or {})
            cache_cfg = dict(tools_cfg.get("cache") or {})
            mode = str(cache_cfg.get("mode") or "off")
            cache = None
            if mode != "off":
                cache = ToolCache(cache_cfg.get("path") or self.out_dir / TOOL_CACHE, mode)
            self._toolbox = build_toolbox(self.task.tools, tools_cfg, cache)
        return self._toolbox

    def tool_identities(self) -> dict[str, str | None]:
        # Tool identity (engine, corpus, k) decides observations, so it goes into every result.
        tools = getattr(self.toolbox(), "_tools", {})
        return {name: getattr(tool, "identity", None) for name, tool in tools.items()}

    def call_tool(self, name: str, argument: str) -> tuple[str, bool]:
        result = self.toolbox().call(name, argument)
        return result.observation, result.ok


def _setup(subject: EvaluatedModel, sampling: Sampling, max_turns: int, instructions_role: str,
           backend_name: str | None) -> tuple[str, str]:
    """A hash of what decides episode outcomes besides the key (model, sampling, turns, prompt, backend)."""
    desc = (
        f"model={subject.label} ({subject.fingerprint()}) backend={backend_name} "
        f"temperature={sampling.temperature} top_p={sampling.top_p} max_new_tokens={sampling.max_new_tokens} "
        f"max_turns={max_turns} instructions_role={instructions_role}"
    )
    return hashlib.sha256(desc.encode()).hexdigest()[:16], desc


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
    test_sets = _test_sets(task, cfg.get("test_sets"))
    sampling, n_samples, seeds = _sampling(cfg)
    max_turns = int(cfg.get("max_turns") or task_cfg.get("max_turns") or 7)
    modes = tag_modes(str(cfg.get("tag_mode") or "positive"), subject.tagging_cfg)
    placement = tagging.placement(subject.tagging_cfg) if subject.tagging_cfg.get("strategy") else "prefix"
    instructions_role = str({**(cfg.get("render") or {}), **subject.render_cfg}.get("instructions_role") or "system")
    # A backend brought by the caller runs the episodes, whatever cfg.backend names.
    backend_name = getattr(backend, "name", None) or (cfg.get("backend") or {}).get("name") or "hf"
    setup, setup_desc = _setup(subject, sampling, max_turns, instructions_role, backend_name)

    path = out_dir / TRAJECTORIES
    done = _existing(path, setup)
    runtime = _Runtime(cfg, subject, task, out_dir, backend)
    wanted: list[tuple] = []
    todo: list[tuple[str, int, str, Question, int]] = []  # (mode, seed, test set, question, sample)
    for mode in modes:
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
        _run(runtime, todo, path, modes, sampling, max_turns, placement, instructions_role, setup, setup_desc, cfg, done)
    records = [done[key] for key in wanted]
    metrics = summarize(records, task, modes, test_sets, pass_k=cfg.get("pass_k") or [1],
                        resamples=int(cfg.get("bootstrap_resamples") or BOOTSTRAP_RESAMPLES))
    metrics.update({
        "task": task.name,
        "model": subject.label,
        "training": subject.training,
        "backend": backend_name,
        "sampling": {"temperature": sampling.temperature, "top_p": sampling.top_p,
                     "max_new_tokens": sampling.max_new_tokens, "n": n_samples, "seeds": seeds},
        "max_turns": max_turns,
        "tag_mode": str(cfg.get("tag_mode") or "positive"),
        "setup": setup_desc,
        "versions": _versions(runtime.tool_identities(), backend_name),
        "files": {"trajectories": TRAJECTORIES, "tool_cache": TOOL_CACHE if (out_dir / TOOL_CACHE).exists() else None},
    })
    write_json_atomic(out_dir / METRICS, metrics)
    return metrics


def _run(runtime: _Runtime, todo, path: Path, modes, sampling: Sampling, max_turns: int, placement: str,
         instructions_role: str, setup: str, setup_desc: str, cfg: Mapping[str, Any], done: dict) -> None:
    from tqdm import tqdm

    chunk_size = max(1, int(cfg.get("chunk_size") or 256))
    backend = runtime.backend()
    groups: dict[tuple[str, int], list] = defaultdict(list)
    for mode, seed, set_name, q, s in todo:
        groups[(mode, seed)].append((set_name, q, s))
    bar = tqdm(total=len(todo), desc="episodes", unit="ep", disable=not cfg.get("progress", True), file=sys.stderr)
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
                    bar.set_postfix_str(f"{mode} tag, turn {turn}/{max_turns}, {total - finished} running")

                trajectories = run_episodes(
                    backend, runtime.task, [(q, s) for _, q, s in chunk], runtime.call_tool,
                    sampling=Sampling(sampling.temperature, sampling.max_new_tokens, sampling.top_p, seed, sampling.stop),
                    max_turns=max_turns, tag=modes[mode], placement=placement,
                    instructions_role=instructions_role,
                    provenance={"tag_mode": mode, "tag": modes[mode], "seed": seed, "setup": setup, "setup_desc": setup_desc},
                    on_step=show_turn,
                )
                for traj in trajectories:
                    traj.provenance["test_set"] = set_of[(traj.question_id, traj.provenance["sample_index"])]
                    writer.write(traj)
                    done[_record_key(traj)] = traj
                    bar.update(1)
    bar.close()


# --- metrics ------------------------------------------------------------------------------------


def _episode_metrics(traj: Trajectory) -> dict[str, float]:
    values = {name: float(value) for name, value in (traj.stats.get("metrics") or {}).items()
              if isinstance(value, (bool, int, float))}
    values["reward"] = float(traj.reward)
    return values


def _set_summary(records: Sequence[Trajectory], pass_k: Sequence[int], resamples: int) -> dict:
    by_question: dict[str, list[Trajectory]] = defaultdict(list)
    for traj in records:
        by_question[traj.question_id].append(traj)
    names = sorted({name for traj in records for name in _episode_metrics(traj)})
    out: dict[str, Any] = {"n_questions": len(by_question), "n_episodes": len(records)}
    for name in names:
        out[name] = mean_ci([[_episode_metrics(t).get(name, 0.0) for t in ts] for ts in by_question.values()],
                            resamples=resamples)
    out.update(pass_at_ks([[t.reward for t in ts] for ts in by_question.values()], pass_k))
    out.update(_behaviour(records))
    out["mean_steps"] = mean_ci([[t.stats.get("turns", 0) for t in ts] for ts in by_question.values()], resamples=resamples)
    seeds = sorted({t.provenance.get("seed", 0) for t in records})
    if len(seeds) > 1:
        out["reward_by_seed"] = {str(s): sum(t.reward for t in records if t.provenance.get("seed", 0) == s)
                                 / max(1, sum(1 for t in records if t.provenance.get("seed", 0) == s)) for s in seeds}
    return out


def _behaviour(records: Iterable[Trajectory]) -> dict:
    """Action error rate (the paper's Table 6): failed parses and failed tool calls per attempted action."""
    records = list(records)
    actions = sum(t.stats.get("actions", 0) for t in records)
    parse_errors = sum(t.stats.get("parse_errors", 0) for t in records)
    tool_errors = sum(t.stats.get("tool_errors", 0) for t in records)
    attempts = actions + parse_errors  # a turn without a parsable action is an attempted action too
    return {
        "action_error_rate": (parse_errors + tool_errors) / attempts if attempts else 0.0,
        "actions": {"attempted": attempts, "parse_errors": parse_errors, "tool_errors": tool_errors},
        "failures": dict(Counter(t.failure or "solved" for t in records)),
    }


def question_scores(records: Iterable[Trajectory], metric: str = "reward") -> dict[str, float]:
    """Per question ("<test set>/<question id>"): the mean of `metric` over its episodes."""
    sums: dict[str, list[float]] = defaultdict(list)
    for traj in records:
        sums[f"{traj.provenance.get('test_set')}/{traj.question_id}"].append(_episode_metrics(traj).get(metric, 0.0))
    return {q: sum(v) / len(v) for q, v in sums.items()}


def summarize(records: Sequence[Trajectory], task: Task, modes: Mapping[str, str | None],
              test_sets: Mapping[str, Sequence[Question]], *, pass_k: Sequence[int] = (1,),
              resamples: int = BOOTSTRAP_RESAMPLES) -> dict:
    """metrics.json's results: per tag mode, per test set every task metric as {mean, lo, hi, ...}.

    Each test set has `reward` (the task's label), the task's metrics (`strict`/`numeric` for math,
    `em`/`f1` for HotpotQA, `acc` for StrategyQA), pass@k, `action_error_rate`, `mean_steps` and
    failure counts; `average` is the unweighted mean over test sets of each metric's mean, and
    `overall` pools every episode for behaviour. With both tags evaluated, `control_strength` is
    positive-tag minus negative-tag reward per test set (paired over questions).
    """
    results: dict[str, Any] = {}
    for mode, tag in modes.items():
        mine = [t for t in records if t.provenance.get("tag_mode") == mode]
        per_set = {name: _set_summary([t for t in mine if t.provenance.get("test_set") == name], pass_k, resamples)
                   for name in test_sets}
        metric_names = sorted({k for s in per_set.values() for k, v in s.items() if isinstance(v, dict) and "mean" in v})
        average = {name: sum(s[name]["mean"] for s in per_set.values() if name in s) / len(per_set)
                   for name in metric_names if all(name in s for s in per_set.values())}
        results[mode] = {"tag": tag, "test_sets": per_set, "average": average, "overall": _behaviour(mine)}
    out: dict[str, Any] = {"results": results, "primary": next(iter(modes))}
    if "positive" in results and "negative" in results:
        strength = {}
        for name in test_sets:
            pos = question_scores(t for t in records if t.provenance.get("tag_mode") == "positive" and t.provenance.get("test_set") == name)
            neg = question_scores(t for t in records if t.provenance.get("tag_mode") == "negative" and t.provenance.get("test_set") == name)
            if pos and neg:
                cmp = paired_comparison(neg, pos, resamples=resamples)
                strength[name] = {"diff": cmp.diff, "lo": cmp.diff_lo, "hi": cmp.diff_hi, "p_value": cmp.p_value,
                                  "positive": cmp.mean_b, "negative": cmp.mean_a}
        out["control_strength"] = {"per_test_set": strength,
                                   "mean": sum(v["diff"] for v in strength.values()) / len(strength) if strength else None}
    return out


# --- a training run -----------------------------------------------------------------------------


def default_config() -> dict:
    """conf/evaluate.yaml's own keys with the hf backend and default tools (no Hydra needed)."""
    from omegaconf import OmegaConf

    from negagent.config import CONF_DIR

    base = OmegaConf.load(CONF_DIR / "evaluate.yaml")
    for key in ("defaults", "hydra"):
        base.pop(key, None)
    base.backend = OmegaConf.load(CONF_DIR / "backend" / "hf.yaml")
    tools = OmegaConf.load(CONF_DIR / "tools" / "default.yaml")
    base.tools = OmegaConf.merge(tools, base.get("tools") or {})
    base.task = OmegaConf.create({})
    base.model = OmegaConf.create({})
    base.tagging = OmegaConf.create({"strategy": "none"})
    return base  # type: ignore[return-value]


def evaluate_run(run_dir: str | Path, overrides: Mapping[str, Any] | None = None, out_dir: str | Path | None = None) -> dict:
    """Evaluate the model trained in `run_dir` on its own task; results in `out_dir` (default `<run_dir>/eval`).

    `overrides` are evaluate.yaml keys (nested dicts), e.g. {"sampling": {"max_new_tokens": 128},
    "task": {"limit_test": 50}, "data_dir": ..., "cache_dir": ...}. Returns the metrics dict.
    """
    from omegaconf import OmegaConf

    cfg = OmegaConf.merge(default_config(), OmegaConf.create(dict(overrides or {})), {"run_dir": str(run_dir)})
    return evaluate(cfg, out_dir if out_dir is not None else Path(run_dir) / EVAL_SUBDIR)
