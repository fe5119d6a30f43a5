"""Training internals in process, without a training run: DeepSpeed configs, batch sizes, trainer
settings, resume points, the verified final save, frozen-config launch, data preparation, the
base-model comparison and what an evaluation loads from a run directory."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from negagent import rundir
from negagent.evaluation import baseline
from negagent.training import checkpoint
from negagent.training import data
from negagent.training import deepspeed_config
from negagent import model_source as evaluated_model
from negagent.training import launch
from negagent.training import recipe as training
from negagent.config import CONF_DIR
from negagent.errors import NegagentError
from negagent.render import RenderedSample
from negagent.training.tracking import REDACTED
from negagent.trajectory import write_trajectories
from tests.helpers import TINY_MODEL, make_traj


@functools.lru_cache(maxsize=None)
def _composed(*overrides: str) -> str:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(version_base=None, config_dir=str(CONF_DIR)):
        return json.dumps(OmegaConf.to_container(compose("train", overrides=list(overrides)), resolve=True))


def composed(*overrides: str) -> dict:
    """conf/train.yaml composed with `overrides`, as plain data (a fresh copy each call)."""
    return json.loads(_composed(*overrides))


# -- deepspeed_config -------------------------------------------------------------------------------
def _ds_expected(stage: int, **zero_extra) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 3, "train_batch_size": 12,
        "gradient_clipping": 0.5, "bf16": {"enabled": True},
        "zero_optimization": {"stage": stage, "overlap_comm": False, "contiguous_gradients": True, "reduce_bucket_size": 64 * 64,
                              **zero_extra},
        "steps_per_print": 10**9, "wall_clock_breakdown": False,
    }


_ZERO3 = {"stage3_gather_16bit_weights_on_model_save": True, "stage3_prefetch_bucket_size": 3686,  # int(0.9 * 64 * 64)
          "stage3_param_persistence_threshold": 640}
_OFFLOAD = {"offload_optimizer": {"device": "cpu", "pin_memory": True}, "offload_param": {"device": "cpu", "pin_memory": True}}


@pytest.mark.parametrize("stage, expected", [
    ("zero2", _ds_expected(2)),
    ("zero3", _ds_expected(3, **_ZERO3)),
    ("zero3_offload", {**_ds_expected(3, **_ZERO3, **_OFFLOAD),
                       "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.1}}}),
])
def test_deepspeed_config_of_each_stage(stage, expected):
    """Each trainer preset's DeepSpeed JSON, key for key: explicit batch sizes (one micro-batch per rank
    and forward, grad_accum of them per step on 4 ranks), ZeRO-3 saves gathered, offload with its own AdamW."""
    trainer = composed(f"trainer={stage}", "trainer.grad_accum=3", "trainer.lr=3e-4", "trainer.weight_decay=0.1",
                       "trainer.max_grad_norm=0.5")["trainer"]
    assert deepspeed_config.build(trainer, world_size=4, bf16=True, hidden_size=64, on_gpu=False) == expected


def test_deepspeed_off_and_fp32():
    """No DeepSpeed without a stage; bf16 off is written as off."""
    trainer = composed("trainer=zero2")["trainer"]
    assert deepspeed_config.build(composed("trainer=lora")["trainer"], world_size=2, bf16=True, hidden_size=64, on_gpu=True) is None
    assert deepspeed_config.build(trainer, world_size=1, bf16=False, hidden_size=64, on_gpu=False)["bf16"] == {"enabled": False}


def test_unknown_deepspeed_stage_is_an_error():
    """A stage that is not one of the presets is rejected with the choices, by build as by check_stage."""
    message = "trainer.deepspeed='zero1' is not a DeepSpeed setting; choose null or one of: zero2, zero3, zero3_offload"
    with pytest.raises(NegagentError) as raised:
        deepspeed_config.build({"deepspeed": "zero1", "grad_accum": 1, "max_grad_norm": 1.0}, world_size=1, bf16=False,
                               hidden_size=64, on_gpu=False)
    assert str(raised.value) == message
    deepspeed_config.check_stage(None)


# -- training: batch sizes and settings --------------------------------------------------------------
@pytest.mark.parametrize("world_size, grad_accum", [(1, 16), (2, 8), (4, 4), (8, 2), (16, 1)])
def test_paper_global_batch_of_64_over_world_sizes(world_size, grad_accum):
    """trainer=paper: 4 samples per rank and micro-batch, so 64 samples per optimizer step take
    64 / (4 x ranks) micro-batches; DeepSpeed is told the same."""
    trainer = composed("trainer=paper")["trainer"]
    assert (trainer["global_batch_size"], trainer["per_device_batch_size"]) == (64, 4)
    assert type(training.resolve_grad_accum(trainer, world_size)) is int
    assert training.resolve_grad_accum(trainer, world_size) == grad_accum
    ds = deepspeed_config.build({**trainer, "grad_accum": grad_accum}, world_size=world_size, bf16=False, hidden_size=64, on_gpu=False)
    assert (ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (grad_accum, grad_accum * world_size)
    assert ds["optimizer"]["params"]["lr"] == 5e-5 and ds["zero_optimization"]["offload_param"]["device"] == "cpu"


@pytest.mark.parametrize("world_size", [3, 5, 32])
def test_paper_global_batch_that_ranks_cannot_split_is_an_error(world_size):
    """64 samples per step cannot be split into micro-batches of 4 on 3, 5 or 32 ranks."""
    with pytest.raises(NegagentError) as raised:
        training.resolve_grad_accum(composed("trainer=paper")["trainer"], world_size)
    assert str(raised.value) == (f"trainer.global_batch_size=64 is not a multiple of per_device_batch_size x ranks = "
                                 f"{4 * world_size}")


def test_grad_accum_is_used_without_a_global_batch():
    """Without global_batch_size, grad_accum is taken as it is, whatever the number of ranks."""
    trainer = composed("trainer.grad_accum=5")["trainer"]
    assert trainer["global_batch_size"] is None
    assert [training.resolve_grad_accum(trainer, n) for n in (1, 3)] == [5, 5]


@pytest.mark.parametrize("setting, expected", [("auto", False), (True, True), (False, False)])
def test_bf16_setting(setting, expected):
    """auto means bf16 only on a CUDA GPU that has it (this machine has none); true/false as given."""
    assert not torch.cuda.is_available()
    assert training.resolve_bf16(setting) is expected


@pytest.mark.parametrize("has_bf16", [True, False])
def test_bf16_auto_on_a_gpu(monkeypatch, has_bf16):
    """On a CUDA GPU, auto follows whether the GPU has bf16."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: has_bf16)
    assert training.resolve_bf16("auto") is has_bf16


@pytest.mark.parametrize("key, value, message", [
    ("method", "qlora", "trainer.method='qlora' is not one of lora, full"),
    ("deepspeed", "zero4", "trainer.deepspeed='zero4' is not a DeepSpeed setting; choose null or one of: zero2, zero3, zero3_offload"),
    ("batching", "sorted", "trainer.batching='sorted' is not one of grouped, packed, padded"),
    ("loss_norm", "sum", "trainer.loss_norm='sum' is not one of token_mean, seq_mean"),
    ("bf16", "yes", "trainer.bf16='yes' is not auto, true or false"),
    ("per_device_batch_size", 0, "trainer.per_device_batch_size=0 must be at least 1"),
    ("grad_accum", 0, "trainer.grad_accum=0 must be at least 1"),
    ("nproc_per_node", -1, "trainer.nproc_per_node=-1 must be at least 1"),
    ("save_steps", 0, "trainer.save_steps=0 must be at least 1"),
    ("logging_steps", 0, "trainer.logging_steps=0 must be at least 1"),
])
def test_bad_trainer_setting_is_one_line(key, value, message):
    """Each bad trainer setting is named, with its value and the choices, before any rank starts."""
    trainer = {**composed()["trainer"], key: value}
    with pytest.raises(NegagentError) as raised:
        training.check_trainer_config(trainer)
    assert str(raised.value) == message


def test_every_trainer_preset_passes_the_checks():
    """The shipped presets are valid (and the checks accept a missing count key as 1)."""
    for preset in sorted(p.stem for p in (CONF_DIR / "trainer").glob("*.yaml")):
        training.check_trainer_config(composed(f"trainer={preset}")["trainer"])
    trainer = composed()["trainer"]
    del trainer["save_steps"]
    training.check_trainer_config(trainer)


def test_training_arguments_carry_the_trainer_config(tmp_path):
    """One process without DeepSpeed: every trainer setting reaches the HF TrainingArguments as given."""
    cfg = composed("debug=smoke", "seed=11", "trainer.grad_accum=3", "trainer.epochs=2", "trainer.max_steps=7", "trainer.lr=3e-4",
                   "trainer.scheduler=constant", "trainer.warmup_ratio=0.1", "trainer.weight_decay=0.01", "trainer.max_grad_norm=0.5",
                   "trainer.save_steps=5", "trainer.save_total_limit=3", "trainer.logging_steps=2",
                   "trainer.gradient_checkpointing=true")
    args = training.training_arguments(cfg, tmp_path, world_size=1)
    got = {k: getattr(args, k) for k in (
        "output_dir", "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "max_steps",
        "learning_rate", "warmup_steps", "weight_decay", "max_grad_norm", "bf16", "activation_checkpointing",
        "activation_checkpointing_kwargs", "save_steps", "save_total_limit", "logging_steps", "logging_first_step", "seed",
        "data_seed", "deepspeed", "use_cpu", "ddp_backend", "dataloader_num_workers", "remove_unused_columns", "disable_tqdm")}
    assert got == {
        "output_dir": str(tmp_path / "checkpoints"), "per_device_train_batch_size": 1, "gradient_accumulation_steps": 3,
        "num_train_epochs": 2.0, "max_steps": 7, "learning_rate": 3e-4, "warmup_steps": 0.1, "weight_decay": 0.01,
        "max_grad_norm": 0.5, "bf16": False, "activation_checkpointing": True,
        "activation_checkpointing_kwargs": {"use_reentrant": False}, "save_steps": 5, "save_total_limit": 3,
        "logging_steps": 2, "logging_first_step": True, "seed": 11, "data_seed": 11, "deepspeed": None, "use_cpu": True,
        "ddp_backend": None, "dataloader_num_workers": 0, "remove_unused_columns": False, "disable_tqdm": False,
    }
    assert (args.lr_scheduler_type, args.save_strategy, args.report_to) == ("constant", "steps", [])
    off = training.training_arguments(composed("debug=smoke"), tmp_path, world_size=1)
    assert (off.activation_checkpointing, off.activation_checkpointing_kwargs) == (False, None)


