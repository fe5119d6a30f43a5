"""The GPU check: one command that exercises negagent's GPU paths and writes what it measured to a JSON.

    bash benchmarks/gpu_check.sh [--out DIR] [--work DIR] [--model NAME] [--budget-s S] [--allow-cpu]

Every check runs a real entry point (generate.py, train.py, evaluate.py) as its own process with Hydra
overrides, its own timeout and `hydra.run.dir` under the work folder, and is read back from the run
directory (train: `summary.json`; evaluation: `metrics.json` and `trajectories.jsonl`):

    collect                   scripted teacher on arith: the trajectories every training check uses
    lora_bf16                 trainer=lora, bf16: tokens/s, peak memory, final loss, verified save
    full_bf16                 trainer=full, bf16
    zero3                     trainer=zero3 on one rank; its verified save (parameter count, SHA-256) is required
    packed_sdpa               LoRA with trainer.batching=packed, model.attn_implementation=sdpa
    packed_flash_attention_2  the same with flash_attention_2 (optional: only when flash_attn imports)
    eval_hf                   evaluate.py on the lora_bf16 run (the base model if it failed), hf backend, batched
    eval_vllm                 the same with backend=vllm (optional: only when vllm imports)

Each record: status (ok | failed | unavailable), seconds (wall clock of the process), its figures and,
when it failed, the last line of the process's stderr. An optional check that cannot run is
`unavailable` with the reason and a WARNING line; an available check that fails, or any required
check that fails, makes the exit status 1 (after the JSON is written). No CUDA GPU: one line, exit 1,
unless `--allow-cpu` (development: the same checks at tiny sizes, fp32 because DeepSpeed refuses bf16
on CPU). `--budget-s` bounds the whole run: each check's timeout is cut to what is left, and a check
that cannot start in time fails as not started. The JSON is rewritten after every check, so a run
stopped from outside still leaves the finished checks' records.

Episodes/s of the evaluation checks is measured from outside: the evaluator creates its progress bar
(stderr, "episodes:") right after the backend and model are loaded and closes it once the last episode
is written, so the time between the bar's first and last print is the time spent stepping episodes;
when the bar is not seen, the process's wall clock is used and the record says so (`basis`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MARKER = ".gpu_check"  # written into folders this script created: only those are ever emptied


@dataclass(frozen=True)
class Sizes:
    """How much each check does; GPU sizes keep the whole run well under 8 minutes on one H200."""

    train_questions: int  # arith questions the scripted teacher answers (about 1.6 kept trajectories each)
    max_steps: int
    batch_size: int  # samples per optimizer step (one micro-batch)
    max_length: int  # render.max_length
    test_questions: int
    eval_batch_size: int  # backend.batch_size
    max_new_tokens: int  # per model turn
    bf16: bool
    timeouts: dict = field(default_factory=dict)  # seconds per check kind


GPU_SIZES = Sizes(train_questions=250, max_steps=20, batch_size=16, max_length=4096, test_questions=64,
                  eval_batch_size=64, max_new_tokens=160, bf16=True,
                  timeouts={"collect": 120, "train": 180, "zero3": 240, "eval": 240, "vllm": 360})
CPU_SIZES = Sizes(train_questions=12, max_steps=2, batch_size=2, max_length=1024, test_questions=3,
                  eval_batch_size=3, max_new_tokens=24, bf16=False,
                  timeouts={"collect": 120, "train": 300, "zero3": 300, "eval": 300, "vllm": 300})

MIN_START_S = 15  # a check is not started with less of the budget left than this


@dataclass
class Check:
    name: str
    kind: str  # collect | train | eval
    required: bool
    describe: str
    overrides: list[str] = field(default_factory=list)
    timeout_key: str = "train"
    module: str | None = None  # optional checks: the module that must import
    install_hint: str | None = None


# -- running one entry point ------------------------------------------------------------------------
@dataclass
class ProcessResult:
    returncode: int | None  # None: killed at its timeout
    seconds: float
    stderr_tail: str
    marks: dict[str, float]  # stderr pattern name -> monotonic time it was first seen


def _kill_group(proc: subprocess.Popen) -> None:
    """Stop the entry point and everything it started (torchrun ranks), TERM first, then KILL."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_entry_point(args: list[str], log_dir: Path, name: str, timeout: float,
                    marks: dict[str, re.Pattern] | None = None) -> ProcessResult:
    """`python <args>` in the repository with stdout/stderr logged to `log_dir/<name>.out|err`;
    `marks` are byte patterns whose first appearance on stderr is timed (and `<name>_last` the last)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    seen: dict[str, float] = {}
    tail = bytearray()
    started = time.monotonic()
    with open(log_dir / f"{name}.out", "wb") as out, open(log_dir / f"{name}.err", "wb") as err:
        proc = subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=out, stderr=subprocess.PIPE, env=env,
                                start_new_session=True)

        def pump() -> None:
            window = b""
            for chunk in iter(lambda: proc.stderr.read1(65536), b""):
                now = time.monotonic()
                err.write(chunk)
                err.flush()
                window = (window + chunk)[-4096:]  # a pattern may straddle two reads
                for key, pattern in (marks or {}).items():
                    if pattern.search(window):
                        seen.setdefault(key, now)
                        seen[f"{key}_last"] = now
                tail.extend(chunk)
                del tail[:-16384]

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            returncode = None
        except BaseException:
            _kill_group(proc)
            raise
        reader.join(timeout=10)
    return ProcessResult(returncode, time.monotonic() - started, tail.decode("utf-8", "replace"), seen)


def error_lines(stderr: str) -> tuple[str, str | None]:
    """(the last non-empty line of stderr, the last exception line above it when that differs).

    Progress bars rewrite their line with carriage returns; each rewrite counts as a line."""
    lines = [line.strip() for line in re.split(r"[\r\n]+", stderr) if line.strip()]
    last = lines[-1] if lines else "(no output on stderr)"
    causes = [line for line in lines if re.match(r"^[\w.]*(Error|Exception|Interrupt|Exit)\b.*", line)]
    cause = causes[-1] if causes and causes[-1] != last else None
    return last, cause


# -- the checks -------------------------------------------------------------------------------------
def build_checks(model: str, sizes: Sizes, on_gpu: bool) -> list[Check]:
    bf16 = "true" if sizes.bf16 else "false"
    train = [f"model={model}", f"trainer.bf16={bf16}", f"trainer.max_steps={sizes.max_steps}",
             f"trainer.per_device_batch_size={sizes.batch_size}", "trainer.grad_accum=1",
             f"trainer.save_steps={sizes.max_steps + 1000}",  # no intermediate checkpoint: the final save is verified
             f"render.max_length={sizes.max_length}"]
    packed = ["trainer=lora", *train, "trainer.batching=packed"]
    return [
        Check("collect", "collect", True, "scripted teacher, arith", timeout_key="collect"),
        Check("lora_bf16", "train", True, "LoRA", ["trainer=lora", *train]),
        Check("full_bf16", "train", True, "full fine-tuning", ["trainer=full", *train]),
        Check("zero3", "train", True, "ZeRO-3, one rank", ["trainer=zero3", *train, "trainer.nproc_per_node=1"],
              timeout_key="zero3"),
        Check("packed_sdpa", "train", True, "LoRA, packed, sdpa", [*packed, "model.attn_implementation=sdpa"]),
        Check("packed_flash_attention_2", "train", False, "LoRA, packed, flash-attention 2",
              [*packed, "model.attn_implementation=flash_attention_2"], module="flash_attn",
              install_hint="pip install flash-attn"),
        Check("eval_hf", "eval", True, "hf backend, batched",
              # dtype: model.dtype=auto, bfloat16 on a GPU with bf16
              ["backend=hf", f"backend.batch_size={sizes.eval_batch_size}"], timeout_key="eval"),
        Check("eval_vllm", "eval", False, "vLLM backend",
              ["backend=vllm", "backend.gpu_memory_utilization=0.5", f"backend.max_model_len={sizes.max_length}"],
              timeout_key="vllm", module="vllm", install_hint="pip install vllm"),
    ]


def module_imports(module: str, timeout: float = 120) -> str | None:
    """None when `module` imports in this interpreter; else why not (one line)."""
    try:
        result = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True,
                                timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return f"`import {module}` did not finish within {timeout:.0f} s"
    if result.returncode == 0:
        return None
    last, _ = error_lines(result.stderr)
    return last


def _count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def read_collect(run_dir: Path) -> dict:
    stats = json.loads((run_dir / "stats.json").read_text())
    kept = stats.get("kept") or {}
    figures = {"trajectories": _count_lines(run_dir / "trajectories.jsonl"),
               "positives": kept.get("positives"), "negatives": kept.get("negatives")}
    if not figures["trajectories"]:
        raise CheckFailed(f"{run_dir / 'trajectories.jsonl'} holds no trajectory")
    return figures


class CheckFailed(Exception):
    """A check's process succeeded but what it wrote is not what the check requires."""


