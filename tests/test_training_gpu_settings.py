"""GPU training settings: attention implementation and dtype, DeepSpeed sizes from the hidden size,
verification that never gathers the whole model, and the memory line with its refusal."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from negagent import models
from negagent.errors import NegagentError
from negagent.training import checkpoint, deepspeed_config, memory
from negagent.training import recipe as training
from tests.helpers import TINY_MODEL
from tests.test_training_units import composed

REPO = Path(__file__).resolve().parents[1]


# -- model.attn_implementation and model.dtype -----------------------------------------------------------
@pytest.mark.parametrize("key, value, message", [
    ("attn_implementation", "flash", "model.attn_implementation='flash' is not one of sdpa, eager, flash_attention_2"),
    ("attn_implementation", "flex_attention", "model.attn_implementation='flex_attention' is not one of sdpa, eager, flash_attention_2"),
    ("dtype", "bf16", "model.dtype='bf16' is not one of auto, bfloat16, float16, float32"),
    ("dtype", "float64", "model.dtype='float64' is not one of auto, bfloat16, float16, float32"),
])
def test_bad_model_setting_is_one_line_before_any_work(monkeypatch, key, value, message):
    """A bad value is refused by the check, by model_config and by load_model, before any tokenizer
    or weight is read."""
    monkeypatch.setattr(models, "load_tokenizer", lambda cfg: pytest.fail("read the tokenizer before checking"))
    cfg = {**TINY_MODEL, key: value}
    for call in (models.check_model_settings, models.model_config, models.load_model):
        with pytest.raises(NegagentError) as raised:
            call(cfg)
        assert str(raised.value) == message


def test_flash_attention_without_its_package_says_how_to_get_it(monkeypatch):
    assert models.flash_attn_installed() is (importlib.util.find_spec("flash_attn") is not None)
    monkeypatch.setattr(models, "flash_attn_installed", lambda: False)
    with pytest.raises(NegagentError) as raised:
        models.check_model_settings({**TINY_MODEL, "attn_implementation": "flash_attention_2"})
    assert str(raised.value) == ("model.attn_implementation=flash_attention_2 needs the flash_attn package: "
                                 "`pip install flash-attn`, or choose model.attn_implementation=sdpa")
    monkeypatch.setattr(models, "flash_attn_installed", lambda: True)
    models.check_model_settings({**TINY_MODEL, "attn_implementation": "flash_attention_2"})  # installed: accepted


def test_a_bad_backend_dtype_is_named_as_such():
    with pytest.raises(NegagentError) as raised:
        models.load_model(TINY_MODEL, dtype="half")
    assert str(raised.value) == "backend.dtype='half' is not one of auto, bfloat16, float16, float32"


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_loaded_model_uses_the_attention_asked_for(attn):
    """The config key reaches the tiny model's LlamaConfig (and model_config); missing means sdpa."""
    model = models.load_model({**TINY_MODEL, "attn_implementation": attn})
    assert model.config._attn_implementation == attn
    assert all(layer.self_attn.config._attn_implementation == attn for layer in model.model.layers)
    assert models.model_config({**TINY_MODEL, "attn_implementation": attn})._attn_implementation == attn
    assert models.attn_implementation(TINY_MODEL) == "sdpa"


