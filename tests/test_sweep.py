"""Resumable sweeps without a cluster: member identity, done markers, the checks made before anything
is submitted, and composition of every launcher and experiment preset."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from negagent.errors import NegagentError
from negagent.rundir import read_finished
from negagent.sweep import (SweepMember, check_distinct_dirs, check_partition, check_sbatch, config_hash, finished, identity,
                            last_error_line, mark_done, member_dir, queued_job_ids, show_sweep_config,
                            skip_if_done, slurm_partitions, write_status)
from tests.helpers import assert_one_line_error

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


def test_identity_drops_where_things_are_kept_and_logged():
    """The identity is the config without hydra, logger, data.preview and every cache_dir."""
    assert identity({**CFG, "hydra": {"run": {"dir": "x"}}}) == {
        "seed": 0, "data": {"trajectories": "t.jsonl"}, "tagging": {"strategy": "prefix", "neg_num": None},
        "model": {"name": "tiny", "tokenizer_from": {}}}
    assert identity({"runs": [{"cache_dir": "/a", "n": 1}], "data": "not a mapping"}) == {"runs": [{"n": 1}], "data": "not a mapping"}
    assert CFG["model"]["cache_dir"] == "/a"  # the caller's config is not changed


def test_hash_is_sha256_of_the_canonical_identity():
    """16 hex digits of sha256 over the identity as sorted, compact JSON; key order does not matter."""
    canonical = json.dumps(identity(CFG), sort_keys=True, separators=(",", ":"))
    assert config_hash(CFG) == hashlib.sha256(canonical.encode()).hexdigest()[:16]
    assert config_hash(dict(reversed(list(CFG.items())))) == config_hash(CFG)
    assert config_hash(OmegaConf.create(CFG)) == config_hash(CFG)


@pytest.mark.parametrize("dotted, value", [("cache_dir", "/elsewhere"), ("model.cache_dir", "/x"),
                                           ("model.tokenizer_from.cache_dir", "/y"), ("data.preview", 5),
                                           ("logger.name", "wandb")])
def test_hash_ignores_where_things_are_kept_and_logged(dotted, value):
    assert config_hash(_with(CFG, dotted, value)) == config_hash(CFG)


@pytest.mark.parametrize("dotted, value", [("seed", 1), ("tagging.strategy", "none"), ("tagging.neg_num", 10),
                                           ("data.trajectories", "u.jsonl"), ("model.name", "other")])
def test_hash_changes_with_what_decides_a_result(dotted, value):
    assert config_hash(_with(CFG, dotted, value)) != config_hash(CFG)


def test_done_marker_skip_and_rerun(tmp_path, capsys):
    run = tmp_path / "member"
    assert not finished(run, CFG) and not skip_if_done(run, CFG)  # nothing there: runs
    run.mkdir()
    (run / "metrics.json").write_text("{}")
    assert mark_done(run, CFG, outputs=["metrics.json"]) == run / "done.json"
    record = read_finished(run)
    assert datetime.fromisoformat(record.pop("finished_at")).tzinfo == timezone.utc
    assert record == {"config_hash": config_hash(CFG), "outputs": ["metrics.json"], "attempt": None}
    assert skip_if_done(run, CFG)
    assert capsys.readouterr().out == f"skip: {run} already finished (config {config_hash(CFG)})\n"
    (run / "log.txt").write_text("")
    mark_done(run, CFG, outputs=["log.txt"], attempt="123_0")  # the launcher's mark after the entry point's
    assert (read_finished(run)["outputs"], read_finished(run)["attempt"]) == (["log.txt", "metrics.json"], "123_0")
    mark_done(run, CFG)  # a later mark keeps the outputs and the attempt
    assert (read_finished(run)["outputs"], read_finished(run)["attempt"]) == (["log.txt", "metrics.json"], "123_0")
    (run / "metrics.json").unlink()  # a recorded result went missing: run again
    assert not finished(run, CFG)
    with pytest.raises(NegagentError) as info:
        mark_done(run, CFG, outputs=["metrics.json", "log.txt", "model.bin"])
    assert str(info.value) == f"cannot mark {run} done: metrics.json, model.bin missing"


def test_finished_run_of_another_config_is_never_overwritten(tmp_path):
    mark_done(tmp_path, CFG)
    other = _with(CFG, "tagging.strategy", "none")
    with pytest.raises(NegagentError) as info:
        finished(tmp_path, other)
    assert str(info.value) == (f"{tmp_path} holds a finished run of a different config (done.json: {config_hash(CFG)}, "
                               f"this run: {config_hash(other)}); choose another output directory or remove that one")
    mark_done(tmp_path, other)  # marking with another config replaces the record, outputs and all
    assert read_finished(tmp_path)["config_hash"] == config_hash(other) and finished(tmp_path, other)


@pytest.mark.parametrize("content", ["{torn", "[1, 2]", '{"outputs": []}', ""])
def test_unreadable_done_marker_means_unfinished(tmp_path, content):
    """A torn, foreign or hashless done.json is no finished run: the member runs again."""
    (tmp_path / "done.json").write_text(content)
    assert read_finished(tmp_path) is None and not finished(tmp_path, CFG)


def test_members_sharing_a_directory_are_refused():
    members = [SweepMember(0, ["tagging=prefix"], "/s/same", "a"), SweepMember(1, ["tagging=none"], "/s/same", "b")]
    with pytest.raises(NegagentError, match=r"#0 \(tagging=prefix\) and #1 \(tagging=none\) would both write to /s/same"):
        check_distinct_dirs(members)
    check_distinct_dirs([SweepMember(0, [], "/s/a", "a"), SweepMember(1, [], "/s/b", "a")])


@pytest.mark.parametrize("logs, line", [
    (["loading\nerror: data/t.jsonl:3: bad trajectory record\nbye\n"], "error: data/t.jsonl:3: bad trajectory record"),
    (["error: first\nerror: second\n"], "error: second"),
    (["Traceback\n  File x\nValueError: boom\n"], "ValueError: boom"),
    (["x\nsubmitit.core.JobException: job died\n  \n"], "submitit.core.JobException: job died"),
    (["step 1\nstep 2\n\n"], "step 2"),  # no error line: the last line
    (["\n  \n", "error: in the second log\n"], "error: in the second log"),  # an empty log is skipped
    ([None, "error: after a missing log\n"], "error: after a missing log"),
    (["", None], None),
])
def test_last_error_line_prefers_the_error(tmp_path, logs, line):
    """The line a failed member is reported by: its log's last error, else its last line."""
    paths = [None]
    for i, text in enumerate(logs):
        path = tmp_path / f"{i}.err"
        if text is not None:
            path.write_text(text)
        paths.append(str(path))
    assert last_error_line(*paths) == line


