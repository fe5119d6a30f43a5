"""The shared ReAct loop: parsing, failure types, batching, and the HF backend."""

from negagent.agent import Sampling, clean_turn, parse_action, run_episodes
from negagent.tasks import get_task
from negagent.tasks.base import Question
from negagent.tools import calculate


class ReplayBackend:
    """Answers each chat with the next line of a per-question script (a test double of a model)."""

    name = "replay"

    def __init__(self, scripts):
        self.scripts = scripts
        self.batch_sizes = []

    def complete(self, chats, sampling):
        self.batch_sizes.append(len(chats))
        out = []
        for chat in chats:
            question = chat[1]["content"].split("Question: ")[-1]
            turn = sum(m["role"] == "assistant" for m in chat)
            out.append(self.scripts[question][turn])
        return out


def calc_tool(name, argument):
    if name != "calculate":
        return f"Error: unknown tool '{name}'", False
    result = calculate(argument)
    return result, not result.startswith("Error")


def test_parse_action():
    assert parse_action("Thought: x\nAction: calculate[(2+3)*4]").argument == "(2+3)*4"
    assert parse_action("Action: finish[Paris [France]]").argument == "Paris [France]"
    assert parse_action("Action: Finish[7]").name == "finish"
    assert parse_action("Thought: I think 7") is None
    assert clean_turn("Action: calculate[1+1]\nObservation: 2\nAction: finish[2]") == "Action: calculate[1+1]"


def test_episodes_finish_independently_with_failure_types():
    task = get_task({"name": "arith", "data_dir": None, "n_train": 4, "n_test": 4})
    qs = [Question(str(i), f"q{i}", gold) for i, gold in enumerate([5, 5, 5, 5, 5])]
    scripts = {
        "q0": ["Action: calculate[2+3]", "Action: finish[5]"],            # correct
        "q1": ["Action: finish[6]"],                                       # wrong_answer
        "q2": ["I am not sure."] * 3,                                      # parse_error at the limit
        "q3": ["Action: calculate[9**9**9]"] * 3,                          # tool_error
        "q4": ["Action: calculate[1+1]"] * 3,                              # max_steps
    }
    backend = ReplayBackend(scripts)
    trajs = list(run_episodes(backend, task, [(q, 0) for q in qs], calc_tool, sampling=Sampling(), max_turns=3))
    by_q = {t.provenance["question_id"]: t for t in trajs}
    assert by_q["0"].reward and by_q["0"].failure is None and by_q["0"].pred == "5"
    assert by_q["1"].failure == "wrong_answer"
    assert by_q["2"].failure == "parse_error" and by_q["2"].stats["parse_errors"] == 3
    assert by_q["3"].failure == "tool_error" and by_q["3"].stats["tool_errors"] == 3
    assert by_q["4"].failure == "max_steps"
    assert backend.batch_sizes == [5, 4, 3]  # every unfinished episode advances together
    assert by_q["0"].messages[1] == {"role": "user", "content": "Observation: 5", "train": False}
    assert by_q["0"].messages[-1]["role"] == "assistant"


def test_hf_backend_batched_episodes(tokenizer):
    import torch

    from negagent.backends.hf import HFBackend
    from negagent.models import load_model
    from negagent.render import Renderer
    from tests.helpers import TINY_MODEL

    task = get_task({"name": "arith", "data_dir": None, "n_train": 4, "n_test": 6})
    questions = task.test_sets()["arith"][:6]
    torch.manual_seed(0)
    backend = HFBackend(load_model(TINY_MODEL), Renderer(tokenizer), batch_size=4)
    trajs = list(run_episodes(backend, task, [(q, 0) for q in questions], calc_tool,
                              sampling=Sampling(temperature=0.0, max_new_tokens=8), max_turns=2))
    assert sorted(t.provenance["question_id"] for t in trajs) == sorted(q.id for q in questions)
    assert all(t.failure in {"parse_error", "no_finish", "max_steps", "tool_error", "wrong_answer"} for t in trajs)
    assert all(t.provenance["backend"] == "hf" for t in trajs)
