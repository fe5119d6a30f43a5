"""Collect labelled trajectories: a teacher answers a task's training questions with tools.

    python generate.py debug=smoke task=arith backend@teacher=scripted hydra.run.dir=runs/gen
    python generate.py task=math data_dir=DATA backend@teacher=openai teacher.model=gpt-4o-mini hydra.run.dir=runs/gsm8k
    python generate.py backend@teacher=openai teacher.base_url=http://127.0.0.1:8000/v1 teacher.api_key_env=null \
        teacher.model=/models/smollm2 protocol=paper hydra.run.dir=runs/local

Writes episodes.jsonl (every episode), trajectories.jsonl (the protocol's training set) and
stats.json into the run directory. Re-running the same command with the same hydra.run.dir resumes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from negagent.config import check_group_overrides
from negagent.errors import exit_on_user_error
from negagent.collection.collect import collect


@hydra.main(version_base=None, config_path="conf", config_name="generate")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    run_dir = Path(hydra.core.hydra_config.HydraConfig.get().runtime.output_dir)
    collect(cfg, run_dir)
    print(f"trajectories: {run_dir / 'trajectories.jsonl'}", flush=True)


if __name__ == "__main__":
    exit_on_user_error(check_group_overrides)(sys.argv[1:])
    main()
