"""Fine-tune a model on labelled trajectories with a tagging strategy.

    python train.py data.trajectories=runs/gen/trajectories.jsonl tagging=prefix
    python train.py debug=smoke hydra.run.dir=/tmp/smoke
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from negagent.config import check_group_overrides
from negagent.data import prepare
from negagent.errors import exit_on_user_error
from negagent.models import load_tokenizer
from negagent.render import Renderer
from negagent.tasks import get_task


@hydra.main(version_base=None, config_path="conf", config_name="train")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    run_dir = Path(hydra.core.hydra_config.HydraConfig.get().runtime.output_dir)
    task = get_task(cfg.task)
    tokenizer = load_tokenizer(cfg.model)
    renderer = Renderer(tokenizer, max_length=cfg.render.max_length, end_of_turn=cfg.render.end_of_turn)
    samples, manifest = prepare(OmegaConf.to_container(cfg, resolve=True), task, renderer)
    for sample in samples[: cfg.data.preview]:
        print(f"--- sample {sample.id} (positive={sample.positive}) ---\n{renderer.debug_view(sample)}")
    (run_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    print(json.dumps(manifest["samples"], indent=2))


if __name__ == "__main__":
    exit_on_user_error(check_group_overrides)(sys.argv[1:])
    main()