class _Arguments:
    """Records what training_arguments passes to transformers.TrainingArguments."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs


_COMMON = {"per_device_train_batch_size": 1, "num_train_epochs": 1.0, "max_steps": 2, "learning_rate": 2e-4,
           "lr_scheduler_type": "cosine", "warmup_steps": 0.03, "weight_decay": 0.0, "max_grad_norm": 1.0,
           "activation_checkpointing": False, "activation_checkpointing_kwargs": None, "save_strategy": "steps",
           "save_steps": 20, "save_total_limit": 2, "logging_steps": 5, "logging_first_step": True, "report_to": "none",
           "seed": 0, "data_seed": 0, "dataloader_num_workers": 0, "remove_unused_columns": False, "disable_tqdm": False}


@pytest.mark.parametrize("trainer, world_size, bf16, expected", [
    ("lora", 2, "true", {"gradient_accumulation_steps": 1, "bf16": True, "deepspeed": None, "use_cpu": True, "ddp_backend": "gloo"}),
    ("zero2", 1, "false", {"gradient_accumulation_steps": 1, "bf16": False, "use_cpu": False, "ddp_backend": None,
                          "deepspeed": {"grad_accum": 1, "world_size": 1}}),
    ("zero3", 2, "false", {"gradient_accumulation_steps": 1, "bf16": False, "use_cpu": False, "ddp_backend": "gloo",
                          "deepspeed": {"grad_accum": 1, "world_size": 2}, "accelerator_config": {"use_configured_state": True}}),
    ("paper", 4, "auto", {"gradient_accumulation_steps": 4, "bf16": False, "use_cpu": False, "ddp_backend": "gloo",
                         "deepspeed": {"grad_accum": 4, "world_size": 4}, "accelerator_config": {"use_configured_state": True}}),
])
def test_training_arguments_on_cpu_ranks(tmp_path, monkeypatch, trainer, world_size, bf16, expected):
    """Exactly what reaches the Trainer on CPU: several ranks talk over gloo; with DeepSpeed the JSON
    (for the resolved grad_accum and ranks) replaces use_cpu, and several DeepSpeed ranks run on
    accelerate's state set up beforehand (use_configured_state)."""
    import transformers

    prepared = []
    monkeypatch.setattr(transformers, "TrainingArguments", _Arguments)
    monkeypatch.setattr(training, "_deepspeed_state_on_cpu", lambda: prepared.append(True))
    monkeypatch.setattr(deepspeed_config, "build", lambda t, world_size, bf16, **_: None if not t.get("deepspeed") else
                        {"grad_accum": t["grad_accum"], "world_size": world_size})
    cfg = composed("debug=smoke", f"trainer={trainer}", f"trainer.bf16={bf16}", "trainer.max_steps=2", "trainer.lr=2e-4",
                   "trainer.epochs=1", "trainer.scheduler=cosine", "trainer.warmup_ratio=0.03", "trainer.weight_decay=0",
                   "trainer.max_grad_norm=1", "trainer.save_steps=20", "trainer.save_total_limit=2", "trainer.logging_steps=5",
                   "trainer.gradient_checkpointing=false")
    got = training.training_arguments(cfg, tmp_path, world_size=world_size).kwargs
    assert got == {**_COMMON, "output_dir": str(tmp_path / "checkpoints"), **expected}
    assert prepared == ([True] if "accelerator_config" in expected else [])


def test_samples_digest_covers_ids_tokens_and_labels_in_order():
    """The digest every rank checks: equal for equal samples, different when an id, a token, a label
    or the order differs; no samples hash to the empty SHA-256."""
    a, b = RenderedSample("a", [1, 2, 3], [-100, 2, 3]), RenderedSample("b", [4, 5], [4, 5])
    digest = training.samples_digest([a, b])
    assert digest == training.samples_digest([RenderedSample("a", [1, 2, 3], [-100, 2, 3], positive=True), b])
    changed = [[RenderedSample("c", a.input_ids, a.labels), b], [RenderedSample("a", [1, 2, 4], a.labels), b],
               [RenderedSample("a", a.input_ids, [-100, -100, 3]), b], [b, a]]
    assert len({digest, *(training.samples_digest(s) for s in changed)}) == 5
    assert training.samples_digest([]) == hashlib.sha256(b"").hexdigest()


def test_distributed_env_reads_rank_and_world_size(monkeypatch):
    """Rank and world size come from torchrun's variables; a plain process is rank 0 of 1."""
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert training.distributed_env() == (0, 1)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert training.distributed_env() == (3, 4)


# -- training: resume point -------------------------------------------------------------------------
def _checkpoint(folder: Path, step: int, state: str | None) -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"weights")
    if state is not None:
        (path / "trainer_state.json").write_text(state)
    return path


def test_resume_point_is_the_newest_finished_save(tmp_path):
    """The newest checkpoint whose trainer_state.json (written last) reads back with its own step;
    newer ones whose save was cut (no state, a torn state, another step's state) are reported."""
    folder = tmp_path / "checkpoints"
    assert training.last_complete_checkpoint(folder) == (None, [])
    _checkpoint(folder, 3, json.dumps({"global_step": 3}))
    finished = _checkpoint(folder, 20, json.dumps({"global_step": 20}))
    torn = _checkpoint(folder, 100, '{"global_st')
    missing = _checkpoint(folder, 40, None)
    other = _checkpoint(folder, 60, json.dumps({"global_step": 6}))
    (folder / "checkpoint-80").write_text("a file, not a checkpoint")
    (folder / "checkpoint-9x").mkdir()
    assert training.last_complete_checkpoint(folder) == (finished, [torn, other, missing])


def test_no_finished_save_means_a_fresh_start(tmp_path):
    """Only unfinished saves: no resume point (training starts over), every one reported."""
    folder = tmp_path / "checkpoints"
    unfinished = [_checkpoint(folder, 2, None), _checkpoint(folder, 4, "[]")]
    assert training.last_complete_checkpoint(folder) == (None, unfinished[::-1])


# -- training: model, callback, facts -----------------------------------------------------------------
def test_lora_model_trains_only_the_adapter_with_the_configured_shape():
    """trainer.method=lora wraps the model with LoRA of the configured rank, alpha, dropout and target
    modules; only the adapter is trainable; the KV cache is off for training."""
    cfg = {"model": {**TINY_MODEL, "lora_target_modules": ["q_proj", "v_proj"]},
           "trainer": {"method": "lora", "gradient_checkpointing": True, "lora": {"r": 4, "alpha": 16, "dropout": 0.1}}}
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = training.build_model(cfg)
    # peft's use of a deprecated transformers property is silenced: nothing a user could change.
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]
    lora = model.peft_config["default"]
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, set(lora.target_modules)) == (4, 16, 0.1, {"q_proj", "v_proj"})
    assert lora.task_type == "CAUSAL_LM" and type(model).__name__ == "PeftModelForCausalLM"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "v_proj"}  # ...q_proj.lora_A.default.weight
    assert model.config.use_cache is False
    default = training.build_model({"model": dict(TINY_MODEL), "trainer": {**cfg["trainer"], "gradient_checkpointing": False}})
    assert set(default.peft_config["default"].target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}


def test_full_model_trains_every_weight():
    """trainer.method=full: the plain model, every parameter trainable."""
    model = training.build_model({"model": dict(TINY_MODEL), "trainer": {"method": "full", "gradient_checkpointing": False}})
    assert not hasattr(model, "peft_config") and all(p.requires_grad for p in model.parameters())
    assert model.config.use_cache is False
    facts = training._partition_facts(model)
    total = sum(p.numel() for p in model.parameters())
    assert facts == {"param_elements": total, "local_param_elements": total}


def test_metrics_callback_records_loss_on_the_main_process_only():
    """Logged losses become the final loss and step and go to the tracker; other ranks and empty logs
    record nothing."""
    logged = []
    tracker = SimpleNamespace(log=lambda logs, step: logged.append((dict(logs), step)))
    final: dict = {}
    callback = training._metrics_callback(tracker, final)
    main, other = SimpleNamespace(is_world_process_zero=True, global_step=5), SimpleNamespace(is_world_process_zero=False, global_step=5)
    callback.on_log(None, other, None, logs={"loss": 1.0})
    callback.on_log(None, main, None, logs={})
    assert (final, logged) == ({}, [])
    callback.on_log(None, main, None, logs={"loss": 2, "learning_rate": 0.1})
    callback.on_log(None, SimpleNamespace(is_world_process_zero=True, global_step=6), None, logs={"train_runtime": 3.0})
    assert final == {"final_loss": 2.0, "final_step": 5} and isinstance(final["final_loss"], float)
    assert logged == [({"loss": 2, "learning_rate": 0.1}, 5), ({"train_runtime": 3.0}, 6)]
    training._metrics_callback(None, final).on_log(None, main, None, logs={"loss": 0.5})  # no tracker: still recorded
    assert final == {"final_loss": 0.5, "final_step": 5}


def test_partition_facts_of_zero3_parameters():
    """Under ZeRO-3 a rank holds a shard (ds_tensor) of each parameter of full size ds_numel; shared
    parameters count once."""
    shard = torch.nn.Parameter(torch.zeros(1))
    shard.ds_numel, shard.ds_tensor = 10, torch.zeros(5)
    plain = torch.nn.Parameter(torch.zeros(2))
    model = SimpleNamespace(parameters=lambda: iter([shard, plain, shard]))
    assert training._partition_facts(model) == {"param_elements": 12, "local_param_elements": 7}


