"""Sweep reports over a multirun directory: every member listed, tables, plots (what they show),
paired comparison, the strategy table, and the base-vs-trained table printed after training."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from matplotlib.collections import PathCollection
from omegaconf import OmegaConf
from PIL import Image

from negagent.report import runs as report
from negagent.report import strategy_table
from negagent.metrics import format_ci
from negagent.evaluation.baseline import comparison_rows, evaluate_base, print_comparison
from negagent.evaluation import evaluate
from negagent.metrics import mean_ci, paired_comparison
from negagent.report.runs import RunResult, columns, find_members, load_member
from negagent.report.strategy_table import StrategyRow, summarize
from negagent.tasks import get_task
from tests.helpers import TINY_MODEL, assert_one_line_error
from tests.test_evaluation import AnswerBackend, TagBackend, _cfg

REPO = Path(__file__).resolve().parents[1]
IDS = [q.id for q in get_task({"name": "arith", "n_test": 6}).test_sets()["arith"]]
RESAMPLES = 1000  # conf/evaluate.yaml's bootstrap_resamples, which the evaluations below use


@pytest.fixture
def saved_figures(monkeypatch):
    """Every matplotlib figure saved during the test, as it was drawn into its PNG."""
    from matplotlib.figure import Figure

    figures, original = [], Figure.savefig

    def savefig(self, *args, **kwargs):
        figures.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return figures


def _errorbar_lines(ax) -> dict[str, list[tuple]]:
    """label -> [(x, y, whisker low, whisker high)] of every errorbar line drawn on `ax`."""
    out = {}
    for container in ax.containers:
        data_line, _, (whiskers, *_) = container.lines
        out[container.get_label()] = [(x, y, seg[0][1], seg[1][1])
                                      for (x, y), seg in zip(data_line.get_xydata().tolist(), whiskers.get_segments())]
    return out


def _bars(ax) -> list[tuple]:
    """[(tick label, bar height, whisker low, whisker high)] of the bars drawn on `ax`."""
    (container,) = [c for c in ax.containers if hasattr(c, "patches")]
    whiskers = container.errorbar.lines[2][0].get_segments()
    labels = [t.get_text() for t in ax.get_xticklabels()]
    return [(label, bar.get_height(), *((seg[0][1], seg[1][1]) if len(seg) else (None, None)))  # no whisker at NaN
            for label, bar, seg in zip(labels, container.patches, whiskers)]


def _rounded(value):
    """`value` with every float rounded to 9 places (percent scaling may differ in the last bit)."""
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return round(float(value), 9) if isinstance(value, float) else value


def _ci(per_question, resamples=RESAMPLES) -> dict:
    return mean_ci([[float(v) for v in q] for q in per_question], resamples=resamples)


def _main(capsys, *argv) -> SimpleNamespace:
    """`python -m negagent.report ARGV` in this process: returncode, stdout, stderr."""
    try:
        report.main([str(a) for a in argv])
        code = 0
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=captured.out, stderr=captured.err)


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


def test_report_over_multirun(tmp_path, capsys, saved_figures):
    """Every member is a row (the unevaluated one as missing, with why); means and intervals are the
    questions' rewards; the plot shows each strategy's reward against negatives; --compare lists the
    questions that flipped."""
    sweep = tmp_path / "multirun" / "2024-01-01"
    a = _member(sweep, "tagging=prefix,tagging.neg_num=0", "prefix", 0, 0, IDS[:2])
    b = _member(sweep, "tagging=prefix,tagging.neg_num=100", "prefix", 100, 0, IDS[:5])
    c = _member(sweep, "tagging=none,tagging.neg_num=100", "none", 100, 0, IDS[:3])
    missing = _member(sweep, "tagging=none,tagging.neg_num=0", "none", 0, 0, None)
    (sweep.parent / "multirun.yaml").write_text("hydra: {}\n")
    out = tmp_path / "report"
    done = _main(capsys, sweep.parent, "--out", out, "--compare", a, b)
    assert done.returncode == 0, done.stderr
    why = f"no metrics: neither {missing}/eval/metrics.json nor {missing}/metrics.json exists"
    assert f"4 runs, 1 without metrics\n  missing: {missing}: {why}\n" in done.stdout
    assert f"comparison: B - A = +0.500, 3 better in B, 0 better in A, p = 0.25\n" in done.stdout

    def reward(n_right):  # a member's reward column: n_right of 6 questions, one episode each
        return _ci([[1]] * n_right + [[0]] * (6 - n_right))

    cols = ["arith.numeric", "arith.strict", "action_error_rate", "mean_steps"]
    rows = list(csv.reader((out / "report.csv").open()))
    assert rows[0] == ["strategy", "neg_num", "negatives_used", "seed", "status", "run"] + [
        f"{c}{part}" for c in cols for part in ("", ".lo", ".hi")]
    expected = [["none", "0", "", "0", f"missing: {why}", str(missing)] + [""] * 12]
    for member, strategy, neg, n_right in ((c, "none", "100", 3), (a, "prefix", "0", 2), (b, "prefix", "100", 5)):
        ci = [str(reward(n_right)[k]) for k in ("mean", "lo", "hi")]
        expected.append([strategy, neg, "", "0", "ok", str(member)] + ci + ci + ["0.0", "", "", "1.0", "", ""])
    assert rows[1:] == expected  # sorted by strategy, then negatives

    markdown = (out / "report.md").read_text().splitlines()
    assert "| strategy | negatives | seed | " + " | ".join(cols) + " | run |" in markdown
    five = reward(5)
    cell = f"{five['mean']:.3f} [{five['lo']:.3f}, {five['hi']:.3f}]"
    assert f"| prefix | 100 | 0 | {cell} | {cell} | 0.000 | 1.000 | {b} |" in markdown
    assert f"| none | 0 | 0 | missing ({why}) | - | - | - | {missing} |" in markdown
    assert markdown[-3:] == ["## Missing (1)", "", f"- {missing}: {why}"]

    assert sorted(p.name for p in out.glob("*.png")) == ["plot_arith.numeric.png", "plot_strategies.png"]
    assert Image.open(out / "plot_arith.numeric.png").size == (720, 480)  # 6 x 4 inches at 120 dpi
    ax = saved_figures[0].axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == (
        "number of negative trajectories", "arith.numeric", "arith.numeric vs negatives")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["none", "prefix"]
    # One seed a point: the whisker is the bootstrap interval.
    lines = {label: _rounded(points) for label, points in _errorbar_lines(ax).items()}
    assert lines == {
        "none": _rounded([(100.0, 0.5, reward(3)["lo"], reward(3)["hi"])]),
        "prefix": _rounded([(0.0, 2 / 6, reward(2)["lo"], reward(2)["hi"]), (100.0, 5 / 6, five["lo"], five["hi"])]),
    }

    comparison = json.loads((out / "comparison.json").read_text())
    flipped = sorted(f"arith/{q}" for q in IDS[2:5])
    assert comparison == {"a": str(a), "b": str(b), "n_common": 6, "mean_a": 2 / 6, "mean_b": 5 / 6, "diff": 0.5,
                          "diff_lo": comparison["diff_lo"], "diff_hi": comparison["diff_hi"],
                          "better_in_b": flipped, "better_in_a": [], "p_value": 0.25}  # exact two-sided: 3 flips one way
    paired = paired_comparison({f"arith/{q}": float(q in IDS[:2]) for q in IDS}, {f"arith/{q}": float(q in IDS[:5]) for q in IDS})
    assert (comparison["diff_lo"], comparison["diff_hi"]) == (paired.diff_lo, paired.diff_hi)
    assert (out / "comparison.md").read_text().splitlines() == [
        "# Paired comparison", "", f"- A: {a}", f"- B: {b}", "- questions in both: 6",
        f"- mean reward: A 0.333, B 0.833; B - A = +0.500 [{paired.diff_lo:+.3f}, {paired.diff_hi:+.3f}] (paired bootstrap 95%)",
        "- flipped: 3 better in B, 0 better in A; exact sign test (McNemar for one episode a question) p = 0.25",
        "", "## Better in B", "", *[f"- {q}" for q in flipped], "", "## Better in A", ""]


def test_two_members_are_compared_without_asking(tmp_path, capsys):
    """A sweep of exactly two evaluated runs gets its paired comparison by default."""
    a = _member(tmp_path / "sweep", "seed=0", "prefix", 0, 0, IDS[:4])
    b = _member(tmp_path / "sweep", "seed=1", "prefix", 0, 1, IDS[1:3])
    done = _main(capsys, tmp_path / "sweep")
    assert done.returncode == 0, done.stderr
    assert "comparison: B - A = -0.333, 0 better in B, 2 better in A, p = 0.5\n" in done.stdout
    comparison = json.loads((tmp_path / "sweep" / "comparison.json").read_text())
    assert (comparison["a"], comparison["b"]) == (str(a), str(b))
    assert comparison["better_in_a"] == sorted(f"arith/{q}" for q in (IDS[0], IDS[3]))


def test_report_of_nothing_is_one_line(tmp_path):
    """The module's command line: a directory without runs is one error line, exit 2."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "negagent.report", str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=env)
    assert_one_line_error(done, f"{tmp_path}: no run directories in it (none holds config.yaml, .hydra/, metrics.json or eval/)")


