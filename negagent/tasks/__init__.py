"""Build a task from its config, and the data plumbing the task modules share.

`get_task(cfg)` is the one entry: `cfg` is the `task` config group (a DictConfig or a plain dict)
with `name`, `data_dir` and the task's own keys (see conf/task/<name>.yaml). Data files are read
either from `data_dir` (`source: local`, the default; offline) or from the Hugging Face hub
(`source: hub`); every problem with them is a `NegagentError` that names the file and the fix.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from negagent.errors import NegagentError
from negagent.tasks.base import Question, Task

__all__ = ["Question", "Task", "get_task", "TASK_NAMES"]

# name -> module with `build(cfg) -> Task`. Imported on demand: the task modules import the data
# helpers below from this package, and only the chosen task is loaded.
_MODULES = {
    "arith": "negagent.tasks.arith",
    "math": "negagent.tasks.math",
    "hotpotqa": "negagent.tasks.hotpotqa",
    "strategyqa": "negagent.tasks.strategyqa",
}
TASK_NAMES = tuple(_MODULES)


def get_task(cfg: Mapping[str, Any]) -> Task:
    """The task named by `cfg["name"]`, configured by the rest of `cfg`."""
    name = cfg.get("name")
    if name not in _MODULES:
        raise NegagentError(f"unknown task {name!r}; choose one of: {', '.join(TASK_NAMES)}")
    if cfg.get("max_turns") is not None:  # read by the agent loop's callers; 0 would store empty episodes
        integer(cfg, "max_turns", 7, minimum=1)
    return importlib.import_module(_MODULES[name]).build(cfg)


# --- config values ---------------------------------------------------------------------------


def choice(cfg: Mapping[str, Any], key: str, allowed: Sequence[str], default: str) -> str:
    """`cfg[key]` (or `default`), which must be one of `allowed`."""
    value = cfg.get(key, default)
    if value not in allowed:
        raise NegagentError(f"task.{key}={value!r}: choose one of: {', '.join(allowed)}")
    return value


def integer(cfg: Mapping[str, Any], key: str, default: int, minimum: int = 0) -> int:
    """`cfg[key]` (or `default`), an integer >= minimum."""
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise NegagentError(f"task.{key}={value!r}: expected an integer >= {minimum}")
    return value


def limit(cfg: Mapping[str, Any], key: str) -> int | None:
    """`cfg[key]`: how many questions to keep, or None (the default) for all of them."""
    return None if cfg.get(key) is None else integer(cfg, key, 0)


def first(items: list, n: int | None) -> list:
    """The first `n` items (all of them when n is None)."""
    return items if n is None else items[:n]


# --- data files ------------------------------------------------------------------------------


@dataclass(frozen=True)
class HubSplit:
    """A public copy of a data file on the Hugging Face hub, for `source: hub`."""

    dataset: str
    config: str | None
    split: str
    # local field name -> hub column, where they differ. Rows without a mapped "id" are numbered by
    # their index in the split, which is how the paper's files number GSM8K and HotpotQA.
    columns: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DataFile:
    """One split of a dataset: its path under data_dir, where users get it, and its hub copy."""

    path: str  # relative to data_dir; *.json holds one JSON list, *.jsonl one object a line
    origin: str  # what the file is and where it comes from, for error messages
    required: tuple[str, ...]  # fields every record must have
    hub: HubSplit | None = None  # None: no public hub copy matches this file


def load_records(data: DataFile, source: str, data_dir: str | Path | None) -> list[dict]:
    """The records of `data` from `source` ("local" or "hub"), each checked for its required fields."""
    records = _load_hub(data) if source == "hub" else _load_local(data, data_dir)
    for index, record in enumerate(records):
        missing = [key for key in data.required if key not in record]
        if missing:
            raise NegagentError(f"{data.path}: record {index} lacks field {missing[0]!r}")
    return records


def _load_local(data: DataFile, data_dir: str | Path | None) -> list[dict]:
    fix = f"({data.path} from {data.origin}), or task.source=hub when online"
    if data_dir is None:
        raise NegagentError(f"task.data_dir is not set: set it to a directory holding {fix}")
    path = Path(data_dir) / data.path
    if not path.is_file():
        raise NegagentError(f"{path} not found: set task.data_dir to a directory holding {fix}")
    return read_jsonl(path) if path.suffix == ".jsonl" else read_json_list(path)


def read_json_list(path: Path) -> list[dict]:
    """A file holding one JSON list of objects."""
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise NegagentError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise NegagentError(f"{path}: expected a JSON list of objects")
    return records


def read_jsonl(path: Path) -> list[dict]:
    """A file holding one JSON object a line; blank lines are skipped."""
    records = []
    with path.open(encoding="utf-8") as lines:
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise NegagentError(f"{path}:{lineno}: invalid JSON: {exc.msg}") from exc
            if not isinstance(record, dict):
                raise NegagentError(f"{path}:{lineno}: expected a JSON object")
            records.append(record)
    return records


def _load_hub(data: DataFile) -> list[dict]:
    hub = data.hub
    if hub is None:
        raise NegagentError(
            f"{data.path} has no matching public copy on the hub: use task.source=local with "
            f"task.data_dir holding it ({data.origin})"
        )
    try:
        from datasets import load_dataset

        rows = load_dataset(hub.dataset, hub.config, split=hub.split)
    except Exception as exc:  # offline, renamed dataset, ...: all mean "use the local files"
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise NegagentError(
            f"could not load {hub.dataset} ({hub.split}) from the Hugging Face hub ({reason}); "
            f"offline, use task.source=local with task.data_dir holding {data.path}"
        ) from exc
    records = []
    for index, row in enumerate(rows):
        record = dict(row)
        record.update({local: row[column] for local, column in hub.columns.items()})
        if "id" not in hub.columns:
            record["id"] = index
        records.append(record)
    return records
