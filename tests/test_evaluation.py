"""The evaluator: scoring contract, statistics, tag modes, resume, run directories, bad input."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import platform
import random
import re
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import pytest
from omegaconf import OmegaConf
from tqdm import tqdm

import negagent
from negagent.errors import NegagentError
from negagent.evaluation.evaluator import _task_cfg, default_config, evaluate, evaluate_run, score
from negagent.metrics import question_scores
from negagent.metrics import summarize
from negagent.tagging import tag_modes
from negagent.metrics import mean_ci, paired_comparison, pass_at_k, pass_at_ks
from negagent.tasks import get_task
from negagent.tasks.arith import ArithTask
from tests.helpers import TINY_MODEL, assert_one_line_error, make_traj

# tqdm guards its bars with a lock shared between processes by default; a forked test process killed
# while holding it (a timeout in a mutation run) would hang every later one. Keep it process-local.
tqdm.set_lock(threading.RLock())

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


class TagBackend(AnswerBackend):
    """A stand-in model that obeys the tag: `right` maps each tag (None: no tag) to the ids of the
    questions it answers right under that tag. It reads the tag where `placement` puts it (before or
    after the question line), so a tag in the wrong place, or an unknown one, is a wrong lookup."""

    def __init__(self, task, right, placement="prefix"):
        super().__init__(task)
        self.by_tag, self.placement = {tag: set(ids) for tag, ids in right.items()}, placement

    def complete(self, chats, sampling):
        out = []
        for chat in chats:
            before, _, after = next(m["content"] for m in chat if m["role"] == "user").partition("Question: ")
            tag = before.rstrip("\n") if self.placement == "prefix" else after.partition("\n")[2]
            self.right = self.by_tag[tag or None]
            out += super().complete([chat], sampling)
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
    """score() applies each task's own rules: numeric vs strict math, HotpotQA EM/F1, yes/no."""
    math_scores = score("arith", "18.0", "18")
    assert math_scores["reward"] is True and math_scores["numeric"] is True and math_scores["strict"] is False
    assert score("math", "1,800", "1800")["numeric"] is True
    hotpot = score("hotpotqa", "the Eiffel Tower", "Eiffel Tower")
    assert hotpot["reward"] and hotpot["em"] and hotpot["f1"] == 1.0
    assert score("strategyqa", "Yes.", True)["reward"] is True
    task = get_task({"name": "arith", "n_test": 2})
    assert score(task, None, 3)["reward"] is False


def test_statistics():
    """Intervals over questions, unbiased pass@k, and the paired comparison with its exact sign test."""
    ci = mean_ci([[1, 1], [0, 0], [1, 0]], resamples=200)
    assert ci["mean"] == pytest.approx(0.5) and ci["lo"] <= 0.5 <= ci["hi"] and ci["n_episodes"] == 6
    assert pass_at_k(5, 0, 1) == 0.0 and pass_at_k(5, 5, 3) == 1.0
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(4, 2))
    assert pass_at_ks([[True, False], [False, False]], [1, 2, 3]) == {"pass@1": 0.25, "pass@2": 0.5}
    cmp = paired_comparison({"a": 0, "b": 0, "c": 1, "d": 1}, {"a": 1, "b": 1, "c": 1, "d": 0})
    assert cmp.better_in_b == ["a", "b"] and cmp.better_in_a == ["d"] and cmp.diff == pytest.approx(0.25)
    assert cmp.p_value == pytest.approx(1.0)  # 2 vs 1 flips: exact two-sided binomial p = 1


GRADED = {"strategy": "graded", "grade_tags": ["zero", "some", "full"], "grade_cuts": []}
SUFFIX = {**PREFIX, "strategy": "suffix"}


@pytest.mark.parametrize("mode, tagging, expected", [
    ("all", PREFIX, {"positive": "Solve it correctly.", "negative": "Fail at it.", "none": None}),
    ("positive", PREFIX, {"positive": "Solve it correctly."}),
    ("negative", SUFFIX, {"negative": "Fail at it."}),
    ("none", PREFIX, {"none": None}),
    ("all", GRADED, {"positive": "full", "negative": "zero", "none": None}),  # highest grade vs lowest
    ("negative", GRADED, {"negative": "zero"}),
    ("all", {"strategy": "none"}, {"none": None}),
    ("none", {"strategy": "positive_only"}, {"none": None}),
    ("positive", {"strategy": "none"}, {"positive": None}),  # untagged: the primary mode asks without a tag
])
def test_tag_modes(mode, tagging, expected):
    """Each tag mode evaluates under the tag the strategy trained for it (None: no tag)."""
    assert tag_modes(mode, tagging) == expected


