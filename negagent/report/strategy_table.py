"""The strategy comparison of a sweep: members of one strategy pooled over their seeds.

A row is one (strategy, number of negatives) with every seed's run in it. Its accuracy is the
task reward under the run's primary tag (the success tag; no tag for untagged strategies), one
column per test set, each with a 95% bootstrap interval that resamples questions while each
question keeps the episodes of all seeds. Its control strength is the success-tag minus the
failure-tag reward, paired over questions (all test sets pooled), for strategies trained with tags.

Written next to the sweep report as strategies.md / strategies.csv / plot_strategies.png, and
printed as a table.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from negagent.metrics import format_ci, mean_ci, paired_comparison, question_scores

# The paper's baselines first, then its method, then anything else alphabetically.
_ORDER = {"base": -1, "positive_only": 0, "none": 1, "prefix": 2, "suffix": 3, "graded": 4}
_PAPER_NAMES = {"none": "none (NUT)", "prefix": "prefix (NAT)", "suffix": "suffix (NAT)", "graded": "graded (NAT)"}


@dataclass
class StrategyRow:
    """One strategy (at one number of negatives) over its seeds."""

    strategy: str
    negatives: float | None
    seeds: list[Any] = field(default_factory=list)
    accuracy: dict[str, dict] = field(default_factory=dict)  # test set -> {mean, lo, hi, n_questions, n_episodes}
    per_seed: dict[str, float] = field(default_factory=dict)  # seed -> mean reward over test sets
    control: dict | None = None  # {diff, lo, hi, p_value, positive, negative}; None: untagged
    action_error_rate: float | None = None
    mean_steps: float | None = None  # actions per episode, over test sets and seeds

    @property
    def label(self) -> str:
        name = _PAPER_NAMES.get(self.strategy, self.strategy)
        return name if self.negatives is None else f"{name}, {self.negatives:g} neg"


def summarize(members: Sequence) -> list[StrategyRow]:
    """Rows for every evaluated member, grouped by (strategy, negatives); members without metrics
    are left to the sweep report's missing list."""
    groups: dict[tuple, list] = defaultdict(list)
    for m in members:
        if m.metrics:
            groups[(str(m.strategy), m.negatives if m.neg_num is not None else None)].append(m)
    rows = []
    for (strategy, negatives), runs in groups.items():
        row = StrategyRow(strategy, negatives, seeds=sorted((m.seed for m in runs), key=str))
        by_question: dict[str, list[float]] = defaultdict(list)
        positive: dict[str, float] = {}  # "<run>/<question>" -> score under each tag
        negative: dict[str, float] = {}
        errors, steps = [], []
        for run, m in enumerate(runs):
            primary = m.metrics.get("primary") or next(iter(m.metrics["results"]))
            scores = question_scores(m.episodes(primary))
            for q, v in scores.items():
                by_question[q].append(v)
            row.per_seed[str(m.seed)] = sum(scores.values()) / len(scores) if scores else math.nan
            errors.append(m.metrics["results"][primary].get("overall", {}).get("action_error_rate"))
            steps += [s["mean_steps"]["mean"] for s in m.metrics["results"][primary]["test_sets"].values() if "mean_steps" in s]
            if "negative" in m.metrics["results"]:
                positive.update((f"{run}/{q}", v) for q, v in question_scores(m.episodes("positive")).items())
                negative.update((f"{run}/{q}", v) for q, v in question_scores(m.episodes("negative")).items())
        for test_set in sorted({q.split("/", 1)[0] for q in by_question}):
            row.accuracy[test_set] = mean_ci([v for q, v in by_question.items() if q.split("/", 1)[0] == test_set])
        known = [e for e in errors if e is not None]
        row.action_error_rate = sum(known) / len(known) if known else None
        row.mean_steps = sum(steps) / len(steps) if steps else None
        if positive and negative:
            # A question of a run is one pair: seeds add pairs, they are not averaged away.
            cmp = paired_comparison(negative, positive)
            row.control = {"diff": cmp.diff, "lo": cmp.diff_lo, "hi": cmp.diff_hi, "p_value": cmp.p_value,
                           "positive": cmp.mean_b, "negative": cmp.mean_a}
        rows.append(row)
    return sorted(rows, key=lambda r: (_ORDER.get(r.strategy, 99), r.strategy, r.negatives if r.negatives is not None else math.inf))


