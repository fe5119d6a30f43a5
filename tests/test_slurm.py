"""Sweeps through a real Slurm: the two-node localhost cluster of scripts/slurm_local.sh.

The session fixture uses a running cluster, or starts one (installing Debian's packages if needed)
when NEGAGENT_TEST_DATA (CI) or NEGAGENT_SLURM=1 is set; in CI a cluster that cannot be started is a
failure with the reason, elsewhere the tests skip saying how to run them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from safetensors.torch import load_file

from negagent.rundir import read_finished
from negagent.training.checkpoint import tensor_digest
from negagent.sweep import STATUS_FILE
from negagent.trajectory import write_trajectories
from tests.helpers import assert_one_line_error, make_traj
from tests.test_training import _wait_for, checkpoint_saved

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "slurm_local.sh"
# The `trajectories` fixture's good file: 12 trajectories, every third one a failure.
GOOD_COUNTS = {"positive": 8, "negative": 4}


def _script(*args: str, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def slurm():
    """A running local Slurm (started here when allowed; stopped again if this fixture started it)."""
    if _script("status", timeout=30).returncode == 0:
        yield
        return
    in_ci = bool(os.environ.get("NEGAGENT_TEST_DATA"))
    if not (in_ci or os.environ.get("NEGAGENT_SLURM") == "1"):
        pytest.skip("no Slurm running: start one with `bash scripts/slurm_local.sh` (root, Debian) "
                    "or set NEGAGENT_SLURM=1 to let the tests start it")
    try:
        started = _script("start", timeout=900)  # a first start installs packages with apt
    except subprocess.TimeoutExpired:
        pytest.fail("scripts/slurm_local.sh did not start Slurm within 900 s")
    if started.returncode != 0:
        pytest.fail(f"scripts/slurm_local.sh could not start Slurm: {(started.stderr or started.stdout).strip()[-2000:]}")
    yield
    _script("stop", timeout=60)


def _sweep(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "train.py"), "-m", "hydra/launcher=slurm_local", "debug=smoke", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _status(sweep_dir: Path, by: str) -> dict[str, dict]:
    """sweep.json's members keyed by their override of `by` (`tagging=prefix`)."""
    members = json.loads((sweep_dir / STATUS_FILE).read_text())["members"]
    return {next(o for o in m["overrides"] if o.startswith(f"{by}=")): m for m in members}


def check_members(sweep_dir: Path, by: str, expected: dict[str, str]) -> dict[str, dict]:
    """Every member is listed with the expected status; finished ones hold the manifest of their own
    strategy and data, their evaluation and a done marker for their config; failed ones name the log
    their error line comes from and hold no done marker."""
    members = _status(sweep_dir, by)
    assert {key: m["status"] for key, m in members.items()} == expected, json.dumps(list(members.values()), indent=1)
    for key, member in members.items():
        run_dir = Path(member["run_dir"])
        if member["status"] in ("finished", "skipped"):
            overrides = dict(o.split("=", 1) for o in member["overrides"])
            manifest = json.loads((run_dir / "manifest.json").read_text())
            assert (manifest["task"], manifest["strategy"], manifest["trajectories"], manifest["available"]) == (
                "arith", overrides["tagging"], overrides["data.trajectories"], GOOD_COUNTS), key
            assert json.loads((run_dir / "eval" / "metrics.json").read_text())["task"] == "arith", key
            assert read_finished(run_dir)["config_hash"] == member["config_hash"]
        else:
            assert member["error"] in Path(member["log_err"]).read_text().splitlines(), member
            assert read_finished(run_dir) is None
    return members


@pytest.fixture
def trajectories(tmp_path) -> tuple[Path, Path]:
    good = tmp_path / "good.jsonl"
    write_trajectories(good, [make_traj(i, reward=i % 3 != 0) for i in range(12)])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "t0", "task": "arith"\n')  # a torn record: the member fails with one line
    return good, bad


def test_unknown_partition_stops_before_submission(slurm, tmp_path):
    sweep = tmp_path / "sweep"
    done = _sweep(["tagging=prefix,none", f"hydra.sweep.dir={sweep}", "hydra.launcher.partition=gpu_nope"], timeout=120)
    assert_one_line_error(done, "error: partition 'gpu_nope' (hydra.launcher.partition) does not exist on this "
                                "cluster; it has: local")
    assert not (sweep / ".submitit").exists()  # no job folder: nothing was submitted


