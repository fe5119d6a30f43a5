"""The evaluator: scoring contract, statistics, tag modes, resume, run directories, bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from negagent.errors import NegagentError
from negagent.evaluation import default_config, evaluate, evaluate_run, score, tag_modes
from negagent.metrics import mean_ci, paired_comparison, pass_at_k, pass_at_ks
from negagent.tasks import get_task
from tests.helpers import TINY_MODEL

REPO = Path(__file__).resolve().parents[1]
PREFIX = {"strategy": "prefix", "positive": "Solve it correctly.", "negative": "Fail at it."}


class AnswerBackend:
    """A stand-in model: answers each question right when its id is in `right`, else wrong.

    With `search`, the first turn searches (so the tool cache is exercised)."""

    name = "answers"

    def __init__(self, task, right=(), search=False):
        self.by_text = {q.question: q for qs in task.test_sets().values() for q in qs}
        self.right, self.search, self.calls = set(right), search, 0

    def complete(self, chats, sampling):
        self.calls += 1
        out = []
        for chat in chats:
            text = next(m["content"] for m in chat if m["role"] == "user")
            q = self.by_text[text.split("Question: ", 1)[1].split("\n")[0]]
            if self.search and len(chat) <= 2:
                out.append("Thought: look it up.\nAction: search[Paris]")
            elif q.id in self.right:
                out.append(f"Thought: done.\nAction: finish[{q.gold}]")
            else:
                out.append("Thought: guess.\nAction: finish[-12345]")
        return out


def _cfg(**over):
    cfg = default_config()
    cfg.task = {"name": "arith", "n_test": 6, "max_turns": 3}
    cfg.model = dict(TINY_MODEL)
    cfg.sampling.max_new_tokens = 8
    cfg.backend.threads = 1
    cfg.progress = False
    cfg.pass_k = [1, 2]
    return OmegaConf.merge(cfg, over)


def test_score_contract():
    math_scores = score("arith", "18.0", "18")
    assert math_scores["reward"] is True and math_scores["numeric"] is True and math_scores["strict"] is False
    assert score("math", "1,800", "1800")["numeric"] is True
    hotpot = score("hotpotqa", "the Eiffel Tower", "Eiffel Tower")
    assert hotpot["reward"] and hotpot["em"] and hotpot["f1"] == 1.0
    assert score("strategyqa", "Yes.", True)["reward"] is True
    task = get_task({"name": "arith", "n_test": 2})
    assert score(task, None, 3)["reward"] is False


def test_statistics():
    ci = mean_ci([[1, 1], [0, 0], [1, 0]], resamples=200)
    assert ci["mean"] == pytest.approx(0.5) and ci["lo"] <= 0.5 <= ci["hi"] and ci["n_episodes"] == 6
    assert pass_at_k(5, 0, 1) == 0.0 and pass_at_k(5, 5, 3) == 1.0
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(4, 2))
    assert pass_at_ks([[True, False], [False, False]], [1, 2, 3]) == {"pass@1": 0.25, "pass@2": 0.5}
    cmp = paired_comparison({"a": 0, "b": 0, "c": 1, "d": 1}, {"a": 1, "b": 1, "c": 1, "d": 0})
    assert cmp.better_in_b == ["a", "b"] and cmp.better_in_a == ["d"] and cmp.diff == pytest.approx(0.25)
    assert cmp.p_value == pytest.approx(1.0)  # 2 vs 1 flips: exact two-sided binomial p = 1


def test_tag_modes():
    assert tag_modes("all", PREFIX) == {"positive": "Solve it correctly.", "negative": "Fail at it.", "none": None}
    graded = {"strategy": "graded", "grade_tags": ["zero", "some", "full"], "grade_cuts": []}
    assert tag_modes("negative", graded) == {"negative": "zero"}
    assert tag_modes("all", {"strategy": "none"}) == {"none": None}
    with pytest.raises(NegagentError, match="trains without tags"):
        tag_modes("negative", {"strategy": "positive_only"})
    with pytest.raises(NegagentError, match="tag_mode"):
        tag_modes("both", PREFIX)


def test_evaluate_resumes_and_counts(tmp_path):
    task = get_task({"name": "arith", "n_test": 6})
    ids = [q.id for q in task.test_sets()["arith"]]
    cfg = _cfg(sampling={"n": 2, "seeds": [0, 1]})
    backend = AnswerBackend(task, right=ids[:3])
    metrics = evaluate(cfg, tmp_path, backend=backend)
    stats = metrics["results"]["positive"]["test_sets"]["arith"]
    assert stats["n_episodes"] == 24 and stats["numeric"]["mean"] == 0.5 and stats["strict"]["mean"] == 0.5
    assert stats["pass@2"] == 0.5 and stats["action_error_rate"] == 0.0 and stats["mean_steps"]["mean"] == 1.0
    assert stats["failures"] == {"solved": 12, "wrong_answer": 12}
    assert metrics["versions"]["negagent"] and "torch" in metrics["versions"]
    lines = (tmp_path / "trajectories.jsonl").read_text().splitlines()
    assert len(lines) == 24
    # A killed run: keep 10 finished episodes and a torn line; the re-run adds only the 14 missing.
    (tmp_path / "trajectories.jsonl").write_text("\n".join(lines[:10]) + "\n" + lines[10][:40])
    again = AnswerBackend(task, right=ids[:3])
    assert evaluate(cfg, tmp_path, backend=again)["results"] == metrics["results"]
    new_lines = (tmp_path / "trajectories.jsonl").read_text().splitlines()
    assert len(new_lines) == 24 and new_lines[:10] == lines[:10]
    finished = AnswerBackend(task)
    evaluate(cfg, tmp_path, backend=finished)
    assert finished.calls == 0  # nothing left to run
    with pytest.raises(NegagentError, match="another evaluation setup"):
        evaluate(_cfg(sampling={"n": 2, "seeds": [0, 1], "temperature": 0.7}), tmp_path, backend=finished)


def test_parse_errors_and_tool_errors_are_failure_types(tmp_path, capsys):
    class Broken(AnswerBackend):
        def complete(self, chats, sampling):
            return ["I will not use the format." if i % 2 else "Action: calculate[1/0]" for i in range(len(chats))]

    task = get_task({"name": "arith", "n_test": 6})
    stats = evaluate(_cfg(progress=True), tmp_path, backend=Broken(task))["results"]["positive"]["test_sets"]["arith"]
    assert stats["action_error_rate"] == 1.0 and stats["mean_steps"]["mean"] == 3.0
    assert "positive tag, turn 3/3, 6 running" in capsys.readouterr().err  # the bar moves while no episode ends
    assert set(stats["failures"]) <= {"parse_error", "tool_error"} and stats["reward"]["mean"] == 0.0


def _make_run_dir(root: Path, task_cfg: dict, tagging: dict) -> Path:
    """A finished training run as train.py leaves it: frozen config, manifest, LoRA adapter, tokenizer."""
    from peft import LoraConfig, get_peft_model

    from negagent.models import load_model, load_tokenizer

    run = root / "run"
    run.mkdir()
    tokenizer = load_tokenizer(TINY_MODEL)
    peft_model = get_peft_model(load_model(TINY_MODEL), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(run)
    tokenizer.save_pretrained(run)
    config = {"seed": 3, "model": TINY_MODEL, "task": task_cfg, "tagging": {**PREFIX, "neg_num": 100},
              "render": {"max_length": 1024, "instructions_role": "system", "end_of_turn": None}}
    config["tagging"].update(tagging)
    (run / "config.yaml").write_text(OmegaConf.to_yaml(config))
    (run / "manifest.json").write_text(json.dumps({"samples": {"negative": {"samples": 100}, "positive": {"samples": 50}}}))
    (run / "done").write_text("")
    return run


def test_run_dir_with_adapter_and_tag_sensitivity(tmp_path):
    import torch

    from negagent.evaluated_model import from_run_dir, load_causal_lm, load_tokenizer_for
    from negagent.models import load_model

    run = _make_run_dir(tmp_path, {"name": "arith", "n_test": 3, "max_turns": 2}, {})
    subject = from_run_dir(run)
    assert subject.adapter_dir == run and subject.training["negatives_used"] == 100 and subject.training["seed"] == 3
    merged = load_causal_lm(subject, load_tokenizer_for(subject), device="cpu")
    base = load_model(TINY_MODEL)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[name], base.state_dict()[name])  # the adapter was merged
    metrics = evaluate_run(run, {"tag_mode": "all", "sampling": {"max_new_tokens": 6}, "backend": {"threads": 1},
                                 "progress": False})
    assert set(metrics["results"]) == {"positive", "negative", "none"}
    assert metrics["training"]["strategy"] == "prefix" and metrics["control_strength"]["mean"] is not None
    records = [json.loads(line) for line in (run / "eval" / "trajectories.jsonl").read_text().splitlines()]
    assert len(records) == 9 and {r["provenance"]["tag"] for r in records} == {"Solve it correctly.", "Fail at it.", None}
    assert (run / "eval" / "metrics.json").is_file()


def test_bad_run_dirs(tmp_path):
    from negagent.evaluated_model import from_run_dir

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.yaml").write_text("model: {name: tiny}\n")
    with pytest.raises(NegagentError, match="no trained model"):
        from_run_dir(empty)
    with pytest.raises(NegagentError, match="no such directory"):
        from_run_dir(tmp_path / "nowhere")


def test_missing_test_file_is_one_line(tmp_path):
    cfg = _cfg(task={"name": "math", "data_dir": str(tmp_path), "test_sets": ["svamp"]})
    with pytest.raises(NegagentError, match="SVAMP"):
        evaluate(cfg, tmp_path / "out")


@pytest.mark.parametrize("task_name", ["math", "hotpotqa", "strategyqa"])
def test_every_task_with_tiny_model(tmp_path, data_dir, task_name):
    cfg = _cfg(data_dir=str(data_dir), task={"name": task_name, "data_dir": str(data_dir), "limit_test": 2, "max_turns": 1},
               sampling={"max_new_tokens": 4})
    cfg.tools.search.data_dir = str(data_dir)
    metrics = evaluate(cfg, tmp_path)
    sets = metrics["results"]["positive"]["test_sets"]
    expected = {"math": {"gsm8k", "svamp", "asdiv", "multiarith"}, "hotpotqa": {"hotpotqa"}, "strategyqa": {"strategyqa"}}
    assert set(sets) == expected[task_name]
    metric = {"math": "numeric", "hotpotqa": "f1", "strategyqa": "acc"}[task_name]
    assert all(s["n_episodes"] == 2 and metric in s for s in sets.values())
    if task_name == "math":
        assert {"numeric", "strict"} <= set(metrics["results"]["positive"]["average"])


def test_search_observations_are_recorded_for_replay(tmp_path, data_dir):
    task = get_task({"name": "strategyqa", "data_dir": str(data_dir), "limit_test": 2})
    cfg = _cfg(data_dir=str(data_dir), task={"name": "strategyqa", "data_dir": str(data_dir), "limit_test": 2})
    cfg.tools.search.data_dir = str(data_dir)
    metrics = evaluate(cfg, tmp_path, backend=AnswerBackend(task, search=True))
    cache = tmp_path / "tool_cache.jsonl"
    assert cache.is_file() and "Paris" in cache.read_text() and metrics["files"]["tool_cache"] == "tool_cache.jsonl"
    assert metrics["versions"]["tools"]["search"].startswith("bm25s")


def _cli(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "evaluate.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_cli_smoke_writes_results(tmp_path):
    done = _cli("debug=smoke", f"hydra.run.dir={tmp_path}", "sampling.max_new_tokens=8", "backend.threads=1",
                "progress=false")
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["results"]["positive"]["test_sets"]["arith"]["n_episodes"] == 8
    assert len((tmp_path / "trajectories.jsonl").read_text().splitlines()) == 8


@pytest.mark.parametrize("args, message", [
    (["run_dir=/nonexistent/run"], "no such directory"),
    (["backend=vllm"], "vllm package"),
    (["tag_mode=sideways"], "tag_mode"),
    (["backend=openai", "backend.base_url=http://127.0.0.1:9/v1", "backend.model=m", "backend.api_key_env=null",
      "backend.timeout_s=2", "backend.max_retries=0"], ""),
])
def test_cli_bad_input_is_one_line(tmp_path, args, message):
    done = _cli("debug=smoke", f"hydra.run.dir={tmp_path}", *args, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in done.stderr


def test_hf_prefix_cache_gives_the_same_turns(tokenizer):
    from negagent.agent import Sampling, run_episodes
    from negagent.backends.hf import HFBackend
    from negagent.models import load_model
    from negagent.render import Renderer

    task = get_task({"name": "arith", "n_test": 5})
    model, renderer = load_model(TINY_MODEL), Renderer(tokenizer)
    toolbox_call = lambda name, arg: ("1", True)  # noqa: E731  (observations do not matter here)
    runs = {}
    for cached in (False, True):
        backend = HFBackend(model, renderer, batch_size=5, prefix_cache=cached)
        runs[cached] = sorted((t.id, [m["content"] for m in t.messages]) for t in run_episodes(
            backend, task, [(q, 0) for q in task.test_sets()["arith"]], toolbox_call,
            sampling=Sampling(temperature=0.0, max_new_tokens=6), max_turns=2))
        assert (backend._prefix is not None) == cached
    assert runs[True] == runs[False]
