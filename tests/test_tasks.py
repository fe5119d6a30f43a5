"""Tasks: building from config, generated arith problems, real data files, and data-file errors."""

from __future__ import annotations

import hashlib
import json
import random
import re
import sys
import types
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from negagent.errors import NegagentError
from negagent.tasks import TASK_NAMES, get_task
from negagent.tasks import arith as arith_module
from negagent.tasks.arith import THEMES, Problem, _operands, generate

REPO = Path(__file__).resolve().parents[1]
DATA_TASKS = ("math", "hotpotqa", "strategyqa")


@pytest.mark.parametrize(
    "cfg, message",
    [
        ({"name": "math", "scoring": "fuzzy"}, "task.scoring='fuzzy': choose one of: numeric, strict"),
        ({"name": "arith", "scoring": "fuzzy"}, "task.scoring='fuzzy': choose one of: numeric, strict"),
        ({"name": "math", "source": "web"}, "task.source='web': choose one of: local, hub"),
        ({"name": "hotpotqa", "source": "web"}, "task.source='web': choose one of: local, hub"),
        ({"name": "strategyqa", "source": "web"}, "task.source='web': choose one of: local, hub"),
        ({"name": "math", "test_sets": ["gsm9k"]},
         "task.test_sets=['gsm9k']: choose from: gsm8k, svamp, asdiv, multiarith"),
        ({"name": "math", "test_sets": []}, "task.test_sets=[]: choose from: gsm8k, svamp, asdiv, multiarith"),
        ({"name": "hotpotqa", "limit_test": -1}, "task.limit_test=-1: expected an integer >= 0"),
        ({"name": "strategyqa", "limit_train": "x"}, "task.limit_train='x': expected an integer >= 0"),
        ({"name": "math", "limit_train": True}, "task.limit_train=True: expected an integer >= 0"),
        ({"name": "arith", "max_steps": 7}, "task.min_steps=2, task.max_steps=7: need min <= max <= 6"),
        ({"name": "arith", "min_steps": 3, "max_steps": 2}, "task.min_steps=3, task.max_steps=2: need min <= max <= 6"),
        ({"name": "arith", "min_steps": 0}, "task.min_steps=0: expected an integer >= 1"),
        ({"name": "arith", "max_steps": 0}, "task.max_steps=0: expected an integer >= 1"),
        ({"name": "arith", "n_train": "many"}, "task.n_train='many': expected an integer >= 0"),
        ({"name": "arith", "n_train": None}, "task.n_train=None: expected an integer >= 0"),
        ({"name": "arith", "n_test": -1}, "task.n_test=-1: expected an integer >= 0"),
        ({"name": "arith", "seed": 1.5}, "task.seed=1.5: expected an integer >= 0"),
        ({"name": "arith", "limit_test": -2}, "task.limit_test=-2: expected an integer >= 0"),
        # 0 turns would store episodes without a single message, which no loader accepts.
        ({"name": "arith", "max_turns": 0}, "task.max_turns=0: expected an integer >= 1"),
        ({"name": "math", "max_turns": "7"}, "task.max_turns='7': expected an integer >= 1"),
        ({"name": "hotpotqa", "on_parse_error": "stop"}, "task.on_parse_error='stop': choose one of: observe, end"),
        ({"name": "arith", "on_parse_error": None}, "task.on_parse_error=None: choose one of: observe, end"),
        ({"name": "x"}, "unknown task 'x'; choose one of: arith, math, hotpotqa, strategyqa"),
        ({}, "unknown task None; choose one of: arith, math, hotpotqa, strategyqa"),
    ],
)
def test_bad_config_values_are_user_errors(cfg, message):
    with pytest.raises(NegagentError) as err:
        get_task({"data_dir": None, **cfg})
    assert str(err.value) == message


