"""Sweep reports: a table and plots over training runs, and a paired comparison of two runs.

    python -m negagent.report multirun/train/2024-05-01_12-00-00 [--out DIR] [--compare RUN_A RUN_B]

Layout it reads (`negagent.rundir`). A *member* is a directory with any of: `config.yaml`,
`.hydra/config.yaml`, `manifest.json`, `metrics.json`, `eval/metrics.json`, `done`. Each argument is a member, or a
multirun directory searched (a few levels deep) for members; the search does not descend into a
member. A member's evaluation is `<member>/eval/metrics.json` (written by train.py's final
evaluation or `python evaluate.py run_dir=<member>`), else `<member>/metrics.json` (an evaluate.py
output directory). Its coordinates (strategy, negatives, seed) come from metrics.json's `training`
section, else from the member's frozen config and manifest. A member without metrics is listed as
missing, with its path, never dropped.

Outputs in --out (default: the first argument): report.md, report.csv, one PNG per headline
metric (metric against the number of negatives, a line per strategy, like the paper's Figure 1),
the strategy comparison pooled over seeds (strategies.md / .csv / plot_strategies.png, printed
too; see `negagent.report.strategy_table`), and with two members (or --compare) comparison.md /
comparison.json: which questions flipped and an exact paired test.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

from negagent import rundir
from negagent.errors import NegagentError, exit_on_user_error
from negagent.metrics import format_ci, question_scores
from negagent.report import strategy_table

_SEARCH_DEPTH = 16  # run names that hold path values (data.trajectories=/a/b.jsonl) nest folders


@dataclass
class RunResult:
    """One run of a sweep: where it is, its coordinates, and its metrics (None: missing)."""

    path: Path
    strategy: str | None = None
    neg_num: Any = None
    negatives_used: int | None = None
    seed: Any = None
    metrics: dict | None = None
    metrics_path: Path | None = None
    problem: str | None = None  # why metrics are missing
    values: dict[str, dict] = field(default_factory=dict)  # column -> {mean, lo, hi}

    @cached_property
    def _episodes(self) -> list:
        from negagent.trajectory import load_trajectories

        return load_trajectories(_trajectory_file(self))[0]

    def episodes(self, tag_mode: str) -> list:
        """The evaluated episodes under one tag mode (from the trajectories next to metrics.json, read once)."""
        return [t for t in self._episodes if t.provenance.get("tag_mode", tag_mode) == tag_mode]

    @property
    def negatives(self) -> float | None:
        """x of the plots: the configured number of negatives, else the number the run used."""
        for value in (self.neg_num, self.negatives_used):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
        return None


def find_members(paths: Sequence[str | Path]) -> list[Path]:
    """Every member in or at `paths`, in sorted order, each once."""
    found: list[Path] = []

    def walk(path: Path, depth: int) -> None:
        if rundir.is_run(path):
            found.append(path)
            return
        if depth >= _SEARCH_DEPTH:
            return
        for child in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
            walk(child, depth + 1)

    for raw in paths:
        path = Path(raw)
        if not path.is_dir():
            raise NegagentError(f"{path}: no such directory")
        before = len(found)
        walk(path, 0)
        if len(found) == before:
            raise NegagentError(f"{path}: no run directories in it (none holds config.yaml, .hydra/, metrics.json or eval/)")
    unique: list[Path] = []
    for path in found:
        if path.resolve() not in {p.resolve() for p in unique}:
            unique.append(path)
    return unique


def _frozen(path: Path) -> dict:
    try:
        return rundir.read_config(path)[0]
    except NegagentError:  # an absent or unreadable config only costs the coordinates, not the report
        return {}


def load_member(path: Path) -> RunResult:
    """A member with its coordinates and metrics (or the reason they are missing)."""
    from negagent.model_source import training_summary

    member = RunResult(path)
    candidate = rundir.evaluation_metrics(path)
    if candidate is not None:
        member.metrics = rundir.read_json(candidate)
        member.metrics_path = candidate
        if member.metrics is None or "results" not in member.metrics:
            member.problem = f"{candidate} is not an evaluation metrics file"
            member.metrics = None
    else:
        member.problem = (f"no metrics: neither {path / rundir.EVAL / rundir.METRICS} nor "
                          f"{path / rundir.METRICS} exists")
    training = dict((member.metrics or {}).get("training") or {})
    if not training.get("strategy"):
        training = {**training_summary(_frozen(path), rundir.read_manifest(path)), **{k: v for k, v in training.items() if v is not None}}
    member.strategy = training.get("strategy")
    member.neg_num = training.get("neg_num")
    member.negatives_used = training.get("negatives_used")
    member.seed = training.get("seed")
    if member.metrics:
        member.values = columns(member.metrics)
    return member


def columns(metrics: dict) -> dict[str, dict]:
    """Flat table columns of one metrics.json (its primary tag mode): name -> {mean, lo, hi}."""
    primary = metrics.get("primary") or next(iter(metrics["results"]))
    result = metrics["results"][primary]
    out: dict[str, dict] = {}
    for set_name, stats in result.get("test_sets", {}).items():
        names = [k for k, v in stats.items() if isinstance(v, dict) and "mean" in v and k not in ("mean_steps",)]
        if len(names) > 1:
            names.remove("reward")  # the reward repeats one of the task's own metrics
        for name in names:
            out[f"{set_name}.{name}"] = stats[name]
        for name, value in stats.items():
            if name.startswith("pass@") and name != "pass@1":
                out[f"{set_name}.{name}"] = {"mean": value}
    if len(result.get("test_sets", {})) > 1:
        for name, value in result.get("average", {}).items():
            if name != "reward":
                out[f"average.{name}"] = {"mean": value}
    overall = result.get("overall") or {}
    if "action_error_rate" in overall:
        out["action_error_rate"] = {"mean": overall["action_error_rate"]}
    steps = [s["mean_steps"]["mean"] for s in result.get("test_sets", {}).values() if "mean_steps" in s]
    if steps:
        out["mean_steps"] = {"mean": sum(steps) / len(steps)}
    strength = metrics.get("control_strength") or {}
    if strength.get("mean") is not None:
        out["control_strength"] = {"mean": strength["mean"]}
    return out


def headline_columns(members: Sequence[RunResult]) -> list[str]:
    """The columns plotted: each test set's reward metric (and the average over sets)."""
    names: list[str] = []
    for member in members:
        if not member.metrics:
            continue
        primary = member.metrics.get("primary") or next(iter(member.metrics["results"]))
        for set_name, stats in member.metrics["results"][primary]["test_sets"].items():
            metric = _reward_metric(stats)
            names.append(f"{set_name}.{metric}")
        if len(member.metrics["results"][primary]["test_sets"]) > 1:
            stats = next(iter(member.metrics["results"][primary]["test_sets"].values()))
            names.append(f"average.{_reward_metric(stats)}")
    return list(dict.fromkeys(names))


