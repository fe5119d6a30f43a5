"""The shared ReAct loop: action parsing, failure types, statistics, provenance and the chats the
backend receives. The hf backend has its own tests in tests/test_hf_backend.py."""

import re

import pytest

from negagent.agent import Action, Sampling, clean_turn, parse_action, run_episodes
from negagent.render import build_chat
from negagent.tasks import get_task
from negagent.tasks.base import Question
from negagent.tools import calculate
from negagent.trajectory import Trajectory


class ReplayBackend:
    """Answers each chat with the next line of a per-question script (a test double of a model),
    and keeps every chat and sampling it was given."""

    name = "replay"

    def __init__(self, scripts):
        self.scripts = scripts
        self.calls = []  # one (chats, sampling) per step

    def complete(self, chats, sampling):
        self.calls.append((chats, sampling))
        out = []
        for chat in chats:
            user = next(m["content"] for m in chat if m["role"] == "user")
            question = re.search(r"Question: (\S+)", user).group(1)
            turn = sum(m["role"] == "assistant" for m in chat)
            out.append(self.scripts[question][turn])
        return out


class FakeTask:
    """Two tools and a scoring with an F1 (like HotpotQA's), so the score and the metrics are known."""

    name = "fake"
    tools = ("calculate", "search")
    instructions = "Solve it."
    max_turns = 4

    def score(self, pred, gold):
        return {"reward": pred == gold, "f1": 0.5 if pred else 0.0, "em": pred == gold}


def calc_tool(name, argument):
    if name != "calculate":
        return f"Error: unknown tool '{name}'", False
    result = calculate(argument)
    return result, not result.startswith("Error")


INVALID = "Observation: Invalid action. End the turn with 'Action: calculate|search[argument]' or 'Action: finish[answer]'."


def a(content):
    return {"role": "assistant", "content": content, "train": True}


def u(content):
    return {"role": "user", "content": content, "train": False}


@pytest.mark.parametrize("text, action", [
    ("Thought: x\nAction: calculate[(2+3)*4]", Action("calculate", "(2+3)*4")),
    ("Action: finish[Paris [France]]", Action("finish", "Paris [France]")),  # brackets inside survive
    ("Action: finish[[1, 2] and [3]]", Action("finish", "[1, 2] and [3]")),
    ("Action: Finish[7]", Action("finish", "7")),  # names are lower-cased
    ("Action 2: search[Eiffel Tower]", Action("search", "Eiffel Tower")),  # numbered, as in HotpotQA ReAct
    ("Action : calculate [ 1 + 1 ]\n", Action("calculate", "1 + 1")),  # spaces; the argument is stripped
    ("Action:finish[two\nlines]", Action("finish", "two\nlines")),  # arguments may span lines
    ("Action: finish[]", Action("finish", "")),
    ("Action: web_search2[x]", Action("web_search2", "x")),
    ("Action: _x[y]", Action("_x", "y")),
    # The last action of a turn counts, each with its own argument.
    ("Thought: a\nAction: calculate[2+3]\nThought: b\nAction: finish[5]", Action("finish", "5")),
    ("Action: search[a [b]]\nAction: finish[c [d]]", Action("finish", "c [d]")),
    ("Thought: I think 7", None),
    ("Action: finish 7", None),
    ("Action: calculate(2+3)", None),  # the scripted teacher's malformed forms
    ("Action: calculate 2+3", None),
    ("Action: [2+3]", None),
    ("Action: 7up[x]", None),  # a name starts with a letter or _
    ("Action: finish[7", None),
    ("Action: finish]7[", None),
    ("", None),
])
def test_parse_action(text, action):
    """The last `Action: name[argument]` of a turn, with every bracket inside the argument; None
    when the turn has no well-formed action."""
    assert parse_action(text) == action


@pytest.mark.parametrize("text, cleaned", [
    ("Action: calculate[1+1]\nObservation: 2\nAction: finish[2]", "Action: calculate[1+1]"),
    ("Action: calculate[1+1] Observation: 2", "Action: calculate[1+1]"),  # no newline before it
    ("Action: calculate[1+1]\n\nObservation: 2\nObservation: 3", "Action: calculate[1+1]"),
    ("Action: a[1]\nObservation: 1\nAction: b[2]\nObservation: 2\nAction: c[3]\nObservation: 3", "Action: a[1]"),
    ("  Thought: x\nAction: finish[1]\n\n", "Thought: x\nAction: finish[1]"),
    ("Observation: 2", ""),
    ("\n\n", ""),
])
def test_clean_turn(text, cleaned):
    """A turn is cut before the first observation the model wrote itself and stripped."""
    assert clean_turn(text) == cleaned


