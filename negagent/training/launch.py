"""Distributed launch from a frozen config.

The Hydra process resolves the config once and writes it to `<run_dir>/config.yaml`; training
ranks are started (torchrun) on this module's plain entry point, which reads that file:

    python -m negagent.training.launch <run_dir>

So there is one output directory, and ranks never see Hydra or a `--local_rank` argument. One
process without DeepSpeed trains inside the Hydra process instead.

On a cluster every rank is started by the cluster instead (one Slurm task per GPU, on one node or
several; see hydra_plugins/negagent_launcher): the task of rank 0 runs train.py, freezes the config
and trains in its own process as rank 0; the other tasks never run train.py and write nothing but
their own `ranks/rank<N>.*` records: each waits at a `RankGate` (a TCP store that rank 0 hosts
beside the rendezvous port) until rank 0 says "train", then trains in its own process on the frozen
config, or stops with rank 0's error when rank 0 ends without training.

Run directory rules (file names in `negagent.rundir`): a finished run is never written into
again; a directory holding an unfinished run with the same config is resumed from its last
checkpoint; one holding a different config is refused.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from negagent import rundir
from negagent.errors import NegagentError, exit_on_user_error
from negagent.training.tracking import REDACTED, redact_secrets, run_identity

REPO_ROOT = Path(__file__).resolve().parents[2]  # negagent/training/launch.py -> the checkout


def resolve_config(cfg, overrides: Sequence[str], run_dir: Path, name_excludes: Sequence[str] = ()) -> dict[str, Any]:
    """The fully resolved config as plain data, with `run` (dir, overrides, name, group) added and
    secrets redacted: what ranks read and what the run directory keeps. The name and group leave out
    the keys in `name_excludes` (Hydra's override_dirname exclude_keys: paths, the run dir)."""
    from omegaconf import OmegaConf

    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    overrides = [redact_override(o) for o in overrides]  # the run's name and group are built from them
    named = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in set(name_excludes)]
    resolved["run"] = {"dir": str(run_dir), "overrides": list(overrides), **run_identity(named)}
    return redact_secrets(resolved)


def redact_override(override: str) -> str:
    """A command-line override with its value redacted when `redact_secrets` would redact it in the
    config (a key naming a secret, or a value shaped like an API key); others unchanged."""
    key, sep, value = override.partition("=")
    if not sep:
        return override
    leaf = key.lstrip("+~").rsplit(".", 1)[-1]
    bare = value.strip("'\"")
    if redact_secrets({leaf: bare})[leaf] == REDACTED and bare != REDACTED:
        return f"{key}={REDACTED}"
    return override


def redact_hydra_files(folder: Path | None, overrides: Sequence[str]) -> None:
    """Redact Hydra's own copies of the run (`<run_dir>/.hydra/*.yaml`: config, overrides, hydra), which
    Hydra writes before the job starts with secrets in clear: secret config entries as `redact_secrets`
    does, and every secret override (also inside `override_dirname`) as `redact_override` does."""
    if folder is None or not folder.is_dir():
        return
    replacements = {o: redact_override(o) for o in overrides if redact_override(o) != o}

    def scrub(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: scrub(v) for k, v in node.items()}
        if isinstance(node, list):
            return [scrub(v) for v in node]
        if isinstance(node, str):
            for secret, redacted in replacements.items():
                node = node.replace(secret, redacted)
        return node

    for path in sorted(folder.glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        clean = scrub(redact_secrets(data))
        if clean != data:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(yaml.safe_dump(clean, sort_keys=False))
            tmp.replace(path)


def refuse_finished_run_dir(argv: Sequence[str]) -> None:
    """Before Hydra writes anything: `hydra.run.dir=D` naming a finished run is an error.

    Finished means the whole run (training and any evaluation after it) marked itself complete
    (`done.json`); a run trained but not yet evaluated is resumed instead.
    """
    for arg in argv:
        if arg.startswith("hydra.run.dir="):
            folder = Path(arg.split("=", 1)[1]).expanduser()
            if (folder / rundir.FINISHED).is_file():
                raise NegagentError(f"{folder}: a finished run is already there; choose a new hydra.run.dir")


def _first_difference(a: Any, b: Any, path: str = "") -> str | None:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for key in sorted(set(a) | set(b), key=str):
            found = _first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else str(key))
            if found:
                return found
        return None
    return None if a == b else (path or "<root>")


