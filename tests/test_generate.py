"""Trajectory collection offline: the scripted teacher, the paper's protocol, resume after kill -9,
bad input, and the openai teacher against a local OpenAI-compatible endpoint (tests/servers.py)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from negagent.agent import Sampling, run_episodes
from negagent.backends.scripted import FAILURES, ScriptedTeacher
from negagent.config import CONF_DIR
from negagent.generation import collect
from negagent.render import build_chat
from negagent.tasks import get_task
from negagent.tools import calculate
from negagent.trajectory import load_trajectories
from tests.servers import ChatEndpoint, FaultProxy, free_port

REPO = Path(__file__).resolve().parents[1]
ARITH = {"name": "arith", "data_dir": None, "n_train": 12, "max_turns": 7}
OFFLINE = {"progress": False}


def run_cli(*args: str, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "generate.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines() if line.strip()]


def calc_tool(name: str, argument: str) -> tuple[str, bool]:
    observation = calculate(argument)
    return observation, not observation.startswith("Error")


def by_id(path: Path) -> dict[str, list[dict]]:
    return {json.loads(line)["id"]: json.loads(line)["messages"] for line in path.read_text().splitlines()}


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-2000:]
    for needle in needles:
        assert needle in errors[0], errors[0]


# --- the scripted teacher -----------------------------------------------------------------------


def test_smoke_cli_writes_positives_and_negatives_and_resumes(tmp_path):
    out = tmp_path / "run"
    result = run_cli("debug=smoke", "task=arith", "teacher=scripted", f"hydra.run.dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    trajectories, _ = load_trajectories(out / "trajectories.jsonl", task="arith")
    assert any(t.reward for t in trajectories) and any(not t.reward for t in trajectories)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["episodes"]["total"] == 16 * 3  # debug=smoke: 16 questions, the paper's 3 samples each
    assert stats["episodes"]["positives"] + stats["episodes"]["negatives"] == 48
    assert set(stats["episodes"]["by_temperature"]) == {"0.2", "0.5", "0.7"}
    assert stats["episodes"]["turns"]["histogram"] and stats["episodes"]["failure_types"]
    assert "positives" in result.stdout and "failure types" in result.stdout
    before = (out / "episodes.jsonl").read_bytes()
    again = run_cli("debug=smoke", "task=arith", "teacher=scripted", f"hydra.run.dir={out}")
    assert again.returncode == 0 and (out / "episodes.jsonl").read_bytes() == before
    assert json.loads((out / "stats.json").read_text())["this_run"]["collected"] == 0


def test_paper_protocol_keeps_one_positive_per_question_and_every_negative(tmp_path):
    stats = collect({"task": ARITH, "generation": OFFLINE}, tmp_path)
    episodes, _ = load_trajectories(tmp_path / "episodes.jsonl")
    kept, _ = load_trajectories(tmp_path / "trajectories.jsonl")
    assert len(episodes) == 12 * 3 and len({t.id for t in episodes}) == 36
    assert {t.provenance["temperature"] for t in episodes} == {0.2, 0.5, 0.7}
    positives = Counter(t.question_id for t in kept if t.reward)
    assert positives and max(positives.values()) == 1
    assert positives.keys() == {t.question_id for t in episodes if t.reward}
    assert {t.id for t in kept if not t.reward} == {t.id for t in episodes if not t.reward}
    assert stats["kept"]["positives"] == len(positives)


def test_labels_come_from_scoring_not_from_the_failure_mode():
    task = get_task({**ARITH, "n_train": 40})
    for failure in FAILURES:
        teacher = ScriptedTeacher(task, {failure: 1.0}, scale_with_temperature=False)
        jobs = [(q, 0) for q in task.train_questions()]
        trajs = list(run_episodes(teacher, task, jobs, calc_tool, sampling=Sampling(0.5)))
        for traj in trajs:  # the label is the task's verdict on the prediction, whatever went wrong
            assert traj.reward == task.score(traj.pred, traj.gold)["reward"]
        negatives = sum(not t.reward for t in trajs)
        assert negatives >= len(trajs) // 3, failure  # every mode really produces failures
        if failure == "malformed_action":
            assert any(t.failure == "parse_error" for t in trajs)
            assert any(t.stats["parse_errors"] and t.reward for t in trajs)  # some recover


def test_scripted_teacher_reads_observations_and_is_seeded():
    task = get_task(ARITH)
    question = task.train_questions()[0]
    teacher = ScriptedTeacher(task, {})
    first_expr = question.meta["steps"][0]["expr"]
    first_value = question.meta["steps"][0]["value"]
    chat = build_chat(task.instructions, question.question, [])
    turn = teacher.complete([chat], Sampling(0.5))[0]
    assert f"calculate[{first_expr}]" in turn
    # The calculator "said" something else: the next step builds on what it said, like a model would.
    fake = first_value + 1000
    chat = build_chat(task.instructions, question.question, [
        {"role": "assistant", "content": turn}, {"role": "user", "content": f"Observation: {fake}"}])
    second = teacher.complete([chat], Sampling(0.5))[0]
    expected = question.meta["steps"][1]["expr"].replace(str(first_value), str(fake), 1)
    assert f"calculate[{expected}]" in second
    # Same (question, sample seed, temperature): the same episode; other samples differ somewhere.
    noisy = ScriptedTeacher(task, {f: 0.18 for f in FAILURES})
    chats = [build_chat(task.instructions, q.question, []) for q in task.train_questions()]
    runs = {seed: noisy.complete(chats, Sampling(0.7, seed=seed)) for seed in (0, 0, 1, 2)}
    assert noisy.complete(chats, Sampling(0.7, seed=0)) == runs[0]
    assert runs[1] != runs[0] or runs[2] != runs[0]


def test_math_scripted_teacher_uses_gsm8k_notes(tmp_path, data_dir):
    task = {"name": "math", "data_dir": str(data_dir), "limit_train": 10, "max_turns": 7}
    collect({"task": task, "protocol": {"name": "one", "temperatures": [0.2], "keep": "all"},
             "generation": OFFLINE}, tmp_path)
    trajectories, _ = load_trajectories(tmp_path / "trajectories.jsonl", task="math")
    assert len(trajectories) == 10 and sum(t.reward for t in trajectories) >= 6
    assert "calculate[48/2]" in trajectories[0].messages[0]["content"]  # GSM8K train #0: <<48/2=24>>


def test_hf_teacher_collects_with_a_local_model(tmp_path):
    from tests.helpers import TINY_MODEL

    cfg = {"task": {**ARITH, "n_train": 2, "max_turns": 2}, "teacher": {"name": "hf", "batch_size": 4},
           "model": TINY_MODEL, "protocol": {"name": "one", "temperatures": [0.7], "keep": "all"},
           "generation": {"max_new_tokens": 8, "progress": False}}
    stats = collect(cfg, tmp_path)
    assert stats["episodes"]["total"] == 2 and stats["teacher"] == "hf:tiny"


# --- the openai teacher against a local endpoint ------------------------------------------------


def openai_cfg(endpoint_url: str, model: str = "scripted", **teacher) -> dict:
    return {
        "task": ARITH,
        "teacher": {"name": "openai", "base_url": endpoint_url, "model": model, "api_key_env": None,
                    "timeout_s": 5, "backoff_s": 0.05, "max_backoff_s": 0.2, **teacher},
        "protocol": {"name": "paper", "temperatures": [0.2, 0.5, 0.7], "keep": "one_positive"},
        "generation": OFFLINE,
    }


def test_openai_teacher_counts_retries_through_a_fault_proxy(tmp_path):
    task = {**ARITH, "n_train": 6}
    teacher = ScriptedTeacher(get_task(task), {"wrong_operand": 0.2})
    cfg = openai_cfg("", timeout_s=1, price_per_1m_input=1.0, price_per_1m_output=2.0, max_retries=10) | {"task": task}
    with ChatEndpoint(teacher) as endpoint, FaultProxy(endpoint.base_url, rate=0.3, stall_s=30, seed=1) as proxy:
        cfg["teacher"]["base_url"] = proxy.base_url
        stats = collect(cfg, tmp_path)
    usage = stats["this_run"]["teacher_usage"]
    assert stats["episodes"]["total"] == 18 and len(set(ids(tmp_path / "episodes.jsonl"))) == 18
    assert sum(proxy.faults.values()) > 0 and set(proxy.faults) == {"429", "500", "stall"}
    reasons = usage["retry_reasons"]
    assert reasons["429"] == proxy.faults["429"] and reasons["5xx"] == proxy.faults["500"]
    # Every stall times out; on a loaded machine a slow honest answer may time out too.
    assert reasons["timeout"] >= proxy.faults["stall"] and usage["retries"] == sum(reasons.values())
    assert usage["requests"] == proxy.forwarded + sum(proxy.faults.values())
    assert usage["prompt_tokens"] > 0 and usage["cost_usd"] > 0
    # The same episodes as a fault-free run: retries never change what is collected.
    with ChatEndpoint(teacher) as endpoint:
        collect(openai_cfg(endpoint.base_url) | {"task": task}, tmp_path / "clean")
    assert by_id(tmp_path / "clean" / "episodes.jsonl") == by_id(tmp_path / "episodes.jsonl")


def test_kill_9_and_resume_collects_every_question_sample_exactly_once(tmp_path):
    task = get_task({**ARITH, "n_train": 16})
    teacher = ScriptedTeacher(task, {"wrong_operand": 0.1, "skipped_step": 0.1, "malformed_action": 0.1})
    out = tmp_path / "run"
    with ChatEndpoint(teacher, latency_s=0.05) as endpoint:
        args = ["task=arith", "task.n_train=16", "teacher=openai", f"teacher.base_url={endpoint.base_url}",
                "teacher.model=scripted", "teacher.api_key_env=null", "teacher.concurrency=4",
                f"hydra.run.dir={out}"]
        rng = random.Random()
        killed = 0
        for _kill in range(2):
            target = rng.randint(1, 40)  # a random moment: after 1..40 of the 48 episodes
            process = subprocess.Popen([sys.executable, "generate.py", *args], cwd=REPO,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and process.poll() is None:
                episodes = out / "episodes.jsonl"
                if episodes.is_file() and episodes.read_bytes().count(b"\n") >= target:
                    break
                time.sleep(0.01)
            if process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
            killed += process.wait(timeout=30) == -signal.SIGKILL
        assert killed, "the generator finished before it could be killed"
        finished = run_cli(*args)
        assert finished.returncode == 0, finished.stderr[-3000:]
        collect(openai_cfg(endpoint.base_url) | {"task": {**ARITH, "n_train": 16}}, tmp_path / "reference")
    got = ids(out / "episodes.jsonl")
    expected = {f"{q.id}-s{s}" for q in task.train_questions() for s in range(3)}
    assert len(got) == len(set(got)) == 48 and set(got) == expected  # none lost, none duplicated
    # The interrupted run holds exactly the episodes of an uninterrupted one.
    assert by_id(out / "episodes.jsonl") == by_id(tmp_path / "reference" / "episodes.jsonl")
    episodes, _ = load_trajectories(out / "episodes.jsonl")
    kept, _ = load_trajectories(out / "trajectories.jsonl")
    assert len({t.id for t in kept}) == len(kept)
    assert {t.id for t in kept if not t.reward} == {t.id for t in episodes if not t.reward}
    assert Counter(t.question_id for t in kept if t.reward) == Counter(
        {q: 1 for q in {t.question_id for t in episodes if t.reward}})


# --- bad input ------------------------------------------------------------------------------------


def test_no_key_in_the_environment(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "NEGAGENT_TEST_UNSET_KEY"}
    result = subprocess.run(
        [sys.executable, "generate.py", "teacher=openai", "teacher.model=m",
         "teacher.api_key_env=NEGAGENT_TEST_UNSET_KEY", f"hydra.run.dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert_one_line_error(result, "NEGAGENT_TEST_UNSET_KEY is not set")
    assert not (tmp_path / "episodes.jsonl").exists()


def test_unreachable_base_url(tmp_path):
    result = run_cli("teacher=openai", "teacher.model=m", "teacher.api_key_env=null", "teacher.backoff_s=0.1",
                     f"teacher.base_url=http://127.0.0.1:{free_port()}/v1", f"hydra.run.dir={tmp_path}")
    assert_one_line_error(result, "cannot reach the server", "teacher.base_url")
    assert not (tmp_path / "episodes.jsonl").exists()


@pytest.mark.parametrize("raw, needle", [
    ((200, "application/json", b"{not json"), "not a chat completion in JSON"),
    ((200, "text/html", b"<html>proxy login</html>"), "not a chat completion in JSON"),
])
def test_malformed_server_answers(tmp_path, raw, needle):
    with ChatEndpoint(None, raw=raw) as endpoint:
        result = run_cli("teacher=openai", "teacher.model=scripted", "teacher.api_key_env=null",
                         f"teacher.base_url={endpoint.base_url}", f"hydra.run.dir={tmp_path}")
    assert_one_line_error(result, needle)


def test_unknown_model_and_foreign_directory_lose_nothing(tmp_path):
    out = tmp_path / "run"
    assert run_cli("debug=smoke", f"hydra.run.dir={out}").returncode == 0
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.suffix == ".jsonl"}
    teacher = ScriptedTeacher(get_task(ARITH), {})
    with ChatEndpoint(teacher) as endpoint:
        unknown = run_cli("teacher=openai", "teacher.model=gpt-nonexistent", "teacher.api_key_env=null",
                          f"teacher.base_url={endpoint.base_url}", f"hydra.run.dir={tmp_path / 'other'}")
        assert_one_line_error(unknown, "does not serve this model", "gpt-nonexistent")
        other_teacher = run_cli("debug=smoke", "teacher=openai", "teacher.model=scripted", "teacher.api_key_env=null",
                                f"teacher.base_url={endpoint.base_url}", f"hydra.run.dir={out}")
    assert_one_line_error(other_teacher, "teacher='scripted'", "hydra.run.dir")
    other_task = run_cli("debug=smoke", "task=math", f"hydra.run.dir={out}")
    assert_one_line_error(other_task, "task='arith'")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.suffix == ".jsonl"} == files


def test_generate_config_composes_with_every_teacher_and_protocol():
    for teacher in sorted(p.stem for p in (CONF_DIR / "teacher").glob("*.yaml")):
        for protocol in sorted(p.stem for p in (CONF_DIR / "protocol").glob("*.yaml")):
            with initialize_config_dir(str(CONF_DIR), version_base=None):
                cfg = compose("generate", overrides=[f"teacher={teacher}", f"protocol={protocol}", "debug=smoke"])
            assert cfg.teacher.name == teacher and cfg.protocol.temperatures == [0.2, 0.5, 0.7]
            assert cfg.task.limit_train == 16 and cfg.model.name == "tiny"
