"""HotpotQA: multi-hop questions answered with a search tool, scored by EM (the reward) and F1.

Local files are the paper's random subsets (8,000 train, 500 dev) whose ids index the official
splits. `source: hub` loads the full official splits instead, numbering rows the same way, so an id
names the same question either way; `limit_*` then keep the first N.

The offline search corpus holds the context of 137 of the 500 dev questions (matched by question
text: 80 with their paragraphs, 57 with their gold evidence sentences); an evaluation with
`tools.search.backend=bm25` runs those only (`limit_test` counting among them) and says so in
metrics.json (`corpus_coverage`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from negagent.scoring import exact_match, f1
from negagent.tasks import DataFile, HubSplit, choice, first, integer, limit, load_records
from negagent.tasks.base import Question, MAX_TURNS, PARSE_ERROR_RULES
from negagent.tasks.instructions import react_instructions

_NAT = "the NAT repository's data folder, https://github.com/Reason-Wang/NAT"
_FIELDS = ("question", "answer", "id")

TRAIN = DataFile(
    "nat/hotpotqa/train_random_8000.json", _NAT, _FIELDS, HubSplit("hotpotqa/hotpot_qa", "distractor", "train")
)
TEST = DataFile(
    "nat/hotpotqa/dev_random_500.json", _NAT, _FIELDS, HubSplit("hotpotqa/hotpot_qa", "distractor", "validation")
)

INSTRUCTIONS = react_instructions(
    "Answer the question below. It usually needs facts about two different things, so look each of them up.",
    ("search",),
    "Keep the answer short: a name, a date, a number, yes or no, or a few words.",
)


def _questions(records: list[dict]) -> list[Question]:
    return [
        Question(id=str(record["id"]), question=record["question"].strip(), gold=record["answer"],
                 meta={"type": record.get("type")})
        for record in records
    ]


@dataclass(frozen=True)
class HotpotQATask:
    """The HotpotQA task; `limit_*` keep the first N questions (None: all)."""

    data_dir: str | None
    source: str = "local"
    limit_train: int | None = None
    limit_test: int | None = None

    max_turns: int = MAX_TURNS
    on_parse_error: str = "observe"

    name: ClassVar[str] = "hotpotqa"
    tools: ClassVar[tuple[str, ...]] = ("search",)
    instructions: ClassVar[str] = INSTRUCTIONS
    # Its questions are answerable from their own context paragraphs: with offline search
    # (tools.search.backend=bm25) an evaluation keeps the questions whose context the corpus holds.
    context_bound: ClassVar[bool] = True

    def train_questions(self) -> list[Question]:
        records = first(load_records(TRAIN, self.source, self.data_dir), self.limit_train)
        return _questions(records)

    def test_sets(self) -> dict[str, list[Question]]:
        records = first(load_records(TEST, self.source, self.data_dir), self.limit_test)
        return {"hotpotqa": _questions(records)}

    def score(self, prediction: str | None, gold: Any) -> dict:
        if prediction is None:
            return {"reward": False, "em": False, "f1": 0.0}
        em = exact_match(prediction, gold)
        return {"reward": em, "em": em, "f1": f1(prediction, gold)}


def build(cfg: Mapping[str, Any]) -> HotpotQATask:
    """A HotpotQATask from the `task` config (conf/task/hotpotqa.yaml)."""
    return HotpotQATask(
        max_turns=integer(cfg, "max_turns", MAX_TURNS, minimum=1),
        on_parse_error=choice(cfg, "on_parse_error", PARSE_ERROR_RULES, "observe"),
        data_dir=cfg.get("data_dir"),
        source=choice(cfg, "source", ("local", "hub"), "local"),
        limit_train=limit(cfg, "limit_train"),
        limit_test=limit(cfg, "limit_test"),
    )
