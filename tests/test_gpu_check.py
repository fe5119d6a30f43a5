"""benchmarks/gpu_check.sh: it fails loudly without a GPU, never writes into someone's folder, and in its
CPU development mode (`--allow-cpu`) runs every required check through the real entry points.

The end-to-end run takes about 90 s on 2 CPU cores (six entry-point processes, one of them DeepSpeed), so it
runs where NEGAGENT_TEST_DATA is set (CI) and skips elsewhere, saying how to run it.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
REQUIRED = ["collect", "lora_bf16", "full_bf16", "zero3", "packed_sdpa", "eval_hf"]
TRAINING = ["lora_bf16", "full_bf16", "zero3", "packed_sdpa"]


def _run(*args: str, timeout: int, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **env})


def test_without_a_gpu_it_exits_1_with_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    result = _run("--out", str(out), timeout=120, CUDA_VISIBLE_DEVICES="")
    assert result.returncode == 1, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no CUDA GPU visible"), result.stderr[-2000:]
    assert "--allow-cpu" in lines[0]
    assert result.stdout == ""
    assert not out.exists()


def test_a_folder_it_did_not_make_is_refused_and_left_as_it_was(tmp_path):
    out = tmp_path / "someone"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = _run("--allow-cpu", "--out", str(out), timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"gpu_check: error: --out {out} exists, is not empty and was not made by gpu_check; choose a new folder "
        "(nothing was changed)"]
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


def test_error_lines_take_the_last_line_and_the_exception_above_it():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from gpu_check import error_lines
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    stderr = ("Traceback (most recent call last):\n  File \"x.py\", line 1\nValueError: bf16 needs a GPU\n"
              "steps:  50%|#####     | 1/2\rsteps: 100%|##########| 2/2\n"
              "error: training ranks failed (exit 1); the lines above say why\n\n")
    assert error_lines(stderr) == ("error: training ranks failed (exit 1); the lines above say why",
                                   "ValueError: bf16 needs a GPU")
    assert error_lines("ValueError: only this\n") == ("ValueError: only this", None)
    assert error_lines("") == ("(no output on stderr)", None)


@pytest.mark.skipif(not os.environ.get("NEGAGENT_TEST_DATA"),
                    reason="about 90 s on 2 cores: runs in CI (NEGAGENT_TEST_DATA set); "
                           "locally: NEGAGENT_TEST_DATA=. python -m pytest tests/test_gpu_check.py")
def test_cpu_mode_runs_every_required_check_end_to_end(tmp_path):
    out = tmp_path / "gpu_check"
    result = _run("--allow-cpu", "--model", "tiny", "--out", str(out), timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    report = json.loads((out / "gpu_check.json").read_text())
    checks, sizes = report["checks"], report["sizes"]
    assert list(checks) == ["collect", "lora_bf16", "full_bf16", "zero3", "packed_sdpa", "packed_flash_attention_2",
                            "eval_hf", "eval_vllm"]
    assert {name: checks[name]["status"] for name in REQUIRED} == dict.fromkeys(REQUIRED, "ok"), json.dumps(checks)
    assert report["failed"] == [] and report["unavailable"] == ["packed_flash_attention_2", "eval_vllm"]
    assert report["environment"]["cuda_available"] is False and report["environment"]["torch"]
    assert 0 < report["total_seconds"] < 900

    collected = (out / "runs" / "collect" / "trajectories.jsonl").read_text().splitlines()
    assert checks["collect"]["trajectories"] == len(collected) > 0
    for name in TRAINING:
        rec = checks[name]
        assert rec["tokens_per_s"] > 0 and rec["steps"] == sizes["max_steps"] and rec["seconds"] > 0, name
        assert math.isfinite(rec["final_loss"]) and rec["final_loss"] > 0, name
        assert re.fullmatch(r"[0-9a-f]{64}", rec["saved"]["sha256"]) and rec["saved"]["parameters"] > 0, name
        assert rec["bf16"] is False and rec["attn_implementation"] == "sdpa", name
        summary = json.loads((Path(rec["run_dir"]) / "summary.json").read_text())
        assert (summary["tokens_per_s"], summary["saved"]) == (rec["tokens_per_s"], rec["saved"]), name
    assert (checks["lora_bf16"]["method"], checks["full_bf16"]["method"]) == ("lora", "full")
    assert (checks["zero3"]["deepspeed"], checks["packed_sdpa"]["batching"]) == ("zero3", "packed")
    # ZeRO-3's gathered save holds the whole model: as many parameters as the plain full fine-tuning's
    assert checks["zero3"]["saved"]["parameters"] == checks["full_bf16"]["saved"]["parameters"]

    ev = checks["eval_hf"]
    assert ev["subject"] == "the lora_bf16 run" and ev["backend"] == "hf"
    assert ev["episodes"] == sizes["test_questions"] and ev["episodes_per_s"] > 0
    assert ev["basis"].startswith("episode stepping"), ev["basis"]
    assert len((out / "runs" / "eval_hf" / "trajectories.jsonl").read_text().splitlines()) == ev["episodes"]

    for name in ("packed_flash_attention_2", "eval_vllm"):
        assert "needs a CUDA GPU" in checks[name]["reason"]
        assert f"gpu_check: WARNING: {name} unavailable: " in result.stdout
    for name in REQUIRED:
        assert re.search(rf"^gpu_check: \[\d/8\] {name}: OK in [\d.]+ s", result.stdout, re.M), name
    assert result.stdout.rstrip().endswith(f"JSON: {out / 'gpu_check.json'}")
