"""Evaluate a model with the shared agent loop on a task's test sets; write metrics and trajectories.

    python evaluate.py run_dir=runs/train/2024-05-01_12-00-00          # a training run (results in <run>/eval)
    python evaluate.py model=smollm2_135m task=math data_dir=DATA      # a base model
    python evaluate.py backend=openai backend.model=gpt-4o-mini task=strategyqa data_dir=DATA
    python evaluate.py run_dir=RUN tag_mode=all                        # tag sensitivity / control strength
    python evaluate.py debug=smoke hydra.run.dir=/tmp/eval-smoke
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from negagent.config import check_group_overrides
from negagent.errors import exit_on_user_error
from negagent import rundir
from negagent.evaluation import evaluate

# With run_dir set and no hydra.run.dir given, results go inside the run (<run>/eval), where
# `python -m negagent.report` looks for them.
OmegaConf.register_new_resolver(
    "eval_dir", lambda run_dir, stamp: f"{run_dir}/{rundir.EVAL}" if run_dir else f"runs/eval/{stamp}", replace=True
)


@hydra.main(version_base=None, config_path="conf", config_name="evaluate")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    out_dir = Path(hydra.core.hydra_config.HydraConfig.get().runtime.output_dir)
    metrics = evaluate(cfg, out_dir)
    summary = {
        mode: {name: {k: round(v["mean"], 4) for k, v in stats.items() if isinstance(v, dict) and "mean" in v}
               for name, stats in result["test_sets"].items()}
        for mode, result in metrics["results"].items()
    }
    print(json.dumps(summary, indent=2))
    if metrics.get("control_strength"):
        print(f"control strength (positive - negative tag reward): {metrics['control_strength']['mean']:.4f}")
    print(f"results: {out_dir}")


if __name__ == "__main__":
    exit_on_user_error(check_group_overrides)(sys.argv[1:])
    main()