SCRIPTS = {
    "q0": ["Thought: add.\nAction: calculate[2+3]", "Action: finish[5]"],     # correct in two turns
    "q1": ["Action: finish[6]"],                                               # wrong_answer
    "q2": ["I am not sure."] * 3,                                              # parse_error at the limit
    "q3": ["Action: calculate[9**9**9]"] * 3,                                  # tool_error
    "q4": ["Action: calculate[1+1]"] * 3,                                      # max_steps
    "q5": ["Observation: 5"],                                                  # no_finish: nothing left of the turn
    "q6": ["I am not sure.", "Action: search[x]", "Action: calculate[1+1]"],   # errors, then a good call: max_steps
    "q7": ["Action: search[x]", "Action: calculate[1+1]", "Thought: hmm"],     # a tool error, then a parse error
}


@pytest.fixture
def episodes():
    """The scripted episodes of SCRIPTS (gold 5, sample index 3, max_turns 3) on FakeTask: the
    backend, the trajectories in the order they were yielded, and the on_step calls."""
    backend = ReplayBackend(SCRIPTS)
    steps = []
    jobs = [(Question(str(i), f"q{i}", "5"), 3) for i in range(8)]
    trajs = list(run_episodes(backend, FakeTask(), jobs, calc_tool, sampling=Sampling(temperature=0.7),
                              max_turns=3, provenance={"run": "r1"}, on_step=lambda *s: steps.append(s)))
    return backend, trajs, steps


def test_episodes_finish_independently_in_batched_steps(episodes):
    """Every unfinished episode advances one turn per backend call; episodes are yielded as they
    finish, the ones left at the turn limit at the end, and on_step sees every turn and the end."""
    backend, trajs, steps = episodes
    assert [len(chats) for chats, _ in backend.calls] == [8, 6, 5]
    assert [t.id for t in trajs] == ["1-s3", "5-s3", "0-s3", "2-s3", "3-s3", "4-s3", "6-s3", "7-s3"]
    assert steps == [(1, 2, 8), (2, 3, 8), (3, 3, 8), (3, 8, 8)]


def test_failure_types_and_counts(episodes):
    """Each episode's failure type comes from how it ended (the last turn's error for unfinished
    ones), and its counts from every turn."""
    _, trajs, _ = episodes
    got = {t.provenance["question_id"]: (t.failure, t.stats["turns"], t.stats["actions"], t.stats["parse_errors"],
                                         t.stats["tool_errors"]) for t in trajs}
    assert got == {
        "0": (None, 2, 2, 0, 0),
        "1": ("wrong_answer", 1, 1, 0, 0),
        "2": ("parse_error", 3, 0, 3, 0),
        "3": ("tool_error", 3, 3, 0, 3),
        "4": ("max_steps", 3, 3, 0, 0),
        "5": ("no_finish", 1, 0, 0, 0),
        "6": ("max_steps", 3, 2, 1, 1),
        "7": ("parse_error", 3, 2, 1, 1),
    }


def test_trajectories_are_complete_records(episodes):
    """A finished and an unfinished episode, field by field: the trailing observation of the
    unfinished one is dropped (its last word is the model's), the score is the task's F1, and the
    provenance names backend, temperature, the caller's fields, question and sample."""
    _, trajs, _ = episodes
    by_q = {t.provenance["question_id"]: t for t in trajs}
    provenance = {"backend": "replay", "temperature": 0.7, "run": "r1", "sample_index": 3}
    assert by_q["0"] == Trajectory(
        id="0-s3", task="fake", question="q0", gold="5",
        messages=[a("Thought: add.\nAction: calculate[2+3]"), u("Observation: 5"), a("Action: finish[5]")],
        reward=True, score=0.5, pred="5", failure=None, provenance={**provenance, "question_id": "0"},
        stats={"turns": 2, "actions": 2, "parse_errors": 0, "tool_errors": 0, "metrics": {"f1": 0.5, "em": True}},
    )
    assert by_q["6"] == Trajectory(
        id="6-s3", task="fake", question="q6", gold="5",
        messages=[a("I am not sure."), u(INVALID), a("Action: search[x]"), u("Observation: Error: unknown tool 'search'"),
                  a("Action: calculate[1+1]")],
        reward=False, score=0.0, pred=None, failure="max_steps", provenance={**provenance, "question_id": "6"},
        stats={"turns": 3, "actions": 2, "parse_errors": 1, "tool_errors": 1, "metrics": {"f1": 0.0, "em": False}},
    )
    assert by_q["1"].pred == "6" and by_q["1"].reward is False and by_q["1"].score == 0.5
    assert by_q["5"].messages == [a("")]  # the empty turn is kept: the episode's last word


