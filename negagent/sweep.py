"""Resumable sweeps: a member's identity and done marker, the checks made before anything is
submitted, and `-m --cfg` for entry points.

A sweep member is identified by a hash of its resolved config without the keys that say where
things are kept or how they are logged (`hydra.*`, `cache_dir` at any depth, `logger`,
`data.preview`). When a member finishes, `done.json` in its run directory records that hash.
Re-running the same sweep (same `hydra.sweep.dir`) skips members whose `done.json` matches and
whose recorded outputs still exist (file names in `negagent.rundir`); failed or unfinished members run again. A run directory that
holds a finished run of a *different* config is never overwritten: that is an error.

Entry points call `skip_if_done(run_dir, cfg)` first and `mark_done(run_dir, cfg, outputs)` last.
The Slurm launcher (hydra_plugins/negagent_launcher, the `_target_` of conf/hydra/launcher/*)
does both around each member by itself, submits only unfinished members, and writes
`<sweep dir>/sweep.json` listing every member with its status, run directory and log paths.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from omegaconf import DictConfig, OmegaConf, open_dict

from negagent import config, rundir
from negagent.errors import NegagentError
from negagent.files import write_json_atomic

log = logging.getLogger(__name__)

STATUS_FILE = "sweep.json"
# Keys that do not change a result: where things are kept, how it is logged, what is printed.
VOLATILE_PATHS: tuple[str, ...] = ("hydra", "logger", "data.preview")
VOLATILE_NAMES: frozenset[str] = frozenset({"cache_dir"})
SLURM_TIMEOUT_S = 30  # every sinfo / squeue call


# --------------------------------------------------------------------------- identity and markers

def _drop_volatile_names(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _drop_volatile_names(v) for k, v in node.items() if k not in VOLATILE_NAMES}
    if isinstance(node, list):
        return [_drop_volatile_names(v) for v in node]
    return node


def identity(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The part of a config that defines a result: the resolved config without the volatile keys."""
    plain = config.plain(cfg)
    for dotted in VOLATILE_PATHS:
        *parents, last = dotted.split(".")
        node: Any = plain
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return _drop_volatile_names(plain)