def test_limits_cap_the_generated_arith_counts():
    """limit_* caps n_train/n_test like it caps the questions read from files; 0 keeps none."""
    task = get_task({"name": "arith", "n_train": 5, "n_test": 4, "limit_train": 3, "limit_test": 0})
    assert (len(task.train_questions()), len(task.test_sets()["arith"])) == (3, 0)
    uncapped = get_task({"name": "arith", "n_train": 5, "n_test": 4, "limit_train": 9, "limit_test": None})
    assert (len(uncapped.train_questions()), len(uncapped.test_sets()["arith"])) == (5, 4)
    assert uncapped.train_questions()[:3] == task.train_questions()


# --- instructions ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TASK_NAMES)
def test_instructions_describe_the_protocol_and_tools(name):
    task = get_task({"name": name, "data_dir": None})  # building reads no data
    text = task.instructions
    for marker in ("Thought:", "Action:", "Observation:", "finish[answer]"):
        assert marker in text
    for tool in task.tools:
        assert f"{tool}[" in text
    assert task.tools == {"arith": ("calculate",), "math": ("calculate",)}.get(name, ("search",))


def test_task_specific_answer_rules():
    assert "Yes or No" in get_task({"name": "strategyqa"}).instructions
    assert "final number" in get_task({"name": "math"}).instructions


# --- arith -------------------------------------------------------------------------------------

_EXPR = re.compile(r"^\d+[-+*/]\d+$")


@pytest.fixture
def arith():
    """Made afresh for each test (a fraction of a second): a shared copy would be generated inside
    whichever test runs first, and mutation testing would credit only that test with it."""
    task = get_task({"name": "arith", "data_dir": None, "n_train": 300, "n_test": 100})
    return task, task.train_questions(), task.test_sets()["arith"]


def test_arith_problems_are_exactly_the_published_ones(arith):
    """The generated problems are part of every collected dataset's identity: any change to the
    generator shows here. The digest covers all 400 problems (ids, texts, golds, steps, themes);
    after a deliberate change, recompute it with the expression below and say why in the commit."""
    _, train, test = arith
    assert (train[0].id, train[0].question, train[0].gold) == (
        "arith-train-0-0",
        "Lena bakes 67 cookies for a school fair. With help from friends, she ends up with four times as many "
        "cookies as before. Sadly, 2 cookies break and are thrown away. How many cookies does Lena have now?",
        266,
    )
    assert train[0].meta == {"theme": "baking", "steps": [
        {"expr": "67*4", "value": 268, "text": "Multiply the number of cookies by 4."},
        {"expr": "268-2", "value": 266, "text": "Subtract the 2 broken cookies."}]}
    assert (test[0].id, test[0].gold, [s["expr"] for s in test[0].meta["steps"]]) == (
        "arith-test-0-0", 5, ["2*5", "20-10", "10/2"])
    blob = json.dumps([[q.id, q.question, q.gold, q.meta] for q in train + test], sort_keys=True)
    assert hashlib.sha256(blob.encode()).hexdigest() == "a66b5174e76bb40db3bc6a38825b18897e514142ed73fbebf4629077f67ec221"


def test_arith_values_stay_whole_and_within_the_story(arith):
    """Every intermediate value is a whole number from 2 to the theme's largest value."""
    themes = {theme.name: theme for theme in THEMES}
    _, train, test = arith
    for q in train + test:
        values = [step["value"] for step in q.meta["steps"]]
        assert all(isinstance(v, int) and 2 <= v <= themes[q.meta["theme"]].max_value for v in values), q


def test_arith_sizes_and_ids(arith):
    task, train, test = arith
    assert task.name == "arith" and len(train) == 300 and len(test) == 100
    ids = [q.id for q in train + test]
    assert len(set(ids)) == len(ids) and all(isinstance(i, str) for i in ids)


def test_arith_is_deterministic(arith):
    _, train, test = arith
    again = get_task({"name": "arith", "n_train": 300, "n_test": 100})
    assert again.train_questions() == train and again.test_sets()["arith"] == test
    assert [q.meta for q in again.train_questions()] == [q.meta for q in train]
    other_seed = get_task({"name": "arith", "n_train": 300, "n_test": 100, "seed": 1})
    assert [q.question for q in other_seed.train_questions()] != [q.question for q in train]


