"""Arithmetic word problems made on the fly: an offline math task for laptops, CI and scripted teachers.

A problem is a short story (shopping, savings, ages, travel, baking, a library, a farm, a rain
barrel) whose quantity goes through `min_steps`..`max_steps` operations (+ - * /), every
intermediate result a positive integer. `gold` is the integer answer and `meta["steps"]` the worked
solution, [{"expr": "12*3", "value": 36, "text": <what the step computes>}], from which a scripted
teacher writes a correct trajectory. The same config gives the same problems. The test set depends
only on (seed, n_test, step range), so changing n_train never changes it, and train problems are
drawn from another random stream and never repeat a test problem's text.
"""

from __future__ import annotations

import operator
import random
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from negagent.errors import NegagentError
from negagent.tasks import choice, integer, limit
from negagent.tasks.base import Question, MAX_TURNS, PARSE_ERROR_RULES
from negagent.tasks.instructions import react_instructions
from negagent.tasks.math import SCORING_RULES, score_math

MAX_STEPS = 6  # the longest entity chain below has 7 members, so 6 links


@dataclass(frozen=True)
class Move:
    """One way a story goes on: a sentence, and one text per calculation it needs.

    `op` is "+", "-", "*" or "/" (the running value with an operand {n}), or "+*" / "-*": add or
    take away a product {k}*{m} = {p}, which takes two calculations. A move with `ask` ends the
    story with its own question (e.g. "how many in each box?"), so it can only come last.
    """

    op: str
    sentence: str
    steps: tuple[str, ...]
    ask: str | None = None


@dataclass(frozen=True)
class Theme:
    """A kind of story. With a `chain`, each move is about the next member (a relative, a day),
    named {cur}, and relates it to the one before, {prev}; otherwise one quantity changes."""

    name: str
    start: str  # opening sentence, {a} is the first value
    ask: str  # closing question about the last value
    moves: tuple[Move, ...]
    start_range: tuple[int, int]
    max_value: int  # no value in the story exceeds this
    max_operand: int  # largest number added or taken away in one move
    chain: tuple[str, ...] = ()
    shuffle_chain: bool = False  # relatives come in any order; days and months do not


class Problem(NamedTuple):
    text: str
    answer: int
    steps: list[dict]  # [{"expr", "value", "text"}], the last value is the answer
    theme: str


def _m(op: str, sentence: str, *steps: str, ask: str | None = None) -> Move:
    return Move(op, sentence, steps, ask)