def read_train(run_dir: Path, check: Check, sizes: Sizes, on_gpu: bool) -> tuple[dict, list[str]]:
    path = run_dir / "summary.json"
    if not path.is_file():
        raise CheckFailed(f"{path} is missing although train.py exited 0")
    summary = json.loads(path.read_text())
    frozen = _frozen_model(run_dir)
    figures = {
        "tokens_per_s": summary.get("tokens_per_s"),
        "peak_memory_gib": summary.get("peak_memory_gib"),
        "final_loss": summary.get("final_loss"),
        "steps": summary.get("steps"),
        "train_seconds": summary.get("train_seconds"),
        "samples": summary.get("samples"),
        "real_tokens": summary.get("real_tokens"),
        "method": summary.get("method"),
        "deepspeed": summary.get("deepspeed"),
        "batching": summary.get("batching"),
        "bf16": sizes.bf16,
        "attn_implementation": frozen.get("attn_implementation"),
        "saved": summary.get("saved"),
        "run_dir": str(run_dir),
    }
    problems = []
    if summary.get("steps") != sizes.max_steps:
        problems.append(f"steps {summary.get('steps')} != trainer.max_steps {sizes.max_steps}")
    if not isinstance(figures["tokens_per_s"], (int, float)) or figures["tokens_per_s"] <= 0:
        problems.append(f"tokens_per_s is {figures['tokens_per_s']!r}")
    loss = figures["final_loss"]
    if not isinstance(loss, (int, float)) or not math.isfinite(loss):
        problems.append(f"final_loss is {loss!r}")
    saved = summary.get("saved") or {}
    if not (isinstance(saved.get("parameters"), int) and saved["parameters"] > 0 and saved.get("sha256")):
        problems.append(f"no verified save in summary.json (saved: {saved or None})")
    if not (run_dir / "done").exists():
        problems.append("no `done` marker: the saved weights were not verified")
    if check.name == "zero3" and summary.get("deepspeed") != "zero3":
        problems.append(f"summary says deepspeed={summary.get('deepspeed')!r}, not zero3")
    if check.name.startswith("packed") and summary.get("batching") != "packed":
        problems.append(f"summary says batching={summary.get('batching')!r}, not packed")
    wanted_attn = next((o.split("=", 1)[1] for o in check.overrides if o.startswith("model.attn_implementation=")), None)
    if wanted_attn and frozen.get("attn_implementation") != wanted_attn:
        problems.append(f"the run's frozen config has model.attn_implementation={frozen.get('attn_implementation')!r}")
    if problems:
        raise CheckFailed(f"{path}: " + "; ".join(problems))
    warnings = []
    if "peak_memory_gib" not in summary:
        warnings.append("summary.json has no peak_memory_gib")
    elif figures["peak_memory_gib"] is None and on_gpu:
        warnings.append("summary.json's peak_memory_gib is null on a GPU run")
    return figures, warnings


