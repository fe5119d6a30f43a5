"""`python -m negagent.export`: a training run directory -> a standalone Hugging Face model directory
that loads without negagent, computes what negagent's own in-memory merge computes, serves through
`transformers serve` to the same episodes as the hf backend, and says in its card how to prompt it."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from negagent import __version__
from negagent.agent import Sampling, run_episodes
from negagent.export import CARD, FACTS, eval_facts, export, inference_facts, main, model_card
from negagent.trajectory import write_trajectories
from tests.helpers import TINY_MODEL, assert_one_line_error, make_traj
from tests.servers import transformers_serve

REPO = Path(__file__).resolve().parents[1]
TAG = "Generate a trajectory that solves the question correctly."
NEGATIVE_TAG = "Generate a trajectory that fails to solve the question."
PROMPT = [{"role": "system", "content": "Answer."}, {"role": "user", "content": f"{TAG}\nQuestion: What is 2 + 3?"}]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "negagent.export", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


class _Answers:
    """A stand-in model for the evaluator: the right answer to the first `right` test questions."""

    name = "answers"

    def __init__(self, task, right: int):
        questions = [q for qs in task.test_sets().values() for q in qs]
        self.gold = {q.question: q.gold for q in questions}
        self.right = {q.question for q in questions[:right]}

    def complete(self, chats, sampling):
        questions = [next(m["content"] for m in chat if m["role"] == "user").split("Question: ", 1)[1].split("\n")[0]
                     for chat in chats]
        return [f"Thought: done.\nAction: finish[{self.gold[q] if q in self.right else -12345}]" for q in questions]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished LoRA run of `train.py debug=smoke` (one step), evaluated on 4 arith questions.

    The one real training run of this file (about 20 s of CPU): config, manifest, tokenizer and
    `done` as train.py writes them. One step barely moves the adapter (its B matrices start at
    zero) and the tiny random model greedily writes only "\\n", so the trained adapter is replaced
    by a seeded random one (peft init_lora_weights=False, large lora_alpha): merging it changes
    the logits by far more than the tolerance, and the merged model writes varied text. The
    evaluation uses a stand-in that answers 2 of the 4 questions right, so metrics.json's mean
    lies strictly inside its interval.
    """
    from peft import LoraConfig, get_peft_model

    from negagent.evaluation.evaluator import default_config, evaluate
    from negagent.models import load_model
    from negagent.tasks import get_task

    root = tmp_path_factory.mktemp("export")
    trajectories = root / "arith.jsonl"
    write_trajectories(trajectories, [make_traj(i, i % 3 != 0) for i in range(6)])  # 4 positives, 2 negatives
    run = root / "run"
    result = subprocess.run(
        [sys.executable, "train.py", "debug=smoke", f"data.trajectories={trajectories}", f"hydra.run.dir={run}",
         "trainer.max_steps=1"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run / "done").is_file() and (run / "adapter_model.safetensors").is_file()

    torch.manual_seed(0)
    random_lora = LoraConfig(r=8, lora_alpha=160, target_modules=TARGETS, init_lora_weights=False,
                             task_type="CAUSAL_LM")
    get_peft_model(load_model(TINY_MODEL), random_lora).save_pretrained(run)

    cfg = OmegaConf.merge(default_config(), {
        "run_dir": str(run), "task": {"limit_test": 4}, "tag_mode": "all", "max_turns": 1, "progress": False,
        "pass_k": [1], "bootstrap_resamples": 200, "sampling": {"temperature": 0.0}})
    evaluate(cfg, run / "eval", backend=_Answers(get_task({"name": "arith", "limit_test": 4}), right=2))
    return run


@pytest.fixture(scope="module")
def exported(run_dir) -> tuple[Path, str]:
    """(directory, what it printed) of the command with its defaults: merged, into <run_dir>/export.

    In this process: a second process would load torch and transformers again for nothing."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main([str(run_dir)])
    return run_dir / "export", printed.getvalue()


@pytest.fixture(scope="module")
def renderer():
    from negagent.models import load_tokenizer
    from negagent.render import Renderer

    return Renderer(load_tokenizer(TINY_MODEL))


def _logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def test_command_exports_a_merged_model_into_the_run(exported):
    """The default export: merged weights as safetensors, tokenizer, card and facts; no adapter;
    the command says where it wrote and which tag to prompt with."""
    out, printed = exported
    # (The last lines: importing peft may first print DeepSpeed's accelerator note.)
    assert printed.splitlines()[-2:] == [f"exported (merged): {out}", f"inference tag (prefix): {TAG}"]
    assert sorted(p.name for p in out.iterdir()) == [
        CARD, "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors", FACTS,
        "tokenizer.json", "tokenizer_config.json"]
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".export")] == []  # no staging left
    umask = os.umask(0)
    os.umask(umask)
    # Readable as the user's other files are (safetensors alone would write model.safetensors 0600).
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {p.name: 0o666 & ~umask for p in out.iterdir()}


def test_merged_export_computes_negagent_in_memory_merge(run_dir, exported, renderer):
    """Loaded with plain transformers, the export's logits equal negagent's own merge of the run's
    adapter (evaluated_model.load_causal_lm), and differ from the base model's: the adapter is in."""
    from transformers import AutoModelForCausalLM

    from negagent.model_source import from_run_dir, load_causal_lm, load_tokenizer_for
    from negagent.models import load_model

    out, _ = exported
    ids = renderer.prompt_ids(PROMPT)
    subject = from_run_dir(run_dir)
    reference = _logits(load_causal_lm(subject, load_tokenizer_for(subject), device="cpu"), ids)
    standalone = _logits(AutoModelForCausalLM.from_pretrained(out).eval(), ids)
    torch.testing.assert_close(standalone, reference, atol=1e-5, rtol=0)
    assert (_logits(load_model(TINY_MODEL).eval(), ids) - standalone).abs().max() > 0.1


def test_export_tokenizer_has_the_chat_template_and_generation_stops_at_end_of_turn(exported, renderer):
    """The saved tokenizer renders a chat to exactly the renderer's prompt ids, and the generation
    config ends at the renderer's end-of-turn token and samples unless a request says temperature 0."""
    from transformers import AutoTokenizer, GenerationConfig

    out, _ = exported
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == renderer.tokenizer.chat_template
    ids = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_dict=False)
    assert ids == renderer.prompt_ids(PROMPT)
    generation = GenerationConfig.from_pretrained(out)
    assert (generation.eos_token_id, generation.pad_token_id, generation.do_sample) == (
        [renderer.end_of_turn_id], renderer.tokenizer.pad_token_id, True)


