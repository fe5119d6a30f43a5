"""Every config composes, and bad group names get one clear line."""

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from negagent.config import CONF_DIR

REPO = Path(__file__).resolve().parents[1]
TASKS = sorted(p.stem for p in (CONF_DIR / "task").glob("*.yaml"))
TAGGINGS = sorted(p.stem for p in (CONF_DIR / "tagging").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("tagging", TAGGINGS)
def test_train_composes_for_every_task_and_tagging(task, tagging):
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        cfg = compose("train", overrides=[f"task={task}", f"tagging={tagging}", "debug=smoke"])
    assert cfg.task.name == task and cfg.tagging.strategy in {"prefix", "suffix", "none", "positive_only", "graded"}
    assert cfg.task.limit_train == 16 and cfg.model.name == "tiny"


@pytest.mark.parametrize("model", MODELS)
def test_every_model_composes(model):
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        cfg = compose("train", overrides=[f"model={model}", "model.path=/x"] if model == "local" else [f"model={model}"])
    assert cfg.model.name


def run(*args, cwd=REPO):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_unknown_group_value_is_one_line():
    result = run("train.py", "task=bogus")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "unknown task 'bogus'" in result.stderr and "arith" in result.stderr


def test_cfg_job_prints_composed_config():
    result = run("train.py", "--cfg", "job", "task=hotpotqa", "tagging=graded")
    assert result.returncode == 0, result.stderr
    assert "name: hotpotqa" in result.stdout and "strategy: graded" in result.stdout


def test_missing_trajectory_file_is_one_line(tmp_path):
    result = run("train.py", "debug=smoke", f"hydra.run.dir={tmp_path}", f"data.trajectories={tmp_path}/nope.jsonl")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: {tmp_path}/nope.jsonl: trajectory file not found"