@pytest.mark.parametrize("setting, training, cuda, bf16, expected", [
    ("auto", True, True, True, torch.float32),  # training: float32 master weights, trainer.bf16 adds mixed precision
    ("auto", True, False, False, torch.float32),
    ("auto", False, True, True, torch.bfloat16),  # generation on a GPU with bf16
    ("auto", False, True, False, torch.float32),  # a GPU without bf16
    ("auto", False, False, False, torch.float32),  # CPU
    (None, False, False, False, torch.float32),  # a config from before the key existed
    ("bfloat16", True, False, False, torch.bfloat16),  # explicit: as given, everywhere
    ("float16", False, True, True, torch.float16),
    ("float32", False, True, True, torch.float32),
])
def test_resolve_dtype(monkeypatch, setting, training, cuda, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert models.resolve_dtype(setting, training=training) is expected


def test_generation_dtype_follows_the_device_the_model_is_on(monkeypatch):
    """A model on CPU generates in float32 even on a GPU host; on a CUDA device in bfloat16."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert models.resolve_dtype("auto", training=False, device=torch.device("cpu")) is torch.float32
    assert models.resolve_dtype("auto", training=False, device="cuda:0") is torch.bfloat16


@pytest.mark.parametrize("cfg_dtype, override, training, expected", [
    ("auto", None, True, torch.float32),
    ("bfloat16", None, True, torch.bfloat16),
    ("bfloat16", None, False, torch.bfloat16),
    ("bfloat16", "float16", False, torch.float16),  # a backend's dtype wins
])
def test_load_model_loads_the_dtype_asked(cfg_dtype, override, training, expected):
    model = models.load_model({**TINY_MODEL, "dtype": cfg_dtype}, dtype=override, training=training)
    assert {p.dtype for p in model.parameters()} == {expected}


def _hf_backend(backend_cfg, model_cfg):
    from negagent.backends import build_backend
    from negagent.model_source import base_model

    source = base_model(model_cfg, {"strategy": "none"}, {})
    return build_backend({"name": "hf", "device": "cpu", **backend_cfg}, source=source, render_cfg={})


@pytest.mark.parametrize("backend_dtype, model_cfg, dtype, attn", [
    (None, {"dtype": "auto"}, torch.float32, "sdpa"),  # auto on CPU
    (None, {"dtype": "bfloat16", "attn_implementation": "eager"}, torch.bfloat16, "eager"),
    ("float16", {"dtype": "bfloat16"}, torch.float16, "sdpa"),  # backend.dtype overrides model.dtype
])
def test_hf_backend_loads_the_dtype_and_attention_asked(backend_dtype, model_cfg, dtype, attn):
    backend = _hf_backend({"dtype": backend_dtype}, {**TINY_MODEL, **model_cfg})
    assert {p.dtype for p in backend.model.parameters()} == {dtype}
    assert backend.model.config._attn_implementation == attn
    assert backend.complete([[{"role": "user", "content": "2+3?"}]], _greedy())[0] != ""


def _greedy():
    from negagent.agent import Sampling

    return Sampling(temperature=0.0, max_new_tokens=4, stop=())


def test_hf_backend_sets_a_loaded_model_to_the_config(monkeypatch):
    """Weights loaded another way (a full fine-tuned run in its saved dtype) are cast and switched to
    the model config's attention; a model already right is used as it is."""
    from negagent.backends.hf import with_model_settings

    model = models.load_model(TINY_MODEL)
    assert with_model_settings(model, {"dtype": None}, TINY_MODEL) is model
    changed = with_model_settings(model, {"dtype": None}, {**TINY_MODEL, "dtype": "bfloat16", "attn_implementation": "eager"})
    assert {p.dtype for p in changed.parameters()} == {torch.bfloat16} and changed.config._attn_implementation == "eager"


# -- DeepSpeed sizes from the hidden size --------------------------------------------------------------
@pytest.mark.parametrize("stage", ["zero2", "zero3", "zero3_offload"])
@pytest.mark.parametrize("on_gpu", [True, False])
def test_deepspeed_sizes_follow_the_hidden_size(stage, on_gpu):
    """transformers' "auto" values for h = 5120 (Llama-2-13B); overlap_comm only on GPUs."""
    trainer = composed(f"trainer={stage}")["trainer"]
    zero = deepspeed_config.build(trainer, world_size=8, bf16=True, hidden_size=5120, on_gpu=on_gpu)["zero_optimization"]
    assert zero["overlap_comm"] is on_gpu
    assert zero["reduce_bucket_size"] == 26_214_400  # h * h
    if stage == "zero2":
        assert "stage3_prefetch_bucket_size" not in zero and "stage3_param_persistence_threshold" not in zero
    else:
        assert zero["stage3_prefetch_bucket_size"] == 23_592_960  # int(0.9 * h * h)
        assert zero["stage3_param_persistence_threshold"] == 51_200  # 10 * h
    json.dumps(zero)  # plain JSON values


def test_deepspeed_sizes_match_transformers_auto_fill():
    """The numbers transformers itself fills in for "auto" given a model of that hidden size."""
    from types import SimpleNamespace

    from transformers import LlamaConfig
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, unset_hf_deepspeed_config

    keys = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")
    hf = HfTrainerDeepSpeedConfig({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3, **{k: "auto" for k in keys}}})
    try:  # the object turns ZeRO-3 on for this process while it lives: off again before the next test
        hf.trainer_config_finalize(SimpleNamespace(get_warmup_steps=lambda n: 1), SimpleNamespace(config=LlamaConfig(hidden_size=96)), 10)
    finally:
        unset_hf_deepspeed_config()
    ours = deepspeed_config.build(composed("trainer=zero3")["trainer"], world_size=1, bf16=False,
                                  hidden_size=deepspeed_config.hidden_size(LlamaConfig(hidden_size=96)), on_gpu=True)
    assert {k: ours["zero_optimization"][k] for k in keys} == {k: hf.config["zero_optimization"][k] for k in keys} == {
        "reduce_bucket_size": 9216, "stage3_prefetch_bucket_size": 8294, "stage3_param_persistence_threshold": 960}


