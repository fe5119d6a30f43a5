"""A resumable Slurm launcher: hydra-submitit-launcher's, with negagent's sweep rules.

Before submitting anything it checks that members have distinct run directories, that sbatch is
on PATH and that the partition exists, each failing with one line. It submits only members not
already finished (negagent.sweep's done markers), waits for all of them, following the queue with
squeue since accounting may be off, writes `<sweep dir>/sweep.json`, prints one line per failed
member with its log path, and exits non-zero when any member failed. Inside the job it skips a
member that finished meanwhile (a requeue) and marks a member done when it succeeds.

A member of several Slurm tasks (`tasks_per_node` > 1 or `nodes` > 1; train.py only) is one
training run with one rank per task: every task gets the torchrun contract (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR = the first node's Slurm address, MASTER_PORT); the task of rank 0 runs the
Hydra job (train.py: freeze, train as rank 0, evaluate, mark done) and the other tasks follow it
through `negagent.training.launch.follow_rank_zero` without running the job.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides, run_job, setup_globals
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as SubmititSlurmLauncher
from omegaconf import DictConfig, OmegaConf, open_dict

from negagent.errors import NegagentError, exit_on_user_error
from negagent.rundir import read_finished
from negagent.sweep import (SweepMember, check_distinct_dirs, check_partition, check_sbatch, finished, last_error_line,
                            mark_done, member_dir, member_hash, queued_job_ids, run_slurm_command, write_status)

log = logging.getLogger(__name__)

GONE_GRACE_S = 10.0  # a job that left the queue gets this long for its result file to appear (slow shared disks)
POLL_S = 1.0


class SlurmLauncher(SubmititSlurmLauncher):
    """`_target_: hydra_plugins.negagent_launcher.slurm_launcher.SlurmLauncher`, same parameters as
    hydra-submitit-launcher's `submitit_slurm`."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        # A bad sweep ends here with one line and exit 2, before or after submission, never a traceback.
        return exit_on_user_error(self._launch)(job_overrides, initial_job_idx)

    def _launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[JobReturn]:
        planned = [self._plan(list(overrides), initial_job_idx + i) for i, overrides in enumerate(job_overrides)]
        members = [member for member, _ in planned]
        check_distinct_dirs(members)
        for member in members:
            if finished(member.run_dir, member.config_hash):  # raises when the dir holds another config's result
                member.status = "skipped"
                log.info(f"skip {member.label}: finished earlier in {member.run_dir}")
        to_run = [member for member in members if member.status != "skipped"]
        tasks = int(self.params.get("nodes") or 1) * int(self.params.get("tasks_per_node") or 1)
        if tasks > 1 and str(self.config.hydra.job.name) != "train":
            raise NegagentError(f"hydra.launcher: {tasks} Slurm tasks per member (nodes x tasks_per_node) are ranks of "
                                f"one training run; {self.config.hydra.job.name}.py runs as one task: use "
                                "hydra.launcher.nodes=1 hydra.launcher.tasks_per_node=1")
        if to_run:
            check_sbatch()
            check_partition(self.params.get("partition"))

        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        self._wait(to_run, self._submit(to_run) if to_run else [])
        statuses: dict[int, SweepMember] = getattr(self, "_members", {})  # every batch of this sweep
        statuses.update({m.index: m for m in members})
        self._members = statuses
        status_file = write_status(sweep_dir, statuses.values())
        self._report(members, status_file)
        return [self._job_return(member, config) for member, config in planned]

    def _plan(self, overrides: list[str], index: int) -> tuple[SweepMember, DictConfig]:
        config = self._member_config(overrides, index, f"job_id_for_{index}")
        run_dir = member_dir(config)
        return SweepMember(index=index, overrides=overrides, run_dir=run_dir, config_hash=member_hash(config, run_dir)), config

    def _member_config(self, overrides: list[str], index: int, job_id: str) -> DictConfig:
        config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(config.hydra.job):
            config.hydra.job.id = job_id
            config.hydra.job.num = index
        return config

    @staticmethod
    def _job_return(member: SweepMember, config: DictConfig) -> JobReturn:
        task_cfg = OmegaConf.masked_copy(config, [key for key in config if key != "hydra"])
        return JobReturn(overrides=member.overrides, cfg=task_cfg, hydra_cfg=config, working_dir=member.run_dir,
                         task_name=str(config.hydra.job.name), status=JobStatus.COMPLETED)

    # -- submission and waiting ---------------------------------------------------------------
    def _submit(self, members: Sequence[SweepMember]) -> list[Any]:
        """hydra-submitit-launcher's submission (one job array), for the given members only."""
        import submitit

        init_keys = {"submitit_folder", "max_num_timeout"}
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, folder=self.params["submitit_folder"],
                                         slurm_max_num_timeout=self.params.get("max_num_timeout", 0))
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{key if key in base else f"{self._EXECUTOR}_{key}": value
                                      for key, value in self.params.items() if key not in init_keys})
        log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {self.config.hydra.sweep.dir}")
        job_params = []
        for member in members:
            log.info(f"\t#{member.index} : {' '.join(filter_overrides(member.overrides))}")
            job_params.append((member.overrides, "hydra.sweep.dir", member.index, f"job_id_for_{member.index}",
                               Singleton.get_state()))
        try:
            jobs = executor.map_array(self, *zip(*job_params))
        except (submitit.core.utils.FailedJobError, subprocess.CalledProcessError, OSError) as exc:
            text = getattr(exc, "stderr", None) or getattr(exc, "output", None) or str(exc)
            text = text.decode(errors="replace") if isinstance(text, bytes) else str(text)
            raise NegagentError(f"sbatch refused the sweep: {(text.strip().splitlines() or [str(exc)])[-1]}") from None
        for member, job in zip(members, jobs):
            member.status = "submitted"
            member.job_id = str(job.job_id)
            member.log_out, member.log_err = str(job.paths.stdout), str(job.paths.stderr)
        return jobs

    def _wait(self, members: Sequence[SweepMember], jobs: Sequence[Any]) -> None:
        """Until every job has written its result file or has left the queue without one."""
        from tqdm import tqdm

        pending = dict(enumerate(zip(members, jobs)))
        left_queue_at: dict[int, float] = {}
        with tqdm(total=len(jobs), desc="sweep members", unit="member", disable=not jobs) as bar:
            while pending:
                queued = queued_job_ids()
                now = time.monotonic()
                for key, (member, job) in list(pending.items()):
                    if job.paths.result_pickle.exists():
                        self._collect(member, job)
                    elif queued is not None and member.job_id not in queued:
                        if now - left_queue_at.setdefault(key, now) < GONE_GRACE_S:
                            continue
                        member.status = "failed"
                        member.error = (last_error_line(member.log_err, member.log_out)
                                        or "the job left the queue without a result and wrote no log")
                    else:
                        continue
                    del pending[key]
                    bar.update(1)
                if pending:
                    time.sleep(POLL_S)

    @staticmethod
    def _collect(member: SweepMember, job: Any) -> None:
        try:
            ret = job.results()[0]
        except Exception as exc:  # submitit re-raises the job's own failure, traceback as text
            member.status = "failed"
            member.error = last_error_line(member.log_err) or str(exc).strip().splitlines()[-1]
            return
        if getattr(ret, "status", None) == JobStatus.FAILED:
            member.status = "failed"
            exc = ret._return_value
            member.error = last_error_line(member.log_err) or f"{type(exc).__name__}: {exc}"
            return
        member.status = "finished"

    @staticmethod
    def _report(members: Sequence[SweepMember], status_file: Path) -> None:
        count = {s: sum(m.status == s for m in members) for s in ("finished", "skipped", "failed")}
        print(f"sweep: {len(members)} members: {count['finished']} finished, {count['skipped']} skipped "
              f"(finished earlier), {count['failed']} failed; status in {status_file}", flush=True)
        failed = [m for m in members if m.status == "failed"]
        for member in failed:
            print(f"FAILED {member.label}: {member.error} (log: {member.log_err or member.log_out})",
                  file=sys.stderr, flush=True)
        if failed:
            raise NegagentError(f"{len(failed)} of {len(members)} sweep members failed (listed above); "
                                "run the same command again to retry them, finished members are skipped")

    # -- inside the job -----------------------------------------------------------------------
    def __call__(self, sweep_overrides: list[str], job_dir_key: str, job_num: int, job_id: str,
                 singleton_state: dict) -> JobReturn:
        """Run one member (one rank of it when the job has several tasks): skip it when it already
        finished, mark it done (rank 0) when it succeeds."""
        import submitit

        Singleton.set_state(singleton_state)
        setup_globals()
        environment = submitit.JobEnvironment()
        config = self._member_config(list(sweep_overrides), job_num, environment.job_id)
        run_dir = member_dir(config)
        digest = member_hash(config, run_dir)
        # A marker from this very attempt was written by rank 0 while this rank started late: not a skip.
        attempt = f"{environment.job_id}:{os.environ.get('SLURM_RESTART_COUNT', '0')}"
        if finished(run_dir, digest) and (read_finished(run_dir) or {}).get("attempt") != attempt:
            print(f"skip: {run_dir} already finished (config {digest})", flush=True)  # e.g. requeued after it finished
            return JobReturn(overrides=list(sweep_overrides), working_dir=run_dir, status=JobStatus.COMPLETED)
        gate = None
        if environment.num_tasks > 1:
            from negagent.training import launch

            _export_rank_environment(environment)
            if environment.global_rank != 0:
                return _follow(list(sweep_overrides), Path(run_dir))
            gate = launch.RANK_GATE = launch.RankGate.open_host()  # before the slow part: the others wait on it
        ret = run_job(hydra_context=self.hydra_context, task_function=self.task_function, config=config,
                      job_dir_key=job_dir_key, job_subdir_key="hydra.sweep.subdir")
        if ret.status == JobStatus.COMPLETED and environment.global_rank == 0:
            mark_done(run_dir, digest, attempt=attempt)
        elif ret.status == JobStatus.FAILED:  # the log then holds the traceback the summary points to
            exc = ret._return_value
            traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
            sys.stderr.flush()
        if gate is not None:  # rank 0 ended without training (trained earlier, or failed first): release the others
            failed = ret.status == JobStatus.FAILED
            gate.say("ended", error=f"{type(ret._return_value).__name__}: {ret._return_value}" if failed else None)
        return ret


