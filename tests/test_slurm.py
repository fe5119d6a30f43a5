"""Sweeps through a real Slurm: the one-node localhost cluster of scripts/slurm_local.sh.

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

from negagent.rundir import read_finished
from negagent.sweep import STATUS_FILE
from negagent.trajectory import write_trajectories
from tests.helpers import assert_one_line_error, make_traj

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


RANK_APP = '''
import json, os, hydra
from pathlib import Path

@hydra.main(version_base=None, config_path={conf!r}, config_name="train")
def main(cfg):
    out = Path(hydra.core.hydra_config.HydraConfig.get().runtime.output_dir)
    names = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"]
    (out / f"rank{{os.environ['RANK']}}.json").write_text(json.dumps({{k: os.environ.get(k) for k in names}}))

main()
'''


def test_one_task_per_gpu_gives_each_task_its_rank(slurm, tmp_path):
    """Several tasks in a member's job: each runs the entry point as one rank of one distributed run
    (the torchrun variables), and the member is marked done once."""
    app = tmp_path / "rank_app.py"
    app.write_text(RANK_APP.format(conf=str(REPO / "conf")))
    sweep = tmp_path / "sweep"
    done = subprocess.run([sys.executable, str(app), "-m", "hydra/launcher=slurm_local", "hydra.launcher.tasks_per_node=2",
                           "tagging=prefix", f"hydra.sweep.dir={sweep}"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = sweep / "tagging=prefix"
    ranks = [json.loads((run_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(e["RANK"], e["LOCAL_RANK"], e["WORLD_SIZE"]) for e in ranks] == [("0", "0", "2"), ("1", "1", "2")]
    assert ranks[0]["MASTER_ADDR"] == ranks[1]["MASTER_ADDR"] and ranks[0]["MASTER_PORT"] == ranks[1]["MASTER_PORT"]
    done_record = read_finished(run_dir)  # written once, by the launcher's rank-0 wrapper, for the job's first attempt
    assert done_record["outputs"] == [] and done_record["attempt"].endswith(":0"), done_record
