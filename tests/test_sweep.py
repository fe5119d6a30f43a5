"""Resumable sweeps without a cluster: member identity, done markers, the checks made before anything
is submitted, and composition of every launcher and experiment preset."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from negagent.errors import NegagentError
from negagent.sweep import (Member, check_distinct_dirs, config_hash, finished, last_error_line, mark_done,
                            read_done, show_sweep_config, skip_if_done)

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

CFG = {"seed": 0, "cache_dir": "~/.cache/negagent", "data": {"trajectories": "t.jsonl", "preview": 0},
       "tagging": {"strategy": "prefix", "neg_num": None},
       "model": {"name": "tiny", "cache_dir": "/a", "tokenizer_from": {"cache_dir": "/b"}},
       "logger": {"name": "none"}}


def _with(cfg: dict, dotted: str, value) -> dict:
    import copy

    out = copy.deepcopy(cfg)
    *parents, last = dotted.split(".")
    node = out
    for key in parents:
        node = node[key]
    node[last] = value
    return out


def test_hash_ignores_where_things_are_kept_and_logged():
    base = config_hash(CFG)
    assert base == config_hash(dict(reversed(list(CFG.items()))))  # key order
    for dotted, value in [("cache_dir", "/elsewhere"), ("model.cache_dir", "/x"), ("model.tokenizer_from.cache_dir", "/y"),
                          ("data.preview", 5), ("logger.name", "wandb")]:
        assert config_hash(_with(CFG, dotted, value)) == base, dotted
    assert config_hash({**CFG, "hydra": {"run": {"dir": "x"}}}) == base
    for dotted, value in [("seed", 1), ("tagging.strategy", "none"), ("tagging.neg_num", 10), ("data.trajectories", "u.jsonl")]:
        assert config_hash(_with(CFG, dotted, value)) != base, dotted


def test_done_marker_skip_and_rerun(tmp_path, capsys):
    run = tmp_path / "member"
    assert not finished(run, CFG) and not skip_if_done(run, CFG)  # nothing there: runs
    run.mkdir()
    (run / "metrics.json").write_text("{}")
    mark_done(run, CFG, outputs=["metrics.json"])
    assert read_done(run)["outputs"] == ["metrics.json"]
    assert skip_if_done(run, CFG)
    assert "already finished" in capsys.readouterr().out
    mark_done(run, CFG)  # a second mark (the launcher's after the entry point's) keeps the outputs
    assert read_done(run)["outputs"] == ["metrics.json"]
    (run / "metrics.json").unlink()  # a recorded result went missing: run again
    assert not finished(run, CFG)
    with pytest.raises(NegagentError, match="missing"):
        mark_done(run, CFG, outputs=["metrics.json"])


def test_finished_run_of_another_config_is_never_overwritten(tmp_path):
    mark_done(tmp_path, CFG)
    other = _with(CFG, "tagging.strategy", "none")
    with pytest.raises(NegagentError, match=f"{tmp_path} holds a finished run of a different config"):
        finished(tmp_path, other)


def test_unreadable_done_marker_means_unfinished(tmp_path):
    (tmp_path / "done.json").write_text("{torn")
    assert not finished(tmp_path, CFG)


def test_members_sharing_a_directory_are_refused():
    members = [Member(0, ["tagging=prefix"], "/s/same", "a"), Member(1, ["tagging=none"], "/s/same", "b")]
    with pytest.raises(NegagentError, match=r"#0 \(tagging=prefix\) and #1 \(tagging=none\) would both write to /s/same"):
        check_distinct_dirs(members)
    check_distinct_dirs([Member(0, [], "/s/a", "a"), Member(1, [], "/s/b", "a")])


def test_last_error_line_prefers_the_error(tmp_path):
    log = tmp_path / "x.err"
    log.write_text("loading\nerror: data/t.jsonl:3: bad trajectory record\nbye\n")
    assert last_error_line(None, str(tmp_path / "absent"), str(log)) == "error: data/t.jsonl:3: bad trajectory record"
    log.write_text("Traceback\n  File x\nValueError: boom\n")
    assert last_error_line(str(log)) == "ValueError: boom"


# --------------------------------------------------------------------------- the entry point, before submission

def _train(args: list[str], path: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if path is not None:
        env["PATH"] = path
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_members_writing_to_one_directory_stop_before_submission(tmp_path):
    sweep = tmp_path / "sweep"
    done = _train(["-m", "hydra/launcher=slurm_local", "tagging=prefix,none", f"hydra.sweep.dir={sweep}",
                   "hydra.sweep.subdir=same"])
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "would both write to" in errors[0] and str(sweep / "same") in errors[0]
    assert "Traceback" not in done.stderr
    assert not (sweep / ".submitit").exists()


def test_missing_sbatch_stops_before_submission(tmp_path):
    sweep = tmp_path / "sweep"
    done = _train(["-m", "hydra/launcher=slurm_local", "tagging=prefix,none", f"hydra.sweep.dir={sweep}"],
                  path=str(Path(sys.executable).parent))  # PATH without Slurm's commands
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: sbatch not found on PATH")
    assert "Traceback" not in done.stderr
    assert not (sweep / ".submitit").exists()


# --------------------------------------------------------------------------- presets compose

def _show(argv: list[str], capsys) -> str:
    assert show_sweep_config(argv, CONF, "train", "train")
    return capsys.readouterr().out


def test_show_sweep_config_only_handles_multirun_cfg(capsys):
    assert not show_sweep_config(["tagging=prefix", "--cfg", "job"], CONF, "train", "train")
    assert not show_sweep_config(["-m", "tagging=prefix,none"], CONF, "train", "train")
    with pytest.raises(NegagentError, match="does not compose"):
        show_sweep_config(["-m", "tagging=prefix,nope", "--cfg", "job"], CONF, "train", "train")
    with pytest.raises(NegagentError, match="would both write to"):
        show_sweep_config(["-m", "tagging=prefix,none", "hydra.sweep.subdir=same", "--cfg", "hydra"], CONF, "train", "train")


def test_slurm_sweep_cfg_hydra_composes(capsys):
    out = _show(["-m", "hydra/launcher=slurm_local", "tagging=prefix,none", "--cfg", "hydra"], capsys)
    shown = yaml.safe_load(out)
    launcher = shown["hydra"]["launcher"]
    assert launcher["_target_"] == "hydra_plugins.negagent_launcher.slurm_launcher.SlurmLauncher"
    assert launcher["partition"] == "local"
    assert out.startswith("# sweep of 2 members")
    assert "# member #0: tagging=prefix" in out and "# member #1: tagging=none" in out


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONF / "hydra" / "launcher").glob("*.yaml")))
def test_launcher_presets_compose(preset, capsys):
    out = _show(["-m", f"hydra/launcher={preset}", "tagging=prefix,none", "--cfg", "hydra", "--resolve"], capsys)
    launcher = yaml.safe_load(out)["hydra"]["launcher"]
    assert launcher["_target_"].startswith("hydra_plugins.negagent_launcher.")
    if launcher.get("gpus_per_node"):
        assert launcher["tasks_per_node"] == launcher["gpus_per_node"]  # one task per GPU
        assert launcher["additional_parameters"]["requeue"] is True
        assert launcher["max_num_timeout"] > 0


EXPERIMENT_MEMBERS = {"cpu_demo": 8, "cpu_demo_two_step": 8, "quickstart": 1, "math_7b": 6, "math_13b": 6, "math_negatives": 28, "tag_wording": 4,
                      "hotpotqa": 15, "hotpotqa_graded": 6, "strategyqa": 3, "paper_base": 1}


def test_every_experiment_preset_is_listed():
    assert set(EXPERIMENT_MEMBERS) == {p.stem for p in (CONF / "experiment").glob("*.yaml")}


@pytest.mark.parametrize("preset", sorted(EXPERIMENT_MEMBERS))
def test_experiment_presets_compose(preset, capsys):
    out = _show(["-m", f"experiment={preset}", "--cfg", "all", "--resolve"], capsys)
    docs = out.split("# member #")[1:]
    assert len(docs) == EXPERIMENT_MEMBERS[preset]
    configs = [yaml.safe_load(doc.split("\n", 1)[1]) for doc in docs]
    dirs = [c["hydra"]["runtime"]["output_dir"] for c in configs]
    assert len(set(dirs)) == len(dirs)  # every member its own run directory
    if preset not in ("paper_base", "quickstart"):  # fixed sweep dir per sweep preset: the same command resumes
        assert {str(Path(d).parent.relative_to(REPO)) for d in dirs} == {f"multirun/{preset}"}
        assert all("experiment=" not in Path(d).name for d in dirs)
    if preset.startswith(("math", "tag_", "hotpotqa", "strategyqa")):
        assert {c["trainer"]["name"] for c in configs} == {"paper"}
        assert all(c["trainer"]["evaluate_after"] for c in configs)
    if preset == "math_13b":
        assert {c["model"]["name"] for c in configs} == {"llama2_13b_chat"}
    if preset == "tag_wording":
        assert len({(c["tagging"]["positive"], c["tagging"]["negative"]) for c in configs}) == 4  # four wordings
    if preset == "math_negatives":
        assert sorted({c["tagging"]["neg_num"] for c in configs}) == list(range(0, 12001, 2000))


def test_train_multirun_cfg_hydra_composes():
    done = _train(["-m", "hydra/launcher=slurm_local", "tagging=prefix,none", "--cfg", "hydra"])
    assert done.returncode == 0, done.stderr
    assert "negagent_launcher.slurm_launcher.SlurmLauncher" in done.stdout and "# member #1: tagging=none" in done.stdout