def check_run_dir(run_dir: Path, resolved: Mapping[str, Any]) -> str:
    """What `run_dir` holds for this config: "new", "resume" (unfinished training) or "trained"
    (training finished and verified; what follows it, evaluation, is still to do). Another
    config's run there is an error."""
    if not (run_dir / rundir.CONFIG).is_file():
        if rundir.is_trained(run_dir):
            raise NegagentError(f"{run_dir}: a finished run is already there; choose a new hydra.run.dir")
        return "new"
    previous, _ = rundir.read_config(run_dir)
    differs = _first_difference(previous, dict(resolved))
    if differs:
        raise NegagentError(f"{run_dir}: holds a run with a different config (at {differs}); "
                            "rerun its exact command to resume, or choose a new hydra.run.dir")
    return "trained" if rundir.is_trained(run_dir) else "resume"


def available_slots() -> tuple[int, str]:
    """(processes this machine can host, what they are): GPUs, else CPU cores this process may use."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count(), "GPUs"
    return len(os.sched_getaffinity(0)), "CPU cores"


def check_nproc(nproc: int) -> None:
    slots, kind = available_slots()
    if nproc < 1 or nproc > slots:
        raise NegagentError(f"trainer.nproc_per_node={nproc} but this machine has {slots} {kind}; use 1..{slots}")


def rank_command(run_dir: Path, nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "negagent.training.launch", str(run_dir)]


def rank_env(ranks_here: int) -> dict[str, str]:
    """Environment a training rank needs beyond the launch contract, given the ranks on this machine:
    without a GPU, DeepSpeed's CPU accelerator and this machine's cores split between the ranks."""
    import torch

    if torch.cuda.is_available():
        return {}
    return {"DS_ACCELERATOR": "cpu",  # DeepSpeed's CPU accelerator: ZeRO on CPU processes
            "OMP_NUM_THREADS": str(max(1, available_slots()[0] // max(1, ranks_here)))}


def started_as_rank() -> tuple[int, int] | None:
    """(rank, world size) when this process is one rank of a launch that started every rank itself
    (RANK and WORLD_SIZE set, world size above 1); None for a plain process."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return (int(os.environ.get("RANK", "0")), world) if world > 1 else None


class RankGate:
    """Rank 0 tells the other ranks of a cluster-started launch whether to train in this attempt.

    Rank 0 hosts a TCP store on MASTER_ADDR at MASTER_PORT + 1 (the rendezvous port itself is the
    process group's); the others connect and wait for one key, `state`: {"state": "train"} once
    rank 0 has frozen the config, or {"state": "ended", "error": ...} when rank 0 ends without
    training (the run was trained already, or it failed first). A rank 0 that dies closes the store,
    and the waiting ranks stop with an error instead of waiting for the time limit.
    """

    KEY = "state"
    CONNECT_S = 1800  # rank 0's task may start long after the others (node boot, imports)
    POLL_S = 60

    def __init__(self, store: Any):
        self.store, self.said = store, None

    @staticmethod
    def _address() -> tuple[str, int]:
        return os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]) + 1

    @classmethod
    def open_host(cls) -> "RankGate":
        """Rank 0: host the store (before the slow part of rank 0's work starts)."""
        import torch.distributed as dist

        addr, port = cls._address()
        try:
            store = dist.TCPStore(addr, port, int(os.environ["WORLD_SIZE"]), True, timedelta(seconds=cls.CONNECT_S),
                                  wait_for_workers=False)
        except (RuntimeError, dist.DistError) as exc:
            raise NegagentError(f"rank 0: cannot open its gate at {addr}:{port} (MASTER_PORT + 1; is the port in "
                                f"use?): {' '.join(str(exc).split())[:200]}") from None
        return cls(store)

    @classmethod
    def join(cls) -> "RankGate":
        """Another rank: connect to rank 0's store (retried until CONNECT_S)."""
        import torch.distributed as dist

        addr, port = cls._address()
        try:
            store = dist.TCPStore(addr, port, int(os.environ["WORLD_SIZE"]), False, timedelta(seconds=cls.CONNECT_S))
        except (RuntimeError, dist.DistError) as exc:
            raise NegagentError(f"rank {os.environ.get('RANK')}: rank 0 did not open its gate at {addr}:{port} "
                                f"within {cls.CONNECT_S} s ({' '.join(str(exc).split())[:200]})") from None
        return cls(store)

    def say(self, state: str, error: str | None = None) -> None:
        """Rank 0: tell the others (once; later calls are ignored)."""
        if self.said is None:
            self.said = state
            self.store.set(self.KEY, json.dumps({"state": state, "error": error}))

    def wait(self) -> dict[str, Any]:
        """Another rank: rank 0's word, waiting as long as rank 0 lives."""
        import torch.distributed as dist

        while True:
            try:
                self.store.wait([self.KEY], timedelta(seconds=self.POLL_S))
                return json.loads(self.store.get(self.KEY))
            except dist.DistStoreError:  # not said yet, rank 0 still there: keep waiting
                continue
            except (RuntimeError, dist.DistError):
                raise NegagentError(f"rank {os.environ.get('RANK')}: rank 0 ended before it said whether to train "
                                    "(its log says why); run the same command again to resume") from None


