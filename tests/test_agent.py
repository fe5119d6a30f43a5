"""The shared ReAct loop: action parsing, failure types, statistics, provenance and the chats the
backend receives. The hf backend has its own tests in tests/test_hf_backend.py."""

import json
import re

import pytest

from negagent.agent import Action, Sampling, clean_turn, parse_action, run_episodes
from negagent.metrics import behaviour
from negagent.render import ChatOpening, build_chat
from negagent.tasks import get_task
from negagent.tasks.base import Question
from negagent.tools import calculate
from negagent.trajectory import Trajectory, validate_record


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
            user = next(m["content"] for m in chat if m["role"] == "user" and "Question: " in m["content"])
            question = re.search(r"Question: (\w+)", user).group(1)
            turn = sum(m["role"] == "assistant" and m.get("train", True) for m in chat)  # not the opening's
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
INVALID_ARITH = "Observation: Invalid action. End the turn with 'Action: calculate[argument]' or 'Action: finish[answer]'."


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


_PAPER_LIKE = ChatOpening(({"role": "user", "content": "Rules."}, {"role": "assistant", "content": "Understood."}))


@pytest.mark.parametrize("kwargs, first_chat", [
    ({}, [{"role": "system", "content": "Solve it."}, {"role": "user", "content": "Question: q0"}]),
    ({"tag": "[ok]"}, [{"role": "system", "content": "Solve it."}, {"role": "user", "content": "[ok]\nQuestion: q0"}]),
    ({"tag": "[failed]", "placement": "suffix", "opening": ChatOpening.from_instructions("Solve it.", "user")},
     [{"role": "user", "content": "Solve it.\n\nQuestion: q0\n[failed]"}]),
    ({"tag": "[ok]", "placement": "prefix", "opening": ChatOpening.from_instructions("Solve it.", "system")},
     [{"role": "system", "content": "Solve it."}, {"role": "user", "content": "[ok]\nQuestion: q0"}]),
    # A prompt file's opening (instructions acknowledged by an untrained assistant turn) and a tag that
    # is a whole question line.
    ({"tag": "Question: {question}. Do it right.", "opening": _PAPER_LIKE},
     [{"role": "user", "content": "Rules."}, {"role": "assistant", "content": "Understood.", "train": False},
      {"role": "user", "content": "Question: q0. Do it right."}]),
])
def test_chats_carry_tag_placement_and_opening(kwargs, first_chat):
    """Every turn's prompt is `build_chat` with the run's opening, tag and placement (defaults: the
    task's instructions as the system turn, no tag, prefix), exactly as in training."""
    backend = ReplayBackend({"q0": ["Action: calculate[1+1]", "Action: finish[2]"]})
    list(run_episodes(backend, FakeTask(), [(Question("0", "q0", "2"), 0)], calc_tool, sampling=Sampling(), **kwargs))
    (first, _), (second, _) = backend.calls
    assert first == [first_chat]
    assert second == [first_chat + [a("Action: calculate[1+1]"), u("Observation: 2")]]
    chat_kwargs = {k: v for k, v in kwargs.items() if k != "opening"}
    assert second[0] == build_chat(kwargs.get("opening", "Solve it."), "q0", second[0][len(first_chat):], **chat_kwargs)


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


# --- on_parse_error=end: the paper's loop -------------------------------------------------------


class PaperLoopTask(FakeTask):
    on_parse_error = "end"


END_SCRIPTS = {
    "q0": ["Thought: add.\nAction: calculate[2+3]", "I am not sure.", "Action: finish[5]"],  # ends at turn 2
    "q1": ["I am not sure.", "Action: finish[5]"],                                 # ends at its first turn
    "q2": ["Action: calculate[2+3]", "Action: lookup[x]", "Action: finish[5]"],    # a tool the task lacks
    "q3": ["Action: search[x]", "Action: finish[5]"],                              # a failed call goes on
    "q4": ["Action: calculate[2+3]", "Observation: 5", "Action: finish[5]"],       # an empty turn
}