def test_hidden_size_of_configs_without_a_hidden_size_key():
    from types import SimpleNamespace

    assert deepspeed_config.hidden_size(SimpleNamespace(hidden_size=None, hidden_sizes=[32, 128, 64])) == 128
    assert deepspeed_config.hidden_size(SimpleNamespace(text_config=SimpleNamespace(hidden_size=256))) == 256
    with pytest.raises(NegagentError, match="has neither hidden_size nor hidden_sizes"):
        deepspeed_config.hidden_size(SimpleNamespace())


def test_training_arguments_size_deepspeed_from_the_model_config(tmp_path, monkeypatch):
    """The recipe reads the tiny model's hidden size (64) from its config, without loading weights,
    and tells build whether the ranks run on GPUs."""
    import transformers

    calls = []
    monkeypatch.setattr(transformers, "TrainingArguments", lambda **kw: kw)
    monkeypatch.setattr(training, "_deepspeed_state_on_cpu", lambda: None)
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded the weights for a size"))
    monkeypatch.setattr(deepspeed_config, "build", lambda t, **kw: calls.append(kw) or {"ok": True})
    args = training.training_arguments(composed("debug=smoke", "trainer=zero3"), tmp_path, world_size=2)
    assert args["deepspeed"] == {"ok": True}
    assert calls == [{"world_size": 2, "bf16": False, "hidden_size": 64, "on_gpu": False}]


