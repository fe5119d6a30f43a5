"""train.py end to end without Slurm, on the tiny model.

One run collects its own data, trains, evaluates the trained and the base model, is killed during
the evaluation and resumed by the same command. One fully fine-tuned run (trainer=full) with suffix
tags and the instructions in the user turn is shared by the tests that follow it: the evaluation
prompt is the training sample's prompt, and the full model is evaluated from its run directory.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from negagent.tasks import get_task
from negagent.trajectory import write_trajectories
from tests.helpers import make_traj

REPO = Path(__file__).resolve().parents[1]
KILL_SEED = 2402  # seeds the kill point; the test prints the point it drew
N_TEST = 8  # test questions; the kill lands in the first half of the trained model's evaluation
WAIT_S = 900  # generous: only a hung run reaches it (nothing here measures speed)

# Small evaluations: the random tiny model would otherwise write many tokens for many turns.
SMALL_EVAL = ("eval.evaluator.sampling.max_new_tokens=8", "+eval.evaluator.max_turns=2",
              "+eval.evaluator.backend.threads=1", "+eval.evaluator.progress=false")


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=WAIT_S)


def _complete_records(path: Path) -> list[bytes]:
    """The episode lines of a JSONL file that a reader keeps (a line torn by a kill is not one)."""
    lines = path.read_bytes().split(b"\n") if path.is_file() else []
    kept = []
    for line in lines:
        try:
            json.loads(line)
        except ValueError:
            continue
        kept.append(line)
    return kept


def _wait_for_records(path: Path, count: int, proc: subprocess.Popen) -> None:
    """Wait (polling the file) until `path` holds `count` episode lines; fail if the run ends first."""
    deadline = time.monotonic() + WAIT_S
    while len(_complete_records(path)) < count:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before its kill point")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {count} episodes in {path} after {WAIT_S} s: the run hangs")
        time.sleep(0.02)


def _table_rows(stdout: str) -> list[list[str]]:
    """The cells of a rich table's header (┃) and body (│) lines."""
    return [[cell.strip() for cell in line[1:-1].split(line[0])] for line in stdout.splitlines() if line[:1] in ("┃", "│")]


def _cell(stat: dict) -> str:
    # The comparison table's format: mean [lo, hi] in percent.
    return f"{stat['mean'] * 100:.1f} [{stat['lo'] * 100:.1f}, {stat['hi'] * 100:.1f}]"