def test_write_status_lists_every_member_in_order(tmp_path):
    """sweep.json: the sweep dir and every member, by index, with status, run dir, job and logs."""
    members = [SweepMember(1, ["seed=1"], "/s/1", "b", status="failed", job_id="7_1", log_err="/s/1.err", error="error: x"),
               SweepMember(0, ["seed=0"], "/s/0", "a", status="skipped")]
    assert write_status(tmp_path, members) == tmp_path / "sweep.json"
    assert json.loads((tmp_path / "sweep.json").read_text()) == {"sweep_dir": str(tmp_path), "members": [
        {"index": 0, "overrides": ["seed=0"], "run_dir": "/s/0", "config_hash": "a", "status": "skipped", "job_id": None,
         "log_out": None, "log_err": None, "error": None},
        {"index": 1, "overrides": ["seed=1"], "run_dir": "/s/1", "config_hash": "b", "status": "failed", "job_id": "7_1",
         "log_out": None, "log_err": "/s/1.err", "error": "error: x"}]}


def test_member_label_and_dir():
    """A member is shown by its index and non-hydra overrides; its run dir is sweep dir / subdir."""
    assert SweepMember(3, ["hydra.job.num=3", "seed=1", "tagging=none"], "/r", "h").label == "#3 (seed=1 tagging=none)"
    assert SweepMember(0, [], "/r", "h").label == "#0 (no overrides)"
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": "multirun/x", "subdir": "seed=1"}}})
    assert member_dir(cfg) == os.path.abspath("multirun/x/seed=1")


# --------------------------------------------------------------------------- Slurm's client commands

@pytest.fixture
def slurm_bin(tmp_path, monkeypatch):
    """A folder first on PATH for fake Slurm commands: write(name, script body)."""
    folder = tmp_path / "bin"
    folder.mkdir()
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")

    def write(name: str, body: str) -> None:
        path = folder / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)

    return write