def test_all_reduce_without_ranks_is_the_tensor_itself():
    t = torch.tensor([2.0, 3.0], dtype=torch.float64)
    assert torch.equal(training._all_reduce_sum(t), t)


def test_all_reduce_with_ranks_sums_a_copy(monkeypatch):
    """With a process group, the counts are summed over ranks, into a copy (the rank's own counts stay)."""
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", lambda t: t.mul_(2))  # as if two ranks held the same counts
    t = torch.tensor([2.0, 3.0], dtype=torch.float64)
    assert torch.equal(training._all_reduce_sum(t), torch.tensor([4.0, 6.0], dtype=torch.float64))
    assert torch.equal(t, torch.tensor([2.0, 3.0], dtype=torch.float64))


def test_changed_training_data_is_refused_on_resume(tmp_path):
    """A rank re-renders the data; when it no longer matches the run's manifest digest, the run stops
    with a one-line error instead of resuming on other data."""
    trajectories = tmp_path / "arith.jsonl"
    write_trajectories(trajectories, [make_traj(i, i % 2 == 0) for i in range(4)])
    cfg = composed("debug=smoke", f"data.trajectories={trajectories}")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    samples, tokenizer = training._samples(cfg, run_dir)  # no manifest yet: accepted
    assert len(samples) == 4 and tokenizer.pad_token is not None
    (run_dir / "manifest.json").write_text(json.dumps({"samples_sha256": training.samples_digest(samples)}))
    assert training._samples(cfg, run_dir)[0] == samples
    (run_dir / "manifest.json").write_text(json.dumps({"samples_sha256": "0" * 64}))
    with pytest.raises(NegagentError) as raised:
        training._samples(cfg, run_dir)
    assert str(raised.value) == (f"{run_dir}/manifest.json: the training data changed since this run started "
                                 f"({trajectories}); start a new run directory")


def test_ranks_render_with_the_run_render_settings(tmp_path):
    """The rank's samples use the run's render.max_length and render.end_of_turn."""
    trajectories = tmp_path / "arith.jsonl"
    write_trajectories(trajectories, [make_traj(i, True, turns=3) for i in range(2)])
    cfg = composed("debug=smoke", f"data.trajectories={trajectories}", "render.max_length=260")  # samples are 279 tokens
    samples, _ = training._samples(cfg, tmp_path)
    assert [(len(s.input_ids), s.truncated) for s in samples] == [(260, True), (260, True)]
    cfg["render"]["end_of_turn"] = "<|endoftext|>"  # a token SmolLM2's template never ends a turn with
    with pytest.raises(NegagentError, match="end-of-turn token '<\\|endoftext\\|>' not found after turn 2"):
        training._samples(cfg, tmp_path)


# -- training: the recipe in this process -------------------------------------------------------------
def _train_cfg(trajectories: Path, *overrides: str) -> dict:
    return composed("debug=smoke", f"data.trajectories={trajectories}", "trainer.max_steps=2", "trainer.logging_steps=1",
                    "trainer.per_device_batch_size=2", *overrides)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One in-process LoRA run of 2 steps on 6 samples, checkpoints kept: (cfg, run dir, summary, stdout)."""
    import contextlib
    import io

    root = tmp_path_factory.mktemp("trained")
    trajectories = root / "arith.jsonl"
    write_trajectories(trajectories, [make_traj(i, i % 3 != 0, turns=2 + i % 2) for i in range(6)])
    cfg = _train_cfg(trajectories, "trainer.save_steps=1", "trainer.keep_checkpoints=true")
    run_dir = root / "run"
    run_dir.mkdir()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        summary = training.train(cfg, run_dir)
    return cfg, run_dir, summary, out.getvalue()


def test_in_process_run_summary_counts_what_was_trained(trained):
    """The summary: settings, samples, micro-batches and steps, losses as logged, real and trained
    tokens of exactly the micro-batches the steps ran (from the rank's order log), and the verified save."""
    from negagent.training import batching
    from negagent.render import IGNORE

    cfg, run_dir, summary, _ = trained
    samples, _ = training._samples(cfg, run_dir)
    plan = batching.plan_micro_batches([len(s.input_ids) for s in samples], 2, "grouped", seed=0, world_size=1)
    order = [json.loads(line) for line in (run_dir / "ranks" / "rank0.order.jsonl").read_text().splitlines()]
    assert [o["step"] for o in order] == [0, 1] and all(o["samples"] in plan for o in order)
    ran = [i for o in order for i in o["samples"]]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in losses] == [1, 2]
    saved_count, saved_sha = checkpoint.tensor_digest(load_file(run_dir / "adapter_model.safetensors"))
    runtime = summary["train_seconds"]
    assert summary == {
        "model": "tiny", "method": "lora", "deepspeed": None, "ranks": 1, "batching": "grouped", "loss_norm": "token_mean",
        "samples": 6, "micro_batches": 3, "steps": 2, "resumed_from": None, "final_loss": losses[-1]["loss"],
        "mean_train_loss": pytest.approx(sum(m["loss"] for m in losses) / 2, rel=1e-3),
        "real_tokens": sum(len(samples[i].input_ids) for i in ran),
        "trained_tokens": sum(label != IGNORE for i in ran for label in samples[i].labels[1:]),
        "train_seconds": runtime, "tokens_per_s": pytest.approx(summary["real_tokens"] / runtime, rel=0.05),
        "activation_checkpointing": False, "peak_memory_gib": None,
        "saved": {"kind": "adapter", "parameters": saved_count, "sha256": saved_sha},
    }
    assert runtime > 0 and json.loads((run_dir / "summary.json").read_text()) == summary


def test_in_process_run_leaves_rank_facts_done_and_kept_checkpoints(trained):
    """rank0.json holds the rank's facts; `done` is written last; keep_checkpoints keeps them."""
    import re

    cfg, run_dir, summary, stdout = trained
    params = sum(p.numel() for p in training.build_model(cfg).parameters())
    assert json.loads((run_dir / "ranks" / "rank0.json").read_text()) == {
        "rank": 0, "world_size": 1, "deepspeed": None, "micro_batches": 3, "param_elements": params, "local_param_elements": params}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\n", (run_dir / "done").read_text())
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["checkpoint-1", "checkpoint-2"]
    assert stdout.splitlines()[-1] == f"done: {run_dir} (final loss {summary['final_loss']}, {summary['tokens_per_s']} tokens/s)"
    assert "resuming from" not in stdout


def test_in_process_resume_skips_an_unfinished_save(trained, tmp_path, capsys):
    """The same run from its checkpoints, the last one's save cut: resumes from checkpoint 1, trains
    step 2 again, reports the skipped save, and removes the checkpoints once the save is verified."""
    import shutil

    cfg, run_dir, summary, _ = trained
    again = tmp_path / "again"
    shutil.copytree(run_dir / "checkpoints", again / "checkpoints")
    (again / "checkpoints" / "checkpoint-2" / "trainer_state.json").unlink()
    resumed = training.train({**cfg, "trainer": {**cfg["trainer"], "keep_checkpoints": False}}, again)
    out = capsys.readouterr().out
    assert f"note: skipping {again / 'checkpoints' / 'checkpoint-2'}: its save did not finish" in out
    assert f"resuming from {again / 'checkpoints' / 'checkpoint-1'}\n" in out
    assert (resumed["resumed_from"], resumed["steps"]) == ("checkpoint-1", 2)
    assert resumed["final_loss"] == pytest.approx(summary["final_loss"], abs=1e-4)
    assert not (again / "checkpoints").exists() and (again / "done").is_file()


def test_in_process_failed_save_is_no_finished_run(trained, tmp_path, monkeypatch):
    """A verification failure propagates: no summary, no `done`, the tracker finished as failed."""
    from negagent.training.tracking import RunTracker

    cfg, _, _, _ = trained
    finished = []
    monkeypatch.setattr(RunTracker, "finish", lambda self, exit_code=0: finished.append(exit_code))

    def refuse(*args, **kwargs):
        raise NegagentError("save differs")

    monkeypatch.setattr(checkpoint, "verify_saved_model", refuse)
    with pytest.raises(NegagentError, match="save differs"):
        training.train({**cfg, "trainer": {**cfg["trainer"], "max_steps": 1}}, tmp_path)
    assert finished == [1] and not (tmp_path / "done").exists() and not (tmp_path / "summary.json").exists()


# -- checkpoint: the verified final save --------------------------------------------------------------
class Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first, self.second = torch.nn.Linear(3, 2), torch.nn.Linear(2, 1)  # 8 + 3 elements
        self.frozen = torch.nn.Parameter(torch.ones(4), requires_grad=False)


def _saved(folder: Path, tensors: dict) -> Path:
    folder.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors")
    return folder


def test_verified_save_returns_count_and_checksum(tmp_path):
    """A save equal to the model verifies: its element count and the checksum of the saved bytes."""
    model = Small()
    folder = _saved(tmp_path / "ok", model.state_dict())
    count, digest = checkpoint.tensor_digest(load_file(folder / "model.safetensors"))
    assert count == 15 and checkpoint.verify_saved_model(model, folder, adapter=False, is_main=True) == {
        "parameters": 15, "sha256": digest}


def test_other_ranks_take_part_without_copying_the_weights(tmp_path, monkeypatch):
    """Ranks other than 0 join the gather but neither copy the full weights (a 13B model per rank would
    not fit in memory) nor read the files."""
    monkeypatch.setattr(checkpoint, "in_memory_weights", lambda *a: pytest.fail("a rank > 0 copied the weights"))
    assert checkpoint.verify_saved_model(Small(), tmp_path / "nothing", adapter=False, is_main=False) == {}


def _changed_value(state):
    state["second.bias"] = state["second.bias"] + 1
    return state


def _reshaped(state):
    state["first.weight"] = state["first.weight"].reshape(3, 2)
    return state


