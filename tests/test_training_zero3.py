"""A real DeepSpeed ZeRO-3 job on 2 CPU ranks (DS_ACCELERATOR=cpu), killed mid-way and resumed.

Checks: the ranks train on disjoint samples, parameters are partitioned, the loss falls, the resumed
run recomputes the step after its checkpoint with the same loss (weights and optimizer restored),
and the final save is gathered and verified (count and checksum equal to the in-memory model).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from negagent.training.checkpoint import tensor_digest
from negagent.trajectory import write_trajectories
from tests.helpers import make_traj
from tests.test_training import REPO, WAIT_S, _wait_for, checkpoint_saved, leave_save_unfinished

N_SAMPLES = 24  # 2 ranks x 3 micro-batches of 4 per epoch


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPU cores for 2 ranks")
# Full fine-tuning under ZeRO-3 on 2 ranks (one member of two Slurm tasks, requeued and resumed) is
# tests/test_slurm.py's; here the torchrun path (trainer.nproc_per_node=2) trains a LoRA adapter.
@pytest.mark.parametrize("method,lr", [("lora", "1e-2")])
def test_zero3_two_ranks_disjoint_partitioned_resumed_and_verified(tmp_path, method, lr):
    trajectories = tmp_path / "arith.jsonl"
    write_trajectories(trajectories, [make_traj(i, i % 3 != 0, turns=2 + i % 3) for i in range(N_SAMPLES)])
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "train.py", "debug=smoke", f"data.trajectories={trajectories}", f"hydra.run.dir={run_dir}",
           "trainer=zero3", "trainer.nproc_per_node=2", f"trainer.method={method}", f"trainer.lr={lr}",
           "trainer.max_steps=-1", "trainer.epochs=2", "trainer.save_steps=3", "trainer.logging_steps=1", "trainer.lora.dropout=0"]

    # First attempt: killed (the whole process group, ranks included) once checkpoint 3 is saved and
    # step 4 is logged; then its checkpoint 6 is made what a kill during that save leaves, so the
    # resume point is checkpoint 3 however far the run got before the signal landed.
    checkpoints = run_dir / "checkpoints"
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for(lambda: checkpoint_saved(checkpoints, 3) and any(m.get("step") == 4 and "loss" in m for m in _metrics(run_dir)),
                  proc)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert not (run_dir / "done").exists()
    killed_step4 = next(m["loss"] for m in _metrics(run_dir) if m.get("step") == 4 and "loss" in m)
    leave_save_unfinished(checkpoints / "checkpoint-6", "latest")

    resumed = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=WAIT_S)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert (run_dir / "done").is_file()
    assert f"note: skipping {checkpoints / 'checkpoint-6'}: its save did not finish" in resumed.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"] == "checkpoint-3" and summary["steps"] == 6 and summary["ranks"] == 2

    # The step after the checkpoint, recomputed from restored weights and optimizer state, matches.
    losses = [m for m in _metrics(run_dir) if "loss" in m]
    recomputed_step4 = [m["loss"] for m in losses if m["step"] == 4][-1]
    assert recomputed_step4 == pytest.approx(killed_step4, abs=1e-4)
    first, last = losses[0]["loss"], losses[-1]["loss"]
    assert last < first - 0.05, (first, last)

    # Disjoint samples: per step, and over the first epoch the ranks split all samples between them.
    orders = []
    for rank in (0, 1):
        lines = [json.loads(line) for line in (run_dir / "ranks" / f"rank{rank}.order.jsonl").read_text().splitlines()]
        orders.append({line["step"]: set(line["samples"]) for line in lines})
    for step in orders[0]:
        assert not orders[0][step] & orders[1][step], step
    epoch0 = [set().union(*(order[s] for s in (0, 1, 2))) for order in orders]
    assert not epoch0[0] & epoch0[1] and epoch0[0] | epoch0[1] == set(range(N_SAMPLES))

    # Partitioned: each rank holds only a shard of the parameters.
    facts = [json.loads((run_dir / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    for fact in facts:
        assert fact["world_size"] == 2 and fact["deepspeed"] == "zero3"
        assert 0 < fact["local_param_elements"] <= fact["param_elements"] // 2 + 1024

    # The final save is complete: reload it and recompute count and checksum.
    name = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    saved = load_file(run_dir / name)
    count, checksum = tensor_digest(saved)
    assert summary["saved"] == {"kind": "adapter" if method == "lora" else "model", "parameters": count, "sha256": checksum}
    assert all(t.abs().sum() > 0 for k, t in saved.items() if "lora_B" in k), "LoRA B weights lost (still zero)"