@pytest.mark.parametrize("case, fragment", [
    ("nowhere", "{root}/nowhere: no such directory"),
    ("compare_unevaluated", "{root}/sweep/unevaluated: no metrics.json, so no trajectories to compare"),
    ("compare_without_trajectories", "{root}/sweep/bare/eval/trajectories.jsonl: per-question trajectories missing; "
                                     "cannot compare on question ids"),
    ("compare_other_questions", "cannot compare {root}/sweep/good and {root}/sweep/other: the two runs share no question ids"),
])
def test_bad_report_input_is_one_line(tmp_path, capsys, case, fragment):
    """Missing directories and comparisons that cannot pair questions end in one error line."""
    good = _member(tmp_path / "sweep", "good", "prefix", 0, 0, IDS[:1])
    args = {"nowhere": [tmp_path / "nowhere"]}.get(case, [tmp_path / "sweep", "--compare", good])
    if case == "compare_unevaluated":
        args.append(_member(tmp_path / "sweep", "unevaluated", "prefix", 0, 1, None))
    elif case == "compare_without_trajectories":
        bare = _member(tmp_path / "sweep", "bare", "prefix", 0, 1, IDS[:1])
        (bare / "eval" / "trajectories.jsonl").unlink()
        args.append(bare)
    elif case == "compare_other_questions":
        other = _member(tmp_path / "sweep", "other", "prefix", 0, 1, IDS[:1])
        path = other / "eval" / "trajectories.jsonl"
        path.write_text(path.read_text().replace('"question_id": "', '"question_id": "x'))
        args.append(other)
    assert_one_line_error(_main(capsys, *args), fragment.format(root=tmp_path))