@pytest.mark.parametrize("corrupt, message", [
    (_changed_value, "(saved 15 parameters, model has 15; checksums differ)"),
    (_reshaped, "(saved 15 parameters, model has 15; checksums differ)"),
    (lambda s: {k: v for k, v in s.items() if k != "second.bias"}, "(saved 14 parameters, model has 15; checksums equal)"),
    (lambda s: {**s, "third.weight": torch.zeros(2)}, "saved tensor third.weight is not in the in-memory model"),
])
def test_a_save_that_differs_from_the_model_is_refused(tmp_path, corrupt, message):
    """Changed values, a changed shape, a missing tensor (count) or a foreign tensor: a one-line error
    naming the folder and what differs, never a `done` run."""
    folder = _saved(tmp_path / "bad", corrupt(dict(Small().state_dict())))
    with pytest.raises(NegagentError) as raised:
        checkpoint.verify_saved_model(Small(), folder, adapter=False, is_main=True)
    prefix = f"{folder}: " + ("" if "not in" in message else "the final save does not match the trained model ")
    assert str(raised.value) == prefix + message


def test_a_truncated_or_missing_save_is_refused(tmp_path):
    """A save cut short (a full disk, a kill) or no weights file at all: a one-line error naming the
    file and safetensors' reason."""
    from safetensors import SafetensorError

    folder = _saved(tmp_path / "cut", Small().state_dict())
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(SafetensorError) as reason:
        load_file(path)
    with pytest.raises(NegagentError) as raised:
        checkpoint.verify_saved_model(Small(), folder, adapter=False, is_main=True)
    assert str(raised.value) == f"{path}: the saved weights cannot be read ({reason.value})" and "\n" not in str(reason.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NegagentError) as raised:
        checkpoint.verify_saved_model(Small(), empty, adapter=False, is_main=True)
    assert str(raised.value) == f"{empty}: the final save wrote no *.safetensors file"


def test_saved_weights_are_read_from_every_file(tmp_path):
    """A sharded save: tensors of every *.safetensors file, together."""
    state = Small().state_dict()
    save_file({"first.weight": state["first.weight"]}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"first.bias": state["first.bias"]}, tmp_path / "model-00002-of-00002.safetensors")
    assert sorted(checkpoint.saved_records(tmp_path)) == ["first.bias", "first.weight"]


def test_adapter_save_is_verified_against_the_trainable_adapter(tmp_path):
    """With LoRA only the adapter is saved and counted (trainable elements); peft's own save verifies."""
    from peft import LoraConfig, get_peft_model

    from negagent.models import load_model

    model = get_peft_model(load_model(TINY_MODEL), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 2 * (2 * 64 + 64 * 2)  # 2 layers x (A: 2x64, B: 64x2)
    assert checkpoint.unique_parameter_count(model, trainable_only=True) == trainable
    assert checkpoint.unique_parameter_count(model, trainable_only=False) == sum(p.numel() for p in model.parameters())
    verified = checkpoint.verify_saved_model(model, tmp_path, adapter=True, is_main=True)
    assert verified == {"parameters": trainable, "sha256": checkpoint.tensor_digest(load_file(tmp_path / "adapter_model.safetensors"))[1]}


def test_tensor_digest_is_sha256_of_names_dtypes_shapes_and_bytes():
    """The documented format: SHA-256 over, in name order, each tensor's SHA-256 of `name|dtype|shape|`
    then its raw bytes."""
    tensors = {"w": torch.tensor([1, 2], dtype=torch.uint8), "e": torch.zeros(0, 3)}
    expected = hashlib.sha256(hashlib.sha256(b"e|torch.float32|(0, 3)|").digest()
                              + hashlib.sha256(b"w|torch.uint8|(2,)|" + b"\x01\x02").digest()).hexdigest()
    assert checkpoint.tensor_digest(tensors) == (2, expected)


def test_parameter_count_counts_shared_and_partitioned_parameters_once_and_whole():
    """A parameter listed twice (tied weights) counts once; a ZeRO-3 partitioned one (ds_numel) counts
    its full size; trainable_only leaves out frozen ones."""
    shared, frozen = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(5), requires_grad=False)
    partitioned = torch.nn.Parameter(torch.zeros(1))
    partitioned.ds_numel = 40  # what ZeRO-3 leaves: a placeholder, the full size in ds_numel
    model = SimpleNamespace(parameters=lambda: iter([shared, partitioned, shared, frozen]))
    assert checkpoint.unique_parameter_count(model, trainable_only=False) == 48
    assert checkpoint.unique_parameter_count(model, trainable_only=True) == 43


def test_tensor_digest_covers_names_dtypes_shapes_and_bytes():
    """The checksum changes with a name, a dtype, a shape or a value, not with insertion order."""
    base = {"a": torch.arange(6, dtype=torch.float32), "b": torch.zeros(0)}
    count, digest = checkpoint.tensor_digest(base)
    assert count == 6 and checkpoint.tensor_digest({"b": base["b"], "a": base["a"]}) == (6, digest)
    variants = [{"c": base["a"], "b": base["b"]}, {**base, "a": base["a"].double()}, {**base, "a": base["a"].reshape(2, 3)},
                {**base, "a": base["a"] + 1}]
    assert len({digest, *(checkpoint.tensor_digest(v)[1] for v in variants)}) == 5
    assert checkpoint.tensor_digest({}) == (0, hashlib.sha256(b"").hexdigest())


# -- launch: frozen config, run directory rules ----------------------------------------------------------
@pytest.mark.parametrize("override, expected", [
    ("+collect.teacher.api_key=sk-abcdefgh12345", f"+collect.teacher.api_key={REDACTED}"),
    ("logger.token=plainvalue", f"logger.token={REDACTED}"),
    ("+collect.teacher.api_key=plain", f"+collect.teacher.api_key={REDACTED}"),
    ("+backend.auth.password=plain", f"+backend.auth.password={REDACTED}"),  # the last key component decides
    ("+token=plain", f"+token={REDACTED}"),
    ("+backend.secret=a=b", f"+backend.secret={REDACTED}"),
    ("+hf_token='quoted value'", f"+hf_token={REDACTED}"),
    ("~backend.password=x", f"~backend.password={REDACTED}"),
    ("logger.notes=sk-abcdefgh12345", f"logger.notes={REDACTED}"),
    ("logger.notes='ghp_abcdefgh12345'", f"logger.notes={REDACTED}"),
    ("backend.api_key_env=OPENAI_API_KEY", "backend.api_key_env=OPENAI_API_KEY"),
    ("eval.evaluator.sampling.max_new_tokens=8", "eval.evaluator.sampling.max_new_tokens=8"),
    ("backend.api_key=", "backend.api_key="),
    (f"backend.api_key={REDACTED}", f"backend.api_key={REDACTED}"),
    ("trainer.lr=1e-3", "trainer.lr=1e-3"),
    ("debug", "debug"),
])
def test_secret_overrides_are_redacted(override, expected):
    """A command-line override keeps its key and loses its value when it is a secret, by the same rules
    as the config (a key naming a secret, a value shaped like a key); the rest stay as typed."""
    assert launch.redact_override(override) == expected


def test_resolved_config_redacts_secrets_in_values_overrides_and_name(tmp_path):
    """The frozen config: resolved, secrets redacted everywhere (config values, the overrides, the run's
    name and group), and the name and group built without the excluded keys."""
    cfg = OmegaConf.create({"seed": 1, "lr": "${seed}", "teacher": {"api_key": "sk-abcdefgh12345", "api_key_env": "K"}})
    overrides = ["seed=1", "+teacher.api_key=sk-abcdefgh12345", "+data.trajectories=/x=1.jsonl", "~data.cache=a", "hydra.run.dir=/r"]
    resolved = launch.resolve_config(cfg, overrides, tmp_path, name_excludes=("data.trajectories", "data.cache"))
    assert resolved == {
        "seed": 1, "lr": 1, "teacher": {"api_key": REDACTED, "api_key_env": "K"},
        "run": {"dir": str(tmp_path), "overrides": ["seed=1", f"+teacher.api_key={REDACTED}", "+data.trajectories=/x=1.jsonl",
                                                   "~data.cache=a", "hydra.run.dir=/r"],
                "name": f"seed=1,+teacher.api_key={REDACTED}", "group": f"+teacher.api_key={REDACTED}"},
    }


def test_hydra_copies_of_the_run_are_redacted(tmp_path):
    """Hydra's own .hydra/*.yaml: secret config values and secret overrides (also inside
    override_dirname) become the marker; files with nothing secret are left byte for byte."""
    secret = "+teacher.api_key=sk-abcdefgh12345"
    folder = tmp_path / ".hydra"
    folder.mkdir()
    (folder / "config.yaml").write_text("seed: 1\nteacher:\n  name: scripted\n  api_key: sk-abcdefgh12345\n")
    (folder / "overrides.yaml").write_text(f"- seed=1\n- {secret}\n")
    (folder / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"override_dirname": f"{secret},seed=1"},
                                                                  "overrides": {"task": ["seed=1", secret]}}}))
    clean = "run:\n  dir: x\n"
    (folder / "other.yaml").write_text(clean)
    launch.redact_hydra_files(folder, ["seed=1", secret])
    assert (folder / "config.yaml").read_text() == f"seed: 1\nteacher:\n  name: scripted\n  api_key: {REDACTED}\n"  # order kept
    assert yaml.safe_load((folder / "overrides.yaml").read_text()) == ["seed=1", f"+teacher.api_key={REDACTED}"]
    assert yaml.safe_load((folder / "hydra.yaml").read_text()) == {"hydra": {
        "job": {"override_dirname": f"+teacher.api_key={REDACTED},seed=1"},
        "overrides": {"task": ["seed=1", f"+teacher.api_key={REDACTED}"]}}}
    assert (folder / "other.yaml").read_text() == clean and sorted(p.name for p in folder.iterdir()) == [
        "config.yaml", "hydra.yaml", "other.yaml", "overrides.yaml"]
    launch.redact_hydra_files(None, [secret])  # hydra.output_subdir=null: nothing to do
    launch.redact_hydra_files(tmp_path / "absent", [secret])