def test_partitions_and_queue_from_slurm(slurm_bin):
    """sinfo's partitions without the default star; squeue's job ids one per array task."""
    slurm_bin("sinfo", 'test "$*" = "-h -o %P" && printf "local*\\ngpu\\n\\ngpu\\n"')
    slurm_bin("squeue", 'test "$*" = "-h -r -o %i" && printf "12_0\\n 12_1 \\n13\\n"')
    assert slurm_partitions() == ["gpu", "local"]
    check_partition("local,gpu")
    check_partition(None)
    assert queued_job_ids() == {"12_0", "12_1", "13"}
    with pytest.raises(NegagentError) as info:
        check_partition("gpu,big")
    assert str(info.value) == "partition 'big' (hydra.launcher.partition) does not exist on this cluster; it has: gpu, local"


def test_no_partition_named_asks_nothing(slurm_bin):
    slurm_bin("sinfo", "exit 1")
    check_partition("")  # the default partition: sinfo is not asked


@pytest.mark.parametrize("script, message", [
    (None, "sinfo not found on PATH: Slurm's client commands are needed for a Slurm sweep"),
    ('echo "sinfo: error: first" >&2; echo "slurm_load_partitions: Unable to contact slurm controller" >&2; exit 1',
     "sinfo -h -o %P failed: slurm_load_partitions: Unable to contact slurm controller"),
    ("exit 3", "sinfo -h -o %P failed: no message"),
    ("exec sleep 30", "sinfo -h -o %P did not answer within 0.2s: is slurmctld up?"),
])
def test_slurm_command_failures_are_one_line(slurm_bin, monkeypatch, script, message):
    """A missing, failing or hanging Slurm command is a user error naming the command."""
    monkeypatch.setattr("negagent.sweep.SLURM_TIMEOUT_S", 0.2)
    if script is None:
        monkeypatch.setenv("PATH", "/nonexistent")
    else:
        slurm_bin("sinfo", script)
    with pytest.raises(NegagentError) as info:
        slurm_partitions()
    assert str(info.value) == message


def test_squeue_that_does_not_answer_means_unknown(slurm_bin, caplog):
    """While waiting on jobs, a failed squeue is a warning and an unknown queue, not an error."""
    slurm_bin("squeue", "echo down >&2; exit 1")
    assert queued_job_ids() is None
    assert caplog.messages == ["squeue -h -r -o %i failed: down; still waiting"]


def test_check_sbatch(slurm_bin, monkeypatch):
    slurm_bin("sbatch", "exit 0")
    check_sbatch()
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(NegagentError, match="^sbatch not found on PATH: submit from a Slurm login node"):
        check_sbatch()


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
    assert_one_line_error(done, "sweep members #0 (tagging=prefix) and #1 (tagging=none) would both write to "
                                f"{sweep / 'same'}; make hydra.sweep.subdir distinct per member")
    assert not (sweep / ".submitit").exists()


def test_missing_sbatch_stops_before_submission(tmp_path):
    sweep = tmp_path / "sweep"
    done = _train(["-m", "hydra/launcher=slurm_local", "tagging=prefix,none", f"hydra.sweep.dir={sweep}"],
                  path=str(Path(sys.executable).parent))  # PATH without Slurm's commands
    line = assert_one_line_error(done, "sbatch not found on PATH: submit from a Slurm login node")
    assert done.stderr.strip().splitlines()[-1] == line
    assert not (sweep / ".submitit").exists()


# --------------------------------------------------------------------------- presets compose

def _show(argv: list[str], capsys) -> str:
    assert show_sweep_config(argv, CONF, "train", "train")
    return capsys.readouterr().out