@pytest.fixture
def paper_loop_episodes():
    """END_SCRIPTS run on a task with on_parse_error=end (gold 5, max_turns 3), by question id."""
    backend = ReplayBackend(END_SCRIPTS)
    jobs = [(Question(str(i), f"q{i}", "5"), 0) for i in range(len(END_SCRIPTS))]
    trajs = list(run_episodes(backend, PaperLoopTask(), jobs, calc_tool, sampling=Sampling(), max_turns=3))
    return backend, {t.provenance["question_id"]: t for t in trajs}


def test_end_stops_at_an_unusable_turn_and_never_stores_it(paper_loop_episodes):
    """Under `end` a turn without a valid action (or naming a tool the task lacks, or empty) ends
    the episode and is left out of the messages; the turns before it stay, the trailing observation
    dropped as usual; the backend is not asked again for an ended episode."""
    backend, by_q = paper_loop_episodes
    assert [len(chats) for chats, _ in backend.calls] == [5, 4]  # all ended by turn 2: no third call
    assert by_q["0"].messages == [a("Thought: add.\nAction: calculate[2+3]")]
    assert by_q["2"].messages == [a("Action: calculate[2+3]")]
    assert by_q["4"].messages == [a("Action: calculate[2+3]")]
    # A tool that fails but exists is an observation, as in the paper's loop (its calculator
    # answers "Error: ..." too).
    assert by_q["3"].messages == [a("Action: search[x]"), u("Observation: Error: unknown tool 'search'"),
                                  a("Action: finish[5]")]
    got = {q: (t.failure, t.reward, t.pred, t.stats["turns"], t.stats["actions"], t.stats["parse_errors"],
               t.stats["tool_errors"]) for q, t in by_q.items()}
    assert got == {
        "0": ("parse_error", False, None, 2, 1, 1, 0),
        "1": ("parse_error", False, None, 1, 0, 1, 0),
        "2": ("tool_error", False, None, 2, 2, 0, 1),
        "3": (None, True, "5", 2, 2, 0, 1),
        "4": ("no_finish", False, None, 2, 1, 0, 0),
    }


def test_end_on_the_first_turn_stores_it_untrained(paper_loop_episodes):
    """An episode ended by its first turn has no other turn, but a record needs an assistant turn:
    it keeps that one untrained (nothing of it is learned) and survives the format's validation."""
    _, by_q = paper_loop_episodes
    first = by_q["1"]
    assert first.messages == [{"role": "assistant", "content": "I am not sure.", "train": False}]
    assert validate_record(json.loads(first.to_json())) == first
    trained = [m["content"] for t in by_q.values() for m in t.messages if m["train"]]
    assert trained and all(parse_action(text) for text in trained)  # every trained turn holds a valid action


def test_action_error_rate_counts_the_turn_that_ended_the_episode(paper_loop_episodes):
    """Under `end` the dropped turns still count: failed parses and failed tool calls per attempted
    action, each failed parse (or unknown tool) the last attempt of its episode."""
    _, by_q = paper_loop_episodes
    stats = behaviour(by_q.values())
    # attempted: 6 actions (calculate x3, lookup, search, finish) + 2 unparsable turns; errors: 2 parses,
    # the unknown tool and the failed search.
    assert stats["actions"] == {"attempted": 8, "parse_errors": 2, "tool_errors": 2}
    assert stats["action_error_rate"] == 0.5
    assert stats["failures"] == {"parse_error": 2, "tool_error": 1, "solved": 1, "no_finish": 1}


@pytest.mark.parametrize("setting, messages, reward", [
    (None, [a("I am not sure."), u(INVALID_ARITH), a("Action: finish[5]")], True),  # the default: observe
    ("observe", [a("I am not sure."), u(INVALID_ARITH), a("Action: finish[5]")], True),
    ("end", [{"role": "assistant", "content": "I am not sure.", "train": False}], False),
])
def test_a_real_task_carries_the_setting_to_the_loop(setting, messages, reward):
    """`task.on_parse_error` reaches the loop through the task, as collection and evaluation build it."""
    cfg = {"name": "arith", "n_train": 1, "n_test": 1} | ({"on_parse_error": setting} if setting else {})
    backend = ReplayBackend({"q1": ["I am not sure.", "Action: finish[5]"]})
    [traj] = run_episodes(backend, get_task(cfg), [(Question("1", "q1", 5), 0)], calc_tool, sampling=Sampling())
    assert (traj.messages, traj.reward, traj.stats["parse_errors"]) == (messages, reward, 1)