@pytest.mark.parametrize("mode, tagging, message", [
    ("negative", {"strategy": "positive_only"}, "tag_mode=negative: tagging strategy 'positive_only' trains without tags"),
    ("negative", {"strategy": "none"}, "tag_mode=negative: tagging strategy 'none' trains without tags"),
    ("both", PREFIX, "tag_mode='both': choose one of: positive, negative, none, all"),
])
def test_bad_tag_modes(mode, tagging, message):
    """A failure tag for an untagged strategy, or an unknown mode, is refused with the choices."""
    with pytest.raises(NegagentError) as info:
        tag_modes(mode, tagging)
    assert str(info.value) == message


def test_evaluate_resumes_and_counts(tmp_path):
    """Every (seed, sample, question) episode is counted; a killed run resumes with only the missing
    episodes, a finished one runs nothing, and another setup in the same directory is refused."""
    task = get_task({"name": "arith", "n_test": 6})
    ids = [q.id for q in task.test_sets()["arith"]]
    cfg = _cfg(sampling={"n": 2, "seeds": [0, 1]})
    backend = AnswerBackend(task, right=ids[:3])
    metrics = evaluate(cfg, tmp_path, backend=backend)
    stats = metrics["results"]["positive"]["test_sets"]["arith"]
    assert stats["n_episodes"] == 24 and stats["numeric"]["mean"] == 0.5 and stats["strict"]["mean"] == 0.5
    assert stats["pass@2"] == 0.5 and stats["action_error_rate"] == 0.0 and stats["mean_steps"]["mean"] == 1.0
    assert stats["failures"] == {"solved": 12, "wrong_answer": 12}
    versions = metrics["versions"]
    assert set(versions) == {"negagent", "python", "torch", "transformers", "peft", "vllm", "openai", "bm25s", "backend", "tools"}
    assert versions["negagent"] == negagent.__version__ and versions["python"] == platform.python_version()
    assert versions["torch"] == importlib.metadata.version("torch") and versions["backend"] == "answers"
    assert versions["tools"] == {"calculate": None}  # the calculator has no identity to record
    assert metrics["backend"] == "answers" and metrics["tag_mode"] == "positive" and metrics["max_turns"] == 3
    assert metrics["sampling"] == {"temperature": 0.2, "top_p": 1.0, "max_new_tokens": 8, "n": 2, "seeds": [0, 1]}
    assert metrics["training"] == {"strategy": "base", "neg_num": None, "pos_num": None, "seed": None, "model": "tiny"}
    assert metrics["files"] == {"trajectories": "trajectories.jsonl", "tool_cache": None}
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
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


def test_another_backend_does_not_resume_these_episodes(tmp_path):
    """The setup names the backend that ran the episodes (one the caller brought, not cfg.backend):
    evaluating the same directory with another model's backend is refused, not silently resumed."""
    task = get_task({"name": "arith", "n_test": 6})
    metrics = evaluate(_cfg(), tmp_path, backend=AnswerBackend(task))
    assert re.fullmatch(r"model=tiny \([0-9a-f]{16}\) backend=answers temperature=0.2 top_p=1.0 max_new_tokens=8 "
                        r"max_turns=3 instructions_role=system", metrics["setup"])
    records = [json.loads(line) for line in (tmp_path / "trajectories.jsonl").read_text().splitlines()]
    assert {(r["provenance"]["setup"], r["provenance"]["setup_desc"]) for r in records} == {
        (hashlib.sha256(metrics["setup"].encode()).hexdigest()[:16], metrics["setup"])}

    class Other(AnswerBackend):
        name = "other"

    other = Other(task)
    with pytest.raises(NegagentError, match="holds episodes of another evaluation setup .*backend=answers"):
        evaluate(_cfg(), tmp_path, backend=other)
    assert other.calls == 0


@pytest.mark.parametrize("progress, shown", [(True, True), (False, False), (None, True)], ids=["on", "off", "default"])
def test_progress_bar_on_stderr_unless_turned_off(tmp_path, capsys, monkeypatch, progress, shown):
    """The bar counts episodes on stderr (on unless progress=false); stdout stays clean."""
    monkeypatch.setattr("tqdm.tqdm.monitor_interval", 0)  # no monitor thread outliving the test
    cfg = _cfg(progress=progress)
    if progress is None:
        del cfg["progress"]
    evaluate(cfg, tmp_path, backend=AnswerBackend(get_task({"name": "arith", "n_test": 6})))
    out, err = capsys.readouterr()
    assert out == ""
    final = err.split("\r")[-1]
    if shown:
        assert re.match(r"episodes: 100%\|[^|]*\| 6/6 \[[^\]]*(ep/s|s/ep), positive tag, turn 1/3, 0 running\]", final), err
    else:
        assert err == ""