def test_finished_run_dir_is_refused_before_hydra_writes(tmp_path):
    """hydra.run.dir naming a run that marked itself finished (done.json) is a one-line error; an
    unfinished one (trained, not yet evaluated) and other arguments pass."""
    tmp_path = tmp_path / "seed=1"  # Hydra's sweep folders are named like overrides
    tmp_path.mkdir()
    (tmp_path / "done").write_text("")
    launch.refuse_finished_run_dir([f"hydra.run.dir={tmp_path}", "seed=1"])
    (tmp_path / "done.json").write_text("{}")
    launch.refuse_finished_run_dir(["seed=1", f"hydra.sweep.dir={tmp_path}"])
    with pytest.raises(NegagentError) as raised:
        launch.refuse_finished_run_dir(["seed=1", f"hydra.run.dir={tmp_path}"])
    assert str(raised.value) == f"{tmp_path}: a finished run is already there; choose a new hydra.run.dir"


def test_run_dir_states(tmp_path):
    """new (empty), resume (same config, no `done`), trained (same config, `done`); a different config,
    or a `done` without a config, is an error naming the first key that differs."""
    resolved = {"seed": 0, "trainer": {"lr": 0.1, "lora": {"r": 8}}, "run": {"dir": "x"}}
    assert launch.check_run_dir(tmp_path, resolved) == "new"
    path = rundir.freeze_config(tmp_path, resolved)
    assert path == tmp_path / "config.yaml" and path.read_text() == yaml.safe_dump(resolved, sort_keys=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]
    assert launch.check_run_dir(tmp_path, resolved) == "resume"
    (tmp_path / "done").write_text("")
    assert launch.check_run_dir(tmp_path, resolved) == "trained"
    changed = {**resolved, "trainer": {"lr": 0.1, "lora": {"r": 16}}, "seed": 1}
    with pytest.raises(NegagentError) as raised:
        launch.check_run_dir(tmp_path, changed)
    assert str(raised.value) == (f"{tmp_path}: holds a run with a different config (at seed); "
                                 "rerun its exact command to resume, or choose a new hydra.run.dir")
    with pytest.raises(NegagentError, match=r"\(at trainer\.lora\.r\)"):
        launch.check_run_dir(tmp_path, {**resolved, "trainer": {"lr": 0.1, "lora": {"r": 16}}})
    with pytest.raises(NegagentError, match=r"\(at extra\)"):
        launch.check_run_dir(tmp_path, {**resolved, "zz": 1, "extra": 0})  # keys in name order
    orphan = tmp_path / "orphan"
    orphan.mkdir()
    (orphan / "done").write_text("")
    with pytest.raises(NegagentError) as raised:
        launch.check_run_dir(orphan, resolved)
    assert str(raised.value) == f"{orphan}: a finished run is already there; choose a new hydra.run.dir"


def test_first_difference_names_the_path():
    assert launch._first_difference({"a": {"b": 1}}, {"a": {"b": 1}}) is None
    assert launch._first_difference({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}}) == "a.c"
    assert launch._first_difference(1, 2) == "<root>"
    assert launch._first_difference({1: "x"}, {1: "y"}) == "1"
    assert launch._first_difference({"a": 1}, 5) == "<root>" and launch._first_difference(None, {"a": 1}) == "<root>"
    assert launch._first_difference({"b": 1, 2: "x"}, {"b": 2, 2: "y"}) == "2"  # keys of mixed types, ordered as text


def test_nproc_must_fit_the_machine(monkeypatch):
    """Ranks are bounded by the GPUs, else the CPU cores this process may use."""
    assert launch.available_slots() == (len(os.sched_getaffinity(0)), "CPU cores")
    with monkeypatch.context() as gpu:
        gpu.setattr(torch.cuda, "is_available", lambda: True)
        gpu.setattr(torch.cuda, "device_count", lambda: 3)
        assert launch.available_slots() == (3, "GPUs")
    monkeypatch.setattr(launch, "available_slots", lambda: (4, "CPU cores"))
    launch.check_nproc(1)
    launch.check_nproc(4)
    for bad in (0, 5):
        with pytest.raises(NegagentError) as raised:
            launch.check_nproc(bad)
        assert str(raised.value) == f"trainer.nproc_per_node={bad} but this machine has 4 CPU cores; use 1..4"


def test_rank_command_runs_this_module_under_torchrun(tmp_path):
    assert launch.rank_command(tmp_path, 3) == [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                "--nproc_per_node=3", "-m", "negagent.training.launch", str(tmp_path)]