def test_arith_splits_are_disjoint(arith):
    _, train, test = arith
    assert not {q.question for q in train} & {q.question for q in test}
    assert len({q.question for q in train}) == len(train)


def test_arith_test_set_does_not_depend_on_n_train(arith):
    _, _, test = arith
    assert get_task({"name": "arith", "n_train": 5, "n_test": 100}).test_sets()["arith"] == test


def test_arith_steps_recompute_the_gold(arith):
    _, train, test = arith
    for q in train + test:
        steps = q.meta["steps"]
        assert isinstance(q.gold, int) and q.gold > 0
        assert 2 <= len(steps) <= 4
        for step in steps:
            assert _EXPR.match(step["expr"]), step
            value = eval(step["expr"])  # safe: the regex admits only "<int><op><int>"
            assert value == step["value"] and value == int(value) and value > 0
            assert step["text"] and "{" not in step["text"]
        assert steps[-1]["value"] == q.gold
        assert "{" not in q.question and q.question.endswith("?")


def test_arith_problems_are_varied(arith):
    _, train, _ = arith
    assert {q.meta["theme"] for q in train} == {
        "shopping", "savings", "ages", "travel", "baking", "library", "farm", "rain barrel"}
    ops = {re.sub(r"\d+", "", step["expr"]) for q in train for step in q.meta["steps"]}
    assert ops == {"+", "-", "*", "/"}
    assert {len(q.meta["steps"]) for q in train} == {2, 3, 4}


def test_arith_defaults():
    task = get_task({"name": "arith"})
    assert (task.n_train, task.n_test, task.seed, task.min_steps, task.max_steps, task.scoring) == (
        2000, 200, 0, 2, 4, "numeric")


@pytest.mark.parametrize("n_train", [1, 2])
def test_arith_few_problems(n_train):
    task = get_task({"name": "arith", "n_train": n_train, "n_test": 1, "min_steps": 3, "max_steps": 3})
    train = task.train_questions()
    assert [q.id for q in train] == [f"arith-train-0-{i}" for i in range(n_train)]
    assert [len(q.meta["steps"]) for q in train + task.test_sets()["arith"]] == [3] * (n_train + 1)


def test_arith_operands_at_their_bounds():
    """The smallest operand is 2 and no value leaves 2..max_value: at each bound exactly one
    operand fits, one step further none does."""
    shopping = THEMES[0]  # values up to 1000
    rng = random.Random(0)
    assert (_operands(rng, "-", 4, shopping), _operands(rng, "-", 3, shopping)) == ({"n": 2}, None)
    assert (_operands(rng, "+", 998, shopping), _operands(rng, "+", 999, shopping)) == ({"n": 2}, None)
    assert (_operands(rng, "*", 500, shopping), _operands(rng, "*", 501, shopping)) == ({"n": 2}, None)
    assert (_operands(rng, "/", 4, shopping), _operands(rng, "/", 3, shopping)) == ({"n": 2}, None)


def _four_problems(monkeypatch) -> None:
    """make_problem replaced by draws among four fixed problems, so that draws repeat and splits collide."""
    def draw(rng, n_steps):
        i = rng.randrange(4)
        return Problem(f"P{i}", i, [{"expr": f"{i}+0", "value": i, "text": "t"}], "fake")

    monkeypatch.setattr(arith_module, "make_problem", draw)


def test_arith_train_never_repeats_a_test_problem(monkeypatch):
    _four_problems(monkeypatch)
    task = get_task({"name": "arith", "n_train": 2, "n_test": 2})
    # The train stream alone would draw P2 then P3; P3 is a test problem, so P1 comes instead.
    assert [q.question for q in task.test_sets()["arith"]] == ["P3", "P0"]
    assert [q.question for q in task.train_questions()] == ["P2", "P1"]