def test_parse_errors_and_tool_errors_are_failure_types(tmp_path, capsys, monkeypatch):
    """Unparsable turns and failing tool calls are action errors and the episodes' failure types."""
    class Broken(AnswerBackend):
        def complete(self, chats, sampling):
            return ["I will not use the format." if i % 2 else "Action: calculate[1/0]" for i in range(len(chats))]

    task = get_task({"name": "arith", "n_test": 6})
    # No tqdm monitor thread: a thread left running would outlive the test (and deadlock forked test runners).
    monkeypatch.setattr("tqdm.tqdm.monitor_interval", 0)
    stats = evaluate(_cfg(progress=True), tmp_path, backend=Broken(task))["results"]["positive"]["test_sets"]["arith"]
    assert stats["action_error_rate"] == 1.0 and stats["mean_steps"]["mean"] == 3.0
    assert "positive tag, turn 3/3, 6 running" in capsys.readouterr().err  # the bar moves while no episode ends
    # Episodes 0, 2, 4 divide by zero on each of their 3 turns, episodes 1, 3, 5 never parse.
    assert stats["failures"] == {"tool_error": 3, "parse_error": 3} and stats["reward"]["mean"] == 0.0
    assert stats["actions"] == {"attempted": 18, "parse_errors": 9, "tool_errors": 9}


@pytest.mark.parametrize("tagging", [PREFIX, SUFFIX], ids=["prefix", "suffix"])
def test_control_strength_is_success_tag_minus_failure_tag(tmp_path, tagging):
    """control_strength pairs each question's success-tag reward with its failure-tag reward. A model
    right on questions 0-4 under the success tag and on 0 and 5 under the failure tag is +0.5: four
    questions better under the success tag, one worse, one tie (exact sign test p = 12/32)."""
    task = get_task({"name": "arith", "n_test": 6})
    ids = [q.id for q in task.test_sets()["arith"]]
    positive, negative, untagged = ids[:5], [ids[0], ids[5]], ids[:3]
    backend = TagBackend(task, {tagging["positive"]: positive, tagging["negative"]: negative, None: untagged},
                         placement=tagging["strategy"])
    metrics = evaluate(_cfg(tag_mode="all", tagging=tagging), tmp_path, backend=backend)
    rewards = {mode: r["test_sets"]["arith"]["reward"]["mean"] for mode, r in metrics["results"].items()}
    assert rewards == {"positive": 5 / 6, "negative": 2 / 6, "none": 3 / 6}
    paired = paired_comparison({f"arith/{q}": float(q in negative) for q in ids},
                               {f"arith/{q}": float(q in positive) for q in ids})
    assert paired.better_in_b == [f"arith/{q}" for q in ids[1:5]] and paired.better_in_a == [f"arith/{ids[5]}"]
    assert metrics["control_strength"] == {
        "per_test_set": {"arith": {"diff": 0.5, "lo": paired.diff_lo, "hi": paired.diff_hi, "p_value": 0.375,
                                   "positive": 5 / 6, "negative": 2 / 6}},
        "mean": 0.5,
    }
    assert paired.diff_lo < 0.5 < paired.diff_hi  # a real interval, not a point
    records = [json.loads(line) for line in (tmp_path / "trajectories.jsonl").read_text().splitlines()]
    assert sorted((r["provenance"]["tag_mode"], r["provenance"]["tag"]) for r in records[::6]) == [
        ("negative", "Fail at it."), ("none", None), ("positive", "Solve it correctly.")]


def test_control_strength_needs_both_tags(tmp_path):
    """Evaluating only the success tag reports no control strength (there is no pair to take)."""
    task = get_task({"name": "arith", "n_test": 6})
    backend = TagBackend(task, {PREFIX["positive"]: [], PREFIX["negative"]: [], None: []})
    assert "control_strength" not in evaluate(_cfg(tag_mode="positive", tagging=PREFIX), tmp_path, backend=backend)