def test_card_and_facts_say_how_to_prompt_what_was_trained_and_how_it_scored(run_dir, exported):
    """negagent_export.json holds the run's strategy, tag, placement, instructions, data manifest and
    the reward intervals of eval/metrics.json; README.md states them in words."""
    from negagent.tasks.arith import INSTRUCTIONS

    out, _ = exported
    facts = json.loads((out / FACTS).read_text())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert {k: facts[k] for k in ("run_name", "task", "strategy", "inference_tag", "placement", "instructions_role",
                                  "weights", "base_model", "negagent_version", "instructions")} == {
        "run_name": "run", "task": "arith", "strategy": "prefix", "inference_tag": TAG, "placement": "prefix",
        "instructions_role": "system", "weights": "merged", "base_model": "tiny", "negagent_version": __version__,
        "instructions": INSTRUCTIONS}
    assert facts["example_chat"] == [{"role": "system", "content": INSTRUCTIONS},
                                     {"role": "user", "content": f"{TAG}\nQuestion: <question>"}]
    assert facts["data"] == {
        "trajectories": manifest["trajectories"], "trajectories_sha256": manifest["trajectories_sha256"],
        "positives_used": 4, "negatives_used": 2, "available": {"positive": 4, "negative": 2},
        "tags": {TAG: 4, NEGATIVE_TAG: 2}}
    assert len(facts["data"]["trajectories_sha256"]) == 64
    reward = metrics["results"]["positive"]["test_sets"]["arith"]["reward"]
    assert reward["mean"] == 0.5 and reward["lo"] < 0.5 < reward["hi"]  # distinct numbers to find in the card
    assert facts["evaluation"]["primary"] == "positive"
    assert facts["evaluation"]["results"]["positive"] == {
        "tag": TAG, "reward": {"arith": {"mean": 0.5, "lo": reward["lo"], "hi": reward["hi"], "n_questions": 4}}}
    assert [(mode, r["tag"]) for mode, r in facts["evaluation"]["results"].items()] == [
        ("positive", TAG), ("negative", NEGATIVE_TAG), ("none", None)]

    card = (out / CARD).read_text()
    for line in (
        f"A ReAct agent for task `arith`, fine-tuned from base model `tiny` with negagent {__version__} "
        "(Negative-Aware Training, arXiv 2402.11651) under tagging strategy `prefix`.",
        f"Inference tag (prefix): `{TAG}`",
        "The trained model expects this tag on its own line before the `Question: ...` line of the first user "
        "message; without it the model is not asked for a successful trajectory.",
        "Instructions role: `system`. The chat the model was trained on starts:",
        "- positives used: 4", "- negatives used: 2",
        f"- trajectory file sha256: `{manifest['trajectories_sha256']}`",
        f"Tag mode `positive` (tag: {json.dumps(TAG)}):",
        f"| arith | 0.500 [{reward['lo']:.3f}, {reward['hi']:.3f}] | 4 |",
        "Sampling: temperature 0.0, max_turns 1.",
        "The LoRA adapter is merged into the base weights: load this directory with "
        "`AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`.",
    ):
        assert line in card.splitlines(), line


