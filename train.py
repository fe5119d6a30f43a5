"""Fine-tune a model on labelled trajectories with a tagging strategy.

    python train.py data.trajectories=runs/gen/trajectories.jsonl tagging=prefix
    python train.py debug=smoke data.trajectories=T hydra.run.dir=/tmp/smoke
    python train.py debug=smoke data.trajectories=T trainer=zero3 trainer.nproc_per_node=2

This process resolves the config, checks the data (writing `manifest.json`), freezes the config
into the run directory and trains: in this process, or on torchrun ranks that read the frozen
config (`negagent.launch`). Rerunning the command of an unfinished run resumes it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from negagent import launch
from negagent.config import check_group_overrides
from negagent.data import prepare
from negagent.errors import exit_on_user_error
from negagent.models import load_tokenizer
from negagent.render import Renderer
from negagent.tasks import get_task
from negagent.training import check_trainer_config, samples_digest


@hydra.main(version_base=None, config_path="conf", config_name="train")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    hydra_cfg = hydra.core.hydra_config.HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    excluded = list(hydra_cfg.job.config.override_dirname.exclude_keys)
    resolved = launch.resolve_config(cfg, list(hydra_cfg.overrides.task), run_dir, name_excludes=excluded)
    check_trainer_config(resolved["trainer"])
    launch.check_nproc(int(resolved["trainer"]["nproc_per_node"]))
    resuming = launch.check_run_dir(run_dir, resolved)
    task = get_task(resolved["task"])
    tokenizer = load_tokenizer(resolved["model"])
    renderer = Renderer(tokenizer, max_length=resolved["render"]["max_length"], end_of_turn=resolved["render"]["end_of_turn"])
    samples, manifest = prepare(resolved, task, renderer)
    manifest["samples_sha256"] = samples_digest(samples)
    for sample in samples[: cfg.data.preview]:
        print(f"--- sample {sample.id} (positive={sample.positive}) ---\n{renderer.debug_view(sample)}")
    print(json.dumps(manifest["samples"], indent=2))
    if not resuming:
        (run_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
        launch.freeze(run_dir, resolved)
    launch.run(run_dir, resolved)


if __name__ == "__main__":
    exit_on_user_error(check_group_overrides)(sys.argv[1:])
    exit_on_user_error(launch.refuse_finished_run_dir)(sys.argv[1:])
    main()