def test_arith_generator_draws_distinct_problems_or_says_it_cannot(monkeypatch):
    _four_problems(monkeypatch)
    assert sorted(p.text for p in generate(random.Random("x"), 4, 1, 1)) == ["P0", "P1", "P2", "P3"]
    with pytest.raises(NegagentError) as err:
        generate(random.Random("x"), 5, 1, 1)
    assert str(err.value) == "arith: made only 4 distinct problems of 5; lower n_train or n_test"


def test_arith_step_range():
    task = get_task({"name": "arith", "n_train": 50, "n_test": 10, "min_steps": 1, "max_steps": 6})
    assert {len(q.meta["steps"]) for q in task.train_questions()} == {1, 2, 3, 4, 5, 6}


def test_arith_scores_like_math():
    strict = get_task({"name": "arith", "scoring": "strict"})
    numeric = get_task({"name": "arith"})
    assert numeric.score("36.0", 36) == {"reward": True, "strict": False, "numeric": True}
    assert strict.score("36.0", 36)["reward"] is False
    assert numeric.score(None, 36) == {"reward": False, "strict": False, "numeric": False}


# --- config files ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TASK_NAMES)
def test_task_config_files(name):
    path = REPO / "conf" / "task" / f"{name}.yaml"
    for line in path.read_text().splitlines()[1:]:  # line 1 says what the task is
        if not line.startswith("name:"):
            assert "#" in line, f"{path.name}: a knob without a comment: {line!r}"
    root = OmegaConf.create({"data_dir": None, "task": OmegaConf.load(path)})
    OmegaConf.set_struct(root, True)  # as Hydra composes it
    assert root.task.name == name and root.task.max_turns == 7 and root.task.data_dir is None
    task = get_task(root.task)
    assert task.name == name


@pytest.mark.parametrize("name", TASK_NAMES)
def test_every_task_carries_on_parse_error(name):
    """What the agent loop does with an unusable turn comes from the task config: `observe` by
    default and in every config file, `end` (the paper's loop) when asked."""
    assert get_task({"name": name, "data_dir": None}).on_parse_error == "observe"
    assert get_task({"name": name, "data_dir": None, "on_parse_error": "end"}).on_parse_error == "end"
    assert OmegaConf.load(REPO / "conf" / "task" / f"{name}.yaml").on_parse_error == "observe"


# --- real data ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def math_task(data_dir):
    task = get_task({"name": "math", "data_dir": str(data_dir)})
    return task, task.train_questions(), task.test_sets()


def test_math_sizes(math_task):
    _, train, tests = math_task
    assert len(train) == 7473
    assert {name: len(qs) for name, qs in tests.items()} == {
        "gsm8k": 1319, "svamp": 1000, "asdiv": 2023, "multiarith": 596,
    }
    for questions in [train, *tests.values()]:
        assert len({q.id for q in questions}) == len(questions)


def test_math_gold_and_steps(math_task):
    _, train, tests = math_task
    assert tests["gsm8k"][0].gold == "18"
    assert tests["asdiv"][0].gold == "9"  # a bare answer, no "####"
    assert any(q.gold == "1,080" for q in train)  # kept as written
    first = train[0]
    assert first.id == "gsm8k-train-0" and first.gold == "72"
    assert first.meta["steps"] == [
        {"expr": "48/2", "value": "24", "text": "Natalia sold 48/2 = 24 clips in May."},
        {"expr": "48+24", "value": "72", "text": "Natalia sold 48+24 = 72 clips altogether in April and May."},
    ]
    assert sum(len(q.meta["steps"]) for q in train) == 23716  # every <<expr=value>> note
    assert all("<<" not in step["text"] for q in train for step in q.meta["steps"])


def test_strict_rule_drops_the_golds_thousands_commas(math_task):
    """The paper's label compares `finish[2125]` with GSM8K's "2,125" after dropping its commas:
    14 of the 1,319 GSM8K test answers have such commas, and each is right only without them."""
    task, _, tests = math_task
    with_commas = [q.gold for q in tests["gsm8k"] if "," in q.gold]
    assert len(with_commas) == 14 and "2,125" in with_commas and "1,450,000" in with_commas
    assert all(task.score(gold.replace(",", ""), gold)["strict"] for gold in with_commas)
    assert not any(task.score(gold, gold)["strict"] for gold in with_commas)
    assert all("," not in q.gold for name in ("svamp", "asdiv", "multiarith") for q in tests[name])