def test_served_export_gives_the_same_episodes_as_the_hf_backend(exported, renderer):
    """`transformers serve` over the exported directory, asked through the openai backend, writes
    the same non-empty turns as the hf backend over the same directory (greedy): the server's
    tokenisation of the chat and its stopping agree with negagent's renderer and backend.
    (Slow for its server: `transformers serve` takes 15-20 s of CPU to start.)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from negagent.backends import build_backend
    from negagent.backends.hf import HFBackend
    from negagent.render import Renderer
    from negagent.tasks import get_task
    from negagent.tools import build_toolbox

    out, _ = exported
    task = get_task({"name": "arith", "limit_test": 2})
    jobs = [(q, 0) for q in task.test_sets()["arith"]]
    toolbox = build_toolbox(task.tools, {})

    def call_tool(name: str, argument: str) -> tuple[str, bool]:
        result = toolbox.call(name, argument)
        return result.observation, result.ok

    def episodes(backend) -> list:
        sampling = Sampling(temperature=0.0, max_new_tokens=24, seed=0)
        found = run_episodes(backend, task, jobs, call_tool, sampling=sampling, max_turns=2, tag=TAG)
        return sorted(found, key=lambda t: t.id)

    local = episodes(HFBackend(AutoModelForCausalLM.from_pretrained(out), Renderer(AutoTokenizer.from_pretrained(out))))
    with transformers_serve(out) as base_url:
        client = build_backend({"name": "openai", "base_url": base_url, "model": str(out), "api_key_env": None})
        try:
            served = episodes(client)
        finally:
            client.close()
    assert [t.messages for t in served] == [t.messages for t in local]
    turns = [m["content"] for t in local for m in t.messages if m["role"] == "assistant"]
    assert len(turns) == 4  # 2 questions x 2 turns: nothing the random model writes is an action
    for turn in turns:
        assert turn and len(renderer.tokenizer.encode(turn, add_special_tokens=False)) >= 8, turn


@pytest.fixture
def unfinished(run_dir, tmp_path) -> Path:
    """A copy of the run without its `done` marker or evaluation, as a killed run leaves it."""
    copy = tmp_path / "unfinished"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("done", "eval", "export", "wandb"))
    return copy


def test_no_merge_copies_the_adapter_which_loads_on_the_base_model(run_dir, exported, unfinished, tmp_path, renderer):
    """--no-merge: the adapter files as trained plus the tokenizer, into an existing empty --out,
    with --allow-unfinished for a run without `done`; peft on the base model gives the merged
    export's logits, and the card says it is an unmerged adapter that was not evaluated."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from negagent.models import load_model

    out = tmp_path / "adapter"
    out.mkdir()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main([str(unfinished), "--no-merge", "--allow-unfinished", "--out", str(out)])
    assert printed.getvalue().splitlines()[-2:] == [f"exported (adapter): {out}", f"inference tag (prefix): {TAG}"]
    assert sorted(p.name for p in out.iterdir()) == [
        CARD, "adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", FACTS, "tokenizer.json",
        "tokenizer_config.json"]
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (out / name).read_bytes() == (run_dir / name).read_bytes()
    ids = renderer.prompt_ids(PROMPT)
    merged = _logits(AutoModelForCausalLM.from_pretrained(exported[0]).eval(), ids)
    # Merged and unmerged float32 weights round differently (seen: 1.9e-5 on logits of a few units);
    # the adapter itself moves the logits by far more than the tolerance (asserted below).
    torch.testing.assert_close(_logits(PeftModel.from_pretrained(load_model(TINY_MODEL), out).eval(), ids), merged,
                               atol=1e-4, rtol=0)
    assert (_logits(load_model(TINY_MODEL).eval(), ids) - merged).abs().max() > 1e-2
    facts = json.loads((out / FACTS).read_text())
    assert (facts["weights"], facts["evaluation"], facts["run_name"]) == ("adapter", None, "unfinished")
    frozen_model = yaml.safe_load((run_dir / "config.yaml").read_text())["model"]
    assert facts["base_model_config"] == frozen_model
    card = (out / CARD).read_text().splitlines()
    assert "not evaluated (the run has no eval/metrics.json)" in card
    assert (f"A peft LoRA adapter, not merged: load base model `tiny` (negagent model config: "
            f"`{json.dumps(frozen_model, sort_keys=True)}`) and apply this directory with "
            f"`peft.PeftModel.from_pretrained`; the tokenizer is here.") in card