def _frozen_model(run_dir: Path) -> dict:
    """The `model` section of the run's frozen config.yaml (what the ranks really used)."""
    try:
        import yaml

        return dict((yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("model") or {})
    except Exception:  # the check still reports the summary; a missing key shows as null
        return {}


def read_eval(out_dir: Path, result: ProcessResult, questions: int) -> tuple[dict, list[str]]:
    path = out_dir / "metrics.json"
    if not path.is_file():
        raise CheckFailed(f"{path} is missing although evaluate.py exited 0")
    metrics = json.loads(path.read_text())
    episodes = _count_lines(out_dir / "trajectories.jsonl")
    if episodes != questions:
        raise CheckFailed(f"{out_dir / 'trajectories.jsonl'} holds {episodes} episodes, expected {questions}")
    mode = next(iter(metrics["results"].values()))
    test_set = next(iter(mode["test_sets"].values()))
    start, end = result.marks.get("bar"), result.marks.get("bar_done")
    if start is not None and end is not None and end > start:
        loop_s, basis = end - start, "episode stepping: evaluator progress bar first print to 100% (model load excluded)"
    else:
        loop_s, basis = result.seconds, "wall clock of evaluate.py (start-up and model load included)"
    figures = {
        "episodes": episodes,
        "episodes_per_s": round(episodes / loop_s, 3) if loop_s > 0 else None,
        "episode_seconds": round(loop_s, 2),
        "basis": basis,
        "reward": (test_set.get("reward") or {}).get("mean"),
        "mean_steps": (test_set.get("mean_steps") or {}).get("mean"),
        "action_error_rate": test_set.get("action_error_rate"),
        "backend": metrics.get("backend"),
        "model": metrics.get("model"),
        "out_dir": str(out_dir),
    }
    return figures, []


# -- one check ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    model: str
    sizes: Sizes
    on_gpu: bool
    work: Path  # run directories
    logs: Path  # each check's stdout/stderr


def why_unavailable(check: Check, on_gpu: bool) -> str | None:
    """None when an optional check can run here; else the reason it cannot."""
    if not check.module:
        return None
    if not on_gpu:
        return f"{check.module} needs a CUDA GPU (this is an --allow-cpu run)"
    why = module_imports(check.module)
    if why is None:
        return None
    if f"No module named '{check.module}'" in why:
        return f"{check.module} is not installed ({check.install_hint})"
    return f"{check.module} does not import: {why}"


def command(check: Check, plan: Plan, records: dict[str, dict], record: dict) -> tuple[list[str], dict | None]:
    """The entry point and overrides of `check`, and the stderr patterns to time (evaluation)."""
    run_dir = plan.work / check.name
    if check.kind == "collect":
        return ["generate.py", "task=arith", "backend@teacher=scripted", f"task.limit_train={plan.sizes.train_questions}",
                "generation.progress=false", f"hydra.run.dir={run_dir}"], None
    if check.kind == "train":
        trajectories = plan.work / "collect" / "trajectories.jsonl"
        return ["train.py", *check.overrides, f"data.trajectories={trajectories}", f"hydra.run.dir={run_dir}"], None
    trained = records.get("lora_bf16", {}).get("status") == "ok"
    subject = [f"run_dir={plan.work / 'lora_bf16'}"] if trained else [f"model={plan.model}"]
    record["subject"] = "the lora_bf16 run" if trained else f"the base model {plan.model} (lora_bf16 failed)"
    marks = {"bar": re.compile(rb"episodes:"), "bar_done": re.compile(rb"episodes:\s*100%")}
    return ["evaluate.py", *subject, *check.overrides, f"task.limit_test={plan.sizes.test_questions}",
            "sampling.temperature=0", f"sampling.max_new_tokens={plan.sizes.max_new_tokens}", "progress=true",
            f"hydra.run.dir={run_dir}"], marks


def run_check(check: Check, plan: Plan, records: dict[str, dict], label: str, left_s: float, budget_s: float) -> dict:
    """Run one check (or say why it did not run), print its progress lines, return its record."""
    record: dict = {"status": None, "required": check.required, "what": check.describe, "seconds": None}
    reason = why_unavailable(check, plan.on_gpu)
    if reason is not None:
        record.update(status="unavailable", reason=reason)
        print(f"gpu_check: {label}: WARNING: unavailable: {reason}", flush=True)
        return record
    if check.kind == "train" and records.get("collect", {}).get("status") != "ok":
        record.update(status="failed", error="not run: the collect check failed, so there is no training data")
    elif left_s < MIN_START_S:
        record.update(status="failed", error=f"not started: the time budget (--budget-s {budget_s:.0f}) was spent")
    if record["status"] == "failed":
        print(f"gpu_check: {label}: FAILED: {record['error']}", flush=True)
        return record

    timeout = min(plan.sizes.timeouts[check.timeout_key], left_s)
    cmd, marks = command(check, plan, records, record)
    record["command"] = "python " + " ".join(cmd)
    print(f"gpu_check: {label} ({check.describe}) ... [timeout {timeout:.0f} s]", flush=True)
    result = run_entry_point(cmd, plan.logs, check.name, timeout, marks)
    record.update(seconds=round(result.seconds, 1), log=str(plan.logs / f"{check.name}.err"))
    warnings: list[str] = []
    if result.returncode != 0:
        last, cause = error_lines(result.stderr_tail)
        record.update(status="failed", error=last if result.returncode is not None
                      else f"timed out after {timeout:.0f} s; last stderr line: {last}")
        if cause:
            record["cause"] = cause
        record["stderr_tail"] = [line for line in re.split(r"[\r\n]+", result.stderr_tail) if line.strip()][-15:]
    else:
        run_dir = plan.work / check.name
        try:
            if check.kind == "collect":
                figures = read_collect(run_dir)
            elif check.kind == "train":
                figures, warnings = read_train(run_dir, check, plan.sizes, plan.on_gpu)
            else:
                figures, warnings = read_eval(run_dir, result, plan.sizes.test_questions)
            record.update(status="ok", **figures)
        except CheckFailed as exc:
            record.update(status="failed", error=str(exc))
        except (OSError, ValueError, KeyError, StopIteration) as exc:  # a result file that is missing or malformed
            record.update(status="failed", error=f"reading the results: {type(exc).__name__}: {exc}")
    if warnings:
        record["warnings"] = warnings
    print_result(label, record)
    return record


def print_result(label: str, record: dict) -> None:
    shown = [(key, spec) for key, spec in (("tokens_per_s", ",.0f"), ("peak_memory_gib", ".2f"), ("final_loss", ".3f"),
                                           ("episodes_per_s", ".3f"), ("trajectories", "d")) if record.get(key) is not None]
    figures = ", ".join(f"{key} {format(record[key], spec)}" for key, spec in shown)
    print(f"gpu_check: {label}: {record['status'].upper()} in {record['seconds']:.1f} s"
          + (f" ({figures})" if figures and record["status"] == "ok" else ""), flush=True)
    if record["status"] == "failed":
        print(f"gpu_check: {label}: {record['error']}", flush=True)
        if record.get("cause"):
            print(f"gpu_check: {label}: cause: {record['cause']}", flush=True)
    for warning in record.get("warnings", []):
        print(f"gpu_check: {label}: WARNING: {warning}", flush=True)



# -- the run ----------------------------------------------------------------------------------------
def prepare_folder(path: Path, what: str) -> None:
    """Create `path`; an existing non-empty folder is used only if this script created it (and is emptied)."""
    if path.exists() and not path.is_dir():
        raise SystemExit(f"gpu_check: error: {what} {path} is a file; choose a new folder")
    if path.is_dir() and any(path.iterdir()):
        if not (path / MARKER).is_file():
            raise SystemExit(f"gpu_check: error: {what} {path} exists, is not empty and was not made by gpu_check; "
                             "choose a new folder (nothing was changed)")
        print(f"gpu_check: emptying {path} (an earlier gpu_check run's folder)", flush=True)
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).write_text("made by benchmarks/gpu_check.py; a rerun may empty this folder\n")


