"""Which model a backend runs: a training run directory, a base model, or a model behind an API,
with the settings it was trained with (its tag, render settings and task). The evaluator evaluates a
`ModelSource`; collection can use one as its teacher; both load it through `negagent.backends`.

A training run directory (`negagent.rundir`) holds a frozen resolved config (`config.yaml` or
`.hydra/config.yaml`, with `model`, `tagging`, `task` and `render` sections), optionally `manifest.json`, and the trained
weights, either a peft adapter (`adapter_config.json` + `adapter_model.*`) or a full model
(`config.json` + `*.safetensors` / `pytorch_model*.bin`), in the directory itself or in one
sub-folder (`model/`, `final/`, ...). Files are detected, never assumed; intermediate
`checkpoint-*` folders are used only when named directly (`run_dir=<run>/checkpoint-500`, whose
config is then read from the parent). An adapter is applied to the base model named by the frozen
`model` config and merged in memory, so no manual merge step is needed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from negagent import rundir
from negagent.errors import NegagentError

_PREFERRED_SUBDIRS = ("model", "final", "adapter", "output")
_SKIPPED_SUBDIRS = (rundir.EVAL, rundir.EVAL_BASE, rundir.COLLECTED, rundir.EXPORT, "wandb", "logs")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass
class ModelSource:
    """A model to run and the settings it was trained with."""

    label: str  # a short name for tables and provenance
    model_cfg: dict  # the `model` config: the base model (for adapters) or the model itself
    tagging_cfg: dict  # tagging strategy the model was trained with (decides the inference tag)
    render_cfg: dict = field(default_factory=dict)
    task_cfg: dict | None = None  # the run's task section, when from a run directory
    weights_dir: Path | None = None  # a full fine-tuned model; None: load `model_cfg`
    adapter_dir: Path | None = None  # a peft adapter on top of the base model
    run_dir: Path | None = None
    training: dict = field(default_factory=dict)  # strategy, neg_num, pos_num, seed, negatives used

    def fingerprint(self) -> str:
        """Changes when the evaluated weights change (names and sizes of the weight files)."""
        digest = hashlib.sha256(json.dumps([self.label, self.model_cfg.get("name")]).encode())
        for folder in (self.weights_dir, self.adapter_dir):
            if folder is not None:
                for path in sorted(folder.iterdir()):
                    if path.is_file() and path.suffix in (".safetensors", ".bin"):
                        digest.update(f"{path.name}:{path.stat().st_size}".encode())
        return digest.hexdigest()[:16]


def _has_weights(folder: Path, stem: str) -> bool:
    return any(folder.glob(f"{stem}*.safetensors")) or any(folder.glob(f"{stem}*.bin"))


def _model_kind(folder: Path) -> str | None:
    if (folder / "adapter_config.json").is_file() and _has_weights(folder, "adapter_model"):
        return "adapter"
    if (folder / "config.json").is_file() and (_has_weights(folder, "model") or _has_weights(folder, "pytorch_model")):
        return "full"
    return None


def find_model_files(run_dir: Path) -> tuple[str, Path]:
    """("adapter" | "full", folder) of the trained weights in `run_dir`, or a one-line error."""
    subdirs = sorted(p for p in run_dir.iterdir() if p.is_dir()) if run_dir.is_dir() else []
    preferred = [run_dir / name for name in _PREFERRED_SUBDIRS if (run_dir / name).is_dir()]
    others = [
        p for p in subdirs
        if p not in preferred and not p.name.startswith((".", "checkpoint-")) and p.name not in _SKIPPED_SUBDIRS
    ]
    for folder in [run_dir, *preferred, *others]:
        kind = _model_kind(folder)
        if kind:
            return kind, folder
    checkpoints = [p.name for p in subdirs if p.name.startswith("checkpoint-") and _model_kind(p)]
    hint = (
        f"; only intermediate checkpoints ({', '.join(checkpoints)}): the run did not finish, pass "
        f"run_dir={run_dir}/{checkpoints[-1]} to evaluate one" if checkpoints else ""
    )
    raise NegagentError(
        f"{run_dir}: no trained model in this run directory (expected adapter_config.json + "
        f"adapter_model.safetensors, or config.json + model.safetensors){hint}"
    )


def training_summary(config: Mapping[str, Any], manifest: Mapping[str, Any]) -> dict:
    """The sweep coordinates of a run: strategy, neg_num, pos_num, seed and negatives actually used."""
    tagging = config.get("tagging") or {}
    samples = (manifest.get("samples") or {}) if isinstance(manifest, Mapping) else {}
    negatives = (samples.get("negative") or {}).get("samples")
    positives = (samples.get("positive") or {}).get("samples")
    return {
        "strategy": tagging.get("strategy"),
        "neg_num": tagging.get("neg_num"),
        "pos_num": tagging.get("pos_num"),
        "seed": config.get("seed", tagging.get("seed")),
        "negatives_used": negatives,
        "positives_used": positives,
        "task": (config.get("task") or {}).get("name"),
        "model": (config.get("model") or {}).get("name"),
    }


def from_run_dir(run_dir: str | Path) -> ModelSource:
    """The model trained in `run_dir`, with its frozen model, tagging, render and task settings."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise NegagentError(f"run_dir={run_dir}: no such directory")
    kind, folder = find_model_files(run_dir)
    # Older runs have only Hydra's unresolved .hydra/config.yaml (model paths such as ${cache_dir}).
    config, config_path = rundir.read_config(run_dir, look_in_parent=True, resolve=True)
    if not isinstance(config.get("model"), Mapping):
        raise NegagentError(f"{config_path}: no `model` section; this is not a training run's config")
    if not rundir.is_trained(run_dir, look_in_parent=True):
        print(f"note: {run_dir} has no '{rundir.TRAINED}' marker: training may not have finished", flush=True)
    return ModelSource(
        label=run_dir.name if run_dir.name else str(run_dir),
        model_cfg=dict(config["model"]),
        tagging_cfg=dict(config.get("tagging") or {"strategy": "none"}),
        render_cfg=dict(config.get("render") or {}),
        task_cfg=dict(config["task"]) if isinstance(config.get("task"), Mapping) else None,
        weights_dir=folder if kind == "full" else None,
        adapter_dir=folder if kind == "adapter" else None,
        run_dir=run_dir,
        training={**training_summary(config, rundir.read_manifest(run_dir, look_in_parent=True)), "run_dir": str(run_dir)},
    )