def test_unreadable_metrics_leave_the_member_missing(tmp_path):
    """A metrics.json that is not an evaluation's is reported as the member's problem, coordinates
    still read from its frozen config."""
    run = _member(tmp_path, "run", "suffix", 50, 2, None)
    (run / "metrics.json").write_text('{"loss": 1.0}')
    member = load_member(run)
    assert (member.strategy, member.neg_num, member.seed, member.metrics) == ("suffix", 50, 2, None)
    assert member.problem == f"{run}/metrics.json is not an evaluation metrics file"
    assert find_members([tmp_path]) == [run]


def test_columns_flatten_the_primary_tag_of_a_metrics_file():
    """Columns: each set's task metrics (reward dropped where a task metric repeats it), pass@k
    beyond 1, averages over several sets, action errors, steps and control strength."""
    stat = {"mean": 0.5, "lo": 0.25, "hi": 0.75}
    per_set = {"reward": stat, "numeric": stat, "strict": {"mean": 0.25}, "mean_steps": {"mean": 2.0},
               "pass@1": 0.5, "pass@4": 0.75, "n_questions": 4}
    metrics = {
        "primary": "positive",
        "results": {
            "none": {"test_sets": {"x": {"reward": {"mean": 0.0}}}},
            "positive": {"test_sets": {"gsm8k": per_set, "svamp": {**per_set, "mean_steps": {"mean": 4.0}}},
                         "average": {"reward": 0.5, "numeric": 0.5, "strict": 0.25},
                         "overall": {"action_error_rate": 0.125}},
        },
        "control_strength": {"mean": 0.2},
    }
    assert columns(metrics) == {
        "gsm8k.numeric": stat, "gsm8k.strict": {"mean": 0.25}, "gsm8k.pass@4": {"mean": 0.75},
        "svamp.numeric": stat, "svamp.strict": {"mean": 0.25}, "svamp.pass@4": {"mean": 0.75},
        "average.numeric": {"mean": 0.5}, "average.strict": {"mean": 0.25},
        "action_error_rate": {"mean": 0.125}, "mean_steps": {"mean": 3.0}, "control_strength": {"mean": 0.2},
    }
    member = RunResult(Path("run"), metrics=metrics)
    assert report.headline_columns([member, RunResult(Path("missing"))]) == ["gsm8k.numeric", "svamp.numeric", "average.numeric"]
    untagged = {"results": {"none": {"test_sets": {"x": {"reward": {"mean": 1.0}, "acc": {"mean": 1.0}}}}},
                "control_strength": {"mean": None}}
    assert columns(untagged) == {"x.acc": {"mean": 1.0}}  # the first mode is primary when none is named