def test_one_rank_without_deepspeed_trains_in_this_process(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(training, "train", lambda cfg, run_dir: calls.append((cfg, run_dir)))
    monkeypatch.setattr(launch.subprocess, "call", lambda *a, **k: pytest.fail("no rank processes for one rank"))
    resolved = {"trainer": {"nproc_per_node": 1, "deepspeed": None}}
    launch.run(tmp_path, resolved)
    assert calls == [(resolved, tmp_path)]


@pytest.mark.parametrize("trainer, slots, threads", [({"nproc_per_node": 2, "deepspeed": None}, 8, "4"),
                                                     ({"nproc_per_node": 1, "deepspeed": "zero2"}, 3, "3"),
                                                     ({"nproc_per_node": 3, "deepspeed": "zero3"}, 2, "1")])
def test_ranks_are_started_with_torchrun_and_checked(tmp_path, monkeypatch, trainer, slots, threads):
    """Several ranks, or DeepSpeed: torchrun ranks on this repository with DeepSpeed's CPU accelerator
    and the cores shared out; a failed rank, or ranks that leave no verified save, are errors."""
    started = []
    rc = {"value": 0}
    monkeypatch.setattr(launch.subprocess, "call", lambda cmd, env: started.append((cmd, env)) or rc["value"])
    monkeypatch.setattr(launch, "available_slots", lambda: (slots, "CPU cores"))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    resolved = {"trainer": trainer}
    nproc = trainer["nproc_per_node"]
    with pytest.raises(NegagentError) as raised:
        launch.run(tmp_path, resolved)
    assert str(raised.value) == f"{tmp_path}: the ranks exited without a verified final save"
    cmd, env = started[0]
    assert cmd == launch.rank_command(tmp_path, nproc)
    assert env["PYTHONPATH"] == f"{launch.REPO_ROOT}{os.pathsep}/elsewhere"
    assert (env["DS_ACCELERATOR"], env["OMP_NUM_THREADS"]) == ("cpu", threads)
    (tmp_path / "done").write_text("")
    launch.run(tmp_path, resolved)
    rc["value"] = 3
    with pytest.raises(NegagentError) as raised:
        launch.run(tmp_path, resolved)
    assert str(raised.value) == "training ranks failed (exit 3); the lines above say why; rerun the same command to resume"


def test_rank_threads_setting_of_the_user_is_kept(tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(launch.subprocess, "call", lambda cmd, env: started.append(env) or 0)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("PYTHONPATH", raising=False)
    (tmp_path / "done").write_text("")
    launch.run(tmp_path, {"trainer": {"nproc_per_node": 2, "deepspeed": "zero3"}})
    assert started[0]["OMP_NUM_THREADS"] == "1" and started[0]["PYTHONPATH"] == str(launch.REPO_ROOT)


@pytest.mark.parametrize("argv, message", [
    ([], "usage: python -m negagent.training.launch <run_dir>  (a run directory with config.yaml)"),
    (["a", "b"], "usage: python -m negagent.training.launch <run_dir>  (a run directory with config.yaml)"),
    (["{tmp}"], "{tmp}/config.yaml: no frozen config; start runs with train.py"),
])
def test_rank_entry_point_needs_one_run_dir_with_a_frozen_config(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exited:
        launch.main([a.format(tmp=tmp_path) for a in argv])
    assert exited.value.code == 2
    assert capsys.readouterr().err == f"error: {message.format(tmp=tmp_path)}\n"


def test_rank_entry_point_trains_the_frozen_config(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(training, "train", lambda cfg, run_dir: calls.append((cfg, run_dir)))
    monkeypatch.setattr(launch, "_die_with_launcher", lambda: calls.append("pdeathsig"))
    rundir.freeze_config(tmp_path, {"seed": 3})
    launch.main([str(tmp_path)])
    assert calls == ["pdeathsig", ({"seed": 3}, tmp_path)]


def test_rank_asks_the_kernel_to_end_it_with_its_launcher(monkeypatch):
    """Linux: prctl(PR_SET_PDEATHSIG, SIGKILL); a rank whose launcher already died (parent pid 1) exits."""
    import ctypes
    import signal

    calls = []

    class Libc:
        def prctl(self, option, sig):
            calls.append((option, sig))

    monkeypatch.setattr(ctypes, "CDLL", lambda name, use_errno: calls.append((name, use_errno)) or Libc())
    monkeypatch.setattr(launch.os, "getppid", lambda: 4321)
    monkeypatch.setattr(launch.os, "_exit", lambda code: calls.append(("exit", code)))
    launch._die_with_launcher()
    assert calls == [("libc.so.6", True), (1, signal.SIGKILL)]
    monkeypatch.setattr(launch.os, "getppid", lambda: 1)
    launch._die_with_launcher()
    assert calls[-1] == ("exit", 1)
    calls.clear()
    monkeypatch.setattr(launch.sys, "platform", "darwin")
    launch._die_with_launcher()
    assert calls == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux only")
def test_rank_dies_when_its_launcher_is_killed(tmp_path):
    """A real process that called _die_with_launcher is gone once its launcher is SIGKILLed, so no
    orphaned rank keeps writing into a run directory that is being resumed."""
    import signal
    import subprocess
    import time

    pid_file, exit_file = tmp_path / "rank.pid", tmp_path / "rank.exit"
    rank = ("import os, signal; from negagent.training.launch import _die_with_launcher; _die_with_launcher(); "
            f"open({str(pid_file)!r}, 'w').write(str(os.getpid())); signal.pause()")
    launcher = ("import subprocess, sys; rc = subprocess.Popen([sys.executable, '-c', sys.argv[1]]).wait(); "
                f"open({str(exit_file)!r}, 'w').write(str(rc))")
    proc = subprocess.Popen([sys.executable, "-c", launcher, rank], cwd=Path(launch.REPO_ROOT))
    try:
        deadline = time.monotonic() + 300  # generous: only a hung start reaches it
        while not pid_file.is_file() or not pid_file.read_text():
            assert not exit_file.exists(), f"the rank exited (code {exit_file.read_text()}) while its launcher lived"
            assert time.monotonic() < deadline, "the rank did not start"
            time.sleep(0.05)
        pid = int(pid_file.read_text())
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)

        def alive() -> bool:
            try:
                return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
            except (FileNotFoundError, ProcessLookupError):
                return False

        deadline = time.monotonic() + 60
        while alive():
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                pytest.fail("the rank outlived its launcher")
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- data: trajectories -> samples + manifest -------------------------------------------------------------
@pytest.fixture(scope="module")
def renderer():
    from negagent.models import load_tokenizer
    from negagent.render import Renderer

    return Renderer(load_tokenizer(TINY_MODEL), max_length=1024)


def _data_cfg(path, **data_over) -> dict:
    cfg = composed("debug=smoke", "tagging=suffix")
    cfg["data"] = {**cfg["data"], "trajectories": str(path), **data_over}
    return cfg


def test_manifest_describes_the_samples(tmp_path, renderer):
    """The manifest: file and hash, strategy and inference tag, what was available, tags used, per
    kind the samples and (trained) tokens, and how many train questions are test questions."""
    from negagent.tasks import get_task

    task = get_task({"name": "arith", "limit_test": 8})
    test_question = task.test_sets()["arith"][0].question
    path = tmp_path / "arith.jsonl"
    write_trajectories(path, [make_traj(0, True, question=test_question), make_traj(1, False, question=test_question),
                              make_traj(2, True, turns=3), make_traj(3, False), make_traj(4, True)])
    cfg = _data_cfg(path)
    samples, manifest = data.prepare(cfg, task, renderer)
    tags = cfg["tagging"]
    assert sorted(s.id for s in samples) == ["t0", "t1", "t2", "t3", "t4"]
    by_id = {s.id: s for s in samples}
    positive = [by_id["t0"], by_id["t2"], by_id["t4"]]
    negative = [by_id["t1"], by_id["t3"]]

    def stats(group):
        tokens, trained = sum(len(s.input_ids) for s in group), sum(s.n_trained for s in group)
        return {"samples": len(group), "tokens": tokens, "trained_tokens": trained, "trained_share": round(trained / tokens, 4),
                "truncated": 0}

    assert manifest == {
        "trajectories": str(path), "trajectories_sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "task": "arith",
        "strategy": "suffix", "inference_tag": tags["positive"], "available": {"positive": 3, "negative": 2},
        "skipped_bad_lines": 0, "torn_tail": False, "tags": {tags["positive"]: 3, tags["negative"]: 2},
        "samples": {"positive": stats(positive), "negative": stats(negative)},
        "test_overlap": {"questions": 1, "test_questions": 8, "train_trajectories": 2, "dropped": False},
    }
    text = renderer.tokenizer.decode(by_id["t3"].input_ids)
    assert f"<|im_start|>system\n{task.instructions}<|im_end|>" in text
    assert f"<|im_start|>user\nQuestion: What is 3?\n{tags['negative']}<|im_end|>" in text

    dropped, manifest = data.prepare(_data_cfg(path, drop_test_overlap=True), task, renderer)
    assert sorted(s.id for s in dropped) == ["t2", "t3", "t4"] and manifest["test_overlap"]["dropped"] is True
    assert manifest["available"] == {"positive": 2, "negative": 1}
    no_overlap = tmp_path / "no_overlap.jsonl"
    write_trajectories(no_overlap, [make_traj(2, True), make_traj(3, False)])
    _, manifest = data.prepare(_data_cfg(no_overlap, drop_test_overlap=True), task, renderer)
    assert manifest["test_overlap"] == {"questions": 0, "test_questions": 8, "train_trajectories": 0, "dropped": False}


def test_test_overlap_ignores_case_punctuation_and_spacing(tmp_path, renderer):
    """A train question that is a test question up to case, punctuation and spacing is an overlap
    (and dropped with data.drop_test_overlap); an unrelated one is not."""
    from negagent.tasks import get_task

    task = get_task({"name": "arith", "limit_test": 4})
    question = task.test_sets()["arith"][1].question
    variant = "  " + question.upper().replace(" ", "   ").replace("?", " ?!") + "\n"
    path = tmp_path / "arith.jsonl"
    write_trajectories(path, [make_traj(0, True, question=variant), make_traj(1, False, question=variant), make_traj(2, True)])
    _, manifest = data.prepare(_data_cfg(path), task, renderer)
    assert manifest["test_overlap"] == {"questions": 1, "test_questions": 4, "train_trajectories": 2, "dropped": False}
    samples, manifest = data.prepare(_data_cfg(path, drop_test_overlap=True), task, renderer)
    assert [s.id for s in samples] == ["t2"] and manifest["test_overlap"]["dropped"] is True


def test_frozen_config_without_instructions_role_uses_the_system_turn(tmp_path, renderer):
    """A run config from before render.instructions_role existed renders the instructions as the system turn."""
    from negagent.tasks import get_task

    task = get_task({"name": "arith", "limit_test": 2})
    path = tmp_path / "arith.jsonl"
    write_trajectories(path, [make_traj(5, True)])
    cfg = _data_cfg(path)
    del cfg["render"]["instructions_role"]
    samples, _ = data.prepare(cfg, task, renderer)
    text = renderer.tokenizer.decode(samples[0].input_ids)
    assert f"<|im_start|>system\n{task.instructions}<|im_end|>\n<|im_start|>user\nQuestion: What is 5?\n" in text


def test_trajectories_of_another_task_are_refused(tmp_path, renderer):
    from negagent.tasks import get_task

    path = tmp_path / "hotpot.jsonl"
    traj = make_traj(0, True)
    traj.task = "hotpotqa"
    write_trajectories(path, [traj])
    with pytest.raises(NegagentError) as raised:
        data.prepare(_data_cfg(path), get_task({"name": "arith", "limit_test": 2}), renderer)
    assert str(raised.value) == (f"{path}:1: trajectory is for task 'hotpotqa', but this run's task is 'arith'; pass a file "
                                 "collected for 'arith' or set task=hotpotqa")


def test_instructions_in_the_user_turn(tmp_path, renderer):
    """render.instructions_role=user puts the instructions before the question in the user turn."""
    from negagent.tasks import get_task

    task = get_task({"name": "arith", "limit_test": 2})
    path = tmp_path / "arith.jsonl"
    write_trajectories(path, [make_traj(5, True)])
    cfg = _data_cfg(path)
    cfg["render"]["instructions_role"] = "user"
    samples, _ = data.prepare(cfg, task, renderer)
    text = renderer.tokenizer.decode(samples[0].input_ids)
    assert f"<|im_start|>user\n{task.instructions}\n\nQuestion: What is 5?\n{cfg['tagging']['positive']}<|im_end|>" in text


def test_bad_lines_are_counted_when_skipped_and_torn_tails_flagged(tmp_path, renderer):
    from negagent.tasks import get_task

    path = tmp_path / "arith.jsonl"
    write_trajectories(path, [make_traj(0, True), make_traj(1, False)])
    with path.open("a") as fh:
        fh.write('{"not": "a trajectory"}\n{"id": "torn')
    _, manifest = data.prepare(_data_cfg(path, skip_bad_lines=True), get_task({"name": "arith", "limit_test": 2}), renderer)
    assert (manifest["skipped_bad_lines"], manifest["torn_tail"], manifest["available"]) == (1, True, {"positive": 1, "negative": 1})
    with pytest.raises(NegagentError, match=r":3: bad trajectory record: .*\(set data.skip_bad_lines=true to skip such lines\)"):
        data.prepare(_data_cfg(path), get_task({"name": "arith", "limit_test": 2}), renderer)


@pytest.mark.parametrize("trajectories, drop, message", [
    (None, False, "data.trajectories is not set: pass data.trajectories=<trajectories.jsonl>"),
    ("", False, "data.trajectories is not set: pass data.trajectories=<trajectories.jsonl>"),
    ("all_test", True, "{path}: every trajectory's question is in a test set; nothing left to train on"),
])
def test_unusable_training_data_is_one_line(tmp_path, renderer, trajectories, drop, message):
    from negagent.tasks import get_task

    task = get_task({"name": "arith", "limit_test": 2})
    path = tmp_path / "arith.jsonl"
    write_trajectories(path, [make_traj(i, True, question=q.question) for i, q in enumerate(task.test_sets()["arith"])])
    cfg = _data_cfg(path, drop_test_overlap=drop)
    if trajectories != "all_test":
        cfg["data"]["trajectories"] = trajectories
    with pytest.raises(NegagentError) as raised:
        data.prepare(cfg, task, renderer)
    assert str(raised.value) == message.format(path=path)


def test_sample_stats_per_kind():
    samples = [RenderedSample("a", [1, 2, 3], [-100, 2, 3], positive=True),
               RenderedSample("b", [1, 2, 3, 4, 5, 6], [-100, -100, -100, 4, 5, 6], positive=True, truncated=True),
               RenderedSample("c", [1, 2, 3], [-100, -100, 3], positive=False)]
    assert data.sample_stats(samples) == {
        "positive": {"samples": 2, "tokens": 9, "trained_tokens": 5, "trained_share": 0.5556, "truncated": 1},
        "negative": {"samples": 1, "tokens": 3, "trained_tokens": 1, "trained_share": 0.3333, "truncated": 0},
    }
    assert data.sample_stats(samples[:1])["negative"] == {"samples": 0, "tokens": 0, "trained_tokens": 0, "trained_share": 0.0,
                                                         "truncated": 0}


def test_file_sha256_over_several_blocks(tmp_path):
    path = tmp_path / "big.bin"
    content = bytes(range(256)) * (5 * 4096 + 3)  # more than one 1 MiB block
    path.write_bytes(content)
    assert data.file_sha256(path) == hashlib.sha256(content).hexdigest()


# -- baseline: the base model next to the trained one ---------------------------------------------------
def _metrics(primary: str, **sets) -> dict:
    return {"primary": primary, "results": {primary: {"test_sets": sets}, "other": {"test_sets": {"x": {}}}}}


def test_comparison_table_rows(capsys):
    """One row per model and test set of each run's primary tag mode, in the documented columns."""
    base = _metrics("none", gsm8k={"n_questions": 4, "reward": {"mean": 0.25, "lo": 0.0, "hi": 0.5},
                                   "strict": {"mean": 0.0, "lo": 0.0, "hi": 0.0}, "action_error_rate": 1.0,
                                   "mean_steps": {"mean": 7.0, "lo": 7.0, "hi": 7.0}},
                    svamp={})
    trained = _metrics("positive", gsm8k={"n_questions": 4, "reward": {"mean": 0.75, "lo": 0.5, "hi": 1.0},
                                          "action_error_rate": 0.125, "mean_steps": {"mean": 3.25, "lo": 3.0, "hi": 3.5}})
    assert baseline.comparison_rows(trained) == [("gsm8k", trained["results"]["positive"]["test_sets"]["gsm8k"])]
    resolved = {"model": {"name": "tiny"}, "task": {"name": "math"}, "tagging": {"strategy": "suffix"}}
    baseline.print_comparison(base, trained, resolved)
    out = capsys.readouterr().out
    assert out.splitlines()[0].strip() == "tiny on math: base vs trained (suffix)"
    rows = [[c.strip() for c in line[1:-1].split(line[0])] for line in out.splitlines() if line[:1] in ("┃", "│")]
    assert rows == [
        ["model", "test set", "questions", "accuracy % [95% CI]", "strict %", "action errors %", "steps"],
        ["base", "gsm8k", "4", "25.0 [0.0, 50.0]", "0.0 [0.0, 0.0]", "100.0", "7.0 [7.0, 7.0]"],
        ["base", "svamp", "-", "-", "-", "0.0", "-"],
        ["trained (suffix)", "gsm8k", "4", "75.0 [50.0, 100.0]", "-", "12.5", "3.2 [3.0, 3.5]"],
    ]


def test_base_model_is_evaluated_untagged_with_the_run_settings(tmp_path, monkeypatch):
    """The base model: the run's model, task and rendering, no tag, the run's evaluator overrides on
    top of evaluate.yaml's defaults, results in the given folder."""
    from negagent.evaluation import evaluator as evaluation

    seen = []
    monkeypatch.setattr(evaluation, "evaluate", lambda cfg, out_dir: seen.append((OmegaConf.to_container(cfg), out_dir)) or {"ok": 1})
    resolved = composed("debug=smoke", "tagging=suffix", "render.instructions_role=user")
    overrides = {"sampling": {"max_new_tokens": 9}, "task": {"limit_test": 3}, "tag_mode": "all", "run_dir": "/a/run",
                 "tagging": {"strategy": "prefix"}}
    assert baseline.evaluate_base(resolved, overrides, tmp_path / "eval_base") == {"ok": 1}
    (cfg, out_dir), = seen
    assert out_dir == tmp_path / "eval_base"
    assert (cfg["run_dir"], cfg["tag_mode"], cfg["tagging"]) == (None, "none", {"strategy": "none"})
    assert (cfg["model"], cfg["task"], cfg["render"]) == (resolved["model"], resolved["task"], resolved["render"])
    defaults = evaluation.default_config()
    assert cfg["sampling"] == {**OmegaConf.to_container(defaults.sampling), "max_new_tokens": 9}
    assert (cfg["backend"], cfg["pass_k"]) == (OmegaConf.to_container(defaults.backend), list(defaults.pass_k))


# -- evaluated_model: what an evaluation loads from a run directory ---------------------------------------
def _adapter(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"x" * 10)
    return folder


def _full(folder: Path, weights: str = "model.safetensors") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")
    (folder / weights).write_bytes(b"x" * 20)
    return folder


def test_model_files_are_found_in_the_run_or_one_subfolder(tmp_path):
    """The run directory itself first, then model/ final/ adapter/ output/, then other folders in name
    order; eval/, wandb/, logs/, hidden folders and checkpoints are never taken."""
    run = tmp_path / "run"
    for skipped in ("eval", "wandb", "logs", ".hidden", "checkpoint-5"):
        _adapter(run / skipped)
    _full(run / "zzz")
    _adapter(run / "aaa")
    assert evaluated_model.find_model_files(run) == ("adapter", run / "aaa")
    _full(run / "final", "pytorch_model.bin")
    assert evaluated_model.find_model_files(run) == ("full", run / "final")
    _adapter(run / "model")
    assert evaluated_model.find_model_files(run) == ("adapter", run / "model")
    _full(run, "model-00001-of-00002.safetensors")
    assert evaluated_model.find_model_files(run) == ("full", run)
    _adapter(run)
    assert evaluated_model.find_model_files(run) == ("adapter", run)


@pytest.mark.parametrize("files", [["adapter_config.json"], ["adapter_model.safetensors"], ["config.json"],
                                   ["config.json", "tokenizer.json"], ["config.json", "adapter_model.bin"]])
def test_incomplete_model_files_are_not_a_model(tmp_path, files):
    for name in files:
        (tmp_path / name).write_text("{}")
    assert evaluated_model._model_kind(tmp_path) is None


def test_run_without_final_weights_names_its_checkpoints(tmp_path):
    """Only intermediate checkpoints: the error says the run did not finish and how to evaluate one."""
    for step in (10, 20, 30):
        _adapter(tmp_path / f"checkpoint-{step}")
    (tmp_path / "checkpoint-40").mkdir()
    with pytest.raises(NegagentError) as raised:
        evaluated_model.find_model_files(tmp_path)
    assert str(raised.value) == (
        f"{tmp_path}: no trained model in this run directory (expected adapter_config.json + adapter_model.safetensors, "
        f"or config.json + model.safetensors); only intermediate checkpoints (checkpoint-10, checkpoint-20, checkpoint-30): "
        f"the run did not finish, pass run_dir={tmp_path}/checkpoint-30 to evaluate one")
    with pytest.raises(NegagentError) as raised:
        evaluated_model.find_model_files(tmp_path / "absent")
    assert str(raised.value).endswith("or config.json + model.safetensors)")


def _config(folder: Path, config: dict, name: str = "config.yaml") -> None:
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(yaml.safe_dump(config))


_RUN_CONFIG = {"seed": 4, "model": {"name": "tiny"}, "task": {"name": "arith", "limit_test": 2},
               "tagging": {"strategy": "suffix", "neg_num": 10, "pos_num": 5, "positive": "P"},
               "render": {"instructions_role": "user"}}


def test_run_dir_subject_carries_the_frozen_settings(tmp_path, capsys):
    """From a run directory: the frozen model, tagging, render and task sections, the weights found, and
    the training coordinates (with the manifest's sample counts); a run without `done` is noted."""
    run = _adapter(tmp_path / "run")
    _config(run, _RUN_CONFIG)
    (run / "manifest.json").write_text(json.dumps({"samples": {"positive": {"samples": 7}, "negative": {"samples": 3}}}))
    subject = evaluated_model.from_run_dir(run)
    assert (subject.label, subject.model_cfg, subject.tagging_cfg, subject.render_cfg, subject.task_cfg) == (
        "run", {"name": "tiny"}, _RUN_CONFIG["tagging"], {"instructions_role": "user"}, _RUN_CONFIG["task"])
    assert (subject.adapter_dir, subject.weights_dir, subject.run_dir) == (run, None, run)
    assert subject.training == {"strategy": "suffix", "neg_num": 10, "pos_num": 5, "seed": 4, "negatives_used": 3,
                                "positives_used": 7, "task": "arith", "model": "tiny", "run_dir": str(run)}
    assert capsys.readouterr().out == f"note: {run} has no 'done' marker: training may not have finished\n"
    (run / "done").write_text("")
    evaluated_model.from_run_dir(run)
    assert capsys.readouterr().out == ""


def test_checkpoint_subject_reads_the_parent_run(tmp_path, capsys):
    """run_dir=<run>/checkpoint-N: the weights there, config and manifest from the run (Hydra's copy when
    there is no config.yaml); the run's `done` counts; a missing tagging section means untagged."""
    run = tmp_path / "run"
    config = {k: v for k, v in _RUN_CONFIG.items() if k not in ("tagging", "render", "task")}
    _config(run, config, ".hydra/config.yaml")
    (run / "manifest.json").write_text(json.dumps({"samples": {"negative": {"samples": 2}}}))
    (run / "done").write_text("")
    ckpt = _full(run / "checkpoint-20")
    subject = evaluated_model.from_run_dir(ckpt)
    assert (subject.label, subject.weights_dir, subject.adapter_dir) == ("checkpoint-20", ckpt, None)
    assert (subject.tagging_cfg, subject.render_cfg, subject.task_cfg) == ({"strategy": "none"}, {}, None)
    assert subject.training == {"strategy": None, "neg_num": None, "pos_num": None, "seed": 4, "negatives_used": 2,
                                "positives_used": None, "task": None, "model": "tiny", "run_dir": str(ckpt)}
    assert capsys.readouterr().out == ""


def test_training_summary_of_a_manifest_that_is_not_one():
    """A manifest.json holding other JSON (a list) counts nothing instead of failing."""
    assert evaluated_model.training_summary({"model": {"name": "tiny"}}, [1, 2]) == {
        "strategy": None, "neg_num": None, "pos_num": None, "seed": None, "negatives_used": None, "positives_used": None,
        "task": None, "model": "tiny"}


@pytest.mark.parametrize("content, message", [
    (None, "{run}: no frozen run config (config.yaml or .hydra/config.yaml) in it or its parent"),
    ("seed: 1\n", "{run}/config.yaml: no `model` section; this is not a training run's config"),
    ("model: tiny\n", "{run}/config.yaml: no `model` section; this is not a training run's config"),
])
def test_run_dir_with_a_bad_config_is_one_line(tmp_path, content, message):
    run = _adapter(tmp_path / "run")
    if content is not None:
        (run / "config.yaml").write_text(content)
    with pytest.raises(NegagentError) as raised:
        evaluated_model.from_run_dir(run)
    assert str(raised.value) == message.format(run=run)


@pytest.mark.parametrize("content", ["model: [unclosed", "x: ${missing_key}\nmodel: {name: a}\n"])
def test_run_dir_with_an_unreadable_config_names_the_first_line_of_the_reason(tmp_path, content):
    """Broken YAML or an interpolation that cannot resolve: the file and the first line of the reason."""
    run = _adapter(tmp_path / "run")
    (run / "config.yaml").write_text(content)
    with pytest.raises(Exception) as reason:
        OmegaConf.to_container(OmegaConf.load(run / "config.yaml"), resolve=True)
    assert len(str(reason.value).splitlines()) > 1  # the rest of the reason is left out
    with pytest.raises(NegagentError) as raised:
        evaluated_model.from_run_dir(run)
    assert str(raised.value) == f"{run}/config.yaml: cannot read the run's config ({str(reason.value).splitlines()[0]})"


def test_fingerprint_follows_the_weight_files():
    """The fingerprint changes with the label, the model name and the name or size of a weight file, and
    with nothing else in the folder."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        subject = evaluated_model.ModelSource("run", {"name": "tiny"}, {"strategy": "none"}, adapter_dir=_adapter(folder))
        first = subject.fingerprint()
        assert len(first) == 16 and first == evaluated_model.ModelSource("run", {"name": "tiny"}, {}, adapter_dir=folder).fingerprint()
        (folder / "notes.txt").write_text("not weights")
        (folder / "sub.safetensors").mkdir()
        assert subject.fingerprint() == first
        prints = {first}
        (folder / "adapter_model.safetensors").write_bytes(b"x" * 11)
        prints.add(subject.fingerprint())
        (folder / "extra.bin").write_bytes(b"")
        prints.add(subject.fingerprint())
        prints.add(evaluated_model.ModelSource("other", {"name": "tiny"}, {}, adapter_dir=folder).fingerprint())
        prints.add(evaluated_model.ModelSource("run", {"name": "big"}, {}, adapter_dir=folder).fingerprint())
        prints.add(evaluated_model.ModelSource("run", {"name": "tiny"}, {}, weights_dir=folder).fingerprint())
        assert len(prints) == 5  # weights_dir and adapter_dir with the same files fingerprint alike
        assert len({*prints, evaluated_model.ModelSource("run", {"name": "tiny"}, {}).fingerprint()}) == 6


def test_training_seed_falls_back_to_the_tagging_seed():
    """Configs without a top-level seed (older runs) record the tagging seed."""
    assert evaluated_model.training_summary({"tagging": {"seed": 7}}, {})["seed"] == 7
    assert evaluated_model.training_summary({"seed": 2, "tagging": {"seed": 7}}, {})["seed"] == 2


def test_run_dir_given_as_dot_is_labelled_dot(tmp_path, monkeypatch):
    """run_dir=. (its name is empty): the label is the path as given."""
    run = _adapter(tmp_path / "run")
    _config(run, _RUN_CONFIG)
    monkeypatch.chdir(run)
    assert evaluated_model.from_run_dir(".").label == "."


def test_missing_run_dir_is_one_line(tmp_path):
    with pytest.raises(NegagentError) as raised:
        evaluated_model.from_run_dir(tmp_path / "nowhere")
    assert str(raised.value) == f"run_dir={tmp_path / 'nowhere'}: no such directory"


def test_base_model_subject():
    subject = evaluated_model.base_model({"name": "tiny", "source": "tiny"}, {"strategy": "none"}, {"instructions_role": "user"})
    assert (subject.label, subject.model_cfg, subject.tagging_cfg, subject.render_cfg) == (
        "tiny", {"name": "tiny", "source": "tiny"}, {"strategy": "none"}, {"instructions_role": "user"})
    assert (subject.weights_dir, subject.adapter_dir, subject.run_dir, subject.task_cfg) == (None, None, None, None)
    assert subject.training == {"strategy": "base", "neg_num": None, "pos_num": None, "seed": None, "model": "tiny"}


def test_tokenizer_saved_with_the_weights_is_preferred(tmp_path, renderer):
    """The tokenizer saved next to the trained weights is used (pad token set); without one, or with one
    lacking a chat template, the model config's."""
    tokenizer = renderer.tokenizer
    saved = _adapter(tmp_path / "with")
    tokenizer.save_pretrained(saved)
    extra = tokenizer.__class__.from_pretrained(saved)
    extra.add_tokens(["<extra_token>"])
    extra.pad_token = None
    extra.save_pretrained(saved)
    got = evaluated_model.load_tokenizer_for(evaluated_model.ModelSource("r", TINY_MODEL, {}, adapter_dir=saved))
    assert len(got) == len(tokenizer) + 1 and got.pad_token == got.eos_token
    bare = evaluated_model.load_tokenizer_for(evaluated_model.ModelSource("r", TINY_MODEL, {}, adapter_dir=_adapter(tmp_path / "bare")))
    assert len(bare) == len(tokenizer)
    untemplated = _adapter(tmp_path / "untemplated")
    extra.chat_template = None
    extra.save_pretrained(untemplated)
    (untemplated / "chat_template.jinja").unlink(missing_ok=True)
    got = evaluated_model.load_tokenizer_for(evaluated_model.ModelSource("r", TINY_MODEL, {}, weights_dir=untemplated))
    assert len(got) == len(tokenizer) and got.chat_template


def test_adapter_for_another_base_model_is_one_line(tmp_path):
    """An adapter whose shapes do not fit the configured base model: a one-line error naming both."""
    from peft import LoraConfig, get_peft_model

    from negagent.models import load_model, load_tokenizer

    wider = {**TINY_MODEL, "arch": {**TINY_MODEL["arch"], "hidden_size": 128, "intermediate_size": 256}}
    get_peft_model(load_model(wider), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path)
    subject = evaluated_model.ModelSource("r", TINY_MODEL, {}, adapter_dir=tmp_path)
    with pytest.raises(NegagentError) as raised:
        evaluated_model.load_causal_lm(subject, load_tokenizer(TINY_MODEL), device="cpu")
    message = str(raised.value)
    prefix = f"{tmp_path}: the adapter does not fit base model 'tiny' ("
    # peft's reason on one line, cut at 300 characters
    assert message.startswith(prefix + "Error(s) in loading state_dict") and message.endswith(")") and "\n" not in message
    assert len(message) - len(prefix) - 1 == 300 and "size mismatch for " in message


def test_adapter_trained_with_added_tokens_is_merged_into_a_resized_model(tmp_path):
    """A tokenizer with added tokens: the base embeddings grow to its size before the adapter is
    merged; the merged model is in eval mode on the asked device."""
    from peft import LoraConfig, get_peft_model

    from negagent.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(TINY_MODEL)
    tokenizer.add_tokens(["<new_a>", "<new_b>"])
    base = load_model(TINY_MODEL)
    base.resize_token_embeddings(len(tokenizer))
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path)
    subject = evaluated_model.ModelSource("r", TINY_MODEL, {}, adapter_dir=tmp_path)
    merged = evaluated_model.load_causal_lm(subject, tokenizer, device="cpu")
    assert merged.get_input_embeddings().weight.shape[0] == len(tokenizer) and not merged.training
    assert not hasattr(merged, "peft_config") and merged.device.type == "cpu"
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[name], load_model(TINY_MODEL).state_dict()[name])


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory, renderer):
    """The tiny model saved as a full model with 64 more embedding rows than its tokenizer has tokens
    (as padded vocabularies are), tokenizer included."""
    from negagent.models import load_model

    folder = tmp_path_factory.mktemp("wide")
    model = load_model(TINY_MODEL)
    model.resize_token_embeddings(len(renderer.tokenizer) + 64)
    model.save_pretrained(folder)
    renderer.tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("dtype, expected", [(None, torch.float32), ("bfloat16", torch.bfloat16)])
