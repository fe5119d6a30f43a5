"""Trajectory collection offline: the scripted teacher, the paper's protocol, resume after kill -9,
bad input, and the openai teacher against a local OpenAI-compatible endpoint (tests/servers.py)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from negagent.agent import Sampling, parse_action, run_episodes
from negagent.backends.scripted import FAILURES, ScriptedTeacher
from negagent.config import CONF_DIR
from negagent.errors import NegagentError
from negagent.collection.collect import collect
from negagent.render import build_chat
from negagent.tasks import get_task
from negagent.tools import calculate
from negagent.trajectory import load_trajectories
from tests.helpers import TINY_MODEL, assert_one_line_error
from tests.servers import ChatEndpoint, FaultProxy, free_port

REPO = Path(__file__).resolve().parents[1]
ARITH = {"name": "arith", "data_dir": None, "n_train": 12, "max_turns": 7}
OFFLINE = {"progress": False}


def run_cli(*args: str, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "generate.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def ids(path: Path) -> list[str]:
    """Record ids of a JSONL file, in file order; none when there is no file yet."""
    if not path.is_file():
        return []
    return [json.loads(line)["id"] for line in path.read_text().splitlines() if line.strip()]


def calc_tool(name: str, argument: str) -> tuple[str, bool]:
    observation = calculate(argument)
    return observation, not observation.startswith("Error")


def by_id(path: Path) -> dict[str, list[dict]]:
    return {json.loads(line)["id"]: json.loads(line)["messages"] for line in path.read_text().splitlines()}


# --- the scripted teacher -----------------------------------------------------------------------


def test_smoke_cli_writes_positives_and_negatives_and_resumes(tmp_path):
    out = tmp_path / "run"
    result = run_cli("debug=smoke", "task=arith", "backend@teacher=scripted", f"hydra.run.dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    # The scripted teacher is seeded: the same 48 episodes (16 questions x the paper's 3 samples) every time.
    stats = json.loads((out / "stats.json").read_text())
    episodes = stats["episodes"]
    assert (episodes["total"], episodes["positives"], episodes["negatives"]) == (48, 35, 13)
    assert episodes["failure_types"] == {"wrong_answer": 13}
    assert episodes["by_temperature"] == {"0.2": {"positives": 12, "negatives": 4},
                                          "0.5": {"positives": 12, "negatives": 4},
                                          "0.7": {"positives": 11, "negatives": 5}}
    assert episodes["turns"] == {"min": 2, "p50": 3, "p90": 5, "max": 6, "mean": 3.46,
                                 "histogram": {"2": 3, "3": 26, "4": 14, "5": 4, "6": 1}}
    assert stats["kept"] == {"total": 29, "positives": 16, "negatives": 13}  # one positive for each question
    trajectories, _ = load_trajectories(out / "trajectories.jsonl", task="arith")
    assert (sum(t.reward for t in trajectories), sum(not t.reward for t in trajectories)) == (16, 13)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("episodes: 48 (positives 35, negatives 13); this run collected 48 in ")
    assert lines[1:] == [
        'failure types: {"wrong_answer": 13}',
        'turns: {"min": 2, "p50": 3, "p90": 5, "max": 6, "mean": 3.46}; assistant chars: '
        '{"min": 112, "p50": 197, "p90": 330, "max": 418, "mean": 228.42}',
        "kept (one_positive): 29 (positives 16, negatives 13)",
        f"trajectories: {out / 'trajectories.jsonl'}",
    ]
    before = (out / "episodes.jsonl").read_bytes()
    again = run_cli("debug=smoke", "task=arith", "backend@teacher=scripted", f"hydra.run.dir={out}")
    assert again.returncode == 0 and (out / "episodes.jsonl").read_bytes() == before
    this_run = json.loads((out / "stats.json").read_text())["this_run"]
    assert (this_run["collected"], this_run["already_there"]) == (0, 48)


def test_paper_protocol_keeps_one_positive_per_question_and_every_negative(tmp_path):
    stats = collect({"task": ARITH, "generation": OFFLINE}, tmp_path)
    episodes, _ = load_trajectories(tmp_path / "episodes.jsonl")
    kept, _ = load_trajectories(tmp_path / "trajectories.jsonl")
    assert len(episodes) == 12 * 3 and len({t.id for t in episodes}) == 36
    assert Counter(t.provenance["temperature"] for t in episodes) == {0.2: 12, 0.5: 12, 0.7: 12}
    assert sum(t.reward for t in episodes) == 28  # the seeded teacher: every question has a positive
    positives = Counter(t.question_id for t in kept if t.reward)
    assert positives == {q.id: 1 for q in get_task(ARITH).train_questions()}
    assert {t.id for t in kept if t.reward} <= {t.id for t in episodes if t.reward}
    assert {t.id for t in kept if not t.reward} == {t.id for t in episodes if not t.reward}
    assert stats["kept"] == {"total": 20, "positives": 12, "negatives": 8}


class Interrupted(Exception):
    pass


class CutOff:
    """A teacher that stops the run (an exception out of the loop) at its `calls`-th step: what is
    on disk then is what a kill between two steps leaves."""

    def __init__(self, teacher, calls: int):
        self.teacher, self.name, self.calls = teacher, teacher.name, calls

    def complete(self, chats, sampling):
        self.calls -= 1
        if self.calls < 0:
            raise Interrupted
        return self.teacher.complete(chats, sampling)


def test_one_positive_is_a_seeded_draw_spread_over_temperatures(tmp_path):
    """`keep: one_positive` keeps a seeded random positive of each question, not the first one (a
    0.2 one whenever that succeeds): with success equally likely at each temperature the kept
    positives spread evenly over 0.2/0.5/0.7, as the paper's do (350/363/357 in its StrategyQA file),
    still one per solved question; a run cut off midway and resumed keeps exactly the same ones."""
    task_cfg = {**ARITH, "n_train": 180}
    task = get_task(task_cfg)
    cfg = {"task": task_cfg, "generation": OFFLINE}

    def teacher():
        return ScriptedTeacher(task, {"wrong_operand": 0.3}, scale_with_temperature=False)

    collect(cfg, tmp_path / "whole", backend=teacher())
    episodes, _ = load_trajectories(tmp_path / "whole" / "episodes.jsonl")
    kept, _ = load_trajectories(tmp_path / "whole" / "trajectories.jsonl")
    positives = [t for t in kept if t.reward]
    assert Counter(t.question_id for t in positives) == Counter({t.question_id for t in episodes if t.reward})
    assert {t.id for t in positives} <= {t.id for t in episodes if t.reward}
    assert {t.id for t in kept if not t.reward} == {t.id for t in episodes if not t.reward}
    spread = Counter(t.provenance["temperature"] for t in positives)
    print(f"kept positives by temperature: {dict(sorted(spread.items()))} of {len(positives)}")
    assert len(positives) > 150 and all(0.25 < spread[x] / len(positives) < 0.42 for x in (0.2, 0.5, 0.7))
    # Cut off in the last sample's pass, where positives wait for it; resumed, it keeps the same ones.
    with pytest.raises(Interrupted):
        collect(cfg, tmp_path / "resumed", backend=CutOff(teacher(), calls=14))
    cut = ids(tmp_path / "resumed" / "trajectories.jsonl")
    assert 0 < len(cut) < len(kept)
    collect(cfg, tmp_path / "resumed", backend=teacher())
    resumed = ids(tmp_path / "resumed" / "trajectories.jsonl")
    assert resumed[:len(cut)] == cut  # appended to, never rewritten
    assert len(resumed) == len(set(resumed)) and set(resumed) == {t.id for t in kept}
    # Killed between writing episodes and the training file: the ledger alone decides what is kept.
    lines = (tmp_path / "whole" / "trajectories.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "whole" / "trajectories.jsonl").write_text("".join(lines[:60]))
    collect(cfg, tmp_path / "whole", backend=teacher())
    assert sorted(ids(tmp_path / "whole" / "trajectories.jsonl")) == sorted(t.id for t in kept)


def test_paper_loop_collects_no_unusable_turn(tmp_path):
    """With task.on_parse_error=end a malformed action ends its episode (none recovers) and is not
    stored; an episode ended by its first turn stays in the ledger but has nothing to train, so the
    training file leaves it out; the directory refuses a run with the other setting."""
    task_cfg = {**ARITH, "n_train": 20, "on_parse_error": "end"}
    teacher = ScriptedTeacher(get_task(task_cfg), {"malformed_action": 0.6}, scale_with_temperature=False)
    stats = collect({"task": task_cfg, "generation": OFFLINE}, tmp_path, backend=teacher)
    episodes, _ = load_trajectories(tmp_path / "episodes.jsonl")
    kept, _ = load_trajectories(tmp_path / "trajectories.jsonl")
    malformed = {t.id for t in episodes if t.stats["parse_errors"]}
    assert stats["episodes"]["failure_types"] == {"parse_error": len(malformed)}
    assert all(t.stats["parse_errors"] == 1 and not t.reward for t in episodes if t.id in malformed)
    untrained = {t.id for t in episodes if not any(m["train"] for m in t.messages)}
    assert untrained and untrained < malformed
    assert {t.id for t in kept if not t.reward} == malformed - untrained
    assert all(parse_action(m["content"]) for t in kept for m in t.messages if m["role"] == "assistant")
    with pytest.raises(NegagentError, match="on_parse_error='end'"):
        collect({"task": {**task_cfg, "on_parse_error": "observe"}, "generation": OFFLINE}, tmp_path, backend=teacher)


@pytest.mark.parametrize("failure, failures, recovered", [
    ("wrong_operand", {"wrong_answer": 40}, 0),
    ("skipped_step", {"wrong_answer": 40}, 0),
    ("no_tool", {"wrong_answer": 40}, 0),
    ("premature_finish", {"wrong_answer": 39, None: 1}, 0),  # one question is answered by its first step
    ("malformed_action", {"parse_error": 22, None: 18}, 18),  # some recover from a malformed action
])
def test_labels_come_from_scoring_not_from_the_failure_mode(failure, failures, recovered):
    assert failure in FAILURES
    task = get_task({**ARITH, "n_train": 40})
    teacher = ScriptedTeacher(task, {failure: 1.0}, scale_with_temperature=False)
    jobs = [(q, 0) for q in task.train_questions()]
    trajs = list(run_episodes(teacher, task, jobs, calc_tool, sampling=Sampling(0.5)))
    for traj in trajs:  # the label is the task's verdict on the prediction, whatever went wrong
        assert traj.reward == task.score(traj.pred, traj.gold)["reward"]
    assert Counter(t.failure for t in trajs) == failures  # every mode really produces failures
    assert sum(bool(t.stats["parse_errors"]) and t.reward for t in trajs) == recovered


def test_scripted_teacher_reads_observations_and_is_seeded():
    task = get_task(ARITH)
    question = task.train_questions()[0]
    teacher = ScriptedTeacher(task, {})
    first_expr = question.meta["steps"][0]["expr"]
    first_value = question.meta["steps"][0]["value"]
    chat = build_chat(task.instructions, question.question, [])
    turn = teacher.complete([chat], Sampling(0.5))[0]
    assert turn == f"Thought: {question.meta['steps'][0]['text']}\nAction: calculate[{first_expr}]"
    # The calculator "said" something else: the next step builds on what it said, like a model would.
    fake = first_value + 1000
    chat = build_chat(task.instructions, question.question, [
        {"role": "assistant", "content": turn}, {"role": "user", "content": f"Observation: {fake}"}])
    second = teacher.complete([chat], Sampling(0.5))[0]
    expected = question.meta["steps"][1]["expr"].replace(str(first_value), str(fake), 1)
    assert second == f"Thought: {question.meta['steps'][1]['text']}\nAction: calculate[{expected}]"
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
    assert len(trajectories) == 10 and sum(t.reward for t in trajectories) == 9
    # GSM8K train #0: "Natalia sold 48/2 = <<48/2=24>>24 clips in May."
    assert trajectories[0].messages[0]["content"] == ("Thought: Natalia sold 48/2 = 24 clips in May.\n"
                                                      "Action: calculate[48/2]")


def test_hf_teacher_collects_with_a_local_model(tmp_path):
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
    assert set(proxy.faults) == {"429", "500", "stall"}  # seed 1 draws every kind
    reasons = usage["retry_reasons"]
    assert reasons["429"] == proxy.faults["429"] and reasons["5xx"] == proxy.faults["500"]
    # Every stall times out; on a loaded machine a slow honest answer may time out too (the one
    # count here that depends on timing, hence >=).
    assert reasons["timeout"] >= proxy.faults["stall"] and usage["retries"] == sum(reasons.values())
    assert set(reasons) == {"429", "5xx", "timeout"}
    assert usage["requests"] == proxy.forwarded + sum(proxy.faults.values())
    assert usage["cost_usd"] == pytest.approx((usage["prompt_tokens"] * 1.0 + usage["completion_tokens"] * 2.0) / 1e6)
    # The same episodes as a fault-free run: retries never change what is collected, nor the tokens
    # counted (only answers that came back count, once each).
    with ChatEndpoint(teacher) as endpoint:
        clean = collect(openai_cfg(endpoint.base_url, timeout_s=120) | {"task": task}, tmp_path / "clean")
    assert by_id(tmp_path / "clean" / "episodes.jsonl") == by_id(tmp_path / "episodes.jsonl")
    clean_usage = clean["this_run"]["teacher_usage"]
    assert (clean_usage["requests"], clean_usage["retries"]) == (endpoint.calls, 0)
    assert (clean_usage["prompt_tokens"], clean_usage["completion_tokens"]) == (
        endpoint.usage["prompt_tokens"], endpoint.usage["completion_tokens"])
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (
        clean_usage["prompt_tokens"], clean_usage["completion_tokens"])
    assert usage["prompt_tokens"] > usage["completion_tokens"] > 0
    assert "cost_usd" not in clean_usage  # no prices, no cost


KILL_SEED = 9  # the kill points are drawn from this seed (and printed): a failing run can be replayed


def test_kill_9_and_resume_collects_every_question_sample_exactly_once(tmp_path):
    """generate.py killed with SIGKILL twice, each time at a chat request drawn from a seeded RNG,
    then run to the end: exactly the episodes of an uninterrupted run, none lost, none twice.

    The endpoint leaves the drawn request unanswered and signals its arrival; the kill follows.
    The client writes every finished episode before its next step's requests, so what is on disk
    at the kill is fixed by the request number alone, not by timing."""
    task_cfg = {**ARITH, "n_train": 16}
    task = get_task(task_cfg)
    teacher = ScriptedTeacher(task, {"wrong_operand": 0.1, "skipped_step": 0.1, "malformed_action": 0.1})
    out = tmp_path / "run"
    with ChatEndpoint(teacher) as endpoint:
        collect(openai_cfg(endpoint.base_url) | {"task": task_cfg}, tmp_path / "reference")
        full_run = endpoint.calls  # the requests of an uninterrupted run, its preflight probe included
        args = ["task=arith", "task.n_train=16", "backend@teacher=openai", f"teacher.base_url={endpoint.base_url}",
                "teacher.model=scripted", "teacher.api_key_env=null", "teacher.concurrency=4",
                f"hydra.run.dir={out}"]
        rng = random.Random(KILL_SEED)
        on_disk = []
        for attempt in range(2):
            # Request 1 is the probe. A run killed at request k has written episodes worth at most
            # k - 2 requests, so the next run needs more than full_run - k: two points of at most
            # full_run // 2 are always reached.
            kill_at = rng.randint(2, full_run // 2)
            print(f"kill {attempt + 1}: at chat request {kill_at} of the {full_run} of a whole run (seed {KILL_SEED})")
            held = endpoint.hold(kill_at)
            with (tmp_path / f"stderr{attempt}.txt").open("w+") as stderr:
                process = subprocess.Popen([sys.executable, "generate.py", *args], cwd=REPO,
                                           stdout=subprocess.DEVNULL, stderr=stderr)
                # Wake up on the held request or on the process ending early, whichever comes first.
                threading.Thread(target=lambda: (process.wait(), held.set()), daemon=True).start()
                assert held.wait(timeout=300), "generate.py neither reached the held request nor ended"
                running = process.poll() is None
                if running:
                    os.kill(process.pid, signal.SIGKILL)
                code = process.wait(timeout=60)
                stderr.seek(0)
                assert running and code == -signal.SIGKILL, f"generate.py ended (exit {code}): {stderr.read()[-3000:]}"
            written = ids(out / "episodes.jsonl")
            print(f"kill {attempt + 1}: {len(written)} episodes on disk")
            assert len(written) == len(set(written)) < 48
            on_disk.append(len(written))
        finished = run_cli(*args)
        assert finished.returncode == 0, finished.stderr[-3000:]
    this_run = json.loads((out / "stats.json").read_text())["this_run"]
    assert (this_run["already_there"], this_run["collected"]) == (on_disk[-1], 48 - on_disk[-1])
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
        [sys.executable, "generate.py", "backend@teacher=openai", "teacher.model=m",
         "teacher.api_key_env=NEGAGENT_TEST_UNSET_KEY", f"hydra.run.dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert_one_line_error(result, "NEGAGENT_TEST_UNSET_KEY is not set")
    assert not (tmp_path / "episodes.jsonl").exists()


def test_unreachable_base_url(tmp_path):
    result = run_cli("backend@teacher=openai", "teacher.model=m", "teacher.api_key_env=null", "teacher.backoff_s=0.1",
                     f"teacher.base_url=http://127.0.0.1:{free_port()}/v1", f"hydra.run.dir={tmp_path}")
    assert_one_line_error(result, "cannot reach the server", "teacher.base_url")
    assert not (tmp_path / "episodes.jsonl").exists()


@pytest.mark.parametrize("raw, needle", [
    ((200, "application/json", b"{not json"), "not a chat completion in JSON"),
    ((200, "text/html", b"<html>proxy login</html>"), "not a chat completion in JSON"),
])
def test_malformed_server_answers(tmp_path, raw, needle):
    with ChatEndpoint(None, raw=raw) as endpoint:
        result = run_cli("backend@teacher=openai", "teacher.model=scripted", "teacher.api_key_env=null",
                         f"teacher.base_url={endpoint.base_url}", f"hydra.run.dir={tmp_path}")
    assert_one_line_error(result, needle)


def test_unknown_model_and_foreign_directory_lose_nothing(tmp_path):
    out = tmp_path / "run"
    assert run_cli("debug=smoke", f"hydra.run.dir={out}").returncode == 0
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.suffix == ".jsonl"}
    teacher = ScriptedTeacher(get_task(ARITH), {})
    with ChatEndpoint(teacher) as endpoint:
        unknown = run_cli("backend@teacher=openai", "teacher.model=gpt-nonexistent", "teacher.api_key_env=null",
                          f"teacher.base_url={endpoint.base_url}", f"hydra.run.dir={tmp_path / 'other'}")
        assert_one_line_error(unknown, "does not serve this model", "gpt-nonexistent")
        other_teacher = run_cli("debug=smoke", "backend@teacher=openai", "teacher.model=scripted", "teacher.api_key_env=null",
                                f"teacher.base_url={endpoint.base_url}", f"hydra.run.dir={out}")
    assert_one_line_error(other_teacher, "teacher='scripted'", "hydra.run.dir")
    other_task = run_cli("debug=smoke", "task=math", f"hydra.run.dir={out}")
    assert_one_line_error(other_task, "task='arith'")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.suffix == ".jsonl"} == files


@pytest.mark.parametrize("teacher", sorted(p.stem for p in (CONF_DIR / "backend").glob("*.yaml")))
@pytest.mark.parametrize("protocol", sorted(p.stem for p in (CONF_DIR / "protocol").glob("*.yaml")))
def test_generate_config_composes_with_every_teacher_and_protocol(teacher, protocol):
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        cfg = compose("generate", overrides=[f"backend@teacher={teacher}", f"protocol={protocol}", "debug=smoke"])
    assert cfg.teacher.name == teacher and cfg.protocol.temperatures == [0.2, 0.5, 0.7]
    assert cfg.task.limit_train == 16 and cfg.model.name == "tiny"