def test_sweep_runs_resumes_and_reports_failures(slurm, tmp_path, trajectories):
    good, bad = trajectories
    sweep = tmp_path / "sweep"
    common = [f"hydra.sweep.dir={sweep}", "trainer.evaluate_after=true", "eval.evaluator.sampling.max_new_tokens=24"]

    first = _sweep(["tagging=prefix,none", f"data.trajectories={good}", *common])
    assert first.returncode == 0, first.stderr[-3000:]
    assert "2 finished, 0 skipped (finished earlier), 0 failed" in first.stdout, first.stdout + first.stderr[-3000:]
    first_members = check_members(sweep, "tagging", {"tagging=prefix": "finished", "tagging=none": "finished"})
    report = subprocess.run([sys.executable, "-m", "negagent.report", str(sweep), "--out", str(tmp_path / "report")],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    table = (tmp_path / "report" / "report.md").read_text()
    for strategy in ("prefix", "none"):  # every member has a row with its metrics
        assert f"| {strategy} " in table, table
    assert "missing" not in table.lower(), table

    # The same sweep again: nothing is submitted. submitit makes a folder per job (.submitit/<job id>),
    # so an unchanged listing and no job id in the status mean no job, whatever the machine's speed.
    job_folders = sorted(p.name for p in (sweep / ".submitit").iterdir())
    assert len(job_folders) >= 1, job_folders
    again = _sweep(["tagging=prefix,none", f"data.trajectories={good}", *common])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 finished, 2 skipped (finished earlier), 0 failed" in again.stdout, again.stdout + again.stderr[-3000:]
    assert sorted(p.name for p in (sweep / ".submitit").iterdir()) == job_folders
    skipped = check_members(sweep, "tagging", {"tagging=prefix": "skipped", "tagging=none": "skipped"})
    assert [(m["job_id"], m["log_err"]) for m in skipped.values()] == [(None, None), (None, None)]

    # Same sweep dir, trajectories swept: the good member is the first sweep's prefix member (skipped),
    # the bad one fails and is named with its log; a re-run submits it again.
    for attempt in range(2):
        failing = _sweep(["tagging=prefix", f"data.trajectories={good},{bad}", *common])
        assert failing.returncode == 2, failing.stderr[-3000:]
        members = check_members(sweep, "data.trajectories", {f"data.trajectories={good}": "skipped",
                                        f"data.trajectories={bad}": "failed"})
        failed = members[f"data.trajectories={bad}"]
        assert members[f"data.trajectories={good}"]["run_dir"] == first_members["tagging=prefix"]["run_dir"]
        # The member's own one-line error, read from its log.
        assert failed["error"] == (f"error: {bad}:1: bad trajectory record: Expecting ',' delimiter: line 1 column 29 "
                                   "(char 28) (set data.skip_bad_lines=true to skip such lines)")
        report = [line for line in failing.stderr.splitlines() if line.startswith("FAILED #1")]
        assert report == [f"FAILED #1 (debug=smoke tagging=prefix data.trajectories={bad} "
                          f"trainer.evaluate_after=True eval.evaluator.sampling.max_new_tokens=24): {failed['error']} "
                          f"(log: {failed['log_err']})"], failing.stderr[-3000:]
        assert_one_line_error(failing, "error: 1 of 2 sweep members failed (listed above); run the same command "
                                       "again to retry them, finished members are skipped")
        if attempt == 0:
            first_job = failed["job_id"]
        else:
            assert failed["job_id"] != first_job  # failed members run again


# A member of several Slurm tasks is ONE ZeRO-3 run (one rank per task) on CPU ranks: 48 samples,
# 2 ranks x 6 micro-batches of 4 per epoch (6 steps), 3 epochs: 18 optimizer steps, a checkpoint every 3.
ZERO3_SAMPLES = 48
ZERO3 = ["trainer=zero3", "trainer.max_steps=-1", "trainer.epochs=3", "trainer.save_steps=3", "trainer.logging_steps=1",
         "trainer.lr=1e-3"]


def _member_dir(sweep: Path) -> Path | None:
    """The one member's run directory (the folder the sweep made that holds a frozen config)."""
    found = [p.parent for p in sweep.rglob("config.yaml") if p.parent.name != ".hydra"]
    return found[0] if len(found) == 1 else None


def _losses(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [m for m in map(json.loads, filter(str.strip, lines)) if "loss" in m]


def _job(job_id: str) -> dict[str, str]:
    """`scontrol show job` as fields (finished jobs stay visible for MinJobAge)."""
    text = subprocess.run(["scontrol", "show", "job", job_id, "--oneliner"], capture_output=True, text=True, timeout=30).stdout
    return dict(field.split("=", 1) for field in text.split() if "=" in field)


def check_one_zero3_run(sweep: Path) -> dict:
    """The member's two tasks trained ONE run: two ranks on disjoint samples with partitioned
    parameters, one verified save, one done marker; only rank 0 wrote run files (the other rank
    wrote its own ranks/ records). Returns the member's sweep.json entry."""
    (member,) = json.loads((sweep / STATUS_FILE).read_text())["members"]
    assert member["status"] == "finished", member
    run_dir = Path(member["run_dir"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["ranks"], summary["deepspeed"], summary["steps"]) == (2, "zero3", 18), summary
    facts = [json.loads((run_dir / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(f["rank"], f["world_size"]) for f in facts] == [(0, 2), (1, 2)]
    for fact in facts:  # each rank holds a shard of the parameters only
        assert 0 < fact["local_param_elements"] <= fact["param_elements"] // 2 + 1024, fact
    orders = [[json.loads(line) for line in (run_dir / "ranks" / f"rank{r}.order.jsonl").read_text().splitlines()]
              for r in (0, 1)]
    first_epoch = [set().union(*(set(line["samples"]) for line in order if line["step"] < 6)) for order in orders]
    assert not first_epoch[0] & first_epoch[1] and first_epoch[0] | first_epoch[1] == set(range(ZERO3_SAMPLES))
    assert summary["saved"]["kind"] == "model" and summary["saved"]["parameters"] == facts[0]["param_elements"]
    saved = load_file(run_dir / "model.safetensors")  # the gathered model, not the shards
    assert (sum(t.numel() for t in saved.values()), tensor_digest(saved)) == (
        facts[0]["param_elements"], (facts[0]["param_elements"], summary["saved"]["sha256"]))
    assert saved["model.embed_tokens.weight"].abs().sum() > 0
    assert (run_dir / "done").is_file() and read_finished(run_dir)["config_hash"] == member["config_hash"]
    assert sorted(p.name for p in (run_dir / "ranks").iterdir()) == [
        "rank0.json", "rank0.order.jsonl", "rank1.json", "rank1.order.jsonl"]
    losses = _losses(run_dir)
    assert losses[-1]["loss"] < losses[0]["loss"] - 0.05, (losses[0], losses[-1])
    return member


def test_a_member_of_several_tasks_is_one_zero3_run_across_nodes_and_resumes_after_a_requeue(slurm, tmp_path):
    """Through train.py and the real local Slurm: a member of two tasks is one 2-rank ZeRO-3 run,
    whether the tasks are on two nodes or on one; a member requeued mid-training (scontrol requeue)
    comes back as the same job, resumes from its last complete checkpoint and ends with the loss of
    the run that was never interrupted."""
    data = tmp_path / "arith.jsonl"
    write_trajectories(data, [make_traj(i, i % 3 != 0, turns=2 + i % 3) for i in range(ZERO3_SAMPLES)])
    common = ["tagging=prefix", f"data.trajectories={data}", *ZERO3]

    # Two nodes, one task on each: never interrupted.
    nodes = tmp_path / "nodes"
    done = _sweep([*common, f"hydra.sweep.dir={nodes}", "hydra.launcher.nodes=2"], timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    member = check_one_zero3_run(nodes)
    job = _job(member["job_id"])
    assert (job.get("NodeList"), job.get("NumNodes"), job.get("NumTasks")) == ("node[1-2]", "2", "2"), job
    reference = _losses(Path(member["run_dir"]))[-1]

    # One node, two tasks: requeued once checkpoint 3 is saved and step 4 logged.
    one_node = tmp_path / "one_node"
    command = [sys.executable, str(REPO / "train.py"), "-m", "hydra/launcher=slurm_local", "debug=smoke", *common,
               f"hydra.sweep.dir={one_node}", "hydra.launcher.tasks_per_node=2"]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def reached() -> bool:
            run_dir = _member_dir(one_node)
            return bool(run_dir and checkpoint_saved(run_dir / "checkpoints", 3)
                        and any(m["step"] == 4 for m in _losses(run_dir)))
        _wait_for(reached, proc)
        (job_id,) = [p.name for p in (one_node / ".submitit").iterdir() if p.name.isdigit()]
        requeued = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=30)
        assert requeued.returncode == 0, requeued.stderr
        out, err = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    member = check_one_zero3_run(one_node)
    run_dir = Path(member["run_dir"])
    summary = json.loads((run_dir / "summary.json").read_text())
    resumed_at = int(summary["resumed_from"].split("-")[1])  # the newest complete checkpoint when the kill landed
    assert 3 <= resumed_at < 18 and resumed_at % 3 == 0, summary
    assert read_finished(run_dir)["attempt"] == f"{job_id}:1"  # finished by the job's second start
    assert _job(job_id).get("Restarts") == "1"
    final = _losses(run_dir)[-1]
    assert final["step"] == reference["step"] == 18
    assert final["loss"] == pytest.approx(reference["loss"], abs=1e-4)


def test_entry_points_other_than_train_refuse_several_tasks(slurm, tmp_path):
    sweep = tmp_path / "sweep"
    done = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "-m", "hydra/launcher=slurm_local",
                           "hydra.launcher.tasks_per_node=2", "model=tiny", f"hydra.sweep.dir={sweep}", "tag_mode=positive,none"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert_one_line_error(done, "error: hydra.launcher: 2 Slurm tasks per member (nodes x tasks_per_node) are ranks of "
                                "one training run; evaluate.py runs as one task: use hydra.launcher.nodes=1 "
                                "hydra.launcher.tasks_per_node=1")
    assert not (sweep / ".submitit").exists()
