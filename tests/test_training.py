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

from negagent.training.tracking import REDACTED
from negagent.trajectory import write_trajectories
from tests.helpers import make_traj

REPO = Path(__file__).resolve().parents[1]
FAKE_SECRET = "sk-negagenttestsecret0123456789"
WAIT_S = 900  # generous wait for a kill point: only a hung run reaches it


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
    """A smoke run leaves the frozen config, manifest, verified adapter, metrics and wandb files; a
    secret given in the config (a key naming one, a value shaped like one) and in the environment
    reaches no file of the run directory, its redaction marker does; the finished run is never
    written into again."""
    run_dir = tmp_path / "smoke"
    # The secret goes into the config: under a key naming a secret (collect.teacher.api_key) and as a
    # key-shaped value under an innocent key (logger.notes); wandb and Hydra both see the config.
    cmd = train_cmd(run_dir, trajectories, "trainer.max_steps=4", "trainer.logging_steps=1", "logger=wandb", "logger.mode=offline",
                    "trainer.gradient_checkpointing=true", f"+collect.teacher.api_key={FAKE_SECRET}", f"+logger.notes={FAKE_SECRET}")
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
    files = [path for path in run_dir.rglob("*") if path.is_file()]
    assert run_dir / ".hydra" / "config.yaml" in files and run_dir / ".hydra" / "overrides.yaml" in files
    for path in files:
        assert FAKE_SECRET.encode() not in path.read_bytes(), f"secret leaked into {path}"
    # Redacted, not dropped: the marker stands where the secret was.
    assert frozen["collect"]["teacher"]["api_key"] == frozen["logger"]["notes"] == REDACTED
    assert frozen["run"]["overrides"][-2:] == [f"+collect.teacher.api_key={REDACTED}", f"+logger.notes={REDACTED}"]
    hydra_copy = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert hydra_copy["collect"]["teacher"]["api_key"] == hydra_copy["logger"]["notes"] == REDACTED
    assert f"+collect.teacher.api_key={REDACTED}" in yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
    wandb_files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(wandb_files) == 1 and REDACTED.encode() in wandb_files[0].read_bytes()

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


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = WAIT_S) -> None:
    """Poll `predicate` until it holds; fail if the run ends first. The timeout only guards against a
    hung run (it is generous; no speed is asserted)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"run ended (exit {proc.returncode}) before it could be killed: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"the run's kill point not reached after {timeout} s: the run hangs")
        time.sleep(0.05)


def checkpoint_saved(checkpoints: Path, step: int) -> bool:
    """Whether `checkpoints/checkpoint-<step>` is completely saved: the Trainer writes trainer_state.json
    last (after weights, optimizer, scheduler and RNG states), so it must read back whole."""
    try:
        return json.loads((checkpoints / f"checkpoint-{step}" / "trainer_state.json").read_text())["global_step"] == step
    except (OSError, ValueError, KeyError):
        return False


def leave_save_unfinished(checkpoint: Path, weights: str) -> None:
    """Make `checkpoint` what a kill during its save leaves: a torn weights file, no trainer_state.json.

    Applied after the kill whether or not the run got that far, so the resume point is the same
    whatever the machine's speed."""
    checkpoint.mkdir(exist_ok=True)
    (checkpoint / "trainer_state.json").unlink(missing_ok=True)
    (checkpoint / weights).write_bytes(b"torn")


def test_killed_run_resumes_to_the_same_final_loss(tmp_path, trajectories):
    """Killed once checkpoint 3 is saved, and (made so) while saving checkpoint 6, the same command
    resumes from checkpoint 3, skipping the unfinished save, and ends with the uninterrupted run's
    final loss and adapter."""
    # LoRA with dropout: the resumed run must restore weights, optimizer, scheduler, data order and RNG.
    overrides = ("trainer.max_steps=8", "trainer.save_steps=3", "trainer.logging_steps=1", "trainer.per_device_batch_size=3")
    whole = run(train_cmd(tmp_path / "whole", trajectories, *overrides))
    assert whole.returncode == 0, whole.stderr[-3000:]
    expected = json.loads((tmp_path / "whole" / "summary.json").read_text())

    cmd = train_cmd(tmp_path / "killed", trajectories, *overrides)
    checkpoints = tmp_path / "killed" / "checkpoints"
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for(lambda: checkpoint_saved(checkpoints, 3), proc)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert not (tmp_path / "killed" / "done").exists()
    leave_save_unfinished(checkpoints / "checkpoint-6", "adapter_model.safetensors")

    resumed = run(cmd)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"note: skipping {checkpoints / 'checkpoint-6'}: its save did not finish" in resumed.stdout
    assert f"resuming from {checkpoints / 'checkpoint-3'}\n" in resumed.stdout
    summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert summary["resumed_from"] == "checkpoint-3" and summary["steps"] == expected["steps"] == 8
    assert summary["final_loss"] == pytest.approx(expected["final_loss"], abs=1e-4)
    a = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    b = load_file(tmp_path / "killed" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() < 1e-5 for k in a)
