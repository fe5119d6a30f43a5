"""The untrained model next to a trained one: evaluate the base model under the same settings and
print both side by side (the end of the default experiment)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

from negagent.metrics import format_ci


def evaluate_base(resolved: Mapping[str, Any], overrides: Mapping[str, Any], out_dir: Path) -> dict:
    """Evaluate `resolved["model"]` untrained (no tag) with the evaluator `overrides` used for the run."""
    from negagent.evaluation.evaluator import default_config, evaluate

    cfg = OmegaConf.merge(default_config(), OmegaConf.create(dict(overrides)))
    # The run's own sections replace the defaults whole (a merge would mix in another task's keys).
    for key, value in {"model": resolved["model"], "task": resolved["task"], "render": resolved["render"],
                       "tagging": {"strategy": "none"}, "run_dir": None, "tag_mode": "none"}.items():
        cfg[key] = value
    return evaluate(cfg, out_dir)


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
                label, name, str(summary.get("n_questions", "-")), format_ci(summary.get("reward")),
                format_ci(summary.get("strict")), format_ci({"mean": summary.get("action_error_rate", 0.0)}),
                format_ci(summary.get("mean_steps"), scale=1.0),
            )
    Console(width=150).print(table)