def _reward_metric(stats: dict) -> str:
    """The task metric that equals the reward (numeric for math, em for HotpotQA, acc for StrategyQA)."""
    reward = stats.get("reward", {}).get("mean")
    for name in ("numeric", "strict", "em", "acc"):
        if name in stats and stats[name].get("mean") == reward:
            return name
    return "reward" if "reward" in stats else next(k for k, v in stats.items() if isinstance(v, dict) and "mean" in v)


def _sort_key(member: RunResult) -> tuple:
    neg = member.negatives
    return (str(member.strategy), neg if neg is not None else math.inf, str(member.seed), str(member.path))


def write_tables(members: Sequence[RunResult], out: Path) -> list[str]:
    """report.md and report.csv; returns the metric columns."""
    cols = list(dict.fromkeys(c for m in members for c in m.values))
    lines = [
        "# Sweep report", "",
        "Means with 95% bootstrap intervals over questions (samples and seeds pooled).", "",
        "| strategy | negatives | seed | " + " | ".join(cols) + " | run |",
        "|" + "---|" * (len(cols) + 4),
    ]
    with (out / "report.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["strategy", "neg_num", "negatives_used", "seed", "status", "run"]
                        + [f"{c}{part}" for c in cols for part in ("", ".lo", ".hi")])
        for m in members:
            neg = m.neg_num if m.neg_num is not None else (f"all ({m.negatives_used})" if m.negatives_used is not None else "all")
            status = "ok" if m.metrics else f"missing: {m.problem}"
            writer.writerow([m.strategy, m.neg_num, m.negatives_used, m.seed, status, str(m.path)]
                            + [m.values.get(c, {}).get(part, "") for c in cols for part in ("mean", "lo", "hi")])
            cells = [format_ci(m.values.get(c), scale=1.0, digits=3) for c in cols] if m.metrics else [f"missing ({m.problem})"] + ["-"] * (len(cols) - 1)
            if not cols:
                cells = []
            lines.append(f"| {m.strategy} | {neg} | {m.seed} | " + " | ".join(cells) + f" | {m.path} |")
    missing = [m for m in members if not m.metrics]
    if missing:
        lines += ["", f"## Missing ({len(missing)})", ""] + [f"- {m.path}: {m.problem}" for m in missing]
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return cols