def environment() -> dict:
    """GPU and versions, queried in a child process so this one never holds a CUDA context."""
    probe = r"""
import importlib.metadata as md, json, platform, subprocess, torch
def v(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
       "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
       "cuda_available": torch.cuda.is_available(), "gpu_count": torch.cuda.device_count()}
for name in ("transformers", "peft", "accelerate", "deepspeed", "hydra-core", "omegaconf", "flash-attn", "vllm"):
    env[name] = v(name)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    env.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), compute_capability=f"{p.major}.{p.minor}",
               bf16_supported=torch.cuda.is_bf16_supported())
    try:
        env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    except Exception:
        env["driver"] = None
print(json.dumps(env))
"""
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=180, cwd=REPO)
    if result.returncode != 0:
        last, cause = error_lines(result.stderr)
        raise SystemExit(f"gpu_check: error: cannot query torch and the GPU: {cause or last}")
    env = json.loads(result.stdout.strip().splitlines()[-1])
    env["negagent_commit"] = _git_commit()
    env["host"] = platform.node()
    return env


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, cwd=REPO)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(records: dict[str, dict]) -> None:
    header = f"{'check':<26} {'status':<12} {'tokens/s':>10} {'episodes/s':>11} {'peak GiB':>9} {'seconds':>8}"
    print(header)
    print("-" * len(header))
    for name, rec in records.items():
        print(f"{name:<26} {rec['status']:<12} {_fmt(rec.get('tokens_per_s'), ',.0f'):>10} "
              f"{_fmt(rec.get('episodes_per_s'), '.3f'):>11} {_fmt(rec.get('peak_memory_gib'), '.2f'):>9} "
              f"{_fmt(rec.get('seconds'), '.1f'):>8}")


