"""train.py end to end on the tiny model: run directory contents, logging, bad input, kill and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from negagent.trajectory import write_trajectories
from tests.helpers import make_traj

REPO = Path(__file__).resolve().parents[1]
FAKE_SECRET = "sk-negagenttestsecret0123456789"


@pytest.fixture(scope="module")
def trajectories(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "arith.jsonl"
    write_trajectories(path, [make_traj(i, i % 3 != 0, turns=2 + i % 3) for i in range(24)])
    return path


def train_cmd(run_dir: Path, trajectories: Path, *overrides: str) -> list[str]:
    return [sys.executable, "train.py", "debug=smoke", f"data.trajectories={trajectories}", f"hydra.run.dir={run_dir}", *overrides]


def run(cmd: list[str], timeout: int = 600, **env) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env={**os.environ, **env})


def test_smoke_run_writes_config_manifest_and_verified_safetensors(tmp_path, trajectories):
    run_dir = tmp_path / "smoke"
    cmd = train_cmd(run_dir, trajectories, "trainer.max_steps=4", "trainer.logging_steps=1", "logger=wandb", "logger.mode=offline",
                    "trainer.gradient_checkpointing=true")
    result = run(cmd, OPENAI_API_KEY=FAKE_SECRET, WANDB_API_KEY=FAKE_SECRET)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "config.yaml").is_file() and (run_dir / "manifest.json").is_file() and (run_dir / "done").is_file()
    assert list(run_dir.glob("*.safetensors")) == [run_dir / "adapter_model.safetensors"]
    assert (run_dir / "tokenizer.json").is_file() and (run_dir / "adapter_config.json").is_file()
    frozen = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert frozen["model"]["name"] == "tiny" and frozen["run"]["name"].startswith("debug=smoke,")
    assert "seed" not in frozen["run"]["group"]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["samples"]["positive"]["samples"] == 16 and manifest["samples"]["negative"]["samples"] == 8
    assert len(manifest["trajectories_sha256"]) == 64 and len(manifest["samples_sha256"]) == 64
    summary = json.loads((run_dir / "summary.json").read_text())
    saved = load_file(run_dir / "adapter_model.safetensors")
    assert summary["steps"] == 4 and summary["saved"]["parameters"] == sum(t.numel() for t in saved.values())
    assert summary["tokens_per_s"] > 0 and summary["trained_tokens"] > 0
    assert summary["activation_checkpointing"] is True  # the config's switch reaches the model
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4]
    assert list((run_dir / "wandb").glob("offline-run-*")), "wandb offline run missing"
    assert not list(run_dir.glob("checkpoints")), "checkpoints are removed once the final save is verified"
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert FAKE_SECRET.encode() not in path.read_bytes(), f"secret leaked into {path}"

    # The same command again: a finished run is never written into.
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    again = run(cmd)
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert again.stderr.strip().splitlines()[-1] == f"error: {run_dir}: a finished run is already there; choose a new hydra.run.dir"
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == before


def _bad(tmp_path, trajectories, *overrides):
    result = run(train_cmd(tmp_path / "bad", trajectories, *overrides), timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "bad" / "config.yaml").exists()
    return result.stderr.strip().splitlines()[-1]


def test_unknown_deepspeed_stage_is_one_line(tmp_path, trajectories):
    line = _bad(tmp_path, trajectories, "trainer.deepspeed=zero4")
    assert line == "error: trainer.deepspeed='zero4' is not a DeepSpeed setting; choose null or one of: zero2, zero3, zero3_offload"


def test_more_ranks_than_the_machine_has_is_one_line(tmp_path, trajectories):
    line = _bad(tmp_path, trajectories, "trainer.nproc_per_node=4096")
    assert line.startswith("error: trainer.nproc_per_node=4096 but this machine has ")


def test_trajectory_file_of_another_task_is_one_line(tmp_path):
    other = tmp_path / "hotpot.jsonl"
    trajs = [make_traj(i, True) for i in range(3)]
    for t in trajs:
        t.task = "hotpotqa"
    write_trajectories(other, trajs)
    line = _bad(tmp_path, other)
    assert line.startswith(f"error: {other}:1: trajectory is for task 'hotpotqa', but this run's task is 'arith'")


def test_model_that_cannot_be_found_offline_is_one_line(tmp_path, trajectories):
    line = _bad(tmp_path, trajectories, "model=local", f"model.path={tmp_path}/no-such-model")
    assert line == f"error: {tmp_path}/no-such-model: no model here (config.json missing); set model.path"


def _wait_for(predicate, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"run ended (exit {proc.returncode}) before it could be killed: {proc.stderr.read()[-2000:]}")
        if time.time() > deadline:
            raise AssertionError("run did not reach its first checkpoint in time")
        time.sleep(0.2)


def test_killed_run_resumes_to_the_same_final_loss(tmp_path, trajectories):
    # LoRA with dropout: the resumed run must restore weights, optimizer, scheduler, data order and RNG.
    overrides = ("trainer.max_steps=8", "trainer.save_steps=3", "trainer.logging_steps=1", "trainer.per_device_batch_size=3")
    whole = run(train_cmd(tmp_path / "whole", trajectories, *overrides))
    assert whole.returncode == 0, whole.stderr[-3000:]
    expected = json.loads((tmp_path / "whole" / "summary.json").read_text())

    cmd = train_cmd(tmp_path / "killed", trajectories, *overrides)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    state = tmp_path / "killed" / "checkpoints" / "checkpoint-3" / "trainer_state.json"
    try:
        _wait_for(state.is_file, proc, timeout=400)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert not (tmp_path / "killed" / "done").exists()

    resumed = run(cmd)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert summary["resumed_from"] is not None and summary["steps"] == expected["steps"] == 8
    assert summary["final_loss"] == pytest.approx(expected["final_loss"], abs=1e-4)
    a = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    b = load_file(tmp_path / "killed" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() < 1e-5 for k in a)
