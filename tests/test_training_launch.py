"""How training ranks start and meet: the run directory's lock, and the gate through which rank 0
of a cluster-started launch (one Slurm task per GPU) tells the other ranks whether to train."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from negagent import rundir
from negagent.errors import NegagentError
from negagent.training import launch

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def rank_env(monkeypatch):
    """This process as rank 1 of 2, rank 0's gate on a free port of this machine."""
    port = _free_port()
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port - 1), "WORLD_SIZE": "2", "RANK": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(launch.RankGate, "POLL_S", 1)
    return env


def _hold_lock(run_dir: Path) -> subprocess.Popen:
    code = f"""
        import sys, time
        from negagent import rundir
        with rundir.training_lock({str(run_dir)!r}):
            print("held", flush=True)
            time.sleep(600)
    """
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_process_may_not_train_in_a_locked_run_dir(tmp_path):
    """The lock names its holder; once the holder is killed (SIGKILL: no clean-up ran) it is free."""
    holder = _hold_lock(tmp_path)
    try:
        with pytest.raises(NegagentError) as err:
            with rundir.training_lock(tmp_path):
                pass
        assert str(err.value) == (f"{tmp_path}: pid {holder.pid} on {socket.gethostname()} is training in this run "
                                  "directory; wait for it to end (or stop it) before resuming here")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    with rundir.training_lock(tmp_path):
        assert (tmp_path / "train.lock").read_text() == f"pid {os.getpid()} on {socket.gethostname()}\n"


def test_the_lock_never_truncates_before_it_is_held(tmp_path):
    holder = _hold_lock(tmp_path)
    try:
        with pytest.raises(NegagentError):
            with rundir.training_lock(tmp_path):
                pass
        assert (tmp_path / "train.lock").read_text() == f"pid {holder.pid} on {socket.gethostname()}\n"
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_the_gate_passes_rank_zeros_word(rank_env):
    host = launch.RankGate.open_host()
    threading.Timer(0.5, host.say, args=("train",)).start()
    assert launch.RankGate.join().wait() == {"state": "train", "error": None}
    host.say("ended", error="ignored: the word was said")  # said once; later words are ignored
    assert launch.RankGate.join().wait() == {"state": "train", "error": None}


def test_a_follower_stops_with_rank_zeros_error(rank_env, tmp_path):
    host = launch.RankGate.open_host()
    host.say("ended", error="NegagentError: data.trajectories: no such file")
    with pytest.raises(NegagentError) as err:
        launch.follow_rank_zero(tmp_path)
    assert str(err.value) == "rank 1: not training, rank 0 failed: NegagentError: data.trajectories: no such file"
    assert list(tmp_path.iterdir()) == []  # a follower writes nothing


def test_a_follower_skips_when_rank_zero_ends_without_training(rank_env, tmp_path):
    host = launch.RankGate.open_host()  # held: rank 0's store lives as long as rank 0
    host.say("ended")
    assert launch.follow_rank_zero(tmp_path) == "skipped"


def test_a_follower_stops_when_rank_zero_dies(rank_env):
    """Rank 0 killed before it said anything: the follower stops at once instead of waiting for the
    job's time limit."""
    code = """
        import os, time
        from negagent.training.launch import RankGate
        gate = RankGate.open_host()
        print("open", flush=True)
        time.sleep(2)
        os.kill(os.getpid(), 9)
    """
    host = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "RANK": "0"})
    try:
        assert host.stdout.readline().strip() == "open"
        started = time.monotonic()
        with pytest.raises(NegagentError) as err:
            launch.RankGate.join().wait()
        assert str(err.value) == ("rank 1: rank 0 ended before it said whether to train (its log says why); "
                                  "run the same command again to resume")
        assert time.monotonic() - started < 30
    finally:
        host.kill()
        host.wait(timeout=30)


@pytest.mark.parametrize("gate, nproc, message", [
    (False, 1, "train.py was started as rank 0 of 2 (RANK/WORLD_SIZE are set), but it is one process: use "
               "trainer.nproc_per_node=N on one machine, or a Slurm launcher preset (hydra/launcher=slurm_gpu_node) "
               "that starts one task per GPU"),
    (True, 2, "trainer.nproc_per_node=2, but this member's 2 Slurm tasks are its ranks already; leave "
              "trainer.nproc_per_node at 1 (GPUs per member: hydra.launcher.tasks_per_node)"),
])
def test_rank_zero_of_a_cluster_launch_refuses_what_would_train_twice(monkeypatch, tmp_path, gate, nproc, message):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    said = []
    monkeypatch.setattr(launch, "RANK_GATE", type("Gate", (), {"say": lambda self, s: said.append(s)})() if gate else None)
    with pytest.raises(NegagentError) as err:
        launch.run(tmp_path, {"trainer": {"nproc_per_node": nproc, "deepspeed": "zero3"}})
    assert str(err.value) == message and said == []


def test_started_as_rank_reads_the_launch_contract(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert launch.started_as_rank() is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert launch.started_as_rank() is None
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert launch.started_as_rank() == (3, 4)


def test_a_gate_port_in_use_is_one_line(rank_env):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", int(rank_env["MASTER_PORT"]) + 1))
        taken.listen()
        with pytest.raises(NegagentError) as err:
            launch.RankGate.open_host()
    assert str(err.value).startswith(f"rank 0: cannot open its gate at 127.0.0.1:{int(rank_env['MASTER_PORT']) + 1} "
                                     "(MASTER_PORT + 1; is the port in use?): ")