def _export_rank_environment(environment: Any) -> None:
    """The torchrun contract for this task (one task per GPU; every GPU stays visible and LOCAL_RANK
    picks one). MASTER_ADDR is the first node's address as Slurm knows it (NodeAddr), which resolves
    where the node's name may not (a cluster's internal names, several nodes on one host)."""
    import submitit

    distributed = submitit.helpers.TorchDistributedEnvironment()
    distributed.master_addr = node_address(distributed.master_addr)
    distributed.export(set_cuda_visible_devices=False, overwrite=True)


def node_address(node: str) -> str:
    """The NodeAddr of a Slurm node (`scontrol show node`), or the name itself when Slurm gives none."""
    try:
        text = run_slurm_command(["scontrol", "show", "node", node, "--oneliner"])
    except NegagentError:
        return node
    for field in text.split():
        if field.startswith("NodeAddr="):
            return field.split("=", 1)[1] or node
    return node


def _follow(overrides: list[str], run_dir: Path) -> JobReturn:
    """A task other than rank 0's: train as its rank once rank 0 says so (never runs the Hydra job)."""
    from negagent.training import launch

    ret = JobReturn(overrides=overrides, working_dir=str(run_dir))
    try:
        ret.return_value = launch.follow_rank_zero(run_dir)
        ret.status = JobStatus.COMPLETED
    except NegagentError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        ret.return_value, ret.status = exc, JobStatus.FAILED
    return ret