def plot(members: Sequence[RunResult], column: str, out: Path) -> Path | None:
    """Metric against number of negatives, one line per strategy (mean over seeds; bars: seed range,
    or the bootstrap interval with one seed). None when no member has both x and y."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[float, list[dict]]] = {}
    for m in members:
        value, x = m.values.get(column), m.negatives
        if value is None or x is None or value.get("mean") is None:
            continue
        series.setdefault(str(m.strategy), {}).setdefault(x, []).append(value)
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for strategy, points in sorted(series.items()):
        xs = sorted(points)
        means, lows, highs = [], [], []
        for x in xs:
            values = points[x]
            mean = sum(v["mean"] for v in values) / len(values)
            if len(values) > 1:
                lo, hi = min(v["mean"] for v in values), max(v["mean"] for v in values)
            else:
                lo, hi = values[0].get("lo", mean), values[0].get("hi", mean)
            means.append(mean)
            lows.append(mean - lo)
            highs.append(hi - mean)
        ax.errorbar(xs, means, yerr=[lows, highs], marker="o", capsize=3, label=strategy)
    ax.set_xlabel("number of negative trajectories")
    ax.set_ylabel(column)
    ax.set_title(f"{column} vs negatives")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out / f"plot_{column.replace('/', '_')}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _trajectory_file(member: RunResult) -> Path:
    if member.metrics_path is None:
        raise NegagentError(f"{member.path}: no metrics.json, so no trajectories to compare")
    name = (member.metrics or {}).get("files", {}).get("trajectories") or rundir.TRAJECTORIES
    path = member.metrics_path.parent / name
    if not path.is_file():
        raise NegagentError(f"{path}: per-question trajectories missing; cannot compare on question ids")
    return path


def compare(a: RunResult, b: RunResult, out: Path) -> dict:
    """Paired comparison of two members on the question ids both evaluated (primary tag mode)."""
    from negagent.metrics import paired_comparison

    def scores(member: RunResult) -> dict[str, float]:
        primary = member.metrics.get("primary") if member.metrics else None
        return question_scores(member.episodes(primary))

    try:
        result = paired_comparison(scores(a), scores(b))
    except ValueError as exc:
        raise NegagentError(f"cannot compare {a.path} and {b.path}: {exc}") from None
    data = {"a": str(a.path), "b": str(b.path), **result.to_dict()}
    (out / "comparison.json").write_text(json.dumps(data, indent=2), encoding="utf-8")
    lines = [
        "# Paired comparison", "",
        f"- A: {a.path}", f"- B: {b.path}",
        f"- questions in both: {result.n_common}",
        f"- mean reward: A {result.mean_a:.3f}, B {result.mean_b:.3f}; B - A = {result.diff:+.3f} "
        f"[{result.diff_lo:+.3f}, {result.diff_hi:+.3f}] (paired bootstrap 95%)",
        f"- flipped: {len(result.better_in_b)} better in B, {len(result.better_in_a)} better in A; "
        f"exact sign test (McNemar for one episode a question) p = {result.p_value:.4g}",
        "", "## Better in B", "", *[f"- {q}" for q in result.better_in_b],
        "", "## Better in A", "", *[f"- {q}" for q in result.better_in_a],
    ]
    (out / "comparison.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return data


def build_report(paths: Sequence[str | Path], out: str | Path | None = None,
                 compare_pair: Sequence[str | Path] | None = None) -> dict:
    """Write the report files; returns {members, missing, columns, plots, comparison, strategies}."""
    members = sorted((load_member(p) for p in find_members(paths)), key=_sort_key)
    out = Path(out or paths[0])
    out.mkdir(parents=True, exist_ok=True)
    cols = write_tables(members, out)
    plots = [str(p) for p in (plot(members, c, out) for c in headline_columns(members)) if p]
    strategies = strategy_table.summarize(members)
    if strategies:
        strategy_table.write(strategies, out)
        plots.append(str(strategy_table.plot(strategies, out)))
    comparison = None
    if compare_pair:
        pair = [load_member(Path(p)) for p in compare_pair]
        comparison = compare(pair[0], pair[1], out)
    elif len(members) == 2 and all(m.metrics for m in members):
        comparison = compare(members[0], members[1], out)
    return {
        "members": [str(m.path) for m in members],
        "missing": [f"{m.path}: {m.problem}" for m in members if not m.metrics],
        "columns": cols,
        "plots": plots,
        "comparison": comparison,
        "strategies": strategies,
        "out": str(out),
    }


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m negagent.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", help="multirun directories or run directories")
    parser.add_argument("--out", help="where to write the report (default: the first directory)")
    parser.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"), help="paired comparison of two runs")
    args = parser.parse_args(argv)
    summary = build_report(args.dirs, args.out, args.compare)
    if summary["strategies"]:
        strategy_table.print_table(summary["strategies"])
    print(f"{len(summary['members'])} runs, {len(summary['missing'])} without metrics")
    for line in summary["missing"]:
        print(f"  missing: {line}")
    out = Path(summary["out"])
    print(f"report: {out / 'report.md'}, {out / 'report.csv'}" + (f", {out / 'strategies.md'}" if summary["strategies"] else ""))
    for path in summary["plots"]:
        print(f"plot: {path}")
    if summary["comparison"]:
        c = summary["comparison"]
        print(f"comparison: B - A = {c['diff']:+.3f}, {len(c['better_in_b'])} better in B, "
              f"{len(c['better_in_a'])} better in A, p = {c['p_value']:.4g}")


if __name__ == "__main__":
    main(sys.argv[1:])