# The gate of this process when it is rank 0 of a cluster-started launch (set by the launcher).
RANK_GATE: RankGate | None = None


def follow_rank_zero(run_dir: Path) -> str:
    """A rank other than 0 of a cluster-started launch: wait for rank 0's word, then train as this
    rank on the frozen config. Returns "trained" or "skipped" (rank 0 ended without training)."""
    word = RankGate.join().wait()
    if word["state"] != "train":
        if word.get("error"):
            raise NegagentError(f"rank {os.environ.get('RANK')}: not training, rank 0 failed: {word['error']}")
        return "skipped"
    _train_as_cluster_rank(rundir.read_config(run_dir)[0], run_dir)
    return "trained"


def _train_as_cluster_rank(cfg: Mapping[str, Any], run_dir: Path) -> None:
    """Train in this process as the rank the cluster started (with `rank_env` for this node's ranks)."""
    for key, value in rank_env(int(os.environ.get("LOCAL_WORLD_SIZE", "1"))).items():
        os.environ.setdefault(key, value)
    from negagent.training.recipe import train

    train(cfg, run_dir)


def run(run_dir: Path, resolved: Mapping[str, Any]) -> None:
    """Train: in this process (one rank, no DeepSpeed), on `nproc_per_node` torchrun ranks, or, when
    the cluster started every rank (one task per GPU), as rank 0 with the others behind the gate."""
    trainer = resolved["trainer"]
    nproc = int(trainer["nproc_per_node"])
    if started_as_rank():
        _run_as_rank_zero(run_dir, resolved, nproc)
        return
    if nproc == 1 and not trainer.get("deepspeed"):
        from negagent.training.recipe import train

        train(resolved, run_dir)
        return
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    for key, value in rank_env(nproc).items():
        env.setdefault(key, value)
    rc = subprocess.call(rank_command(run_dir, nproc), env=env)
    if rc != 0:
        raise NegagentError(f"training ranks failed (exit {rc}); the lines above say why; rerun the same command to resume")
    if not rundir.is_trained(run_dir):
        raise NegagentError(f"{run_dir}: the ranks exited without a verified final save")


def _run_as_rank_zero(run_dir: Path, resolved: Mapping[str, Any], nproc: int) -> None:
    rank, world = started_as_rank()
    if RANK_GATE is None or rank != 0:
        raise NegagentError(f"train.py was started as rank {rank} of {world} (RANK/WORLD_SIZE are set), but it is "
                            "one process: use trainer.nproc_per_node=N on one machine, or a Slurm launcher preset "
                            "(hydra/launcher=slurm_gpu_node) that starts one task per GPU")
    if nproc != 1:
        raise NegagentError(f"trainer.nproc_per_node={nproc}, but this member's {world} Slurm tasks are its ranks "
                            "already; leave trainer.nproc_per_node at 1 (GPUs per member: hydra.launcher.tasks_per_node)")
    RANK_GATE.say("train")
    _train_as_cluster_rank(resolved, run_dir)


def _die_with_launcher() -> None:
    """Linux: end this rank when its launcher dies. torchrun starts ranks in their own sessions, so a
    killed launch (SIGKILL, an OOM kill) would otherwise leave ranks training into the run directory
    while the same command is rerun to resume it."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() == 1:  # the launcher died before the line above
        os._exit(1)


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        raise NegagentError("usage: python -m negagent.training.launch <run_dir>  (a run directory with config.yaml)")
    run_dir = Path(args[0])
    if not (run_dir / rundir.CONFIG).is_file():
        raise NegagentError(f"{run_dir / rundir.CONFIG}: no frozen config; start runs with train.py")
    _die_with_launcher()
    from negagent.training.recipe import train

    train(rundir.read_config(run_dir)[0], run_dir)


if __name__ == "__main__":
    main()