def test_full_model_run_is_saved_as_it_is(exported, tmp_path, renderer):
    """A full fine-tuning run (config.json + model.safetensors, the cache off as training saves it)
    exports to the same logits with the cache on, and the card calls its weights fully fine-tuned."""
    from transformers import AutoModelForCausalLM

    merged, _ = exported
    full = tmp_path / "full"
    shutil.copytree(merged, full, ignore=shutil.ignore_patterns(CARD, FACTS))
    model_config = json.loads((full / "config.json").read_text())
    (full / "config.json").write_text(json.dumps({**model_config, "use_cache": False}))
    for name in ("config.yaml", "manifest.json", "done"):
        shutil.copy2(merged.parent / name, full / name)
    out = export(full, tmp_path / "out")
    ids = renderer.prompt_ids(PROMPT)
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(out).eval(), ids),
                               _logits(AutoModelForCausalLM.from_pretrained(full).eval(), ids), atol=0, rtol=0)
    assert json.loads((out / FACTS).read_text())["weights"] == "full"
    assert json.loads((out / "config.json").read_text())["use_cache"] is True
    assert ("All weights were fine-tuned: load this directory with `AutoModelForCausalLM.from_pretrained` and "
            "`AutoTokenizer.from_pretrained`.") in (out / CARD).read_text().splitlines()


