"""Math word problems with a calculator: train on GSM8K, test on GSM8K, SVAMP, ASDiv and MultiArith.

This is the paper's math setup. `gold` is the answer string exactly as the dataset writes it (the
text after "####", or the bare answer in ASDiv, e.g. "18" or "1,800"), because the paper's strict
rule compares strings. Train questions carry GSM8K's calculator notes as `meta["steps"]`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from negagent.errors import NegagentError
from negagent.scoring import math_numeric, math_strict
from negagent.tasks import DataFile, HubSplit, choice, first, integer, limit, load_records
from negagent.tasks.base import Question, MAX_TURNS, PARSE_ERROR_RULES
from negagent.tasks.instructions import react_instructions

_GSM8K = "GSM8K, https://huggingface.co/datasets/openai/gsm8k"
_NAT = "the NAT repository's data folder, https://github.com/Reason-Wang/NAT"

TRAIN = DataFile(
    "gsm8k/train.jsonl", _GSM8K, ("question", "answer"), HubSplit("openai/gsm8k", "main", "train")
)
# Only GSM8K has a public copy that matches the paper's test file record for record.
TEST_SETS = {
    "gsm8k": DataFile(
        "nat/gsm8k/test.json", _NAT, ("question", "answer", "id"), HubSplit("openai/gsm8k", "main", "test")
    ),
    "svamp": DataFile("nat/SVAMP/test.jsonl", _NAT, ("question", "answer", "id")),
    "asdiv": DataFile("nat/ASDiv/test_one_answer.jsonl", _NAT, ("question", "answer", "id")),
    "multiarith": DataFile("nat/MultiArith/test.jsonl", _NAT, ("question", "answer", "id")),
}

SCORING_RULES = ("numeric", "strict")
INSTRUCTIONS = react_instructions(
    "Solve the math word problem below. Use the calculator for every computation.",
    ("calculate",),
    "Put only the final number inside finish[...], without units or words, e.g. finish[42].",
)

_NOTE = re.compile(r"<<([^=<>]*)=([^<>]*)>>")  # GSM8K's calculator note: <<48/2=24>>
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+")


def gold_answer(answer: str) -> str:
    """The text after the last "####" (the whole answer when there is none), stripped."""
    return answer.rsplit("####", 1)[-1].strip()


def calculator_steps(solution: str) -> list[dict]:
    """GSM8K's calculator notes as [{"expr": "48/2", "value": "24", "text": ...}].

    `text` is the sentence that holds the note, with the notes removed.
    """
    steps = []
    for line in solution.split("####")[0].splitlines():
        for sentence in _SENTENCE_BREAK.split(line):
            text = _NOTE.sub("", sentence).strip()
            steps += [{"expr": expr, "value": value, "text": text} for expr, value in _NOTE.findall(sentence)]
    return steps


def score_math(prediction: str | None, gold: Any, rule: str) -> dict:
    """Both math rules; `reward` is the one named by `rule` ("numeric" or "strict")."""
    strict, numeric = math_strict(prediction, gold), math_numeric(prediction, gold)
    return {"reward": numeric if rule == "numeric" else strict, "strict": strict, "numeric": numeric}


@dataclass(frozen=True)
class MathTask:
    """The math task; `limit_*` keep the first N questions (None: all)."""

    data_dir: str | None
    source: str = "local"
    test_set_names: tuple[str, ...] = tuple(TEST_SETS)
    limit_train: int | None = None
    limit_test: int | None = None
    scoring: str = "numeric"

    max_turns: int = MAX_TURNS
    on_parse_error: str = "observe"

    name: ClassVar[str] = "math"
    tools: ClassVar[tuple[str, ...]] = ("calculate",)
    instructions: ClassVar[str] = INSTRUCTIONS

    def train_questions(self) -> list[Question]:
        records = first(load_records(TRAIN, self.source, self.data_dir), self.limit_train)
        return [
            Question(
                id=f"gsm8k-train-{index}",
                question=record["question"].strip(),
                gold=gold_answer(record["answer"]),
                meta={"steps": calculator_steps(record["answer"])},
            )
            for index, record in enumerate(records)
        ]

    def test_sets(self) -> dict[str, list[Question]]:
        return {name: self._test_set(name) for name in self.test_set_names}

    def _test_set(self, name: str) -> list[Question]:
        records = first(load_records(TEST_SETS[name], self.source, self.data_dir), self.limit_test)
        return [
            Question(
                id=f"{name}-test-{record['id']}",
                question=record["question"].strip(),
                gold=gold_answer(record["answer"]),
            )
            for record in records
        ]

    def score(self, prediction: str | None, gold: Any) -> dict:
        return score_math(prediction, gold, self.scoring)


def build(cfg: Mapping[str, Any]) -> MathTask:
    """A MathTask from the `task` config (conf/task/math.yaml)."""
    names = cfg.get("test_sets", list(TEST_SETS))
    names = (names,) if isinstance(names, str) else tuple(names)  # `task.test_sets=gsm8k` on the CLI
    unknown = [name for name in names if name not in TEST_SETS]
    if unknown or not names:
        raise NegagentError(f"task.test_sets={list(names)}: choose from: {', '.join(TEST_SETS)}")
    return MathTask(
        max_turns=integer(cfg, "max_turns", MAX_TURNS, minimum=1),
        on_parse_error=choice(cfg, "on_parse_error", PARSE_ERROR_RULES, "observe"),
        data_dir=cfg.get("data_dir"),
        source=choice(cfg, "source", ("local", "hub"), "local"),
        test_set_names=names,
        limit_train=limit(cfg, "limit_train"),
        limit_test=limit(cfg, "limit_test"),
        scoring=choice(cfg, "scoring", SCORING_RULES, "numeric"),
    )