def test_math_options(data_dir):
    task = get_task({"name": "math", "data_dir": str(data_dir), "test_sets": "svamp", "limit_test": 3,
                     "limit_train": 2, "scoring": "strict"})
    assert len(task.train_questions()) == 2
    assert {name: len(qs) for name, qs in task.test_sets().items()} == {"svamp": 3}
    assert task.score("18.0", "18") == {"reward": False, "strict": False, "numeric": True}
    assert task.score("18", "18")["reward"] is True


def test_hotpotqa(data_dir):
    task = get_task({"name": "hotpotqa", "data_dir": str(data_dir)})
    train, test = task.train_questions(), task.test_sets()["hotpotqa"]
    assert len(train) == 8000 and len(test) == 500
    assert test[0].id == "6917" and test[0].gold == "Richard Strauss" and test[0].meta["type"] == "bridge"
    assert task.score("richard strauss.", "Richard Strauss") == {"reward": True, "em": True, "f1": 1.0}
    assert task.score("Strauss", "Richard Strauss")["reward"] is False
    assert task.score(None, "Richard Strauss") == {"reward": False, "em": False, "f1": 0.0}


def test_strategyqa(data_dir):
    task = get_task({"name": "strategyqa", "data_dir": str(data_dir)})
    train, test = task.train_questions(), task.test_sets()["strategyqa"]
    assert len(train) == 1290 and len(test) == 500
    assert all(isinstance(q.gold, bool) and isinstance(q.id, str) for q in train + test)
    assert train[0].id == "b8677742616fef051f00" and train[0].meta["facts"]
    assert len({q.question for q in train} & {q.question for q in test}) == 291  # loaded as the paper has them
    assert task.score("Yes.", True) == {"reward": True, "acc": True}
    assert task.score("No", True)["reward"] is False
    assert task.score("maybe", False)["reward"] is False
    assert task.score(None, False)["reward"] is False


# --- data-file errors --------------------------------------------------------------------------


NAT_ORIGIN = "the NAT repository's data folder, https://github.com/Reason-Wang/NAT"


@pytest.mark.parametrize(("name", "relpath", "origin"), [
    ("math", "gsm8k/train.jsonl", "GSM8K, https://huggingface.co/datasets/openai/gsm8k"),
    ("hotpotqa", "nat/hotpotqa/train_random_8000.json", NAT_ORIGIN),
    ("strategyqa", "nat/strategyqa/train.jsonl", NAT_ORIGIN),
])
def test_missing_file_names_the_path_and_the_fix(tmp_path, name, relpath, origin):
    with pytest.raises(NegagentError) as err:
        get_task({"name": name, "data_dir": str(tmp_path)}).train_questions()
    assert str(err.value) == (f"{tmp_path / relpath} not found: set task.data_dir to a directory holding "
                              f"({relpath} from {origin}), or task.source=hub when online")


def test_unset_data_dir():
    with pytest.raises(NegagentError) as err:
        get_task({"name": "math", "data_dir": None}).train_questions()
    assert str(err.value) == ("task.data_dir is not set: set it to a directory holding (gsm8k/train.jsonl from "
                              "GSM8K, https://huggingface.co/datasets/openai/gsm8k), or task.source=hub when online")


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


GOOD_GSM8K = json.dumps({"question": "q", "answer": "#### 1"})


