"""The training recipe: frozen config -> trained adapter or model, verified, in the run directory.

Reads top to bottom in `train`: the memory line (`negagent.training.memory`: refuse model states
that cannot fit, before anything is loaded), arguments (before the model, so ZeRO-3 partitions it
while it loads), data (the same `negagent.training.data.prepare` the entry point ran, checked against its manifest),
micro-batch plan, model (+ LoRA), the HF `Trainer` with this project's loss, resume from the last
checkpoint, final save, verification, summary, `done`. Run it once per rank; `negagent.training.launch`
starts the ranks.

Run directory after a run (names in `negagent.rundir`): config.yaml, manifest.json, the adapter
(adapter_model.safetensors + adapter_config.json) or the full model (model.safetensors +
config.json) with the tokenizer, metrics.jsonl, summary.json, ranks/ (per rank: data order and
ZeRO partition facts), done.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch

from negagent.training import batching
from negagent.training import checkpoint
from negagent.training import deepspeed_config
from negagent.training import memory
from negagent import models
from negagent import rundir
from negagent.errors import NegagentError
from negagent.training.tracking import RunTracker

METHODS = ("lora", "full")


def samples_digest(samples) -> str:
    """SHA-256 over the rendered samples (ids, tokens, labels): every rank must train on the same."""
    digest = hashlib.sha256()
    for s in samples:
        digest.update(json.dumps([s.id, s.input_ids, s.labels]).encode())
    return digest.hexdigest()


# -- settings -------------------------------------------------------------------------------------
def distributed_env() -> tuple[int, int]:
    """(rank, world size) of this process (torchrun/deepspeed set RANK and WORLD_SIZE)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def resolve_bf16(setting: Any) -> bool:
    """`auto`: bf16 where the hardware has it (a CUDA GPU with bf16); CPUs train in fp32."""
    if setting == "auto":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if isinstance(setting, bool):
        return setting
    raise NegagentError(f"trainer.bf16={setting!r} is not auto, true or false")


def resolve_grad_accum(trainer: Mapping[str, Any], world_size: int) -> int:
    """`grad_accum`, or the one that makes `global_batch_size` samples per optimizer step."""
    per_step = int(trainer["per_device_batch_size"]) * world_size
    target = trainer.get("global_batch_size")
    if not target:
        return int(trainer["grad_accum"])
    if int(target) % per_step:
        raise NegagentError(
            f"trainer.global_batch_size={target} is not a multiple of per_device_batch_size x ranks = {per_step}"
        )
    return int(target) // per_step


def check_trainer_config(trainer: Mapping[str, Any]) -> None:
    """One-line errors for settings that would otherwise fail deep inside a rank."""
    if trainer.get("method") not in METHODS:
        raise NegagentError(f"trainer.method={trainer.get('method')!r} is not one of {', '.join(METHODS)}")
    deepspeed_config.check_stage(trainer.get("deepspeed"))
    if trainer.get("batching") not in batching.MODES:
        raise NegagentError(f"trainer.batching={trainer.get('batching')!r} is not one of {', '.join(batching.MODES)}")
    if trainer.get("loss_norm") not in batching.LOSS_NORMS:
        raise NegagentError(f"trainer.loss_norm={trainer.get('loss_norm')!r} is not one of {', '.join(batching.LOSS_NORMS)}")
    resolve_bf16(trainer.get("bf16"))
    for key in ("per_device_batch_size", "grad_accum", "nproc_per_node", "save_steps", "logging_steps"):
        if int(trainer.get(key, 1)) < 1:
            raise NegagentError(f"trainer.{key}={trainer.get(key)} must be at least 1")