def test_collect_train_evaluate_killed_during_evaluation_resumes_only_the_evaluation(tmp_path):
    """A run without data.trajectories collects, trains and evaluates trained and base models; killed
    (the whole process group) during the trained model's evaluation, the same command resumes it:
    collection and training are not redone, the finished episodes are kept as they were, the rest
    are added, and it ends with both evaluations and the comparison table."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "train.py", "debug=smoke", f"hydra.run.dir={run_dir}", "task.limit_train=8",
           f"task.limit_test={N_TEST}", "trainer.max_steps=2", "trainer.evaluate_after=true", "eval.compare_base=true",
           "+eval.evaluator.chunk_size=1", *SMALL_EVAL]  # chunk_size=1: each episode is saved as it ends
    kill_after = random.Random(KILL_SEED).randint(1, N_TEST // 2)
    print(f"kill point: SIGKILL after episode {kill_after} of {N_TEST} in eval/trajectories.jsonl (seed {KILL_SEED})")
    episodes = run_dir / "eval" / "trajectories.jsonl"
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_for_records(episodes, kill_after, proc)
            os.killpg(proc.pid, signal.SIGKILL)
        finally:
            proc.wait(timeout=60)
    kept = _complete_records(episodes)
    print(f"killed with {len(kept)} episodes saved")
    assert kill_after <= len(kept) < N_TEST, "the kill must land during the trained model's evaluation"
    assert (run_dir / "done").is_file() and not (run_dir / "done.json").exists()
    assert not (run_dir / "eval" / "metrics.json").exists() and not (run_dir / "eval_base").exists()
    trained = ["summary.json", "adapter_model.safetensors", "metrics.jsonl", "manifest.json", "config.yaml",
               "ranks/rank0.order.jsonl", "collected/trajectories.jsonl", "collected/stats.json"]
    before = {name: ((run_dir / name).read_bytes(), (run_dir / name).stat().st_mtime_ns) for name in trained}

    again = _run(cmd)
    assert again.returncode == 0, again.stderr[-3000:]
    # Only the evaluation resumed: nothing collected, trained or saved again.
    assert f"resuming: {len(kept)} of {N_TEST} episodes already in {episodes}\n" in again.stdout
    assert "resuming from" not in again.stdout and "done: " not in again.stdout and "collecting" not in again.stderr
    assert {name: ((run_dir / name).read_bytes(), (run_dir / name).stat().st_mtime_ns) for name in trained} == before

    # Exact counts: the kept episodes unchanged and first, one episode per test question in all.
    final = _complete_records(episodes)
    assert len(final) == N_TEST and final[:len(kept)] == kept
    questions = [q.id for q in get_task({"name": "arith", "limit_test": N_TEST}).test_sets()["arith"]]
    records = [json.loads(line) for line in final]
    assert sorted(r["provenance"]["question_id"] for r in records) == sorted(questions)
    frozen = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert frozen["data"]["trajectories"] == str(run_dir / "collected" / "trajectories.jsonl")
    assert {r["provenance"]["tag"] for r in records} == {frozen["tagging"]["positive"]}

    trained_metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    base_metrics = json.loads((run_dir / "eval_base" / "metrics.json").read_text())
    assert trained_metrics["primary"] == "positive" and base_metrics["primary"] == "none"
    assert trained_metrics["training"]["strategy"] == "prefix" and base_metrics["training"]["strategy"] == "base"
    trained_set = trained_metrics["results"]["positive"]["test_sets"]["arith"]
    base_set = base_metrics["results"]["none"]["test_sets"]["arith"]
    assert (trained_set["n_questions"], trained_set["n_episodes"]) == (base_set["n_questions"], base_set["n_episodes"]) == (N_TEST, N_TEST)
    base_records = [json.loads(line) for line in _complete_records(run_dir / "eval_base" / "trajectories.jsonl")]
    assert len(base_records) == N_TEST and {r["provenance"]["tag"] for r in base_records} == {None}
    done = json.loads((run_dir / "done.json").read_text())
    assert done["outputs"] == ["manifest.json", "eval/metrics.json", "eval_base/metrics.json"]

    # The comparison table, row by row, from the two metrics files.
    assert "tiny on arith: base vs trained (prefix)" in again.stdout
    rows = _table_rows(again.stdout)
    assert rows[0] == ["model", "test set", "questions", "accuracy % [95% CI]", "strict %", "action errors %", "steps"]
    expected = [[label, "arith", str(N_TEST), _cell(s["reward"]), _cell(s["strict"]), f"{s['action_error_rate'] * 100:.1f}",
                 f"{s['mean_steps']['mean']:.1f} [{s['mean_steps']['lo']:.1f}, {s['mean_steps']['hi']:.1f}]"]
                for label, s in (("base", base_set), ("trained (prefix)", trained_set))]
    assert rows[1:] == expected


# -- one fully fine-tuned run with suffix tags and the instructions in the user turn -----------------
N_FULL_TEST = 3


@pytest.fixture(scope="module")
def full_suffix_run(tmp_path_factory) -> Path:
    """A finished trainer=full run with tagging=suffix and render.instructions_role=user, evaluated after
    training (trainer.evaluate_after) on N_FULL_TEST questions. Two steps: the first warms up from
    learning rate 0, so one step would save the base model's weights."""
    root = tmp_path_factory.mktemp("full_suffix")
    trajectories = root / "arith.jsonl"
    write_trajectories(trajectories, [make_traj(i, i % 3 != 0) for i in range(6)])
    run_dir = root / "run"
    result = _run([sys.executable, "train.py", "debug=smoke", f"data.trajectories={trajectories}", f"hydra.run.dir={run_dir}",
                   "trainer=full", "tagging=suffix", "render.instructions_role=user", "trainer.max_steps=2",
                   "trainer.evaluate_after=true", f"task.limit_test={N_FULL_TEST}", *SMALL_EVAL])
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


class RecordingBackend:
    """A stand-in model that records every chat it is asked to continue and answers at once."""

    name = "recording"

    def __init__(self):
        self.chats: list[list[dict]] = []

    def complete(self, chats, sampling):
        self.chats.extend([dict(m) for m in chat] for chat in chats)
        return ["Thought: done.\nAction: finish[0]" for _ in chats]


