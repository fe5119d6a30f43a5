"""Fine-tune a model on labelled trajectories with a tagging strategy.

    python train.py data.trajectories=runs/gen/trajectories.jsonl tagging=prefix
    python train.py debug=smoke data.trajectories=T hydra.run.dir=/tmp/smoke
    python train.py debug=smoke data.trajectories=T trainer=zero3 trainer.nproc_per_node=2

This process resolves the config, checks the data (writing `manifest.json`), freezes the config
into the run directory and trains: in this process, or on torchrun ranks that read the frozen
config (`negagent.training.launch`). Rerunning the command of an unfinished run resumes it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from negagent import rundir, sweep
from negagent.config import CONF_DIR, check_group_overrides
from negagent.errors import NegagentError, exit_on_user_error
from negagent.models import check_model_settings, load_tokenizer
from negagent.render import build_renderer
from negagent.tasks import get_task
from negagent.tools.toolbox import check_search_access
from negagent.training import launch
from negagent.training.data import prepare
from negagent.training.recipe import check_trainer_config, samples_digest


@hydra.main(version_base=None, config_path="conf", config_name="train")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    hydra_cfg = hydra.core.hydra_config.HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    # Hydra has parsed the command line and written its copies of the config and overrides (.hydra/),
    # secrets in clear; redact both (wandb records the command line from sys.argv).
    sys.argv[1:] = [launch.redact_override(arg) for arg in sys.argv[1:]]
    launch.redact_hydra_files(run_dir / hydra_cfg.output_subdir if hydra_cfg.output_subdir else None,
                              list(hydra_cfg.overrides.task))
    if sweep.skip_if_done(run_dir, cfg):
        return
    resolved = launch.resolve_config(cfg, list(hydra_cfg.overrides.task), run_dir)
    check_trainer_config(resolved["trainer"])
    check_model_settings(resolved["model"])
    launch.check_nproc(int(resolved["trainer"]["nproc_per_node"]))
    check_trajectories_given(resolved["data"])
    if resolved["trainer"].get("evaluate_after"):  # a search the evaluation cannot use should stop us before training
        check_search_access(get_task(resolved["task"]).tools, resolved["eval"]["evaluator"].get("tools") or {})
    collecting = not resolved["data"]["trajectories"]
    if collecting:
        resolved["data"]["trajectories"] = str(run_dir / rundir.COLLECTED / rundir.TRAJECTORIES)
    state = launch.check_run_dir(run_dir, resolved)
    if state != "trained":
        with rundir.training_lock(run_dir):
            state = launch.check_run_dir(run_dir, resolved)  # again: another process may have trained meanwhile
            if state != "trained":
                prepare_and_train(cfg, resolved, run_dir, state, collecting)
    outputs = [rundir.MANIFEST]
    if resolved["trainer"].get("evaluate_after"):
        outputs += evaluate_after_training(resolved, run_dir)
    sweep.mark_done(run_dir, cfg, outputs=outputs)


def check_trajectories_given(data_cfg) -> None:
    """A config with `data.collect_if_missing: false` (the paper presets) must name its trajectories."""
    if not data_cfg.get("trajectories") and not data_cfg.get("collect_if_missing", True):
        raise NegagentError(
            "data.trajectories is required by this config (data.collect_if_missing=false): pass "
            "data.trajectories=<trajectories.jsonl> from generate.py or `python -m negagent.importers`"
        )


def refuse_missing_trajectories(argv: list[str]) -> None:
    """Before Hydra launches anything (every member of a sweep alike): `check_trajectories_given` on
    the config the command line composes, sweep lists left out (they do not choose the data)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    if any(arg.split("=", 1)[0].lstrip("+~") == "data.trajectories" for arg in argv):
        return
    fixed = [arg for arg in argv if "=" in arg and not arg.startswith(("hydra", "-")) and "," not in arg.split("=", 1)[1]]
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            # Only the data section is resolved: the rest (prompt files, models) is checked when the job runs.
            data_cfg = OmegaConf.to_container(compose("train", overrides=fixed).data, resolve=True)
    except Exception:  # noqa: BLE001 - a command line that does not compose is Hydra's to report
        return
    check_trajectories_given(data_cfg)


def prepare_and_train(cfg: DictConfig, resolved: dict, run_dir: Path, state: str, collecting: bool) -> None:
    """Collect (when no data was given), check and freeze the data and config (a new run), train."""
    if collecting:
        collect_default_data(resolved, run_dir)
    task = get_task(resolved["task"])
    tokenizer = load_tokenizer(resolved["model"])
    renderer = build_renderer(tokenizer, resolved["render"])
    samples, manifest = prepare(resolved, task, renderer)
    manifest["samples_sha256"] = samples_digest(samples)
    for sample in samples[: cfg.data.preview]:
        print(f"--- sample {sample.id} (positive={sample.positive}) ---\n{renderer.debug_view(sample)}")
    print(json.dumps(manifest["samples"], indent=2))
    if state == "new":
        rundir.write_manifest(run_dir, manifest)
        rundir.freeze_config(run_dir, resolved)
    launch.run(run_dir, resolved)


def collect_default_data(resolved: dict, run_dir: Path) -> None:
    """With no `data.trajectories`, collect the task's trajectories into `<run_dir>/collected` first
    (resuming a partial collection).

    The collection depends only on the task and `collect.*` (not on the training seed or strategy),
    so every member of a comparison trains on identical data.
    """
    from negagent.collection.collect import collect

    collect({**resolved["collect"], "task": resolved["task"], "data_dir": resolved.get("data_dir")}, run_dir / rundir.COLLECTED)


def evaluate_after_training(resolved: dict, run_dir: Path) -> list[str]:
    """Evaluate the trained model (and, with `eval.compare_base`, the base model); print the table."""
    from negagent.evaluation import evaluate_run
    from negagent.evaluation.baseline import evaluate_base, print_comparison

    overrides = {"task": {k: resolved["task"][k] for k in ("limit_test",) if k in resolved["task"]},
                 "data_dir": resolved.get("data_dir"), "cache_dir": resolved.get("cache_dir"),
                 **resolved["eval"]["evaluator"]}
    trained = evaluate_run(run_dir, overrides)
    outputs = [f"{rundir.EVAL}/{rundir.METRICS}"]
    if resolved["eval"].get("compare_base"):
        base = evaluate_base(resolved, overrides, run_dir / rundir.EVAL_BASE)
        outputs.append(f"{rundir.EVAL_BASE}/{rundir.METRICS}")
        print_comparison(base, trained, resolved)
    return outputs


if __name__ == "__main__":
    exit_on_user_error(check_group_overrides)(sys.argv[1:])
    if exit_on_user_error(sweep.show_sweep_config)(sys.argv[1:], CONF_DIR, "train", "train"):
        sys.exit(0)
    exit_on_user_error(launch.refuse_finished_run_dir)(sys.argv[1:])
    exit_on_user_error(refuse_missing_trajectories)(sys.argv[1:])
    main()