def _episode(question: int, test_set: str, reward: bool, *, mode: str = "positive", seed: int = 0, **stats):
    traj = make_traj(question, reward)
    traj.provenance.update(test_set=test_set, tag_mode=mode, seed=seed)
    traj.stats = stats
    return traj


def test_summarize_question_level_statistics():
    """Per test set: metric means with intervals over questions (episodes of a question pooled),
    pass@k, action errors per attempted action (a parse error is an attempt), steps, failures, seeds."""
    def ep(q, seed, reward, strict, actions, parse_errors, tool_errors, turns):
        return _episode(q, "a", reward, seed=seed, actions=actions, parse_errors=parse_errors, tool_errors=tool_errors,
                        turns=turns, metrics={"numeric": reward, "strict": strict, "pred_len": 3})
    records = [ep(1, 0, True, False, 2, 1, 0, 3), ep(1, 1, False, False, 1, 0, 1, 1),
               ep(2, 0, True, True, 1, 0, 0, 2), ep(2, 1, True, True, 1, 0, 0, 2)]
    out = summarize(records, {"positive": "tag"}, {"a": []}, pass_k=[1, 2], resamples=200)
    stats = out["results"]["positive"]["test_sets"]["a"]
    assert stats == {
        "n_questions": 2, "n_episodes": 4,
        "numeric": mean_ci([[1.0, 0.0], [1.0, 1.0]], resamples=200),
        "pred_len": mean_ci([[3.0, 3.0], [3.0, 3.0]], resamples=200),
        "reward": mean_ci([[1.0, 0.0], [1.0, 1.0]], resamples=200),
        "strict": mean_ci([[0.0, 0.0], [1.0, 1.0]], resamples=200),
        "pass@1": 0.75, "pass@2": 1.0,
        "action_error_rate": 2 / 6,  # 1 parse error + 1 tool error over 5 actions + 1 unparsable turn
        "actions": {"attempted": 6, "parse_errors": 1, "tool_errors": 1},
        "failures": {"solved": 3, "wrong_answer": 1},
        "mean_steps": mean_ci([[3, 1], [2, 2]], resamples=200),
        "reward_by_seed": {"0": 1.0, "1": 0.5},
    }
    assert stats["reward"]["mean"] == 0.75 and stats["strict"]["mean"] == 0.5 and stats["mean_steps"]["mean"] == 2.0
    assert out["primary"] == "positive" and "control_strength" not in out
    assert out["results"]["positive"]["overall"] == {key: stats[key] for key in ("action_error_rate", "actions", "failures")}
    assert question_scores(records) == {"a/q1": 0.5, "a/q2": 1.0}
    assert question_scores(records, "strict") == {"a/q1": 0.0, "a/q2": 1.0}
    # An episode without the metric (no answer to score) counts 0 for it.
    assert question_scores([*records, _episode(3, "b", True)], "strict") == {"a/q1": 0.0, "a/q2": 1.0, "b/q3": 0.0}


def test_summarize_averages_test_sets_and_pairs_tags_per_set():
    """`average` is the unweighted mean over test sets; control strength is paired within each test
    set (set a: +1.0, set b: -0.5) and its `mean` is the mean over sets."""
    records = [
        _episode(1, "a", True), _episode(2, "a", True), _episode(1, "a", False, mode="negative"),
        _episode(2, "a", False, mode="negative"),
        _episode(3, "b", True), _episode(4, "b", False), _episode(5, "b", False),
        _episode(3, "b", True, mode="negative"), _episode(4, "b", True, mode="negative"),
        _episode(5, "b", False, mode="negative"),
    ]
    out = summarize(records, {"positive": "+", "negative": "-"}, {"a": [], "b": []}, resamples=200)
    assert out["primary"] == "positive"
    assert out["results"]["positive"]["average"] == {"mean_steps": 0.0, "reward": (1.0 + 1 / 3) / 2}
    assert out["results"]["negative"]["average"] == {"mean_steps": 0.0, "reward": (0.0 + 2 / 3) / 2}
    assert [out["results"][m]["tag"] for m in ("positive", "negative")] == ["+", "-"]
    strength = out["control_strength"]
    assert {name: (v["diff"], v["positive"], v["negative"], v["p_value"]) for name, v in strength["per_test_set"].items()} == {
        "a": (1.0, 1.0, 0.0, 0.5), "b": (pytest.approx(-1 / 3), pytest.approx(1 / 3), pytest.approx(2 / 3), 1.0)}
    assert strength["mean"] == pytest.approx((1.0 - 1 / 3) / 2)


