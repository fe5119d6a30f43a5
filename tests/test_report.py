"""Sweep reports over a multirun directory: every member listed, tables, plots, paired comparison."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

from negagent.evaluation import evaluate
from negagent.tasks import get_task
from negagent.strategy_table import summarize
from tests.test_evaluation import AnswerBackend, _cfg

REPO = Path(__file__).resolve().parents[1]


def _member(root: Path, name: str, strategy: str, neg_num, seed: int, right: list[str] | None) -> Path:
    run = root / name
    run.mkdir(parents=True)
    tagging = {"strategy": strategy, "neg_num": neg_num, "positive": "good", "negative": "bad"}
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml({"seed": seed, "tagging": tagging, "task": {"name": "arith"}}))
    if right is not None:  # evaluated: a run whose evaluation wrote <run>/eval
        task = get_task({"name": "arith", "n_test": 6})
        cfg = _cfg()
        cfg.tagging = {"strategy": "none"}
        metrics_dir = run / "eval"
        evaluate(cfg, metrics_dir, backend=AnswerBackend(task, right=right))
        metrics = json.loads((metrics_dir / "metrics.json").read_text())
        metrics["training"] = {"strategy": strategy, "neg_num": neg_num, "seed": seed}
        (metrics_dir / "metrics.json").write_text(json.dumps(metrics))
    return run


def test_report_over_multirun(tmp_path):
    ids = [q.id for q in get_task({"name": "arith", "n_test": 6}).test_sets()["arith"]]
    sweep = tmp_path / "multirun" / "2024-01-01"
    a = _member(sweep, "tagging=prefix,tagging.neg_num=0", "prefix", 0, 0, ids[:2])
    b = _member(sweep, "tagging=prefix,tagging.neg_num=100", "prefix", 100, 0, ids[:5])
    _member(sweep, "tagging=none,tagging.neg_num=100", "none", 100, 0, ids[:3])
    missing = _member(sweep, "tagging=none,tagging.neg_num=0", "none", 0, 0, None)
    (sweep.parent / "multirun.yaml").write_text("hydra: {}\n")
    out = tmp_path / "report"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "negagent.report", str(sweep.parent), "--out", str(out),
                           "--compare", str(a), str(b)], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "4 runs, 1 without metrics" in done.stdout
    rows = list(csv.DictReader((out / "report.csv").open()))
    assert len(rows) == 4 and sum(r["status"].startswith("missing") for r in rows) == 1
    by_run = {Path(r["run"]).name: r for r in rows}
    assert float(by_run[b.name]["arith.numeric"]) == 5 / 6 and by_run[b.name]["arith.numeric.lo"] != ""
    markdown = (out / "report.md").read_text()
    assert str(missing) in markdown and "| prefix | 100 | 0 |" in markdown
    assert (out / "plot_arith.numeric.png").stat().st_size > 1000
    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["n_common"] == 6 and len(comparison["better_in_b"]) == 3 and comparison["better_in_a"] == []
    assert abs(comparison["p_value"] - 0.25) < 1e-9  # exact two-sided: 3 flips one way


def test_report_of_nothing_is_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "negagent.report", str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=env)
    assert done.returncode == 2 and done.stderr.startswith("error:") and "Traceback" not in done.stderr


class TagAwareBackend(AnswerBackend):
    """Answers right the questions in `right` under the success tag, those in `right_failure`
    under the failure tag (the prefix tag sits in the user message)."""

    def __init__(self, task, right, right_failure):
        super().__init__(task, right)
        self.right_success, self.right_failure = set(right), set(right_failure)

    def complete(self, chats, sampling):
        out = []
        for chat in chats:
            failure = any("fails to solve" in m["content"] for m in chat)
            self.right = self.right_failure if failure else self.right_success
            out += super().complete([chat], sampling)
        return out


def _tagged_member(root: Path, strategy: str, seed: int, right: list[str], right_failure: list[str]) -> Path:
    run = root / f"seed={seed},tagging={strategy}"
    tagging = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "tagging" / f"{strategy}.yaml"))
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml({"seed": seed, "tagging": tagging, "task": {"name": "arith"}}))
    task = get_task({"name": "arith", "n_test": 6})
    cfg = _cfg(tag_mode="all")
    cfg.tagging = tagging
    evaluate(cfg, run / "eval", backend=TagAwareBackend(task, right, right_failure))
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    metrics["training"] = {"strategy": strategy, "neg_num": None, "seed": seed}  # as evaluating a training run writes
    (run / "eval" / "metrics.json").write_text(json.dumps(metrics))
    return run


def test_strategy_table_pools_seeds_with_intervals_and_control_strength(tmp_path):
    ids = [q.id for q in get_task({"name": "arith", "n_test": 6}).test_sets()["arith"]]
    sweep = tmp_path / "multirun" / "cpu_demo"
    _tagged_member(sweep, "positive_only", 0, ids[:2], [])
    _tagged_member(sweep, "positive_only", 1, ids[:3], [])
    _tagged_member(sweep, "prefix", 0, ids[:5], ids[:1])
    _tagged_member(sweep, "prefix", 1, ids[:4], [])
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    done = subprocess.run([sys.executable, "-m", "negagent.report", str(sweep)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "positive_only" in done.stdout and "untagged" in done.stdout and "p=0.00781" in done.stdout

    from negagent.report import find_members, load_member

    rows = summarize([load_member(p) for p in find_members([sweep])])
    assert [r.strategy for r in rows] == ["positive_only", "prefix"]  # baselines first
    baseline, nat = rows
    assert baseline.accuracy["arith"]["mean"] == 5 / 12 and baseline.accuracy["arith"]["n_episodes"] == 12
    assert baseline.per_seed == {"0": 2 / 6, "1": 3 / 6} and baseline.control is None and baseline.mean_steps == 1.0
    assert nat.accuracy["arith"]["mean"] == 9 / 12
    assert nat.accuracy["arith"]["lo"] < 0.75 < nat.accuracy["arith"]["hi"]
    # success-tag minus failure-tag, one pair per question and seed: (5-1 + 4-0) / 12, 8 flips one way
    assert abs(nat.control["diff"] - 8 / 12) < 1e-9 and nat.control["lo"] > 0 and abs(nat.control["p_value"] - 2 / 2**8) < 1e-9
    rows_csv = list(csv.DictReader((sweep / "strategies.csv").open()))
    assert [r["strategy"] for r in rows_csv] == ["positive_only", "prefix"] and rows_csv[1]["seeds"] == "0 1"
    assert "| prefix (NAT) | 2 | 75.0 [" in (sweep / "strategies.md").read_text()
    assert (sweep / "plot_strategies.png").stat().st_size > 5000