def base_model(model_cfg: Mapping[str, Any], tagging_cfg: Mapping[str, Any], render_cfg: Mapping[str, Any]) -> ModelSource:
    """A model from the `model` config group, evaluated as it is."""
    return ModelSource(
        label=str(model_cfg.get("name")),
        model_cfg=dict(model_cfg),
        tagging_cfg=dict(tagging_cfg),
        render_cfg=dict(render_cfg),
        training={"strategy": "base", "neg_num": None, "pos_num": None, "seed": None,
                  "model": model_cfg.get("name")},
    )


def load_tokenizer_for(subject: ModelSource):
    """The tokenizer saved with the trained weights when there is one, else the model config's."""
    from negagent.models import load_tokenizer

    for folder in (subject.weights_dir, subject.adapter_dir):
        if folder is not None and any((folder / name).is_file() for name in _TOKENIZER_FILES):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(folder)
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            if tokenizer.chat_template:
                return tokenizer
    return load_tokenizer(subject.model_cfg)


def load_causal_lm(subject: ModelSource, tokenizer, *, dtype: str | None = None, device: str = "auto"):
    """The model in eval mode on `device` ("auto": cuda when available); adapters are merged in memory."""
    import torch
    from transformers import AutoModelForCausalLM

    from negagent.models import load_model

    if subject.weights_dir is not None:
        model = AutoModelForCausalLM.from_pretrained(subject.weights_dir, dtype=getattr(torch, dtype) if dtype else None)
    else:
        model = load_model(subject.model_cfg, dtype=dtype)
    if subject.adapter_dir is not None:
        from peft import PeftModel

        # An adapter trained after new tokens were added carries the larger embedding matrix.
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
        try:
            model = PeftModel.from_pretrained(model, subject.adapter_dir).merge_and_unload()
        except Exception as exc:  # a shape or key mismatch means the adapter is for another base model
            reason = " ".join(str(exc).split())[:300]
            raise NegagentError(
                f"{subject.adapter_dir}: the adapter does not fit base model '{subject.model_cfg.get('name')}' ({reason})"
            ) from None
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval()