def test_show_sweep_config_only_handles_multirun_cfg(capsys):
    """Without both -m and --cfg the entry point's own Hydra handles the command line."""
    assert not show_sweep_config(["tagging=prefix", "--cfg", "job"], CONF, "train", "train")
    assert not show_sweep_config(["-m", "tagging=prefix,none"], CONF, "train", "train")
    assert not show_sweep_config(["--multirun", "tagging=prefix,none", "--cfg"], CONF, "train", "train")  # --cfg without a value
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("argv, message", [
    (["-m", "tagging=prefix,nope", "--cfg", "job"], "the sweep does not compose: In 'train': Could not find 'tagging/nope'"),
    (["-m", "--cfg", "bogus"], "--cfg bogus: choose job, hydra or all"),
    (["--multirun", "--cfg=everything"], "--cfg everything: choose job, hydra or all"),
    (["-m", "--cfg", "job", "--package", "tagging"], "--package is not supported together with --multirun"),
    (["-m", "tagging=prefix,none", "hydra.sweep.subdir=same", "--cfg", "hydra"],
     "sweep members #0 (tagging=prefix) and #1 (tagging=none) would both write to "),
])
def test_show_sweep_config_refuses_bad_sweeps(argv, message, capsys):
    """A sweep that does not compose, an unknown --cfg, --package, or shared run dirs: one line each."""
    with pytest.raises(NegagentError) as info:
        show_sweep_config(argv, CONF, "train", "train")
    assert str(info.value).startswith(message)


def test_slurm_sweep_cfg_hydra_composes(capsys):
    out = _show(["-m", "hydra/launcher=slurm_local", "tagging=prefix,none", "--cfg", "hydra"], capsys)
    shown = yaml.safe_load(out)
    launcher = shown["hydra"]["launcher"]
    assert launcher["_target_"] == "hydra_plugins.negagent_launcher.slurm_launcher.SlurmLauncher"
    assert launcher["partition"] == "local"
    assert out.startswith("# sweep of 2 members")
    assert "# member #0: tagging=prefix" in out and "# member #1: tagging=none" in out


# What each launcher preset resolves to: GPU presets run one task per GPU and requeue on time-outs.
LAUNCHERS = {
    "slurm_local": {"partition": "local", "nodes": 1, "tasks_per_node": 1, "gpus_per_node": None, "timeout_min": 30,
                    "requeue": None, "max_num_timeout": 0},
    "slurm_gpu_node": {"partition": "gpu", "nodes": 1, "tasks_per_node": 8, "gpus_per_node": 8, "timeout_min": 1440,
                       "requeue": True, "max_num_timeout": 3},
    "slurm_multinode": {"partition": "gpu", "nodes": 2, "tasks_per_node": 8, "gpus_per_node": 8, "timeout_min": 2880,
                        "requeue": True, "max_num_timeout": 3},
}


def test_every_launcher_preset_is_listed():
    assert set(LAUNCHERS) == {p.stem for p in (CONF / "hydra" / "launcher").glob("*.yaml")}


@pytest.mark.parametrize("preset", sorted(LAUNCHERS))
def test_launcher_presets_compose(preset, capsys):
    """Each launcher preset composes (inheritance and interpolations resolved) to the resumable launcher."""
    out = _show(["-m", f"hydra/launcher={preset}", "tagging=prefix,none", "--cfg", "hydra", "--resolve"], capsys)
    launcher = yaml.safe_load(out)["hydra"]["launcher"]
    assert launcher["_target_"] == "hydra_plugins.negagent_launcher.slurm_launcher.SlurmLauncher"
    shown = {key: launcher.get(key) for key in LAUNCHERS[preset] if key != "requeue"}
    shown["requeue"] = (launcher.get("additional_parameters") or {}).get("requeue")
    assert shown == LAUNCHERS[preset]


EXPERIMENT_MEMBERS = {"cpu_demo": 8, "cpu_demo_two_step": 8, "quickstart": 1, "math_7b": 6, "math_13b": 6, "math_negatives": 28, "tag_wording": 4,
                      "hotpotqa": 15, "hotpotqa_graded": 6, "strategyqa": 3, "paper_base": 1}


def test_every_experiment_preset_is_listed():
    assert set(EXPERIMENT_MEMBERS) == {p.stem for p in (CONF / "experiment").glob("*.yaml")}


@pytest.mark.parametrize("preset", sorted(EXPERIMENT_MEMBERS))
def test_experiment_presets_compose(preset, capsys, request):
    argv = ["-m", f"experiment={preset}", "--cfg", "all", "--resolve"]
    if preset.startswith(("math", "tag_", "hotpotqa", "strategyqa", "paper_base")):
        # The paper presets read the paper's prompt files (prompt=nat) from the data directory.
        data = request.getfixturevalue("data_dir")
        argv.append(f"data_dir={data}")
        if preset == "paper_base":  # shared settings only: no task of its own, so no prompt file chosen
            argv.append(f"render.prompt_file={data}/nat/prompts/gsm8k/gsm8k_conversation.json")
    out = _show(argv, capsys)
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