@pytest.mark.parametrize("over, message", [
    ({"sampling": {"n": 0}}, "sampling: need n >= 1, max_new_tokens >= 1, temperature >= 0 and distinct seeds "
                              "(got n=0, max_new_tokens=8, temperature=0.2, seeds=[0])"),
    ({"sampling": {"max_new_tokens": 0}}, "(got n=1, max_new_tokens=0, temperature=0.2, seeds=[0])"),
    ({"sampling": {"temperature": -0.1}}, "(got n=1, max_new_tokens=8, temperature=-0.1, seeds=[0])"),
    ({"sampling": {"seeds": [1, 1]}}, "(got n=1, max_new_tokens=8, temperature=0.2, seeds=[1, 1])"),
    ({"test_sets": ["gsm8k"]}, "test_sets=['gsm8k']: task arith has test sets: arith"),
    ({"tag_mode": "negative"}, "tag_mode=negative: tagging strategy 'none' trains without tags"),
])
def test_bad_evaluation_settings_are_refused(tmp_path, over, message):
    """Impossible sampling, unknown test sets and tags the model lacks stop before any episode runs."""
    task = get_task({"name": "arith", "n_test": 6})
    backend = AnswerBackend(task)
    with pytest.raises(NegagentError) as info:
        evaluate(_cfg(**over), tmp_path, backend=backend)
    assert message in str(info.value) and backend.calls == 0
    assert not (tmp_path / "trajectories.jsonl").exists()


def test_greedy_with_several_samples_is_noted(tmp_path, capsys):
    """n > 1 samples at temperature 0 are nearly identical: the run says so (and still runs)."""
    task = get_task({"name": "arith", "n_test": 6})
    metrics = evaluate(_cfg(sampling={"n": 2, "temperature": 0.0}), tmp_path, backend=AnswerBackend(task))
    assert "note: sampling.temperature=0 (greedy) makes the n samples of a question nearly identical" in capsys.readouterr().out
    assert metrics["sampling"] == {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 8, "n": 2, "seeds": [0]}


class SeedBackend(AnswerBackend):
    """Records the batch sizes it is asked for and the first number `random` gives in each call."""

    def __init__(self, task):
        super().__init__(task)
        self.batches, self.draws = [], []

    def complete(self, chats, sampling):
        import torch

        self.batches.append(len(chats))
        self.draws.append((random.random(), torch.initial_seed()))
        return super().complete(chats, sampling)


def test_chunks_are_seeded_from_the_seed_and_their_start(tmp_path):
    """Episodes run in chunks of `chunk_size`; each chunk reseeds random from (seed, chunk start), so a
    re-run or a resumed chunk samples as the first run did, and seeds differ."""
    import torch  # noqa: F401  (loaded: the local backends' torch generator is seeded too)

    task = get_task({"name": "arith", "n_test": 6})
    backend = SeedBackend(task)
    evaluate(_cfg(chunk_size=4, sampling={"seeds": [7, 8]}), tmp_path, backend=backend)
    assert backend.batches == [4, 2, 4, 2]
    seeds = [seed * 1_000_003 + start for seed in (7, 8) for start in (0, 4)]
    assert backend.draws == [(random.Random(s).random(), s) for s in seeds]


@pytest.mark.parametrize("chunk_size, n_test, batches", [(1, 3, [1, 1, 1]), (0, 300, [256, 44]), (None, 300, [256, 44])])
def test_chunk_size_default_and_floor(tmp_path, chunk_size, n_test, batches):
    """chunk_size 0 or unset steps 256 episodes together; 1 steps them one at a time."""
    backend = SeedBackend(get_task({"name": "arith", "n_test": n_test}))
    evaluate(_cfg(chunk_size=chunk_size, task={"n_test": n_test}), tmp_path, backend=backend)
    assert backend.batches == batches


def test_setup_names_the_instructions_role_that_ran(tmp_path, monkeypatch):
    """A run's own render settings win over the evaluation config's, in the prompt and in the setup:
    the same directory evaluated with the other role is another setup."""
    from negagent.model_source import base_model

    class Roles(AnswerBackend):
        def complete(self, chats, sampling):
            self.roles = [m["role"] for m in chats[0]]
            return super().complete(chats, sampling)

    task = get_task({"name": "arith", "n_test": 6})
    trained = base_model(TINY_MODEL, {"strategy": "none"}, {"instructions_role": "user"})
    monkeypatch.setattr("negagent.evaluation.evaluator._subject", lambda cfg: trained)
    backend = Roles(task)
    metrics = evaluate(_cfg(render={"instructions_role": "system"}), tmp_path, backend=backend)
    assert backend.roles == ["user"] and metrics["setup"].endswith(" max_turns=3 instructions_role=user")
    trained.render_cfg = {}
    with pytest.raises(NegagentError, match="another evaluation setup"):
        evaluate(_cfg(render={"instructions_role": "system"}), tmp_path, backend=Roles(task))


