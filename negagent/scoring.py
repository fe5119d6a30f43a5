"""Answer-checking rules, as pure functions of a prediction string and a gold answer.

Math has two rules on purpose: `math_strict` is the paper's label (so results compare with it) and
`math_numeric` is what a human grader would accept; tasks report both. HotpotQA follows the official
evaluation script (hotpot_evaluate_v1.py) exactly; StrategyQA maps a finish argument to a boolean.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter

# A number as people write it in an answer: optional sign, digits, optional decimals, optional "/q".
# The sign only counts where it cannot be a binary minus ("5-3" holds 5 and 3, not 5 and -3).
_NUMBER = re.compile(r"(?:(?<![\w.])-)?\d+(?:\.\d+)?(?:/\d+(?:\.\d+)?)?")
# A comma between digit groups ("1,800,000"); "3,4" stays two numbers.
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_PUNCTUATION = frozenset(string.punctuation)


def math_strict(prediction: str | None, gold: object) -> bool:
    """The paper's rule: the stripped prediction equals the gold string with its commas removed.

    The paper's label drops the commas from the gold only (GSM8K writes "2,125"): `2125` is right
    against "2,125" and `2,125` is not; "18.0" against "18" is wrong.
    """
    return prediction is not None and prediction.strip() == str(gold).replace(",", "").strip()


def parse_number(text: str) -> float | None:
    """The last number in `text`, ignoring "$", "%", units and thousands commas; None if there is none.

    The last one, because a finish argument like "3 + 4 = 7" or "5 boxes, so 35" ends on the answer.
    """
    matches = _NUMBER.findall(_THOUSANDS.sub("", text))
    if not matches:
        return None
    numerator, _, denominator = matches[-1].partition("/")
    if not denominator:
        return float(numerator)
    return float(numerator) / float(denominator) if float(denominator) else None


def math_numeric(prediction: str | None, gold: object) -> bool:
    """The prediction's number equals the gold number within a relative tolerance of 1e-6."""
    if prediction is None:
        return False
    predicted, expected = parse_number(prediction), parse_number(str(gold))
    if predicted is None or expected is None:
        return False
    return math.isclose(predicted, expected, rel_tol=1e-6)


def normalize_answer(text: str) -> str:
    """HotpotQA's normalisation: lowercase, drop punctuation, drop articles, squeeze whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> bool:
    """HotpotQA EM: the normalised strings are equal."""
    return normalize_answer(prediction) == normalize_answer(gold)


def f1(prediction: str, gold: str) -> float:
    """HotpotQA token F1; 0 when either side is yes/no/noanswer and the two differ (official rule)."""
    predicted, expected = normalize_answer(prediction), normalize_answer(gold)
    special = ("yes", "no", "noanswer")
    if (predicted in special or expected in special) and predicted != expected:
        return 0.0
    predicted_tokens, expected_tokens = predicted.split(), expected.split()
    common = sum((Counter(predicted_tokens) & Counter(expected_tokens)).values())
    if common == 0:
        return 0.0
    precision = common / len(predicted_tokens)
    recall = common / len(expected_tokens)
    return 2 * precision * recall / (precision + recall)


_YES_NO = {"yes": True, "true": True, "no": False, "false": False}


def yes_no(prediction: str | None) -> bool | None:
    """"Yes", "yes.", "True" -> True; "No", "false" -> False; anything else (or None) -> None."""
    if prediction is None:
        return None
    return _YES_NO.get(prediction.strip().strip(string.punctuation + string.whitespace).lower())