# -- the Trainer with this project's loss ---------------------------------------------------------
def _trainer_class():
    from transformers import Trainer

    class NegagentTrainer(Trainer):
        """HF Trainer whose loss is `negagent.training.loss` with a normaliser over the whole optimizer step.

        The normaliser (sum of `weights` over every micro-batch of the step, on every rank) is
        computed once per step; each micro-batch's loss is its weighted sum over that, times the
        number of ranks because DeepSpeed/DDP average gradients across ranks.
        """

        loss_is_scaled_for_ga = True

        def __init__(self, *args, order_log: Path | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            self.order_log = order_log
            self.token_counts = torch.zeros(2, dtype=torch.float64)  # real, trained tokens (this rank)

        def _get_num_items_in_batch(self, batch_samples, device):
            total = sum(b["weights"].sum().double() for b in batch_samples) if batch_samples else torch.zeros((), dtype=torch.float64)
            total = torch.as_tensor(total, dtype=torch.float64, device=device).reshape(1)
            if self.args.world_size > 1:
                total = self.accelerator.gather(total).sum()
            return total.reshape(())

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            from negagent.training.loss import trained_logits, weighted_loss_sum

            targets, weights = inputs.pop("targets"), inputs.pop("weights")
            sample_index = inputs.pop("sample_index")  # what remains goes to the model as it is (packed rows:
            # position_ids and, for flash-attention, cu_seq_lens_q/k and max_length_q/k)
            if model.training and self.order_log is not None:
                with self.order_log.open("a") as fh:
                    fh.write(json.dumps({"step": self.state.global_step, "samples": sample_index.tolist()}) + "\n")
            self.token_counts += torch.tensor([batching.real_tokens(inputs), int((targets != -100).sum())], dtype=torch.float64)
            # Logits only at trained positions: the LM head at every position is most of a small model's compute.
            logits, outputs = trained_logits(model, inputs, targets)
            normaliser = num_items_in_batch if num_items_in_batch is not None else weights.sum()
            loss = weighted_loss_sum(logits, targets, weights) / normaliser.to(logits.device).float()
            loss = loss * self.accelerator.num_processes
            return (loss, outputs) if return_outputs else loss

    return NegagentTrainer


def _metrics_callback(tracker: RunTracker | None, final: dict[str, Any]):
    from transformers import TrainerCallback

    class MetricsCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or not state.is_world_process_zero:
                return
            if "loss" in logs:
                final["final_loss"] = float(logs["loss"])
                final["final_step"] = state.global_step
            if tracker is not None:
                tracker.log(logs, state.global_step)

    return MetricsCallback()


# -- pieces of the recipe -------------------------------------------------------------------------
def training_arguments(cfg: Mapping[str, Any], run_dir: Path, world_size: int):
    from transformers import TrainingArguments

    trainer = cfg["trainer"]
    bf16 = resolve_bf16(trainer["bf16"])
    grad_accum = resolve_grad_accum(trainer, world_size)
    on_cpu = not torch.cuda.is_available()
    # Only DeepSpeed's bucket sizes need the hidden size; reading the model's config costs a load.
    hidden = deepspeed_config.hidden_size(models.model_config(cfg["model"])) if trainer.get("deepspeed") else 0
    ds = deepspeed_config.build({**trainer, "grad_accum": grad_accum}, world_size=world_size, bf16=bf16,
                                hidden_size=hidden, on_gpu=not on_cpu)
    extra: dict[str, Any] = {}
    if on_cpu and ds is not None and world_size > 1:
        extra["accelerator_config"] = {"use_configured_state": True}
        _deepspeed_state_on_cpu()
    return TrainingArguments(**extra,
        output_dir=str(run_dir / rundir.CHECKPOINTS),
        per_device_train_batch_size=1,  # one planned micro-batch per forward (see negagent.training.batching)
        gradient_accumulation_steps=grad_accum,
        num_train_epochs=float(trainer["epochs"]),
        max_steps=int(trainer["max_steps"]),
        learning_rate=float(trainer["lr"]),
        lr_scheduler_type=str(trainer["scheduler"]),
        warmup_steps=float(trainer["warmup_ratio"]),  # a fraction of the steps when below 1
        weight_decay=float(trainer["weight_decay"]),
        max_grad_norm=float(trainer["max_grad_norm"]),
        bf16=bf16,
        activation_checkpointing=bool(trainer["gradient_checkpointing"]),
        activation_checkpointing_kwargs={"use_reentrant": False} if trainer["gradient_checkpointing"] else None,
        save_strategy="steps",
        save_steps=int(trainer["save_steps"]),
        save_total_limit=trainer.get("save_total_limit"),
        logging_steps=int(trainer["logging_steps"]),
        logging_first_step=True,
        report_to="none",  # metrics go through negagent.training.tracking
        seed=int(cfg["seed"]),
        data_seed=int(cfg["seed"]),
        deepspeed=ds,
        use_cpu=on_cpu and ds is None,
        # On CPU, accelerate only sets up ranks when given a backend (with or without DeepSpeed).
        ddp_backend="gloo" if on_cpu and world_size > 1 else None,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=False,
    )


def _deepspeed_state_on_cpu() -> None:
    """Set up accelerate's process state for DeepSpeed ranks on CPU.

    accelerate only finds a CPU backend when told one, and the Trainer passes none with DeepSpeed,
    so it would see one process per rank (each rank then trains on all the data). Configured here
    with gloo and handed to the Trainer through `use_configured_state`.
    """
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        state = PartialState(backend="gloo")
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]
    if state.num_processes != int(os.environ.get("WORLD_SIZE", 1)):
        raise NegagentError(f"DeepSpeed on CPU: {state.num_processes} ranks set up, expected {os.environ.get('WORLD_SIZE')}")