# -- verification that never gathers the whole model -----------------------------------------------------
_ZERO3_SCRIPT = r'''
import json, sys
from pathlib import Path
import deepspeed, torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig
from negagent.errors import NegagentError
from negagent.models import model_config
from negagent.training import checkpoint
from tests.helpers import TINY_MODEL

deepspeed.init_distributed(dist_backend="gloo")
# Every parameter partitioned (threshold 0): a read outside a gather sees an empty placeholder.
ds = HfDeepSpeedConfig({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}})
model = AutoModelForCausalLM.from_config(model_config(TINY_MODEL))  # built under zero.Init
torch.manual_seed(0)
with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
    for p in model.parameters():
        p.data.normal_()
folder, careless = Path(sys.argv[1]) / "saved", Path(sys.argv[1]) / "careless"
folder.mkdir()
careless.mkdir()
with deepspeed.zero.GatheredParameters(list(model.parameters())):
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"},
              folder / "model.safetensors")
save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"},
          careless / "model.safetensors")  # placeholders, not weights
real = deepspeed.zero.GatheredParameters
gathers = []

def recording(params, *args, **kwargs):
    gathers.append(sum(p.ds_numel for p in params))
    return real(params, *args, **kwargs)

deepspeed.zero.GatheredParameters = recording
verified = checkpoint.verify_saved_model(model, folder, adapter=False, is_main=True)
first = gathers[:]  # the careless save's verification below gathers again
try:
    checkpoint.verify_saved_model(model, careless, adapter=False, is_main=True)
    careless_error = None
except NegagentError as exc:
    careless_error = str(exc)
modules = [sum(p.ds_numel for p in m.parameters(recurse=False)) for m in model.modules()]
print(json.dumps({"verified": verified, "gathers": first, "largest_module": max(modules),
                  "modules_with_params": sum(n > 0 for n in modules), "placeholder_elements": model.lm_head.weight.numel(),
                  "total": checkpoint.unique_parameter_count(model, trainable_only=False), "careless_error": careless_error}))
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_zero3_verification_gathers_one_module_at_a_time(tmp_path):
    """A real ZeRO-3 partitioned model (1 rank, DeepSpeed's CPU accelerator): verification gathers no
    more than the largest module's own parameters at once, never the model, and still proves the save
    (count and checksum of the file) and refuses a save of placeholders."""
    script = tmp_path / "zero3_verify.py"
    script.write_text(_ZERO3_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "DS_ACCELERATOR": "cpu"}
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["placeholder_elements"] == 0  # really partitioned
    count, digest = checkpoint.tensor_digest(load_file(tmp_path / "saved" / "model.safetensors"))
    assert out["verified"] == {"parameters": count, "sha256": digest} and count == out["total"]
    # one gather per module that has parameters (the tied embedding twice: as embed_tokens and lm_head)
    assert len(out["gathers"]) == out["modules_with_params"] == 21
    assert max(out["gathers"]) <= out["largest_module"] < out["total"]
    assert out["careless_error"].startswith(f"{tmp_path / 'careless'}: the final save does not match the trained model")


def test_other_ranks_gather_with_rank_0_but_digest_nothing(monkeypatch):
    """Ranks > 0 take part in every gather in the same order as rank 0 and hash no tensor."""
    import deepspeed

    model = models.load_model(TINY_MODEL)
    for p in model.parameters():  # what ZeRO-3 marks its parameters with
        p.ds_id, p.ds_numel = id(p), p.numel()
    order = {True: [], False: []}
    is_main = {"now": True}

    class Recording:
        def __init__(self, params, modifier_rank=None):
            assert modifier_rank is None  # read-only gathers: nothing is written back
            order[is_main["now"]].append([p.ds_id for p in params])

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(deepspeed.zero, "GatheredParameters", Recording)
    records = checkpoint.model_records(model, digest=True)
    is_main["now"] = False
    monkeypatch.setattr(checkpoint, "tensor_record", lambda *a: pytest.fail("a rank > 0 hashed a tensor"))
    assert checkpoint.model_records(model, digest=False) == {}
    assert order[True] == order[False] and max(sum(p.numel() for p in model.parameters() if p.ds_id in ids)
                                              for ids in map(set, order[True])) == 64 * 49152
    assert set(records) == set(model.state_dict())  # every state_dict entry, under its state_dict name


def test_digest_of_records_equals_digest_of_the_tensors():
    """Digesting one tensor at a time in any order gives the same checksum as the dict at once."""
    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(2, dtype=torch.bfloat16), "c": torch.tensor(3)}
    records = {k: checkpoint.tensor_record(k, tensors[k]) for k in ("c", "a", "b")}
    assert checkpoint.combine(records) == checkpoint.tensor_digest(tensors) and checkpoint.combine(records)[0] == 9


# -- the memory line and refusal ----------------------------------------------------------------------
def _cfg(*overrides):
    return composed("debug=smoke", *overrides)


@pytest.fixture(scope="module")
def tiny_counts():
    """The tiny model's distinct parameters and largest module, counted on the real model."""
    model = models.load_model(TINY_MODEL)
    total = sum({id(p): p.numel() for p in model.parameters()}.values())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, largest


def test_parameter_counts_on_the_meta_device_match_the_model(tiny_counts, monkeypatch):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded weights to count them"))
    counts = memory.parameter_counts(_cfg("trainer.lora.r=8"))
    # LoRA on q,k,v,o of 2 layers: r x (in + out) each; q, o: 64 -> 64, k, v: 64 -> 32 (2 of 4 heads for keys and values)
    assert (counts.total, counts.largest_layer, counts.adapter) == (*tiny_counts, 2 * 8 * (128 + 96 + 96 + 128))
    assert tiny_counts == (3_219_776, 49_152 * 64)


def test_memory_line_of_zero3_is_deepspeeds_estimate(tiny_counts, monkeypatch, capsys):
    """ZeRO-3, full fine-tuning, 2 CPU ranks: DeepSpeed's formula (no offload, zero_init off for the
    tiny source) per rank, both ranks' states and the CPU figure against the host's available memory."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    total, largest = tiny_counts
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(total, largest, num_gpus_per_node=2, num_nodes=1, cpu_offload=False,
                                                        cpu_offload_params=False, zero_init=False)
    # the formula restated: without zero.Init every rank first holds the whole float32 model in CPU memory
    assert (cpu, gpu) == (int(total * 4 * 2 * 1.5), 4 * largest + int(18 * total / 2))
    monkeypatch.setattr(memory, "host_available_bytes", lambda: 8 * 2**30)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    line = memory.report(_cfg("trainer=zero3", "trainer.nproc_per_node=2"), world_size=2, bf16=False, is_main=True)
    need = 2 * gpu + cpu
    assert line == (f"memory: model states need about {need / 2**30:.3f} GiB of host memory (2 x {gpu / 2**30:.3f} GiB per rank "
                    f"+ {cpu / 2**30:.3f} GiB CPU; DeepSpeed's estimate for ZeRO-3 on 2 ranks (2 per node, 1 node), zero_init=0: "
                    f"3.22M parameters, largest layer 3.15M); 8.000 GiB available")
    assert capsys.readouterr().out == line + "\n"
    memory.report(_cfg("trainer=zero3"), world_size=2, bf16=False, is_main=False)
    assert capsys.readouterr().out == ""  # other ranks check but do not print


@pytest.mark.parametrize("overrides, world, bf16, expected", [
    # ZeRO-2, 4 GPUs on 2 nodes: 2 bytes of 16-bit weights + 18 / 4 ranks; CPU 4 x ranks per node x 1.5
    (("trainer=zero2",), 4, True, lambda t, l: (2 * t + int(18 * t / 4), int(t * 4 * 2 * 1.5))),
    # ZeRO-3 with offload: the largest layer per GPU, 18 bytes x 1.5 per parameter on the CPU of each of 2 nodes
    (("trainer=zero3_offload",), 4, True, lambda t, l: (4 * l, int(t * 18 / 2 * 1.5))),
    # no DeepSpeed, full: 16 bytes per float32 parameter
    (("trainer=full",), 1, True, lambda t, l: (16 * t, 0)),
    (("trainer=full", "model.dtype=bfloat16"), 1, True, lambda t, l: (8 * t, 0)),
    # LoRA without DeepSpeed: float32 frozen weights + 16 bytes per adapter parameter (r=16: 2 x 16 x 448)
    (("trainer=lora",), 1, False, lambda t, l: (4 * (t - 14336) + 16 * 14336, 0)),
    # LoRA under ZeRO-3 with bf16: 16-bit frozen weights split over 4 ranks
    (("trainer=zero3", "trainer.method=lora"), 4, True, lambda t, l: (2 * (t - 14336) // 4 + 16 * 14336, 0)),
])
def test_estimate_of_each_setting(tiny_counts, overrides, world, bf16, expected):
    cfg = _cfg(*overrides)
    est = memory.estimate(cfg, memory.parameter_counts(cfg), world_size=world, local_ranks=2 if world == 4 else 1, bf16=bf16)
    assert (est.device_bytes, est.cpu_bytes) == expected(*tiny_counts)


def test_basis_says_how_each_estimate_was_reckoned(tiny_counts):
    cfg = _cfg("trainer=full")
    assert memory.estimate(cfg, memory.parameter_counts(cfg), world_size=1, local_ranks=1, bf16=True).basis == (
        "full fine-tuning with AdamW: weights, gradients and two moments at 4 bytes each, 16 bytes per parameter (3.22M)")
    cfg = _cfg("trainer=lora")
    assert memory.estimate(cfg, memory.parameter_counts(cfg), world_size=1, local_ranks=1, bf16=True).basis == (
        "LoRA: the frozen weights at 4 bytes per parameter (3.22M) + 16 bytes per adapter parameter (0.01M)")


def test_gpu_line_and_refusal(monkeypatch):
    est = memory.Estimate(device_bytes=3 * 2**30, cpu_bytes=2**29, basis="basis")
    monkeypatch.setattr(memory, "gpu_memory_bytes", lambda: 80 * 2**30)
    assert memory.check_fits(est, on_gpu=True, local_ranks=8) == (
        "memory: model states need about 3.000 GiB per GPU and 0.500 GiB of CPU memory per node (basis); this GPU has 80.000 GiB")
    monkeypatch.setattr(memory, "gpu_memory_bytes", lambda: 2 * 2**30)
    with pytest.raises(NegagentError) as raised:
        memory.check_fits(est, on_gpu=True, local_ranks=8)
    assert str(raised.value) == ("the model states need about 3.000 GiB per GPU (basis), more than this GPU's 2.000 GiB: "
                                 "use trainer=zero3_offload, more ranks (trainer.nproc_per_node) or trainer.method=lora")


def test_training_is_refused_before_the_model_is_built(tmp_path, monkeypatch):
    """Too little host memory for the states: one line, and neither data nor model is touched."""
    monkeypatch.setattr(memory, "host_available_bytes", lambda: 2**20)
    monkeypatch.setattr(training, "build_model", lambda cfg: pytest.fail("built the model"))
    monkeypatch.setattr(training, "_samples", lambda cfg, run_dir: pytest.fail("read the data"))
    with pytest.raises(NegagentError) as raised:
        training.train(_cfg("trainer=full"), tmp_path)
    need = 16 * 3_219_776
    assert str(raised.value) == (
        f"the model states need about {need / 2**30:.3f} GiB of host memory (full fine-tuning with AdamW: weights, gradients "
        f"and two moments at 4 bytes each, 16 bytes per parameter (3.22M)), more than the 0.001 GiB available: "
        f"use trainer.method=lora, a smaller model, or GPUs")


@pytest.mark.parametrize("attn, varlen", [("flash_attention_2", True), ("sdpa", False), ("eager", False)])
def test_recipe_asks_for_varlen_arguments_only_with_flash_attention(tmp_path, monkeypatch, attn, varlen):
    """The recipe's micro-batches carry flash-attention's variable-length arguments exactly when the
    model runs flash_attention_2 (stopped once the data set is built: no flash-attention on CPU)."""
    from negagent.training import batching
    from negagent.trajectory import write_trajectories
    from tests.helpers import make_traj

    monkeypatch.setattr(models, "flash_attn_installed", lambda: True)
    trajectories = tmp_path / "arith.jsonl"
    write_trajectories(trajectories, [make_traj(i, i % 3 != 0) for i in range(6)])
    made = []

    class Stop(Exception):
        pass

    def record(*args, **kwargs):
        made.append(kwargs)
        raise Stop

    monkeypatch.setattr(batching, "MicroBatches", record)
    with pytest.raises(Stop):
        training.train(_cfg(f"data.trajectories={trajectories}", "trainer.batching=packed", f"model.attn_implementation={attn}"),
                       tmp_path)
    assert [(m["mode"], m["varlen"]) for m in made] == [("packed", varlen)]
