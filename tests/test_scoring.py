"""Answer-checking rules: the paper's strict math rule, the numeric rule, official HotpotQA, yes/no."""

from __future__ import annotations

import pytest

from negagent.scoring import exact_match, f1, math_numeric, math_strict, normalize_answer, parse_number, yes_no


@pytest.mark.parametrize(
    ("prediction", "gold", "strict", "numeric"),
    [
        ("18", "18", True, True),
        (" 18 ", "18", True, True),
        ("18.0", "18", False, True),  # the paper labels this a failure; a grader would not
        ("$18", "18", False, True),
        ("18 dollars", "18", False, True),
        ("18.", "18", False, True),
        # The paper's label drops the gold's thousands commas (GSM8K writes "2,125"), not the prediction's.
        ("1800", "1,800", True, True),
        ("2125", " 2,125", True, True),
        ("1450000", "1,450,000", True, True),
        ("2,125", "2,125", False, True),
        ("1,800", "1,800", False, True),
        ("1,800", "1800", False, True),
        ("1,800,000", "1800000", False, True),
        ("3.50", "3.5", False, True),
        ("25%", "25", False, True),
        ("-3", "-3", True, True),
        ("3", "-3", False, False),
        ("1/2", "0.5", False, True),
        ("17", "18", False, False),
        ("18.001", "18", False, False),
        ("eighteen", "18", False, False),  # no digits: no number
        ("", "18", False, False),
        (None, "18", False, False),
    ],
)
def test_math_rules(prediction, gold, strict, numeric):
    assert math_strict(prediction, gold) is strict
    assert math_numeric(prediction, gold) is numeric


def test_numeric_rule_reads_the_last_number_and_a_binary_minus():
    assert parse_number("3 + 4 = 7") == 7
    assert parse_number("5-3") == 3  # a minus after a digit is an operator, not a sign
    assert parse_number("x = -3") == -3
    assert parse_number("3,4") == 4  # not a thousands comma
    assert parse_number("n/a") is None
    assert parse_number("1/0") is None  # a zero denominator is no number, not a ZeroDivisionError
    assert parse_number("3/4") == 0.75
    assert math_numeric("1000000.5", "1000000")  # within 1e-6 relative
    assert math_numeric("0", "0")


def test_math_rules_accept_non_string_gold():
    # arith's gold is an int
    assert math_strict("36", 36) and math_numeric("36.0", 36) and not math_strict("36.0", 36)


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("The Beatles!", "beatles"),
        ("  An apple a  day ", "apple day"),
        ("Theatre", "theatre"),  # articles only as whole words
        ("U.S.A.", "usa"),
        ("Richard   Strauss.", "richard strauss"),
        ("the the", ""),
    ],
)
def test_hotpot_normalization(text, normalized):
    assert normalize_answer(text) == normalized


def test_hotpot_exact_match_and_f1():
    assert exact_match("the Eiffel Tower", "Eiffel Tower.")
    assert not exact_match("Eiffel", "Eiffel Tower")
    assert f1("Richard Strauss", "Richard Strauss") == 1.0
    assert f1("Richard Strauss, composer", "Richard Strauss") == pytest.approx(0.8)  # P 2/3, R 1
    assert f1("Strauss", "Richard Strauss") == pytest.approx(2 / 3)
    assert f1("Mozart", "Richard Strauss") == 0.0
    assert f1("", "Richard Strauss") == 0.0


def test_hotpot_f1_yes_no_rule():
    # Official rule: when either side normalises to yes/no/noanswer and they differ, F1 is 0,
    # even though the tokens overlap.
    assert f1("yes", "yes") == 1.0
    assert f1("Yes.", "yes") == 1.0
    assert f1("yes", "no") == 0.0
    assert f1("yes it is", "yes") == 0.0
    assert f1("no", "no way") == 0.0
    assert f1("noanswer", "no answer") == 0.0
    # Overlapping tokens, so only the special-answer rule makes these 0 (plain F1 would be 2/3).
    assert f1("noanswer", "noanswer given") == 0.0
    assert f1("maybe not", "maybe") == pytest.approx(2 / 3)  # no special side: plain token F1


@pytest.mark.parametrize(
    ("prediction", "value"),
    [
        ("Yes", True), ("yes.", True), ("True", True), (" YES! ", True), ('"yes"', True),
        ("No", False), ("false", False), ("no.", False),
        ("Yes, because it is", None), ("maybe", None), ("", None), (None, None), ("y", None),
    ],
)
def test_yes_no(prediction, value):
    assert yes_no(prediction) is value
