"""The untrained model next to a trained one: evaluate the base model under the same settings and
print both side by side (the end of the default experiment)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table


def evaluate_base(resolved: Mapping[str, Any], overrides: Mapping[str, Any], out_dir: Path) -> dict:
    """Evaluate `resolved["model"]` untrained (no tag) with the evaluator `overrides` used for the run."""
    from negagent.evaluation import default_config, evaluate

    cfg = OmegaConf.merge(
        default_config(),
        OmegaConf.create(dict(overrides)),
        {"run_dir": None, "model": resolved["model"], "task": resolved["task"], "render": resolved["render"],
         "tagging": {"strategy": "none"}, "tag_mode": "none"},
    )
    return evaluate(cfg, out_dir)


def _cell(stat: Any, percent: bool = True) -> str:
    if not isinstance(stat, Mapping) or "mean" not in stat:
        return "-"
    scale = 100.0 if percent else 1.0
    mean, lo, hi = (stat.get(k) for k in ("mean", "lo", "hi"))
    if lo is None or hi is None:
        return f"{mean * scale:.1f}"
    return f"{mean * scale:.1f} [{lo * scale:.1f}, {hi * scale:.1f}]"


def comparison_rows(metrics: Mapping[str, Any]) -> list[tuple[str, dict]]:
    """(test set, summary) pairs of a metrics.json's primary tag mode."""
    primary = metrics["results"][metrics["primary"]]
    return list(primary["test_sets"].items())


def print_comparison(base: Mapping[str, Any], trained: Mapping[str, Any], resolved: Mapping[str, Any]) -> None:
    """A table: per test set, accuracy (with 95% intervals), action error rate and steps, base vs trained."""
    strategy = resolved["tagging"]["strategy"]
    table = Table(title=f"{resolved['model']['name']} on {resolved['task']['name']}: base vs trained ({strategy})")
    for column in ("model", "test set", "questions", "accuracy % [95% CI]", "strict %", "action errors %", "steps"):
        table.add_column(column)
    for label, metrics in (("base", base), (f"trained ({strategy})", trained)):
        for name, summary in comparison_rows(metrics):
            table.add_row(
                label, name, str(summary.get("n_questions", "-")), _cell(summary.get("reward")),
                _cell(summary.get("strict")), _cell({"mean": summary.get("action_error_rate", 0.0)}),
                _cell(summary.get("mean_steps"), percent=False),
            )
    Console(width=150).print(table)