def build_model(cfg: Mapping[str, Any]):
    """The model from `cfg.model`, wrapped with a LoRA adapter when `trainer.method=lora`."""
    from negagent.models import load_model

    trainer = cfg["trainer"]
    model = load_model(cfg["model"], training=True)
    model.config.use_cache = False
    if trainer["method"] == "lora":
        from peft import LoraConfig, get_peft_model

        lora = trainer["lora"]
        targets = cfg["model"].get("lora_target_modules") or ["q_proj", "k_proj", "v_proj", "o_proj"]
        with warnings.catch_warnings():
            # peft reads transformers' deprecated `is_gradient_checkpointing`; nothing for a user to change
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
            model = get_peft_model(model, LoraConfig(r=int(lora["r"]), lora_alpha=int(lora["alpha"]), lora_dropout=float(lora["dropout"]),
                                                     target_modules=list(targets), task_type="CAUSAL_LM"))
        if trainer["gradient_checkpointing"]:
            model.enable_input_require_grads()
    return model


def _samples(cfg: Mapping[str, Any], run_dir: Path):
    from negagent.models import load_tokenizer
    from negagent.render import build_renderer
    from negagent.tasks import get_task
    from negagent.training.data import prepare

    tokenizer = load_tokenizer(cfg["model"])
    renderer = build_renderer(tokenizer, cfg["render"])
    samples, manifest = prepare(cfg, get_task(cfg["task"]), renderer)
    frozen = rundir.read_manifest(run_dir)
    if frozen.get("samples_sha256") not in (None, samples_digest(samples)):
        raise NegagentError(f"{run_dir / rundir.MANIFEST}: the training data changed since this run started "
                            f"({manifest['trajectories']}); start a new run directory")
    return samples, tokenizer


