"""Every config composes to what its file says, and bad group names get one clear line."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from negagent.config import CONF_DIR, check_group_overrides
from negagent.errors import NegagentError
from tests.helpers import assert_one_line_error

REPO = Path(__file__).resolve().parents[1]
TASKS = sorted(p.stem for p in (CONF_DIR / "task").glob("*.yaml"))
TAGGINGS = sorted(p.stem for p in (CONF_DIR / "tagging").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
# The strategy each tagging preset trains with: the wording ablations and controls are prefix tags.
STRATEGY = {"a_b": "prefix", "correct_incorrect": "prefix", "good_bad": "prefix", "graded": "graded", "inverted": "prefix",
            "none": "none", "positive_only": "positive_only", "prefix": "prefix", "random_strings": "prefix",
            "suffix": "suffix", "nat": "prefix", "nat_graded": "graded"}
PREFIX_TAGS = ("Generate a trajectory that solves the question correctly.", "Generate a trajectory that fails to solve the question.")


def _own_keys(group: str, name: str) -> dict:
    """A preset's own keys (without its defaults list)."""
    own = yaml.safe_load((CONF_DIR / group / f"{name}.yaml").read_text()) or {}
    own.pop("defaults", None)
    return own


def test_every_tagging_preset_is_listed():
    assert set(STRATEGY) == set(TAGGINGS)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("tagging", TAGGINGS)
def test_train_composes_for_every_task_and_tagging(task, tagging):
    """Each task with each tagging preset composes: the preset's strategy and its own tag wording
    (prefix's where it names none), and the smoke settings on top."""
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        cfg = compose("train", overrides=[f"task={task}", f"tagging={tagging}", "debug=smoke"])
    assert cfg.task.name == task and cfg.tagging.strategy == STRATEGY[tagging]
    own = _own_keys("tagging", tagging)
    tags = OmegaConf.to_container(cfg.tagging, resolve=False)  # nat* read their wording from a prompt file when resolved
    assert (tags["positive"], tags["negative"]) == (own.get("positive", PREFIX_TAGS[0]), own.get("negative", PREFIX_TAGS[1]))
    assert cfg.task.limit_train == 16 and cfg.model.name == "tiny"


@pytest.mark.parametrize("model", MODELS)
def test_every_model_composes(model):
    """Each model preset composes under its own name with its own keys."""
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        cfg = compose("train", overrides=[f"model={model}", "model.path=/x"] if model == "local" else [f"model={model}"])
    assert cfg.model.name == model
    composed, own = OmegaConf.to_container(cfg.model), _own_keys("model", model)
    if model == "local":
        assert composed["path"] == "/x"
        own["path"] = "/x"
    assert {key: composed[key] for key in own} == own


def run(*args, cwd=REPO):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("argv, message", [
    (["task=bogus"], "unknown task 'bogus' (in {conf}/task); choose one of: " + ", ".join(TASKS)),
    (["tagging=prefix,nope"], "unknown tagging 'nope' (in {conf}/tagging); choose one of: " + ", ".join(TAGGINGS)),
    (["+model=tyni"], "unknown model 'tyni' (in {conf}/model); choose one of: " + ", ".join(MODELS)),
    (["seed=1", "~tagging=bad"], "unknown tagging 'bad' (in {conf}/tagging); choose one of: " + ", ".join(TAGGINGS)),
])
def test_unknown_group_values_are_named_with_the_choices(argv, message):
    """A group override naming no preset (also in a sweep list, or added / deleted) lists the choices."""
    with pytest.raises(NegagentError) as info:
        check_group_overrides(argv)
    assert str(info.value) == message.format(conf=CONF_DIR)


@pytest.mark.parametrize("argv", [
    ["task=arith", "tagging=prefix,none,graded"],
    ["model=null"],  # removes the group
    ["hydra/launcher=anything", "hydra.run.dir=x"],  # Hydra's own groups are Hydra's to check
    ["task.name=bogus", "nogroup=x", "--cfg", "job"],  # keys and unknown groups are not presets
])
def test_known_or_foreign_overrides_pass(argv):
    """Existing presets, null, Hydra's groups, config keys and flags are left alone."""
    check_group_overrides(argv)


def test_unknown_group_value_is_one_line():
    """train.py says so in exactly one line, before Hydra's multi-line message."""
    result = run("train.py", "task=bogus")
    assert_one_line_error(result, "unknown task 'bogus'", "choose one of: " + ", ".join(TASKS))
    assert result.stderr.strip().count("\n") == 0


def test_cfg_job_prints_composed_config():
    """--cfg job prints the composed config, groups applied, and runs nothing."""
    result = run("train.py", "--cfg", "job", "task=hotpotqa", "tagging=graded")
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert (shown["task"]["name"], shown["tagging"]["strategy"]) == ("hotpotqa", "graded")
    assert shown["tagging"]["grade_tags"] == _own_keys("tagging", "graded")["grade_tags"]
    assert "hydra" not in shown


def test_missing_trajectory_file_is_one_line(tmp_path):
    """A trajectory file that is not there is the last and only error line, naming the file."""
    result = run("train.py", "debug=smoke", f"hydra.run.dir={tmp_path}", f"data.trajectories={tmp_path}/nope.jsonl")
    line = assert_one_line_error(result, f"{tmp_path}/nope.jsonl: trajectory file not found")
    assert result.stderr.strip().splitlines()[-1] == line == f"error: {tmp_path}/nope.jsonl: trajectory file not found"