@dataclass(frozen=True)
class SearchingArith(ArithTask):
    """Arith questions with a search tool too (so search runs offline, without a data directory)."""

    tools: ClassVar[tuple[str, ...]] = ("calculate", "search")


@pytest.mark.parametrize("mode, path, cached_at, records", [
    ("auto", None, "out/tool_cache.jsonl", 1),  # the other five searches replay the first
    ("record", "elsewhere/cache.jsonl", "elsewhere/cache.jsonl", 6),  # every search recorded
    ("off", "elsewhere/cache.jsonl", None, 0),
    (None, None, None, 0),  # no mode: no cache
])
def test_search_observations_and_the_tool_cache(tmp_path, monkeypatch, mode, path, cached_at, records):
    """Search runs over the configured corpus; its observations are recorded where tools.cache says
    (in the output directory by default), under the engine's identity, which every result names."""
    corpus = tmp_path / "data" / "hotpotqa_context" / "corpus"
    corpus.mkdir(parents=True)
    (corpus / "corpus.json").write_text(json.dumps({"Paris": ["Paris is the capital of France."],
                                                    "Rome": ["Rome is the capital of Italy."]}))
    task = SearchingArith(n_test=6)
    monkeypatch.setattr("negagent.evaluation.evaluator.get_task", lambda cfg: task)
    cfg = _cfg(tools={"search": {"data_dir": str(tmp_path / "data"), "cache_dir": str(tmp_path / "index")},
                      "cache": {"mode": mode, "path": str(tmp_path / path) if path else None}})
    metrics = evaluate(cfg, tmp_path / "out", backend=AnswerBackend(task, search=True))
    identity = metrics["versions"]["tools"]["search"]
    assert metrics["versions"]["tools"] == {"calculate": None, "search": identity}
    assert re.fullmatch(r"bm25s-[0-9.]+:corpus-[0-9a-f]{16}:k3:chars400", identity)
    episodes = [json.loads(line) for line in (tmp_path / "out" / "trajectories.jsonl").read_text().splitlines()]
    observation = episodes[0]["messages"][1]["content"]
    assert observation == "Observation: #1: Paris | Paris is the capital of France."  # only Paris matches
    assert metrics["files"]["tool_cache"] == ("tool_cache.jsonl" if cached_at == "out/tool_cache.jsonl" else None)
    caches = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*cache.jsonl"))
    assert caches == ([cached_at] if cached_at else [])
    if cached_at:
        cached = [json.loads(line) for line in (tmp_path / cached_at).read_text().splitlines()]
        assert [(r["tool"], r["argument"], r["backend"], f"Observation: {r['observation']}") for r in cached] == [
            ("search", "Paris", identity, observation)] * records


def test_tool_calls_reach_the_toolbox(tmp_path):
    """An action is run by the task's tool under its name, and the observation is what it returned."""
    class Calculates(AnswerBackend):
        def complete(self, chats, sampling):
            return ["Action: calculate[6*7]" if len(chat) <= 2 else "Action: finish[42]" for chat in chats]

    task = get_task({"name": "arith", "n_test": 6})
    evaluate(_cfg(), tmp_path, backend=Calculates(task))
    records = [json.loads(line) for line in (tmp_path / "trajectories.jsonl").read_text().splitlines()]
    assert {r["messages"][1]["content"] for r in records} == {"Observation: 42"}


def test_an_api_model_is_labelled_by_its_backend(tmp_path):
    """An OpenAI-compatible model is named by backend.label (else openai:<model>), is untrained,
    and evaluates under the configured tagging."""
    task = get_task({"name": "arith", "n_test": 6})
    api = {"name": "openai", "model": "gpt-x", "base_url": "http://127.0.0.1:9/v1"}
    metrics = evaluate(_cfg(backend=api, tagging=PREFIX, tag_mode="all"), tmp_path / "a",
                       backend=TagBackend(task, {PREFIX["positive"]: [], PREFIX["negative"]: [], None: []}))
    assert (metrics["model"], metrics["training"]) == ("openai:gpt-x", {"strategy": "base", "model": "openai:gpt-x"})
    assert list(metrics["results"]) == ["positive", "negative", "none"]
    labelled = evaluate(_cfg(backend={**api, "label": "my-api"}), tmp_path / "b", backend=AnswerBackend(task))
    assert (labelled["model"], list(labelled["results"])) == ("my-api", ["positive"])