def test_plot_pools_seeds_at_one_point(tmp_path, saved_figures):
    """Seeds of one strategy at one number of negatives are one point: their mean, whiskers at the
    lowest and highest seed; runs without that column or without a number of negatives are left out."""
    def member(strategy, neg, seed, mean, **extra):
        return RunResult(Path(f"{strategy}{neg}{seed}"), strategy=strategy, neg_num=neg, seed=seed,
                      values={"x.acc": {"mean": mean, **extra}})

    members = [member("prefix", 10, 0, 0.5), member("prefix", 10, 1, 0.7), member("prefix", 10, 2, 0.6, lo=0, hi=1),
               member("none", 0, 0, 0.2, lo=0.1, hi=0.4), member("none", None, 0, 0.9),
               RunResult(Path("used"), strategy="none", negatives_used=20, values={"x.acc": {"mean": 0.3}}),
               RunResult(Path("blank"), strategy="none", neg_num=30, values={"x.acc": {"mean": None}})]
    path = report.plot(members, "x.acc", tmp_path)
    assert path == tmp_path / "plot_x.acc.png" and path.is_file()
    lines = {label: _rounded(points) for label, points in _errorbar_lines(saved_figures[0].axes[0]).items()}
    assert lines == {"prefix": [[10.0, 0.6, 0.5, 0.7]], "none": [[0.0, 0.2, 0.1, 0.4], [20.0, 0.3, 0.3, 0.3]]}  # no interval: a point without whiskers
    assert report.plot(members, "y.acc", tmp_path) is None and not (tmp_path / "plot_y.acc.png").exists()