def write_json(path: Path, report: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for gpu_check.json and the logs (default runs/gpu_check/<time>; must be new or empty)")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for the run directories with their weights (default <out>/runs)")
    parser.add_argument("--model", default=None, help="model config (default smollm2_135m)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget for all checks (default 450)")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="development: run the same checks at tiny sizes on CPU when no GPU is visible")
    args = parser.parse_args(argv)
    began = time.monotonic()

    env = environment()
    on_gpu = bool(env.get("cuda_available"))
    if not on_gpu and not args.allow_cpu:
        print(f"gpu_check: no CUDA GPU visible (torch {env.get('torch')}, CUDA build {env.get('cuda') or 'none'}); "
              "run it on a GPU machine, or pass --allow-cpu for a development run at tiny sizes", file=sys.stderr)
        return 1
    sizes = GPU_SIZES if on_gpu else CPU_SIZES
    model = args.model or "smollm2_135m"
    out = (args.out or REPO / "runs" / "gpu_check" / datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")).resolve()
    work = (args.work or out / "runs").resolve()
    prepare_folder(out, "--out")
    if not work.is_relative_to(out):
        prepare_folder(work, "--work")
    else:
        work.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    json_path = out / "gpu_check.json"

    mode = f"GPU {env.get('gpu')} ({env.get('gpu_memory_gib')} GiB)" if on_gpu else \
        "CPU (--allow-cpu: tiny sizes, fp32; DeepSpeed refuses bf16 on CPU)"
    print(f"gpu_check: {mode}; torch {env['torch']}, CUDA {env.get('cuda')}, transformers {env.get('transformers')}, "
          f"peft {env.get('peft')}, deepspeed {env.get('deepspeed')}; model={model}; budget {args.budget_s:.0f} s", flush=True)
    print(f"gpu_check: logs in {logs}, runs in {work}", flush=True)

    checks = build_checks(model, sizes, on_gpu)
    records: dict[str, dict] = {}
    report = {"tool": "benchmarks/gpu_check.py", "started": datetime.datetime.now().isoformat(timespec="seconds"),
              "mode": "gpu" if on_gpu else "cpu (--allow-cpu)", "model": model, "budget_s": args.budget_s,
              "sizes": {k: v for k, v in sizes.__dict__.items()}, "environment": env, "checks": records,
              "total_seconds": None, "failed": [], "unavailable": []}
    write_json(json_path, report)

    plan = Plan(model=model, sizes=sizes, on_gpu=on_gpu, work=work, logs=logs)
    for index, check in enumerate(checks, 1):
        label = f"[{index}/{len(checks)}] {check.name}"
        elapsed = time.monotonic() - began
        # A run stopped from outside leaves this record behind: the JSON names the check it was in.
        records[check.name] = {"status": "running", "required": check.required, "started_after_s": round(elapsed, 1)}
        write_json(json_path, report)
        left = args.budget_s - elapsed
        records[check.name] = run_check(check, plan, records, label, left, args.budget_s)
        write_json(json_path, report)

    report["total_seconds"] = round(time.monotonic() - began, 1)
    report["failed"] = [name for name, rec in records.items() if rec["status"] == "failed"]
    report["unavailable"] = [name for name, rec in records.items() if rec["status"] == "unavailable"]
    write_json(json_path, report)
    print()
    print_table(records)
    for name in report["unavailable"]:
        print(f"gpu_check: WARNING: {name} unavailable: {records[name]['reason']}")
    for name in report["failed"]:
        print(f"gpu_check: FAILED: {name}: {records[name]['error']}")
    print(f"gpu_check: {'FAILED' if report['failed'] else 'ok'} in {report['total_seconds']:.0f} s; JSON: {json_path}",
          flush=True)
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