THEMES = (
    Theme(
        name="shopping",
        start="{name} goes to the market with ${a}.",
        ask="How many dollars does {name} have now?",
        moves=(
            _m("+", "{His} aunt gives {him} ${n}.", "Add the ${n} from {his} aunt to {his} money."),
            _m("+", "{He} sells an old bike for ${n}.", "Add the ${n} from selling the bike."),
            _m("-", "{He} spends ${n} on a scarf.", "Take the ${n} for the scarf away from {his} money."),
            _m("-", "{He} pays ${n} for lunch.", "Take the ${n} for lunch away from {his} money."),
            _m("-*", "{He} buys {k} notebooks that cost ${m} each.",
               "Work out what {k} notebooks at ${m} each cost.", "Take the ${p} for the notebooks away."),
            _m("+*", "{He} returns {k} lamps and gets ${m} back for each.",
               "Work out the refund for {k} lamps at ${m} each.", "Add the ${p} refund to {his} money."),
            _m("*", "After selling lemonade all afternoon, {he} has {times} as much money as before.",
               "Multiply {his} money by {n}."),
            _m("/", "{He} splits {his} money equally among {n} people, {himself} included.",
               "Divide {his} money into {n} equal shares."),
        ),
        start_range=(20, 200),
        max_value=1000,
        max_operand=60,
    ),
    Theme(
        name="savings",
        start="{name} saves ${a} in January.",
        ask="How many dollars does {name} save in {cur}?",
        moves=(
            _m("+", "In {cur}, {he} saves ${n} more than in {prev}.",
               "Add ${n} to what {he} saved in {prev}."),
            _m("+", "A bonus in {cur} lets {him} save ${n} more than in {prev}.",
               "Add the extra ${n} to the {prev} savings."),
            _m("-", "In {cur}, {he} saves ${n} less than in {prev}.",
               "Subtract ${n} from the {prev} savings."),
            _m("-", "A dentist bill means that in {cur} {he} saves ${n} less than in {prev}.",
               "Subtract ${n} from what {he} saved in {prev}."),
            _m("*", "In {cur}, {he} saves {times} as much as in {prev}.",
               "Multiply the {prev} savings by {n}."),
            _m("/", "In {cur}, {he} saves only {part} of what {he} saved in {prev}.",
               "Divide the {prev} savings by {n}."),
        ),
        start_range=(10, 120),
        max_value=800,
        max_operand=50,
        chain=("January", "February", "March", "April", "May", "June", "July"),
    ),
    Theme(
        name="ages",
        start="{name} is {a} years old.",
        ask="How old is {cur}?",
        moves=(
            _m("+", "{cur} is {n} years older than {prev}.", "Add {n} years to the age of {prev}."),
            _m("+", "{cur} was born {n} years before {prev}.", "Add {n} years to the age of {prev}."),
            _m("-", "{cur} is {n} years younger than {prev}.", "Subtract {n} years from the age of {prev}."),
            _m("-", "{cur} was born {n} years after {prev}.", "Subtract {n} years from the age of {prev}."),
            _m("*", "{cur} is {times} as old as {prev}.", "Multiply the age of {prev} by {n}."),
            _m("/", "{cur} is {part} as old as {prev}.", "Divide the age of {prev} by {n}."),
        ),
        start_range=(4, 30),
        max_value=99,
        max_operand=30,
        chain=("{name}", "{name}'s cousin", "{name}'s friend", "{name}'s neighbour", "{name}'s pen pal",
               "{name}'s teammate", "{name}'s classmate"),
        shuffle_chain=True,
    ),
    Theme(
        name="travel",
        start="On a cycling trip, {name} rides {a} km on Monday.",
        ask="How many kilometers does {name} ride on {cur}?",
        moves=(
            _m("+", "On {cur}, {he} rides {n} km more than on {prev}.", "Add {n} km to the {prev} distance."),
            _m("+", "The wind helps on {cur}, and {he} covers {n} km more than on {prev}.",
               "Add {n} km to the distance ridden on {prev}."),
            _m("-", "On {cur}, {he} rides {n} km less than on {prev}.",
               "Subtract {n} km from the {prev} distance."),
            _m("-", "Rain slows {him} down on {cur}, so {he} covers {n} km less than on {prev}.",
               "Subtract {n} km from the distance ridden on {prev}."),
            _m("*", "On {cur}, {he} rides {times} as far as on {prev}.",
               "Multiply the {prev} distance by {n}."),
            _m("/", "On {cur}, {he} rides only {part} of the {prev} distance.",
               "Divide the {prev} distance by {n}."),
        ),
        start_range=(10, 60),
        max_value=400,
        max_operand=40,
        chain=("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
    ),
    Theme(
        name="baking",
        start="{name} bakes {a} cookies for a school fair.",
        ask="How many cookies does {name} have now?",
        moves=(
            _m("+", "{His} neighbour brings {n} more cookies.", "Add the {n} cookies from the neighbour."),
            _m("-", "{He} eats {n} of the cookies while they cool.", "Subtract the {n} cookies {he} ate."),
            _m("-", "Sadly, {n} cookies break and are thrown away.", "Subtract the {n} broken cookies."),
            _m("+*", "{He} bakes {k} more trays with {m} cookies on each.",
               "Work out how many cookies {k} trays of {m} hold.",
               "Add the {p} cookies from the extra trays."),
            _m("-*", "{He} gives {k} teachers {m} cookies each.",
               "Work out how many cookies {k} teachers get at {m} each.",
               "Subtract the {p} cookies given away."),
            _m("*", "With help from friends, {he} ends up with {times} as many cookies as before.",
               "Multiply the number of cookies by {n}."),
            _m("/", "{He} packs all the cookies into {n} boxes with the same number in each.",
               "Divide the cookies equally among {n} boxes.", ask="How many cookies are in each box?"),
        ),
        start_range=(12, 120),
        max_value=900,
        max_operand=40,
    ),
    Theme(
        name="library",
        start="{name} runs a school library with {a} books.",
        ask="How many books does the library have now?",
        moves=(
            _m("+", "A parent donates {n} books.", "Add the {n} donated books."),
            _m("-", "{name} recycles {n} worn-out books.", "Subtract the {n} recycled books."),
            _m("-", "Students borrow {n} books and have not brought them back yet.",
               "Subtract the {n} books that are out on loan."),
            _m("+*", "{name} orders {k} boxes of new books with {m} books in each box.",
               "Work out how many books {k} boxes of {m} hold.", "Add the {p} new books."),
            _m("-*", "{He} sends {k} crates of {m} books each to a partner school.",
               "Work out how many books {k} crates of {m} hold.", "Subtract the {p} books sent away."),
            _m("*", "After a donation drive, the library holds {times} as many books as before.",
               "Multiply the number of books by {n}."),
            _m("/", "{name} shares all the books equally among {n} classrooms.",
               "Divide the books equally among {n} classrooms.",
               ask="How many books does each classroom get?"),
        ),
        start_range=(40, 300),
        max_value=3000,
        max_operand=80,
    ),
    Theme(
        name="farm",
        start="{name} keeps {a} chickens on {his} farm.",
        ask="How many chickens does {name} have now?",
        moves=(
            _m("+", "{He} buys {n} more chickens at the market.", "Add the {n} chickens {he} bought."),
            _m("-", "{He} sells {n} chickens to a neighbour.", "Subtract the {n} chickens {he} sold."),
            _m("+*", "{He} buys {k} crates of chicks with {m} chicks in each crate.",
               "Work out how many chicks {k} crates of {m} hold.", "Add the {p} chicks to the flock."),
            _m("-*", "{He} gives {k} friends {m} chickens each.",
               "Work out how many chickens {k} friends get at {m} each.",
               "Subtract the {p} chickens given away."),
            _m("*", "After the spring hatching, the flock is {times} as large as before.",
               "Multiply the size of the flock by {n}."),
            _m("/", "{He} moves all the chickens into {n} coops with the same number in each.",
               "Divide the chickens equally among {n} coops.", ask="How many chickens are in each coop?"),
        ),
        start_range=(10, 150),
        max_value=1500,
        max_operand=40,
    ),
    Theme(
        name="rain barrel",
        start="A rain barrel in {name}'s garden holds {a} liters of water.",
        ask="How many liters of water are in the barrel now?",
        moves=(
            _m("+", "A storm adds {n} liters.", "Add the {n} liters from the storm."),
            _m("-", "{name} uses {n} liters to wash {his} car.", "Subtract the {n} liters used on the car."),
            _m("+*", "{He} pours in {k} buckets holding {m} liters each.",
               "Work out how much water {k} buckets of {m} liters hold.",
               "Add the {p} liters from the buckets."),
            _m("-*", "{He} waters {k} plants with {m} liters each.",
               "Work out how much water {k} plants at {m} liters each get.", "Subtract the {p} liters used."),
            _m("*", "After a week of rain, the barrel holds {times} as much water as before.",
               "Multiply the amount of water by {n}."),
            _m("/", "{He} pours all the water equally into {n} watering cans.",
               "Divide the water equally among {n} cans.", ask="How many liters are in each watering can?"),
        ),
        start_range=(20, 200),
        max_value=2000,
        max_operand=50,
    ),
)

PEOPLE = (
    ("Maya", "she"), ("Omar", "he"), ("Lena", "she"), ("Tariq", "he"), ("Sofia", "she"), ("Jonas", "he"),
    ("Aiko", "she"), ("Diego", "he"), ("Priya", "she"), ("Kwame", "he"), ("Elif", "she"), ("Mateo", "he"),
    ("Nadia", "she"), ("Felix", "he"), ("Ines", "she"), ("Ravi", "he"),
)
_PRONOUNS = {
    "she": {"He": "She", "he": "she", "His": "Her", "his": "her", "him": "her", "himself": "herself"},
    "he": {"He": "He", "he": "he", "His": "His", "his": "his", "him": "him", "himself": "himself"},
}
_TIMES = {2: "twice", 3: "three times", 4: "four times"}
_PART = {2: "half", 3: "a third", 4: "a quarter", 5: "a fifth", 6: "a sixth"}
_APPLY = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.floordiv}  # "/" is exact here