def config_hash(cfg: DictConfig | Mapping[str, Any]) -> str:
    """16 hex digits of sha256 over the canonical JSON of `identity(cfg)`."""
    text = json.dumps(identity(cfg), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _digest(cfg_or_hash: DictConfig | Mapping[str, Any] | str) -> str:
    return cfg_or_hash if isinstance(cfg_or_hash, str) else config_hash(cfg_or_hash)


def finished(run_dir: str | Path, cfg_or_hash: DictConfig | Mapping[str, Any] | str) -> bool:
    """True when `run_dir` holds a finished run of this config with all its recorded outputs.

    Raises NegagentError when it holds a finished run of a different config: running there would
    overwrite that result.
    """
    digest = _digest(cfg_or_hash)
    record = rundir.read_finished(run_dir)
    if record is None:
        return False
    if record["config_hash"] != digest:
        raise NegagentError(
            f"{Path(run_dir)} holds a finished run of a different config ({rundir.FINISHED}: {record['config_hash']}, "
            f"this run: {digest}); choose another output directory or remove that one")
    return all((Path(run_dir) / name).exists() for name in record.get("outputs", []))


def skip_if_done(run_dir: str | Path, cfg: DictConfig | Mapping[str, Any]) -> bool:
    """Call first in an entry point: True, with one line saying so, when this run already finished."""
    digest = config_hash(cfg)
    if finished(run_dir, digest):
        print(f"skip: {run_dir} already finished (config {digest})", flush=True)
        return True
    return False


def mark_done(run_dir: str | Path, cfg_or_hash: DictConfig | Mapping[str, Any] | str,
              outputs: Iterable[str] = (), attempt: str | None = None) -> Path:
    """Call last in an entry point: record that `run_dir` finished this config.

    `outputs` are file names relative to `run_dir` that must exist now (a later skip checks them
    again). Marking twice with the same config keeps the union of outputs. `attempt` names the
    Slurm job attempt that finished it (the launcher's). Written atomically.
    """
    run_dir = Path(run_dir)
    digest = _digest(cfg_or_hash)
    names = list(outputs)
    missing = [name for name in names if not (run_dir / name).exists()]
    if missing:
        raise NegagentError(f"cannot mark {run_dir} done: {', '.join(missing)} missing")
    previous = rundir.read_finished(run_dir)
    if previous and previous["config_hash"] == digest:
        names = sorted(set(previous.get("outputs", [])) | set(names))
    record = {"config_hash": digest, "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "outputs": names, "attempt": attempt or (previous or {}).get("attempt")}
    return rundir.write_finished(run_dir, record)


# --------------------------------------------------------------------------- members of a Hydra sweep

@dataclass
class SweepMember:
    """One sweep member: what it runs, where, and how it went."""

    index: int
    overrides: list[str]
    run_dir: str
    config_hash: str
    status: str = "pending"  # pending | skipped (finished earlier) | finished | failed
    job_id: str | None = None
    log_out: str | None = None
    log_err: str | None = None
    error: str | None = None

    @property
    def label(self) -> str:
        shown = [o for o in self.overrides if not o.startswith("hydra")]
        return f"#{self.index} ({' '.join(shown) or 'no overrides'})"


def member_dir(sweep_config: DictConfig) -> str:
    """The run directory Hydra's run_job gives a member: sweep dir joined with its subdir, absolute."""
    sweep_dir = str(OmegaConf.select(sweep_config, "hydra.sweep.dir"))
    subdir = str(OmegaConf.select(sweep_config, "hydra.sweep.subdir"))
    return os.path.abspath(os.path.join(sweep_dir, subdir))


def member_hash(sweep_config: DictConfig, run_dir: str) -> str:
    """A member's config hash, resolved as the job will see it (HydraConfig set, output dir known)."""
    from hydra.core.hydra_config import HydraConfig

    with open_dict(sweep_config.hydra.runtime):
        sweep_config.hydra.runtime.output_dir = run_dir
    saved = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(sweep_config)
    try:
        return config_hash(sweep_config)
    finally:
        HydraConfig.instance().cfg = saved


def write_status(sweep_dir: str | Path, members: Iterable[SweepMember]) -> Path:
    """Write `<sweep dir>/sweep.json`: every member with its status, run dir, job id, logs, error."""
    records = sorted((asdict(m) for m in members), key=lambda r: r["index"])
    return write_json_atomic(Path(sweep_dir) / STATUS_FILE, {"sweep_dir": str(sweep_dir), "members": records})


def last_error_line(*paths: str | None) -> str | None:
    """The most telling line of the first log that has one: its last `error: ...` or `...Error: ...`
    line, else its last line."""
    for path in paths:
        if not path or not Path(path).is_file():
            continue
        lines = [line.strip() for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error:") or line.split(":")[0].endswith(("Error", "Exception"))]
        if errors:
            return errors[-1]
        if lines:
            return lines[-1]
    return None


# --------------------------------------------------------------------------- checks before submission

def check_distinct_dirs(members: Sequence[SweepMember]) -> None:
    """Two members writing to one run directory would overwrite each other."""
    seen: dict[str, SweepMember] = {}
    for member in members:
        other = seen.setdefault(member.run_dir, member)
        if other is not member:
            raise NegagentError(
                f"sweep members {other.label} and {member.label} would both write to {member.run_dir}; "
                "make hydra.sweep.subdir distinct per member (e.g. ${hydra.job.override_dirname} or ${hydra.job.num})")


def run_slurm_command(argv: list[str]) -> str:
    """stdout of a Slurm client command; NegagentError with one line when it is missing, slow or fails."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=SLURM_TIMEOUT_S)
    except FileNotFoundError:
        raise NegagentError(f"{argv[0]} not found on PATH: Slurm's client commands are needed for a Slurm sweep") from None
    except subprocess.TimeoutExpired:
        raise NegagentError(f"{' '.join(argv)} did not answer within {SLURM_TIMEOUT_S}s: is slurmctld up?") from None
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise NegagentError(f"{' '.join(argv)} failed: {reason}")
    return done.stdout


def check_sbatch() -> None:
    """sbatch must be on PATH before anything is submitted."""
    if shutil.which("sbatch") is None:
        raise NegagentError("sbatch not found on PATH: submit from a Slurm login node, start a local cluster with "
                            "scripts/slurm_local.sh, or choose another hydra/launcher")


def slurm_partitions() -> list[str]:
    """Partition names the cluster has (`sinfo`), without the default-partition star."""
    out = run_slurm_command(["sinfo", "-h", "-o", "%P"])
    return sorted({line.strip().rstrip("*") for line in out.splitlines() if line.strip()})


def check_partition(partition: str | None) -> None:
    """A named partition (or each of a comma-separated list) must exist; None means the default."""
    if not partition:
        return
    known = slurm_partitions()
    for name in partition.split(","):
        if name not in known:
            raise NegagentError(f"partition '{name}' (hydra.launcher.partition) does not exist on this cluster; "
                                f"it has: {', '.join(known) or 'none'}")


def queued_job_ids() -> set[str] | None:
    """Ids of jobs the queue still holds, one per array task (`123_4`); None when squeue does not answer."""
    try:
        out = run_slurm_command(["squeue", "-h", "-r", "-o", "%i"])
    except NegagentError as exc:
        log.warning(f"{exc}; still waiting")
        return None
    return {line.strip() for line in out.splitlines() if line.strip()}


# --------------------------------------------------------------------------- showing a sweep's config

_CFG_FLAGS = ("-c", "--cfg")
_MULTIRUN_FLAGS = ("-m", "--multirun")


def show_sweep_config(argv: Sequence[str], conf_dir: str | Path, config_name: str, job_name: str) -> bool:
    """`-m ... --cfg hydra|job|all`: print the sweep's config and compose every member; True if handled.

    Hydra 1.3 refuses `--multirun` together with `--cfg`; an entry point calls this before
    `main()` and exits when it returns True. It prints the primary config (the one the sweeper and
    launcher get) for `--cfg hydra`, and every member's config for `--cfg job|all`, each member
    headed by a comment with its overrides; a member that does not compose, or two members sharing a
    run directory, is an error.
    """
    args = list(argv)
    if not any(a in _MULTIRUN_FLAGS for a in args):
        return False
    cfg_type = resolve = package = None
    overrides: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in _CFG_FLAGS and i + 1 < len(args):
            cfg_type, i = args[i + 1], i + 2
            continue
        if arg.startswith("--cfg="):
            cfg_type = arg.split("=", 1)[1]
        elif arg in ("-p", "--package") and i + 1 < len(args):
            package, i = args[i + 1], i + 2
            continue
        elif arg == "--resolve":
            resolve = True
        elif not arg.startswith("-"):
            overrides.append(arg)
        i += 1
    if cfg_type is None:
        return False
    if cfg_type not in ("job", "hydra", "all"):
        raise NegagentError(f"--cfg {cfg_type}: choose job, hydra or all")
    if package:
        raise NegagentError("--package is not supported together with --multirun")

    from hydra import initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra._internal.hydra import Hydra
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from hydra.types import RunMode

    with initialize_config_dir(config_dir=str(Path(conf_dir).resolve()), version_base=None, job_name=job_name):
        loader = GlobalHydra.instance().config_loader()
        try:
            primary = loader.load_configuration(config_name, overrides, run_mode=RunMode.MULTIRUN)
            with open_dict(primary.hydra):  # resolves ${now:...} once, so every member shares the sweep dir
                primary.hydra.runtime.output_dir = os.path.abspath(str(primary.hydra.sweep.dir))
            params = [f"{k}={v}" for k, v in (OmegaConf.select(primary, "hydra.sweeper.params") or {}).items()]
            task_overrides = list(OmegaConf.select(primary, "hydra.overrides.task") or [])  # what the sweeper gets
            parsed = OverridesParser.create(config_loader=loader).parse_overrides(params + task_overrides)
            members = [m for batch in BasicSweeper.split_arguments(parsed, None) for m in batch]
            configs = [loader.load_sweep_config(primary, m) for m in members]
        except HydraException as exc:
            raise NegagentError(f"the sweep does not compose: {str(exc).strip().splitlines()[0]}") from None
        for index, config in enumerate(configs):
            with open_dict(config.hydra):
                config.hydra.job.num = index
                config.hydra.runtime.output_dir = member_dir(config)
        check_distinct_dirs([SweepMember(i, m, c.hydra.runtime.output_dir, "") for i, (m, c) in enumerate(zip(members, configs))])

        def dump(config: DictConfig, keep: str) -> str:
            HydraConfig.instance().set_config(config)  # for ${hydra:...} interpolations, as Hydra's --cfg does
            shown = copy.deepcopy(config)
            if keep == "hydra":
                shown = Hydra.get_sanitized_hydra_cfg(shown)
            elif keep == "job":
                with open_dict(shown):
                    del shown["hydra"]
            if resolve:
                shown = OmegaConf.create(OmegaConf.to_container(shown, resolve=True))
            return OmegaConf.to_yaml(shown)

        print(f"# sweep of {len(members)} members")
        if cfg_type == "hydra":
            print(dump(primary, "hydra"), end="")
            for index, member in enumerate(members):
                print(f"# member #{index}: {' '.join(member)}")
            return True
        for index, (member, config) in enumerate(zip(members, configs)):
            print(f"# member #{index}: {' '.join(member)}")
            print(dump(config, cfg_type), end="")
    return True