def table_rows(rows: Sequence[StrategyRow]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the comparison table (accuracies and control strength in points)."""
    sets = list(dict.fromkeys(s for r in rows for s in r.accuracy))
    header = ["strategy", "seeds"] + [f"{s} acc % [95% CI]" for s in sets] + ["per seed %", "control strength (pos-neg) [95% CI]", "action errors %", "steps"]
    cells = []
    for r in rows:
        per_seed = ", ".join(f"{v * 100:.1f}" for _, v in sorted(r.per_seed.items()))
        control = "untagged" if r.control is None else f"{format_ci(r.control)} p={r.control['p_value']:.3g}"
        errors = "-" if r.action_error_rate is None else f"{r.action_error_rate * 100:.1f}"
        steps = "-" if r.mean_steps is None else f"{r.mean_steps:.2f}"
        cells.append([r.label, str(len(r.seeds))] + [format_ci(r.accuracy.get(s)) for s in sets] + [per_seed, control, errors, steps])
    return header, cells


def write(rows: Sequence[StrategyRow], out: Path) -> list[Path]:
    """strategies.md and strategies.csv in `out`; returns their paths."""
    header, cells = table_rows(rows)
    lines = [
        "# Strategy comparison", "",
        "Accuracy under the success tag (no tag for untagged strategies), in percent, pooled over seeds:",
        "95% bootstrap intervals resample questions, each keeping its episodes of every seed. Control",
        "strength: success-tag minus failure-tag accuracy, paired per question and seed, with an exact",
        "sign test.", "",
        "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
        *["| " + " | ".join(c) + " |" for c in cells],
    ]
    md = out / "strategies.md"
    md.write_text("\n".join(lines) + "\n", encoding="utf-8")
    path = out / "strategies.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["strategy", "negatives", "seeds", "test_set", "mean", "lo", "hi", "n_questions", "n_episodes",
                         "control", "control_lo", "control_hi", "control_p"])
        for r in rows:
            c = r.control or {}
            for test_set, a in r.accuracy.items():
                writer.writerow([r.strategy, r.negatives, " ".join(map(str, r.seeds)), test_set, a["mean"], a["lo"], a["hi"],
                                 a["n_questions"], a["n_episodes"], c.get("diff", ""), c.get("lo", ""), c.get("hi", ""), c.get("p_value", "")])
    return [md, path]


def print_table(rows: Sequence[StrategyRow]) -> None:
    from rich.console import Console
    from rich.table import Table

    header, cells = table_rows(rows)
    table = Table(title="Strategies (pooled over seeds; 95% intervals)")
    for name in header:
        table.add_column(name, justify="left" if name == "strategy" else "right")
    for c in cells:
        table.add_row(*c)
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    Console(width=max(100, sum(widths) + 3 * len(widths) + 1)).print(table)  # one line a row, even in a narrow log


def plot(rows: Sequence[StrategyRow], out: Path) -> Path | None:
    """plot_strategies.png: accuracy per strategy (bar: pooled mean, whisker: 95% interval, dots:
    seeds) and, beside it, the control strength of tagged strategies. None without rows."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    test_set = next(iter(rows[0].accuracy), None)
    tagged = [r for r in rows if r.control is not None]
    fig, axes = plt.subplots(1, 2 if tagged else 1, figsize=(10 if tagged else 6, 4), squeeze=False)
    ax = axes[0][0]
    xs = range(len(rows))
    means = [r.accuracy[test_set]["mean"] * 100 if test_set in r.accuracy else math.nan for r in rows]
    low = [m - r.accuracy[test_set]["lo"] * 100 if test_set in r.accuracy else 0 for m, r in zip(means, rows)]
    high = [r.accuracy[test_set]["hi"] * 100 - m if test_set in r.accuracy else 0 for m, r in zip(means, rows)]
    ax.bar(xs, means, yerr=[low, high], capsize=4, color="#8fb3d9", edgecolor="#2b5d8a")
    for x, r in zip(xs, rows):
        seeds = list(r.per_seed.values())
        ax.scatter([x] * len(seeds), [v * 100 for v in seeds], color="black", s=12, zorder=3)
    ax.set_xticks(list(xs), [r.label for r in rows], rotation=20, ha="right")
    ax.set_ylabel(f"{test_set} accuracy % (success tag)")
    ax.set_title("accuracy: pooled mean, 95% CI, seeds as dots")
    ax.grid(axis="y", alpha=0.3)
    if tagged:
        ax = axes[0][1]
        xs = range(len(tagged))
        diffs = [r.control["diff"] * 100 for r in tagged]
        ax.bar(xs, diffs, yerr=[[d - r.control["lo"] * 100 for d, r in zip(diffs, tagged)],
                                [r.control["hi"] * 100 - d for d, r in zip(diffs, tagged)]],
               capsize=4, color="#e3a86b", edgecolor="#8a5a2b")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(list(xs), [r.label for r in tagged], rotation=20, ha="right")
        ax.set_ylabel("success-tag minus failure-tag accuracy (points)")
        ax.set_title("control strength, 95% CI")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = out / "plot_strategies.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