def test_backend_gets_each_step_the_sampling_and_the_episode_so_far(episodes):
    """The backend is called with the run's Sampling and, for each episode, the chat of its turns so
    far with tool observations (train flags as in training)."""
    backend, _, _ = episodes
    (first, sampling1), (second, sampling2), _ = backend.calls
    assert sampling1 == sampling2 == Sampling(temperature=0.7)
    assert first[0] == [{"role": "system", "content": "Solve it."}, {"role": "user", "content": "Question: q0"}]
    assert second[0] == first[0] + [a("Thought: add.\nAction: calculate[2+3]"), u("Observation: 5")]


def test_arith_episode_scores_with_the_task():
    """With a real task: its scoring labels the episode and reward is the score when there is no F1."""
    task = get_task({"name": "arith", "data_dir": None, "n_train": 4, "n_test": 4})
    backend = ReplayBackend({"q0": ["Action: calculate[2+3]", "Action: finish[5]"], "q1": ["Action: finish[6]"]})
    jobs = [(Question("0", "q0", 5), 0), (Question("1", "q1", 5), 0)]
    trajs = {t.id: t for t in run_episodes(backend, task, jobs, calc_tool, sampling=Sampling())}
    assert (trajs["0-s0"].reward, trajs["0-s0"].score, trajs["0-s0"].stats["metrics"]) == (True, 1.0, {"strict": True, "numeric": True})
    assert (trajs["1-s0"].reward, trajs["1-s0"].score, trajs["1-s0"].failure) == (False, 0.0, "wrong_answer")
    assert trajs["0-s0"].provenance == {"backend": "replay", "temperature": 0.2, "question_id": "0", "sample_index": 0}


@pytest.mark.parametrize("kwargs, first_chat", [
    ({}, [{"role": "system", "content": "Solve it."}, {"role": "user", "content": "Question: q0"}]),
    ({"tag": "[ok]"}, [{"role": "system", "content": "Solve it."}, {"role": "user", "content": "[ok]\nQuestion: q0"}]),
    ({"tag": "[failed]", "placement": "suffix", "instructions_role": "user"},
     [{"role": "user", "content": "Solve it.\n\nQuestion: q0\n[failed]"}]),
    ({"tag": "[ok]", "placement": "prefix", "instructions_role": "system"},
     [{"role": "system", "content": "Solve it."}, {"role": "user", "content": "[ok]\nQuestion: q0"}]),
])
def test_chats_carry_tag_placement_and_instructions_role(kwargs, first_chat):
    """Every turn's prompt is `build_chat` with the run's tag, placement and instructions role
    (defaults: no tag, prefix, system), exactly as in training."""
    backend = ReplayBackend({"q0": ["Action: calculate[1+1]", "Action: finish[2]"]})
    list(run_episodes(backend, FakeTask(), [(Question("0", "q0", "2"), 0)], calc_tool, sampling=Sampling(), **kwargs))
    (first, _), (second, _) = backend.calls
    assert first == [first_chat]
    assert second == [first_chat + [a("Action: calculate[1+1]"), u("Observation: 2")]]
    assert second[0] == build_chat("Solve it.", "q0", second[0][len(first_chat):], **kwargs)


def test_max_turns_defaults_to_the_tasks_limit():
    """An episode that never finishes stops after the task's `max_turns` by default, as max_steps."""
    backend = ReplayBackend({"q0": ["Action: calculate[1+1]"] * 8})
    [traj] = run_episodes(backend, FakeTask(), [(Question("0", "q0", "2"), 0)], calc_tool, sampling=Sampling())
    assert (len(backend.calls), traj.stats["turns"], traj.failure, len(traj.messages)) == (4, 4, "max_steps", 7)


def test_all_finished_before_the_limit_stops_calling_the_backend():
    """Once every episode has ended, the loop stops; on_step still reports the end once."""
    backend = ReplayBackend({"q0": ["Action: finish[2]"], "q1": ["Action: calculate[1+1]", "Action: finish[2]"]})
    steps = []
    jobs = [(Question("0", "q0", "2"), 0), (Question("1", "q1", "2"), 1)]
    trajs = list(run_episodes(backend, FakeTask(), jobs, calc_tool, sampling=Sampling(), max_turns=5,
                              on_step=lambda *s: steps.append(s)))
    assert [t.id for t in trajs] == ["0-s0", "1-s1"]
    assert [len(chats) for chats, _ in backend.calls] == [2, 1]
    assert steps == [(1, 1, 2), (2, 2, 2), (2, 2, 2)]


def test_no_jobs_no_backend_call():
    """An empty job list yields nothing and reports one finished step of nothing."""
    backend = ReplayBackend({})
    steps = []
    assert list(run_episodes(backend, FakeTask(), [], calc_tool, sampling=Sampling(),
                             on_step=lambda *s: steps.append(s))) == []
    assert (backend.calls, steps) == ([], [(0, 0, 0)])