def test_a_runs_own_task_with_this_configs_data_and_limits():
    """Evaluating a run uses the task it trained on; data_dir, source and limit_test come from the
    evaluation config when it sets them, and test_sets picks sets (a single name too)."""
    run = SimpleNamespace(task_cfg={"name": "math", "limit_test": 100, "data_dir": "/train/data", "test_sets": ["gsm8k"],
                                    "max_turns": 5})
    cfg = {"task": {"name": "arith", "limit_test": 10, "data_dir": None, "source": "hub"}, "test_sets": "svamp"}
    assert _task_cfg(cfg, run) == {"name": "math", "limit_test": 10, "data_dir": "/train/data", "source": "hub",
                                   "test_sets": ["svamp"], "max_turns": 5}
    assert _task_cfg({**cfg, "task_from_run": False}, run) == {"name": "arith", "limit_test": 10, "data_dir": None,
                                                                  "source": "hub"}
    assert _task_cfg({"task": {"name": "arith"}, "test_sets": ["a", "b"]}, SimpleNamespace(task_cfg=None)) == {"name": "arith"}


def test_configured_hf_backend_runs_the_model(tmp_path):
    """Without a backend object, cfg.backend builds the hf backend over the configured model and
    renderer: the tiny model writes every turn, and the episodes carry the backend's label."""
    cfg = _cfg(task={"name": "arith", "n_test": 2, "max_turns": 2}, sampling={"max_new_tokens": 4},
               backend={"device": "cpu", "batch_size": 1, "label": "tiny-hf"})
    metrics = evaluate(cfg, tmp_path)
    assert (metrics["backend"], metrics["versions"]["backend"]) == ("hf", "hf")
    assert metrics["results"]["positive"]["test_sets"]["arith"]["n_episodes"] == 2
    records = [json.loads(line) for line in (tmp_path / "trajectories.jsonl").read_text().splitlines()]
    assert [r["provenance"]["backend"] for r in records] == ["tiny-hf", "tiny-hf"]
    assert all(m["content"] for r in records for m in r["messages"] if m["role"] == "assistant")
    assert [m["role"] for m in records[0]["messages"]][0] == "assistant"


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
    """A training run directory is evaluated with its LoRA adapter merged, under every tag."""
    import torch

    from negagent.model_source import from_run_dir, load_causal_lm, load_tokenizer_for
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
    assert metrics["training"] == {"strategy": "prefix", "neg_num": 100, "pos_num": None, "seed": 3, "negatives_used": 100,
                                   "positives_used": 50, "task": "arith", "model": "tiny", "run_dir": str(run)}
    # A random model solves nothing under any tag: both sides of every pair are 0 (no flips, p = 1).
    assert metrics["control_strength"] == {
        "per_test_set": {"arith": {"diff": 0.0, "lo": 0.0, "hi": 0.0, "p_value": 1.0, "positive": 0.0, "negative": 0.0}},
        "mean": 0.0}
    records = [json.loads(line) for line in (run / "eval" / "trajectories.jsonl").read_text().splitlines()]
    assert len(records) == 9 and {r["provenance"]["tag"] for r in records} == {"Solve it correctly.", "Fail at it.", None}
    assert all(r["messages"][0]["content"] for r in records)  # the model generated text in every episode
    assert json.loads((run / "eval" / "metrics.json").read_text()) == metrics


def test_bad_run_dirs(tmp_path):
    """A run directory without a trained model, or none at all, is a user error."""
    from negagent.model_source import from_run_dir

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.yaml").write_text("model: {name: tiny}\n")
    with pytest.raises(NegagentError, match="no trained model"):
        from_run_dir(empty)
    with pytest.raises(NegagentError, match="no such directory"):
        from_run_dir(tmp_path / "nowhere")


def test_missing_test_file_is_one_line(tmp_path):
    """A test set whose file is missing names the file and how to get it."""
    cfg = _cfg(task={"name": "math", "data_dir": str(tmp_path), "test_sets": ["svamp"]})
    with pytest.raises(NegagentError) as info:
        evaluate(cfg, tmp_path / "out")
    assert str(info.value).startswith(f"{tmp_path}/nat/SVAMP/test.jsonl not found: set task.data_dir to a directory holding")