def test_strategy_table_pools_seeds_with_intervals_and_control_strength(tmp_path, capsys, saved_figures):
    """Seeds of a strategy pool into one row: accuracy over questions (each keeping every seed's
    episodes), per-seed means, and control strength paired per question and seed; the plot's bars
    are those numbers."""
    tagging = {name: OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "tagging" / f"{name}.yaml"))
               for name in ("positive_only", "prefix")}

    def tagged_member(strategy, seed, right, right_failure=()):
        run = tmp_path / "sweep" / f"seed={seed},tagging={strategy}"
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml({"seed": seed, "tagging": tagging[strategy]}))
        task = get_task({"name": "arith", "n_test": 6})
        cfg = _cfg(tag_mode="all")
        cfg.tagging = tagging[strategy]
        tags = {None: right} if strategy == "positive_only" else {
            tagging[strategy]["positive"]: right, tagging[strategy]["negative"]: right_failure, None: []}
        evaluate(cfg, run / "eval", backend=TagBackend(task, tags))
        metrics = json.loads((run / "eval" / "metrics.json").read_text())
        metrics["training"] = {"strategy": strategy, "neg_num": None, "seed": seed}  # as evaluating a training run writes
        (run / "eval" / "metrics.json").write_text(json.dumps(metrics))

    tagged_member("positive_only", 0, IDS[:2])
    tagged_member("positive_only", 1, IDS[:3])
    tagged_member("prefix", 0, IDS[:5], IDS[:1])
    tagged_member("prefix", 1, IDS[:4])
    sweep = tmp_path / "sweep"
    done = _main(capsys, sweep)
    assert done.returncode == 0, done.stderr

    rows = summarize([load_member(p) for p in find_members([sweep])])
    assert [(r.strategy, r.negatives, r.seeds, r.label) for r in rows] == [
        ("positive_only", None, [0, 1], "positive_only"), ("prefix", None, [0, 1], "prefix (NAT)")]  # baselines first
    baseline, nat = rows
    # Each question keeps its episode of both seeds.
    assert baseline.accuracy == {"arith": mean_ci([[1.0, 1.0], [1.0, 1.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])}
    assert baseline.accuracy["arith"]["mean"] == 5 / 12 and baseline.accuracy["arith"]["n_episodes"] == 12
    assert (baseline.per_seed, baseline.control, baseline.action_error_rate, baseline.mean_steps) == (
        {"0": 2 / 6, "1": 3 / 6}, None, 0.0, 1.0)
    assert nat.accuracy == {"arith": mean_ci([[1.0, 1.0]] * 4 + [[1.0, 0.0], [0.0, 0.0]])}
    assert nat.per_seed == {"0": 5 / 6, "1": 4 / 6}
    # Success-tag minus failure-tag, one pair per question and seed: (5-1 + 4-0) / 12, 8 flips one way.
    paired = paired_comparison({f"{run}/arith/{q}": float(q in wrong) for run, wrong in enumerate([IDS[:1], []]) for q in IDS},
                               {f"{run}/arith/{q}": float(q in right) for run, right in enumerate([IDS[:5], IDS[:4]]) for q in IDS})
    assert nat.control == {"diff": 8 / 12, "lo": paired.diff_lo, "hi": paired.diff_hi, "p_value": 2 / 2**8,
                           "positive": 9 / 12, "negative": 1 / 12}
    assert 0 < paired.diff_lo < 8 / 12 < paired.diff_hi

    acc = nat.accuracy["arith"]
    assert "| prefix (NAT) | 2 | 75.0 [{:.1f}, {:.1f}] | 83.3, 66.7 | 66.7 [{:.1f}, {:.1f}] p=0.00781 | 0.0 | 1.00 |".format(
        acc["lo"] * 100, acc["hi"] * 100, paired.diff_lo * 100, paired.diff_hi * 100) in (sweep / "strategies.md").read_text()
    assert "| positive_only | 2 | 41.7 [" in (sweep / "strategies.md").read_text()
    assert "untagged" in done.stdout and "p=0.00781" in done.stdout
    assert list(csv.reader((sweep / "strategies.csv").open())) == [
        ["strategy", "negatives", "seeds", "test_set", "mean", "lo", "hi", "n_questions", "n_episodes",
         "control", "control_lo", "control_hi", "control_p"],
        ["positive_only", "", "0 1", "arith", str(5 / 12), str(baseline.accuracy["arith"]["lo"]),
         str(baseline.accuracy["arith"]["hi"]), "6", "12", "", "", "", ""],
        ["prefix", "", "0 1", "arith", "0.75", str(acc["lo"]), str(acc["hi"]), "6", "12",
         str(8 / 12), str(paired.diff_lo), str(paired.diff_hi), str(2 / 2**8)],
    ]

    assert Image.open(sweep / "plot_strategies.png").size == (1200, 480)  # two panels, 10 x 4 inches at 120 dpi
    accuracy, control = saved_figures[-1].axes
    base_acc = baseline.accuracy["arith"]
    assert _rounded(_bars(accuracy)) == _rounded([
        ("positive_only", 500 / 12, base_acc["lo"] * 100, base_acc["hi"] * 100),
        ("prefix (NAT)", 75.0, acc["lo"] * 100, acc["hi"] * 100)])
    seeds = [tuple(xy) for c in accuracy.collections if isinstance(c, PathCollection) for xy in c.get_offsets().tolist()]
    assert _rounded(seeds) == _rounded([(0, 200 / 6), (0, 50.0), (1, 500 / 6), (1, 400 / 6)])  # a dot per seed
    assert _rounded(_bars(control)) == _rounded([("prefix (NAT)", 800 / 12, paired.diff_lo * 100, paired.diff_hi * 100)])
    assert (accuracy.get_ylabel(), control.get_ylabel()) == (
        "arith accuracy % (success tag)", "success-tag minus failure-tag accuracy (points)")


def test_strategy_plot_of_untagged_rows_has_one_panel(tmp_path, saved_figures):
    """Without tagged strategies there is no control-strength panel; without rows, no plot."""
    rows = [StrategyRow("none", 100.0, seeds=[0], accuracy={"x": {"mean": 0.5, "lo": 0.25, "hi": 0.75}}, per_seed={"0": 0.5}),
            StrategyRow("positive_only", None, seeds=[0], accuracy={}, per_seed={})]
    assert strategy_table.plot(rows, tmp_path) == tmp_path / "plot_strategies.png"
    assert Image.open(tmp_path / "plot_strategies.png").size == (720, 480)
    (ax,) = saved_figures[0].axes
    bars = _bars(ax)
    assert bars[0] == ("none (NUT), 100 neg", 50.0, 25.0, 75.0)
    assert bars[1][0] == "positive_only" and math.isnan(bars[1][1])  # a row without that test set: an empty (NaN) bar
    assert strategy_table.plot([], tmp_path / "absent") is None


def test_strategy_table_cells():
    """The printed and written table: intervals in percent, per-seed means, untagged rows, gaps."""
    rows = [StrategyRow("graded", 2000.0, seeds=[0, 1], accuracy={"x": {"mean": 0.5, "lo": 0.25, "hi": 0.75}},
                        per_seed={"1": 0.25, "0": 0.75}, control={"diff": 0.125, "lo": -0.0625, "hi": 0.25, "p_value": 0.03125},
                        action_error_rate=0.0625, mean_steps=2.5),
            StrategyRow("custom", None, seeds=[3], accuracy={"y": {"mean": float("nan"), "lo": 0.0, "hi": 0.0}})]
    header, cells = strategy_table.table_rows(rows)
    assert header == ["strategy", "seeds", "x acc % [95% CI]", "y acc % [95% CI]", "per seed %",
                      "control strength (pos-neg) [95% CI]", "action errors %", "steps"]
    assert cells == [
        ["graded (NAT), 2000 neg", "2", "50.0 [25.0, 75.0]", "-", "75.0, 25.0", "12.5 [-6.2, 25.0] p=0.0312", "6.2", "2.50"],
        ["custom", "1", "-", "-", "", "untagged", "-", "-"],
    ]


# --------------------------------------------------------------------------- base model vs trained (baseline.py)

@pytest.mark.parametrize("stat, percent, cell", [
    ({"mean": 0.5, "lo": 0.25, "hi": 0.75}, True, "50.0 [25.0, 75.0]"),
    ({"mean": 2.5, "lo": 1.0, "hi": 4.0}, False, "2.5 [1.0, 4.0]"),
    ({"mean": 0.125}, True, "12.5"),
    ({"mean": 0.125, "lo": 0.1}, True, "12.5"),
    ({"lo": 0.1, "hi": 0.2}, True, "-"),
    (None, True, "-"),
])
def test_baseline_cells(stat, percent, cell):
    """A cell of the base-vs-trained table: a fraction in percent (steps as they are), the interval
    when both ends are known, '-' without a mean."""
    assert format_ci(stat, scale=100.0 if percent else 1.0) == cell


def _metrics(primary: str, reward: float, steps: float) -> dict:
    return {"primary": primary, "results": {
        "none": {"test_sets": {"wrong": {}}},
        primary: {"test_sets": {"arith": {"n_questions": 6, "reward": {"mean": reward, "lo": 0.0, "hi": 1.0},
                                          "action_error_rate": 0.25, "mean_steps": {"mean": steps}}}}}}


def test_print_comparison_shows_base_and_trained(capsys):
    """One row per model and test set, from each metrics file's primary tag mode."""
    base, trained = _metrics("none", 0.5, 2.0), _metrics("positive", 0.75, 1.5)
    assert comparison_rows(trained) == [("arith", trained["results"]["positive"]["test_sets"]["arith"])]
    print_comparison(base, trained, {"tagging": {"strategy": "prefix"}, "model": {"name": "tiny"}, "task": {"name": "arith"}})
    out = capsys.readouterr().out
    assert "tiny on arith: base vs trained (prefix)" in out
    rows = [[c.strip() for c in line[1:-1].replace("┃", "│").split("│")] for line in out.splitlines() if line and line[0] in "┃│"]
    assert rows == [["model", "test set", "questions", "accuracy % [95% CI]", "strict %", "action errors %", "steps"],
                    ["base", "arith", "6", "50.0 [0.0, 100.0]", "-", "25.0", "2.0"],
                    ["trained (prefix)", "arith", "6", "75.0 [0.0, 100.0]", "-", "25.0", "1.5"]]


def test_evaluate_base_runs_the_untrained_model_untagged(tmp_path):
    """The base model is evaluated on the run's task and render settings with the run's evaluator
    settings, without a tag and without the trained run (whatever the overrides name)."""
    resolved = {"model": TINY_MODEL, "task": {"name": "arith", "n_test": 2, "max_turns": 1},
                "render": {"max_length": 1024, "instructions_role": "user", "end_of_turn": None}}
    overrides = {"sampling": {"max_new_tokens": 4}, "backend": {"threads": 1}, "progress": False,
                 "tag_mode": "all", "run_dir": str(tmp_path / "trained")}
    metrics = evaluate_base(resolved, overrides, tmp_path / "eval_base")
    assert (metrics["tag_mode"], list(metrics["results"]), metrics["model"], metrics["task"]) == ("none", ["none"], "tiny", "arith")
    assert metrics["training"]["strategy"] == "base" and metrics["sampling"]["max_new_tokens"] == 4
    assert metrics["setup"].endswith(" max_new_tokens=4 max_turns=1 instructions_role=user")  # the run's render settings
    records = [json.loads(line) for line in (tmp_path / "eval_base" / "trajectories.jsonl").read_text().splitlines()]
    assert [(r["provenance"]["tag_mode"], r["provenance"]["tag"]) for r in records] == [("none", None)] * 2
    assert all(r["messages"][0]["content"] for r in records)  # the model generated text