@pytest.mark.parametrize(("name", "relpath", "content", "message"), [
    ("math", "gsm8k/train.jsonl", GOOD_GSM8K + "\n\n{not json\n",
     "{path}:3: invalid JSON: Expecting property name enclosed in double quotes"),  # blank lines are counted
    ("math", "gsm8k/train.jsonl", GOOD_GSM8K + "\n[1]\n", "{path}:2: expected a JSON object"),
    ("math", "gsm8k/train.jsonl", json.dumps({"question": "q"}) + "\n",
     "gsm8k/train.jsonl: record 0 lacks field 'answer'"),
    ("math", "gsm8k/train.jsonl", GOOD_GSM8K + "\n" + json.dumps({"answer": "#### 2"}) + "\n",
     "gsm8k/train.jsonl: record 1 lacks field 'question'"),
    ("hotpotqa", "nat/hotpotqa/train_random_8000.json", '[{"question": "q", "answer": "a", "id": 1},]',
     "{path}: invalid JSON at line 1: Expecting value"),
    ("hotpotqa", "nat/hotpotqa/train_random_8000.json", '{"question": "q"}', "{path}: expected a JSON list of objects"),
    ("hotpotqa", "nat/hotpotqa/train_random_8000.json", '[{"question": "q", "answer": "a", "id": 1}, 2]',
     "{path}: expected a JSON list of objects"),
    ("strategyqa", "nat/strategyqa/train.jsonl", json.dumps({"id": "a", "question": "q?", "answer": "no"}),
     "nat/strategyqa/train.jsonl: record 0: answer must be true or false, got 'no'"),
])
def test_malformed_data_files_name_file_line_and_record(tmp_path, name, relpath, content, message):
    path = tmp_path / relpath
    _write(path, content)
    with pytest.raises(NegagentError) as err:
        get_task({"name": name, "data_dir": str(tmp_path)}).train_questions()
    assert str(err.value) == message.format(path=path)


# --- hub source (the network is faked: only the mapping of hub rows is under test) ----------------


def _fake_hub(monkeypatch, rows=None, error=None):
    """Stand in a fake `datasets` module (cheaper than importing the real one); returns its calls."""
    calls = []

    def load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        if error:
            raise error
        return rows

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


@pytest.mark.parametrize("error, reason", [
    (ConnectionError("no route to host\nmore detail"), "no route to host"),  # the first line of the reason
    (ConnectionError(), "ConnectionError"),  # no message: the exception's type
])
def test_hub_failure_is_a_user_error(monkeypatch, error, reason):
    calls = _fake_hub(monkeypatch, error=error)
    with pytest.raises(NegagentError) as err:
        get_task({"name": "math", "source": "hub"}).train_questions()
    assert str(err.value) == (f"could not load openai/gsm8k (train) from the Hugging Face hub ({reason}); "
                              "offline, use task.source=local with task.data_dir holding gsm8k/train.jsonl")
    assert calls == [("openai/gsm8k", "main", "train")]


def test_hub_rows_map_to_questions(monkeypatch):
    row = {"id": "5a8bcd", "question": "Who? ", "answer": "Him", "type": "bridge"}  # the hub's own hash id
    calls = _fake_hub(monkeypatch, rows=[row, row])
    test = get_task({"name": "hotpotqa", "source": "hub"}).test_sets()["hotpotqa"]
    assert calls == [("hotpotqa/hotpot_qa", "distractor", "validation")]
    assert [q.id for q in test] == ["0", "1"]  # numbered by index, as the paper's files are

    _fake_hub(monkeypatch, rows=[{"qid": "abc", "question": "Is it?", "answer": False}])
    (question,) = get_task({"name": "strategyqa", "source": "hub"}).train_questions()
    assert question.id == "abc" and question.gold is False


def test_hub_without_a_matching_copy(monkeypatch):
    calls = _fake_hub(monkeypatch, rows=[])
    with pytest.raises(NegagentError) as err:
        get_task({"name": "math", "source": "hub", "test_sets": ["svamp"]}).test_sets()
    assert str(err.value) == ("nat/SVAMP/test.jsonl has no matching public copy on the hub: use task.source=local "
                              "with task.data_dir holding it (the NAT repository's data folder, "
                              "https://github.com/Reason-Wang/NAT)")
    assert calls == []  # nothing is asked of the hub