@pytest.mark.parametrize("task_name", ["math", "hotpotqa", "strategyqa"])
def test_every_task_with_tiny_model(tmp_path, data_dir, task_name):
    """Every task evaluates end to end on real data with the hf backend, each test set with its metrics."""
    cfg = _cfg(data_dir=str(data_dir), task={"name": task_name, "data_dir": str(data_dir), "limit_test": 2, "max_turns": 1},
               sampling={"max_new_tokens": 4})
    cfg.tools.search.data_dir = str(data_dir)
    metrics = evaluate(cfg, tmp_path)
    sets = metrics["results"]["positive"]["test_sets"]
    expected = {"math": {"gsm8k", "svamp", "asdiv", "multiarith"}, "hotpotqa": {"hotpotqa"}, "strategyqa": {"strategyqa"}}
    assert set(sets) == expected[task_name]
    metrics_of = {"math": {"numeric", "strict", "reward"}, "hotpotqa": {"em", "f1", "reward"}, "strategyqa": {"acc", "reward"}}
    for stats in sets.values():
        assert stats["n_questions"] == 2 and stats["n_episodes"] == 2
        assert {k for k, v in stats.items() if isinstance(v, dict) and "lo" in v} == metrics_of[task_name] | {"mean_steps"}
    assert set(metrics["results"]["positive"]["average"]) == metrics_of[task_name] | {"mean_steps"}


def test_search_observations_are_recorded_for_replay(tmp_path, data_dir):
    """Search observations go to the tool cache with the engine's identity, as the episodes saw them."""
    task = get_task({"name": "strategyqa", "data_dir": str(data_dir), "limit_test": 2})
    cfg = _cfg(data_dir=str(data_dir), task={"name": "strategyqa", "data_dir": str(data_dir), "limit_test": 2})
    cfg.tools.search.data_dir = str(data_dir)
    metrics = evaluate(cfg, tmp_path, backend=AnswerBackend(task, search=True))
    identity = metrics["versions"]["tools"]["search"]
    assert re.fullmatch(r"bm25s-[0-9.]+:corpus-[0-9a-f]{16}:k3:chars400", identity)
    assert metrics["files"]["tool_cache"] == "tool_cache.jsonl"
    # Both episodes searched "Paris": one recorded observation, tagged with the engine that made it,
    # and exactly what the episodes saw.
    cached = [json.loads(line) for line in (tmp_path / "tool_cache.jsonl").read_text().splitlines()]
    assert [(c["tool"], c["argument"], c["backend"]) for c in cached] == [("search", "Paris", identity)]
    assert cached[0]["observation"].startswith("#1: ")
    episodes = [json.loads(line) for line in (tmp_path / "trajectories.jsonl").read_text().splitlines()]
    assert [e["messages"][1]["content"] for e in episodes] == [f"Observation: {cached[0]['observation']}"] * 2


def _cli(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "evaluate.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_cli_smoke_writes_results(tmp_path):
    """evaluate.py debug=smoke writes metrics.json and one trajectory line per episode."""
    done = _cli("debug=smoke", f"hydra.run.dir={tmp_path}", "sampling.max_new_tokens=8", "backend.threads=1",
                "progress=false")
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["results"]["positive"]["test_sets"]["arith"]["n_episodes"] == 8
    assert len((tmp_path / "trajectories.jsonl").read_text().splitlines()) == 8


@pytest.mark.parametrize("args, fragments", [
    (["run_dir=/nonexistent/run"], ["run_dir=/nonexistent/run: no such directory"]),
    (["backend=vllm"], ["backend=vllm needs the vllm package"]),
    (["tag_mode=sideways"], ["tag_mode='sideways': choose one of: positive, negative, none, all"]),
    # Port 9 (discard) refuses the connection at once: the error names the server it could not reach.
    (["backend=openai", "backend.base_url=http://127.0.0.1:9/v1", "backend.model=m", "backend.api_key_env=null",
      "backend.timeout_s=2", "backend.max_retries=0"], ["http://127.0.0.1:9/v1 (model 'm')", "cannot reach the server"]),
])
def test_cli_bad_input_is_one_line(tmp_path, args, fragments):
    """Bad run directories, backends, tag modes and unreachable servers end in one `error:` line."""
    assert_one_line_error(_cli("debug=smoke", f"hydra.run.dir={tmp_path}", *args, timeout=120), *fragments)

