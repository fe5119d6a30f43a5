"""The run directory: every file name, marker and reader of a run, in one place.

A training run directory (`train.py`, one per run or sweep member):

    config.yaml        the resolved config, frozen before training (ranks and evaluators read it)
    .hydra/            Hydra's own record of the command (older runs have only .hydra/config.yaml)
    manifest.json      what the model is trained on (`negagent.training.data`)
    collected/         trajectories train.py collected itself when `data.trajectories` was null
    checkpoints/       intermediate Trainer checkpoints (removed after a verified final save)
    ranks/             per rank: data order and ZeRO partition facts
    train.lock         held (flock) by the process that trains here; a second one is refused
    metrics.jsonl      training metrics, a line per logging step
    summary.json       the training summary
    adapter_model.safetensors + adapter_config.json, or model.safetensors + config.json: the weights
    done               training finished: final weights saved and verified
    eval/ eval_base/   evaluations of the trained and of the base model (an evaluation directory each)
    export/            a standalone Hugging Face model directory (`python -m negagent.export`)
    done.json          the whole run (training and the evaluation after it) finished, with the
                       config hash a sweep compares (`negagent.sweep`)

An evaluation directory holds trajectories.jsonl, metrics.json and tool_cache.jsonl; a collection
directory collection.json, episodes.jsonl, trajectories.jsonl and stats.json.

Markers are only ever written by the stage that owns them: `done` by training rank 0, `done.json`
by the entry point (or the Slurm launcher) that finished the run. Readers here never write.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from negagent.errors import NegagentError
from negagent.files import write_json_atomic

# -- a training run ------------------------------------------------------------------------------
CONFIG = "config.yaml"
HYDRA_CONFIG = ".hydra/config.yaml"
MANIFEST = "manifest.json"
SUMMARY = "summary.json"
TRAINING_LOG = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
RANKS = "ranks"
COLLECTED = "collected"
TRAINED = "done"  # training finished: final weights saved and verified
FINISHED = "done.json"  # the whole run finished; holds the sweep's config hash
TRAIN_LOCK = "train.lock"
EVAL = "eval"
EVAL_BASE = "eval_base"
EXPORT = "export"

# -- an evaluation directory ---------------------------------------------------------------------
TRAJECTORIES = "trajectories.jsonl"
METRICS = "metrics.json"
TOOL_CACHE = "tool_cache.jsonl"

# -- a collection directory ----------------------------------------------------------------------
EPISODES = "episodes.jsonl"
COLLECTION = "collection.json"
STATS = "stats.json"

# Any of these makes a directory a run for reports.
RUN_MARKERS = (CONFIG, HYDRA_CONFIG, MANIFEST, METRICS, f"{EVAL}/{METRICS}", TRAINED)


def config_path(run_dir: str | Path, *, look_in_parent: bool = False) -> Path | None:
    """The run's frozen config (`config.yaml`, else Hydra's `.hydra/config.yaml`), or None.

    `look_in_parent`: a checkpoint folder named directly (`<run>/checkpoint-500`) uses its run's config.
    """
    run_dir = Path(run_dir)
    for folder in (run_dir, run_dir.parent) if look_in_parent else (run_dir,):
        for name in (CONFIG, HYDRA_CONFIG):
            if (folder / name).is_file():
                return folder / name
    return None


def read_config(run_dir: str | Path, *, look_in_parent: bool = False, resolve: bool = False) -> tuple[dict, Path]:
    """(config as plain data, its path). A missing or unreadable config is a one-line NegagentError.

    `resolve=False` (the default) reads the file as written: a frozen config.yaml is already
    resolved, and resolving someone else's `.hydra/config.yaml` would run its interpolations.
    """
    from omegaconf import OmegaConf

    path = config_path(run_dir, look_in_parent=look_in_parent)
    if path is None:
        where = "in it or its parent" if look_in_parent else "in it"
        raise NegagentError(f"{run_dir}: no frozen run config ({CONFIG} or {HYDRA_CONFIG}) {where}")
    try:
        config = OmegaConf.to_container(OmegaConf.load(path), resolve=resolve)
    except Exception as exc:  # YAML or interpolation errors: name the file, no traceback
        raise NegagentError(f"{path}: cannot read the run's config ({str(exc).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise NegagentError(f"{path}: not a config mapping")
    return config, path


def freeze_config(run_dir: str | Path, resolved: Mapping[str, Any]) -> Path:
    """Write `config.yaml` atomically (ranks and evaluators read it; it never changes after)."""
    import yaml

    path = Path(run_dir) / CONFIG
    tmp = path.with_name(f".{CONFIG}.tmp")
    tmp.write_text(yaml.safe_dump(dict(resolved), sort_keys=False))
    tmp.replace(path)
    return path


def read_json(path: str | Path) -> dict | None:
    """A JSON object from `path`, or None when it is absent, unreadable or not an object."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_manifest(run_dir: str | Path, *, look_in_parent: bool = False) -> dict:
    """The run's manifest.json ({} when absent or unreadable)."""
    run_dir = Path(run_dir)
    for folder in (run_dir, run_dir.parent) if look_in_parent else (run_dir,):
        if (folder / MANIFEST).is_file():
            return read_json(folder / MANIFEST) or {}
    return {}