INSTRUCTIONS = react_instructions(
    "Solve the arithmetic word problem below. Use the calculator for every computation.",
    ("calculate",),
    "Put only the final number inside finish[...], without units or words, e.g. finish[42].",
)


def _operands(rng: random.Random, op: str, value: int, theme: Theme) -> dict | None:
    """Random operands for `op` on `value` that keep every result a whole number in 2..max_value."""
    room = theme.max_value - value
    if op == "+":
        top = min(theme.max_operand, room)
        return {"n": rng.randint(2, top)} if top >= 2 else None
    if op == "-":
        top = min(theme.max_operand, value - 2)
        return {"n": rng.randint(2, top)} if top >= 2 else None
    if op == "*":
        factors = [f for f in _TIMES if value * f <= theme.max_value]
        return {"n": rng.choice(factors)} if factors else None
    if op == "/":
        divisors = [d for d in _PART if value % d == 0 and value // d >= 2]
        return {"n": rng.choice(divisors)} if divisors else None
    # "+*" / "-*": a product k*m, at most what the story has room for (or has, minus 2)
    limit = room if op == "+*" else value - 2
    pairs = [(k, m) for k in range(2, 7) for m in range(2, 13) if k * m <= limit]
    if not pairs:
        return None
    k, m = rng.choice(pairs)
    return {"k": k, "m": m, "p": k * m}


def make_problem(rng: random.Random, n_steps: int) -> Problem | None:
    """One problem with exactly `n_steps` calculations.

    None when the random walk reaches a dead end (no move fits); the caller draws again.
    """
    theme = rng.choice(THEMES)
    name, pronoun = rng.choice(PEOPLE)
    fields: dict[str, Any] = {"name": name, **_PRONOUNS[pronoun]}
    chain = [member.format(**fields) for member in theme.chain]
    if theme.shuffle_chain:
        chain[1:] = rng.sample(chain[1:], len(chain) - 1)
    value = rng.randint(*theme.start_range)
    sentences = [theme.start.format(a=value, **fields)]
    steps: list[dict] = []
    ask, used, link = theme.ask, set(), 0
    while len(steps) < n_steps:
        left = n_steps - len(steps)
        moves = [
            move for move in theme.moves
            if move not in used and len(move.steps) <= left and (move.ask is None or len(move.steps) == left)
        ]
        rng.shuffle(moves)
        for move in moves:
            operands = _operands(rng, move.op, value, theme)
            if operands is not None:
                break
        else:
            return None
        used.add(move)
        if chain:
            fields.update(prev=chain[link], cur=chain[link + 1])
            link += 1
        fields.update(operands)
        if move.op in ("+*", "-*"):
            k, m, p = operands["k"], operands["m"], operands["p"]
            steps.append({"expr": f"{k}*{m}", "value": p, "text": move.steps[0].format(**fields)})
            op, operand = move.op[0], p
        else:
            op, operand = move.op, operands["n"]
            fields.update(times=_TIMES.get(operand), part=_PART.get(operand))
        new_value = _APPLY[op](value, operand)
        text = move.steps[-1].format(**fields)
        steps.append({"expr": f"{value}{op}{operand}", "value": new_value, "text": text})
        sentences.append(move.sentence.format(**fields))
        value = new_value
        ask = move.ask or ask
    sentences.append(ask.format(**fields))
    return Problem(" ".join(sentences), value, steps, theme.name)


def generate(rng: random.Random, n: int, min_steps: int, max_steps: int,
             exclude: AbstractSet[str] = frozenset()) -> list[Problem]:
    """`n` problems with distinct texts, none of them in `exclude`."""
    problems: list[Problem] = []
    seen = set(exclude)
    for _ in range(50 * n + 100):  # far more draws than distinct problems ever need
        if len(problems) == n:
            break
        problem = make_problem(rng, rng.randint(min_steps, max_steps))
        if problem is not None and problem.text not in seen:
            seen.add(problem.text)
            problems.append(problem)
    if len(problems) < n:
        raise NegagentError(
            f"arith: made only {len(problems)} distinct problems of {n}; lower n_train or n_test"
        )
    return problems


@dataclass(frozen=True)
class ArithTask:
    """Generated arithmetic problems; questions are recomputed (in milliseconds) on each call."""

    n_train: int = 2000
    n_test: int = 200
    seed: int = 0
    min_steps: int = 2
    max_steps: int = 4
    scoring: str = "numeric"

    max_turns: int = MAX_TURNS
    on_parse_error: str = "observe"

    name: ClassVar[str] = "arith"
    tools: ClassVar[tuple[str, ...]] = ("calculate",)
    instructions: ClassVar[str] = INSTRUCTIONS

    def _problems(self, split: str, n: int, exclude: AbstractSet[str] = frozenset()) -> list[Problem]:
        # A string seed is hashed with SHA-512 by `random`, so streams are stable across runs and
        # independent of PYTHONHASHSEED; train and test use different streams.
        rng = random.Random(f"negagent-arith-{split}-{self.seed}")
        return generate(rng, n, self.min_steps, self.max_steps, exclude)

    def _questions(self, split: str, problems: list[Problem]) -> list[Question]:
        return [
            Question(id=f"arith-{split}-{self.seed}-{i}", question=p.text, gold=p.answer,
                     meta={"steps": p.steps, "theme": p.theme})
            for i, p in enumerate(problems)
        ]

    def train_questions(self) -> list[Question]:
        test_texts = {problem.text for problem in self._problems("test", self.n_test)}
        return self._questions("train", self._problems("train", self.n_train, exclude=test_texts))

    def test_sets(self) -> dict[str, list[Question]]:
        return {"arith": self._questions("test", self._problems("test", self.n_test))}

    def score(self, prediction: str | None, gold: Any) -> dict:
        return score_math(prediction, gold, self.scoring)


def build(cfg: Mapping[str, Any]) -> ArithTask:
    """An ArithTask from the `task` config (conf/task/arith.yaml)."""
    min_steps, max_steps = integer(cfg, "min_steps", 2, minimum=1), integer(cfg, "max_steps", 4, minimum=1)
    if not min_steps <= max_steps <= MAX_STEPS:
        raise NegagentError(
            f"task.min_steps={min_steps}, task.max_steps={max_steps}: need min <= max <= {MAX_STEPS}"
        )
    # limit_* (shared by every task, used by debug=smoke) caps the generated counts; 0 keeps none,
    # as it does for the tasks read from files.
    limit_train, limit_test = limit(cfg, "limit_train"), limit(cfg, "limit_test")
    n_train, n_test = integer(cfg, "n_train", 2000), integer(cfg, "n_test", 200)
    return ArithTask(
        max_turns=integer(cfg, "max_turns", MAX_TURNS, minimum=1),
        on_parse_error=choice(cfg, "on_parse_error", PARSE_ERROR_RULES, "observe"),
        n_train=n_train if limit_train is None else min(n_train, limit_train),
        n_test=n_test if limit_test is None else min(n_test, limit_test),
        seed=integer(cfg, "seed", 0),
        min_steps=min_steps,
        max_steps=max_steps,
        scoring=choice(cfg, "scoring", SCORING_RULES, "numeric"),
    )