def test_full_model_weights_are_loaded_in_the_asked_dtype(wide_model, renderer, dtype, expected):
    """A full fine-tuned model from its folder: its own weights, in the asked dtype, on the default
    device (auto: the CPU here), in eval mode."""
    subject = evaluated_model.ModelSource("r", TINY_MODEL, {}, weights_dir=wide_model)
    model = evaluated_model.load_causal_lm(subject, renderer.tokenizer, dtype=dtype)
    saved = load_file(wide_model / "model.safetensors")
    state = model.state_dict()
    assert all(torch.equal(state[k], v.to(expected)) for k, v in saved.items())
    assert {p.dtype for p in model.parameters()} == {expected} and model.device.type == "cpu" and not model.training


def test_base_model_is_loaded_in_the_asked_dtype(renderer):
    subject = evaluated_model.base_model(TINY_MODEL, {"strategy": "none"}, {})
    model = evaluated_model.load_causal_lm(subject, renderer.tokenizer, dtype="bfloat16", device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_adapter_base_with_more_rows_than_tokens_is_not_shrunk(wide_model, renderer, tmp_path):
    """A base model whose embedding matrix is larger than its tokenizer keeps its size under an adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base_cfg = {"name": "wide", "source": "path", "path": str(wide_model)}
    get_peft_model(AutoModelForCausalLM.from_pretrained(wide_model), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path)
    subject = evaluated_model.ModelSource("r", base_cfg, {}, adapter_dir=tmp_path)
    model = evaluated_model.load_causal_lm(subject, renderer.tokenizer, device="cpu")
    assert model.get_input_embeddings().weight.shape[0] == len(renderer.tokenizer) + 64


def test_auto_device_is_the_gpu_when_there_is_one(wide_model, renderer, monkeypatch):
    """device=auto means cuda where CUDA is available (the move is recorded, no GPU needed)."""
    from transformers import PreTrainedModel

    moved = []
    subject = evaluated_model.ModelSource("r", TINY_MODEL, {}, weights_dir=wide_model)
    monkeypatch.setattr(PreTrainedModel, "to", lambda self, device: moved.append(device) or self)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    evaluated_model.load_causal_lm(subject, renderer.tokenizer)
    evaluated_model.load_causal_lm(subject, renderer.tokenizer, device="cpu")
    assert moved == ["cuda", "cpu"]