def write_manifest(run_dir: str | Path, manifest: Mapping[str, Any]) -> Path:
    return write_json_atomic(Path(run_dir) / MANIFEST, dict(manifest))


def is_trained(run_dir: str | Path, *, look_in_parent: bool = False) -> bool:
    """Training finished here (the `done` marker): final weights saved and verified."""
    run_dir = Path(run_dir)
    return any((folder / TRAINED).is_file() for folder in ((run_dir, run_dir.parent) if look_in_parent else (run_dir,)))


def mark_trained(run_dir: str | Path) -> Path:
    path = Path(run_dir) / TRAINED
    path.write_text(time.strftime("%Y-%m-%dT%H:%M:%S") + "\n")
    return path


def read_finished(run_dir: str | Path) -> dict | None:
    """The `done.json` record of a finished run, or None (absent or unreadable: unfinished)."""
    record = read_json(Path(run_dir) / FINISHED)
    return record if record is not None and "config_hash" in record else None


def write_finished(run_dir: str | Path, record: Mapping[str, Any]) -> Path:
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return write_json_atomic(Path(run_dir) / FINISHED, dict(record))


def evaluation_metrics(run_dir: str | Path) -> Path | None:
    """The evaluation of a run: `<run>/eval/metrics.json` (training run), else `<run>/metrics.json`
    (an evaluation directory); None when neither exists."""
    run_dir = Path(run_dir)
    for path in (run_dir / EVAL / METRICS, run_dir / METRICS):
        if path.is_file():
            return path
    return None


def is_run(path: str | Path) -> bool:
    """Does `path` hold a run (a training run or an evaluation directory)?"""
    return any((Path(path) / marker).exists() for marker in RUN_MARKERS)


@contextlib.contextmanager
def training_lock(run_dir: str | Path) -> Iterator[None]:
    """Held while this process prepares and trains a run in `run_dir`; a second process asking for it
    (a second command, or a requeued member whose earlier attempt still runs) gets a one-line error
    naming the holder. The kernel releases it when the holder ends, however it ends (flock), so a
    killed run never leaves it taken. On a shared filesystem without flock support it is a no-op."""
    path = Path(run_dir) / TRAIN_LOCK
    handle = path.open("a+")  # never truncate before holding it: the holder's pid is in it
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise NegagentError(f"{run_dir}: {holder} is training in this run directory; wait for it to end "
                                "(or stop it) before resuming here") from None
        except OSError:  # no lock support on this filesystem: go on unguarded
            pass
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        yield
    finally:
        handle.close()