@pytest.mark.parametrize("case", ["missing run", "unfinished run", "no weights", "out not empty", "out is a file"])
def test_bad_input_is_one_line_and_writes_nothing(case, run_dir, unfinished, tmp_path):
    """Each refusal is one `error:` line (exit 2, no traceback) naming the problem, before anything
    is written."""
    out = tmp_path / "out"
    run = run_dir
    if case == "missing run":
        run = tmp_path / "no-such-run"
        fragments = (f"{run}: no such run directory",)
    elif case == "unfinished run":
        run = unfinished
        fragments = (f"{unfinished}: the run has not finished (no 'done' marker)", "--allow-unfinished")
    elif case == "no weights":
        run = tmp_path / "empty-run"
        run.mkdir()
        (run / "done").write_text("x\n")
        fragments = (f"{run}: no trained model in this run directory",)
    elif case == "out not empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine\n")
        fragments = (f"--out {out}: already exists and is not an empty directory",)
    else:
        out.write_text("mine\n")
        fragments = (f"--out {out}: already exists and is not an empty directory",)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    assert_one_line_error(_cli(str(run), "--out", str(out)), *fragments)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_failed_merge_leaves_nothing_behind(unfinished, tmp_path):
    """An adapter that does not fit the run's base model fails the merge half-way through the export
    with a one-line error, and neither --out nor the staging directory beside it is left."""
    from negagent.errors import NegagentError

    frozen = yaml.safe_load((unfinished / "config.yaml").read_text())
    frozen["model"]["arch"]["hidden_size"] = 32  # a narrower base model than the adapter was made for
    (unfinished / "config.yaml").write_text(yaml.safe_dump(frozen))
    parent = tmp_path / "exports"
    parent.mkdir()
    expected = rf"^{re.escape(str(unfinished))}: the adapter does not fit base model 'tiny' \(.*size mismatch"
    with pytest.raises(NegagentError, match=expected):
        export(unfinished, parent / "out", allow_unfinished=True)
    assert list(parent.iterdir()) == []


@pytest.mark.parametrize("tagging_cfg, expected", [
    ({"strategy": "prefix", "positive": "P", "negative": "N"}, ("P", "prefix")),
    ({"strategy": "suffix", "positive": "P", "negative": "N"}, ("P", "suffix")),
    ({"strategy": "graded", "placement": "suffix", "grade_cuts": [0.4], "grade_tags": ["z", "l", "h", "top"]},
     ("top", "suffix")),
    ({"strategy": "none", "positive": "P", "negative": "N"}, (None, None)),
    ({"strategy": "positive_only", "positive": "P", "negative": "N"}, (None, None)),
])
def test_inference_facts_per_strategy(tagging_cfg, expected):
    """The tag the trained model expects and its place: the positive tag (the top grade), none for
    untagged strategies."""
    facts = inference_facts(tagging_cfg)
    assert (facts["strategy"], facts["inference_tag"], facts["placement"]) == (tagging_cfg["strategy"], *expected)


def test_card_for_untagged_and_suffix_strategies_and_missing_facts():
    """An untagged strategy's card says prompts carry no tag; a suffix strategy's says where its
    tag goes; a run without eval says "not evaluated"."""
    base = {"run_name": "r", "task": "arith", "base_model": "tiny", "base_model_config": {"name": "tiny"},
            "negagent_version": __version__, "weights": "merged", "instructions_role": "user", "example_chat": [],
            "data": None, "evaluation": None}
    untagged = model_card({**base, "strategy": "none", "inference_tag": None, "placement": None}).splitlines()
    assert "Inference tag: none. Strategy `none` trains without tags: prompts carry no tag." in untagged
    assert "not evaluated (the run has no eval/metrics.json)" in untagged
    assert "No manifest.json in the run: the training data is not recorded." in untagged
    assert "Instructions role: `user`. The chat the model was trained on starts:" in untagged
    suffix = model_card({**base, "strategy": "suffix", "inference_tag": "T", "placement": "suffix"}).splitlines()
    assert "Inference tag (suffix): `T`" in suffix
    assert ("The trained model expects this tag on its own line after the `Question: ...` line of the first user "
            "message; without it the model is not asked for a successful trajectory.") in suffix


def test_eval_facts_absent_and_unreadable(tmp_path):
    """No eval/metrics.json: None (the card says "not evaluated"); a corrupt one is a one-line error."""
    from negagent.errors import NegagentError

    assert eval_facts(tmp_path) is None
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "metrics.json").write_text("{not json")
    with pytest.raises(NegagentError, match=r"eval/metrics.json: not valid JSON"):
        eval_facts(tmp_path)
