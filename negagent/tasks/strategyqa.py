"""StrategyQA: yes/no questions whose reasoning steps are implicit, answered with a search tool.

`gold` is a bool and a prediction counts only when it reads as a plain yes or no (`scoring.yes_no`).
The paper's test file shares 291 of its 500 questions with its train file; both are loaded as they
are, so that results compare with the paper. `meta` keeps the dataset's facts, decomposition or
explanation where a record has them (a scripted teacher can use them).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from negagent.errors import NegagentError
from negagent.scoring import yes_no
from negagent.tasks import DataFile, HubSplit, choice, first, integer, limit, load_records
from negagent.tasks.base import Question, MAX_TURNS, PARSE_ERROR_RULES
from negagent.tasks.instructions import react_instructions

_NAT = "the NAT repository's data folder, https://github.com/Reason-Wang/NAT"
_FIELDS = ("question", "answer", "id")

TRAIN = DataFile(
    "nat/strategyqa/train.jsonl", _NAT, _FIELDS, HubSplit("ChilleD/StrategyQA", None, "train", {"id": "qid"})
)
TEST = DataFile(
    "nat/strategyqa/test_random_500.jsonl", _NAT, _FIELDS, HubSplit("ChilleD/StrategyQA", None, "test", {"id": "qid"})
)

INSTRUCTIONS = react_instructions(
    "Answer the yes-or-no question below. The facts it depends on are not stated in it: "
    "work out what you need to know and look it up.",
    ("search",),
    "Answer Yes or No: finish[Yes] or finish[No].",
)
_META = ("facts", "decomposition", "explanation")


def _questions(data: DataFile, records: list[dict]) -> list[Question]:
    questions = []
    for index, record in enumerate(records):
        if not isinstance(record["answer"], bool):  # a string "no" would silently score as wrong
            raise NegagentError(
                f"{data.path}: record {index}: answer must be true or false, got {record['answer']!r}"
            )
        questions.append(
            Question(
                id=str(record["id"]),
                question=record["question"].strip(),
                gold=record["answer"],
                meta={key: record[key] for key in _META if key in record},
            )
        )
    return questions


@dataclass(frozen=True)
class StrategyQATask:
    """The StrategyQA task; `limit_*` keep the first N questions (None: all)."""

    data_dir: str | None
    source: str = "local"
    limit_train: int | None = None
    limit_test: int | None = None

    max_turns: int = MAX_TURNS
    on_parse_error: str = "observe"

    name: ClassVar[str] = "strategyqa"
    tools: ClassVar[tuple[str, ...]] = ("search",)
    instructions: ClassVar[str] = INSTRUCTIONS

    def train_questions(self) -> list[Question]:
        records = first(load_records(TRAIN, self.source, self.data_dir), self.limit_train)
        return _questions(TRAIN, records)

    def test_sets(self) -> dict[str, list[Question]]:
        records = first(load_records(TEST, self.source, self.data_dir), self.limit_test)
        return {"strategyqa": _questions(TEST, records)}

    def score(self, prediction: str | None, gold: Any) -> dict:
        correct = yes_no(prediction) == gold
        return {"reward": correct, "acc": correct}


def build(cfg: Mapping[str, Any]) -> StrategyQATask:
    """A StrategyQATask from the `task` config (conf/task/strategyqa.yaml)."""
    return StrategyQATask(
        max_turns=integer(cfg, "max_turns", MAX_TURNS, minimum=1),
        on_parse_error=choice(cfg, "on_parse_error", PARSE_ERROR_RULES, "observe"),
        data_dir=cfg.get("data_dir"),
        source=choice(cfg, "source", ("local", "hub"), "local"),
        limit_train=limit(cfg, "limit_train"),
        limit_test=limit(cfg, "limit_test"),
    )