def _partition_facts(model: torch.nn.Module) -> dict[str, int]:
    params = list({id(p): p for p in model.parameters()}.values())
    full = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params)
    local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
    return {"param_elements": full, "local_param_elements": local}


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """`t` summed over the ranks, as a new CPU tensor (`t` itself stays this rank's)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # GPU ranks talk over NCCL, which reduces only CUDA tensors; CPU ranks over gloo.
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        t = t.to(device, copy=True)
        dist.all_reduce(t)
        t = t.cpu()
    return t


def last_complete_checkpoint(folder: Path) -> tuple[Path | None, list[Path]]:
    """(the newest `checkpoint-N` in `folder` whose save finished, the newer ones whose save did not).

    The Trainer writes `trainer_state.json` last, after the weights, optimizer, scheduler and RNG
    states (with DeepSpeed, after every rank's shards), so a finished save is one whose
    trainer_state.json reads back with `global_step` N. A run killed while saving leaves a newer
    folder without it (or with it torn); transformers' `get_last_checkpoint` would pick that folder
    and the resumed run would fail to load it.
    """
    folder = Path(folder)
    found = []
    for path in folder.iterdir() if folder.is_dir() else ():
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    incomplete = []
    for step, path in sorted(found, reverse=True):
        try:
            state = json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            state = None
        if isinstance(state, dict) and state.get("global_step") == step:
            return path, incomplete
        incomplete.append(path)
    return None, incomplete


# -- the recipe -----------------------------------------------------------------------------------
def train(cfg: Mapping[str, Any], run_dir: str | Path) -> dict[str, Any]:
    """Train this rank per the frozen `cfg`; returns the summary (rank 0 writes it and `done`)."""
    from transformers import set_seed

    run_dir = Path(run_dir)
    rank, world_size = distributed_env()
    is_main = rank == 0
    trainer_cfg = cfg["trainer"]
    check_trainer_config(trainer_cfg)
    models.check_model_settings(cfg["model"])
    memory.report(cfg, world_size=world_size, bf16=resolve_bf16(trainer_cfg["bf16"]), is_main=is_main)
    args = training_arguments(cfg, run_dir, world_size)  # before the model: sets up ZeRO-3 partitioned loading
    samples, tokenizer = _samples(cfg, run_dir)
    plan = batching.plan_micro_batches([len(s.input_ids) for s in samples], int(trainer_cfg["per_device_batch_size"]),
                                       trainer_cfg["batching"], seed=int(cfg["seed"]), world_size=world_size)
    dataset = batching.MicroBatches(samples, plan, mode=trainer_cfg["batching"], pad_id=tokenizer.pad_token_id,
                                    loss_norm=trainer_cfg["loss_norm"],
                                    varlen=models.attn_implementation(cfg["model"]) == "flash_attention_2")
    set_seed(int(cfg["seed"]))
    model = build_model(cfg)
    ranks_dir = run_dir / rundir.RANKS
    ranks_dir.mkdir(exist_ok=True)
    tracker = RunTracker(run_dir, cfg) if is_main else None
    final: dict[str, Any] = {}
    started = time.time()
    try:
        trainer = _trainer_class()(
            model=model, args=args, train_dataset=dataset, data_collator=batching.first_item, processing_class=tokenizer,
            callbacks=[_metrics_callback(tracker, final)], order_log=ranks_dir / f"rank{rank}.order.jsonl",
        )
        resume, incomplete = last_complete_checkpoint(Path(args.output_dir))
        if is_main:
            for path in incomplete:
                print(f"note: skipping {path}: its save did not finish (the run was stopped while saving)", flush=True)
            if resume:
                print(f"resuming from {resume}", flush=True)
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        facts = _partition_facts(trainer.model)
        tokens = _all_reduce_sum(trainer.token_counts)
        trainer.save_model(str(run_dir))
        verified = checkpoint.verify_saved_model(trainer.model, run_dir, adapter=trainer_cfg["method"] == "lora", is_main=is_main)
        (ranks_dir / f"rank{rank}.json").write_text(json.dumps({
            "rank": rank, "world_size": world_size, "deepspeed": trainer_cfg.get("deepspeed"),
            "micro_batches": len(plan) // world_size, **facts,
        }, indent=2))
        runtime = float(result.metrics.get("train_runtime", time.time() - started))
        summary = {
            "model": cfg["model"]["name"], "method": trainer_cfg["method"], "deepspeed": trainer_cfg.get("deepspeed"),
            "ranks": world_size, "batching": trainer_cfg["batching"], "loss_norm": trainer_cfg["loss_norm"],
            "samples": len(samples), "micro_batches": len(plan), "steps": trainer.state.global_step,
            "resumed_from": Path(resume).name if resume else None,
            "final_loss": final.get("final_loss"), "mean_train_loss": result.training_loss,
            "real_tokens": int(tokens[0]), "trained_tokens": int(tokens[1]),
            "train_seconds": round(runtime, 2),
            "tokens_per_s": round(float(tokens[0]) / runtime, 1) if runtime > 0 else None,
            "activation_checkpointing": bool(getattr(trainer.model, "is_activation_checkpointing", False)),
            # this rank's peak of allocated GPU memory (null on CPU), for benchmarks
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None,
            "saved": {"kind": "adapter" if trainer_cfg["method"] == "lora" else "model", **verified},
        }
        if is_main:
            (run_dir / rundir.SUMMARY).write_text(json.dumps(summary, indent=2))
            tracker.summary({k: v for k, v in summary.items() if not isinstance(v, dict)})
            if not trainer_cfg.get("keep_checkpoints", False):
                shutil.rmtree(args.output_dir, ignore_errors=True)
            rundir.mark_trained(run_dir)
            print(f"done: {run_dir} (final loss {summary['final_loss']}, {summary['tokens_per_s']} tokens/s)", flush=True)
    except BaseException:
        if tracker is not None:
            tracker.finish(exit_code=1)
        raise
    if tracker is not None:
        tracker.finish(exit_code=0)
    return summary