def test_suffix_tag_and_user_instructions_reach_the_evaluation_prompt(full_suffix_run, tmp_path):
    """With tagging=suffix and render.instructions_role=user, the evaluation of the run directory asks
    with the success tag after the question, inside the one user turn that also holds the
    instructions, and its prompt is token for token the training sample's prompt for that question."""
    from negagent.training.data import prepare
    from negagent.models import load_tokenizer
    from negagent.render import IGNORE, Renderer

    frozen = yaml.safe_load((full_suffix_run / "config.yaml").read_text())
    assert (frozen["tagging"]["strategy"], frozen["render"]["instructions_role"]) == ("suffix", "user")
    task = get_task(frozen["task"])
    question = task.test_sets()["arith"][0]
    tag = frozen["tagging"]["positive"]

    backend = RecordingBackend()
    metrics = _evaluate_with(full_suffix_run, tmp_path / "eval", backend)
    assert metrics["results"]["positive"]["tag"] == tag
    assert metrics["instructions_role"] == "user" and "instructions_role=user" in metrics["setup"]
    chat = backend.chats[0]
    assert chat == [{"role": "user", "content": f"{task.instructions}\n\nQuestion: {question.question}\n{tag}"}]

    # The training side: the run's own data preparation, for a trajectory of the same question.
    trajectories = tmp_path / "same_question.jsonl"
    write_trajectories(trajectories, [make_traj(0, True, question=question.question)])
    renderer = Renderer(load_tokenizer(frozen["model"]), max_length=frozen["render"]["max_length"],
                        end_of_turn=frozen["render"]["end_of_turn"])
    samples, manifest = prepare({**frozen, "data": {**frozen["data"], "trajectories": str(trajectories)}}, task, renderer)
    assert manifest["test_overlap"]["questions"] == 1 and len(samples) == 1
    first_trained = next(i for i, label in enumerate(samples[0].labels) if label != IGNORE)
    training_prompt = samples[0].input_ids[:first_trained]
    assert training_prompt and renderer.prompt_ids(chat) == training_prompt
    text = renderer.prompt_text(chat)
    user_turn = f"<|im_start|>user\n{task.instructions}\n\nQuestion: {question.question}\n{tag}<|im_end|>\n<|im_start|>assistant\n"
    assert text.endswith(user_turn) and text.count(task.instructions) == 1


def _evaluate_with(run_dir: Path, out_dir: Path, backend) -> dict:
    """evaluate.py's defaults on `run_dir` (its frozen config decides model, tags and rendering), one question."""
    from omegaconf import OmegaConf

    from negagent.evaluation.evaluator import default_config, evaluate

    cfg = OmegaConf.merge(default_config(), {"run_dir": str(run_dir), "task": {"limit_test": 1}, "progress": False,
                                             "max_turns": 1})
    return evaluate(cfg, out_dir, backend=backend)


def test_full_model_run_is_evaluated_from_its_run_directory(full_suffix_run):
    """A trainer=full run saves the whole model (no adapter), and both its evaluation after training
    and `from_run_dir` use exactly those weights (not the base model's), with the run's suffix tag."""
    import torch
    from safetensors.torch import load_file

    from negagent.model_source import from_run_dir, load_causal_lm, load_tokenizer_for
    from negagent.models import load_model

    run = full_suffix_run
    frozen = yaml.safe_load((run / "config.yaml").read_text())
    assert not list(run.glob("adapter_*")) and (run / "config.json").is_file()
    saved = load_file(run / "model.safetensors")
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["method"], summary["saved"]["kind"]) == ("full", "model")
    assert summary["saved"]["parameters"] == sum(t.numel() for t in saved.values())

    subject = from_run_dir(run)
    assert (subject.weights_dir, subject.adapter_dir, subject.label) == (run, None, "run")
    assert subject.training == {"strategy": "suffix", "neg_num": None, "pos_num": None, "seed": 0, "negatives_used": 2,
                                "positives_used": 4, "task": "arith", "model": "tiny", "run_dir": str(run)}
    state = load_causal_lm(subject, load_tokenizer_for(subject), device="cpu").state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in saved.items())
    base = load_model(frozen["model"]).state_dict()
    assert not all(torch.equal(base[name], tensor) for name, tensor in saved.items()), "the base model was evaluated"

    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert (metrics["model"], metrics["training"]["strategy"]) == ("run", "suffix")
    assert metrics["results"]["positive"]["tag"] == frozen["tagging"]["positive"]
    assert metrics["results"]["positive"]["test_sets"]["arith"]["n_episodes"] == N_FULL_TEST
    records = [json.loads(line) for line in _complete_records(run / "eval" / "trajectories.jsonl")]
    assert len(records) == N_FULL_TEST and {r["provenance"]["tag"] for r in records} == {frozen["tagging"]["positive"]}
