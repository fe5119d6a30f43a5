"""Collection from a real `transformers serve` (the OpenAI-compatible server in transformers) on
127.0.0.1, directly and through a proxy injecting 429s, 500s and stalls; and no API key on disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from negagent.collection.collect import collect
from negagent.trajectory import load_trajectories
from tests.helpers import TINY_MODEL, assert_one_line_error
from tests.servers import FaultProxy, save_model_dir, transformers_serve

REPO = Path(__file__).resolve().parents[1]
CANARY = "sk-negagent-canary-7f3a9c1e5b2d4086"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base URL, model name) of `transformers serve` running the tiny model offline."""
    model_dir = save_model_dir(TINY_MODEL, tmp_path_factory.mktemp("served") / "tiny")
    with transformers_serve(model_dir) as base_url:
        yield base_url, str(model_dir)  # the server names a local model by its path


def test_collects_from_transformers_serve_and_no_key_lands_on_disk(served, tmp_path):
    base_url, model = served
    out = tmp_path / "run"
    args = ["task=arith", "task.limit_train=2", "task.max_turns=2", "protocol=paper", "backend@teacher=openai",
            f"teacher.base_url={base_url}", f"teacher.model={model}", "teacher.api_key_env=NEGAGENT_CANARY_KEY",
            "generation.max_new_tokens=16", f"hydra.run.dir={out}"]
    result = subprocess.run([sys.executable, "generate.py", *args], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "NEGAGENT_CANARY_KEY": CANARY})
    assert result.returncode == 0, result.stderr[-3000:]
    episodes, _ = load_trajectories(out / "episodes.jsonl", task="arith")
    assert sorted(t.id for t in episodes) == sorted(f"arith-train-0-{q}-s{s}" for q in (0, 1) for s in range(3))
    assert {t.provenance["temperature"] for t in episodes} == {0.2, 0.5, 0.7}
    for traj in episodes:  # labelled by the task's scoring, whatever the random model wrote
        assert traj.reward is False and traj.failure in {"parse_error", "wrong_answer", "max_steps", "tool_error"}
    stats = json.loads((out / "stats.json").read_text())
    usage = stats["this_run"]["teacher_usage"]
    # One request per model turn, plus the preflight probe; no fault, so no retry.
    turns = sum(m["role"] == "assistant" for t in episodes for m in t.messages)
    assert (usage["requests"], usage["retries"]) == (1 + turns, 0)
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0  # a sampling model: counts vary
    # The key reached the server (as a header) and nowhere else: not the config dumps, logs,
    # trajectories or stats, nor anything printed.
    written = sorted(p for p in out.rglob("*") if p.is_file())
    assert [p.relative_to(out).as_posix() for p in written] == [
        ".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "collection.json", "episodes.jsonl",
        "generate.log", "stats.json", "trajectories.jsonl"]
    for path in written:
        assert CANARY not in path.read_text(errors="replace"), path
    assert CANARY not in result.stdout + result.stderr


def test_fault_proxy_in_front_of_transformers_serve(served, tmp_path):
    """429s and 500s between the client and a real server are retried and counted exactly.

    Stalls (timeouts) are left to test_generate's proxy test: here a loaded machine can make an
    honest answer of the real server as slow as a stall, and the counts would depend on timing."""
    base_url, model = served
    with FaultProxy(base_url, rate=0.4, seed=1, kinds=("429", "500")) as proxy:
        cfg = {
            "task": {"name": "arith", "data_dir": None, "n_train": 4, "max_turns": 2},
            "teacher": {"name": "openai", "base_url": proxy.base_url, "model": model, "api_key_env": None,
                        "concurrency": 4, "timeout_s": 300, "max_retries": 12, "backoff_s": 0.05,
                        "max_backoff_s": 0.5},
            "protocol": {"name": "one", "temperatures": [0.7], "keep": "all"},
            "generation": {"max_new_tokens": 16, "progress": False},
        }
        stats = collect(cfg, tmp_path)
    assert stats["episodes"]["total"] == 4  # every episode completed
    usage = stats["this_run"]["teacher_usage"]
    assert proxy.faults["429"] >= 1 and proxy.faults["500"] >= 1, proxy.faults
    # Every injected fault is retried once and named by its reason; nothing else is retried.
    assert usage["retry_reasons"] == {"429": proxy.faults["429"], "5xx": proxy.faults["500"]}
    assert usage["retries"] == sum(proxy.faults.values())
    assert usage["requests"] == proxy.forwarded + sum(proxy.faults.values())
    episodes, _ = load_trajectories(tmp_path / "episodes.jsonl")
    assert proxy.forwarded == 1 + sum(m["role"] == "assistant" for t in episodes for m in t.messages)  # probe + turns
    assert json.loads((tmp_path / "stats.json").read_text())["this_run"]["teacher_usage"]["retries"] == usage["retries"]


def test_model_the_server_does_not_know(served, tmp_path):
    base_url, _ = served
    result = subprocess.run(
        [sys.executable, "generate.py", "backend@teacher=openai", f"teacher.base_url={base_url}", "teacher.model=no-such-model",
         "teacher.api_key_env=null", f"hydra.run.dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert_one_line_error(result, "does not serve this model", "no-such-model")
    assert not (tmp_path / "episodes.jsonl").exists()
