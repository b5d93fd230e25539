"""Tests for mindmirror.evaluation.metrics: the safe evaluator must compute SVAMP equations exactly
and refuse anything else quickly, without side effects; and the accuracy built on it
(mindmirror.evaluation.evaluate.score)."""

import re
import time
from pathlib import Path

import pytest

from mindmirror.data import formats
from mindmirror.evaluation import metrics
from mindmirror.evaluation.evaluate import score
from mindmirror.evaluation.metrics import (
    InvalidExpression,
    UnsafeExpression,
    equation_value_equal,
    exact_match,
    extract_equation,
    safe_eval,
)


@pytest.mark.parametrize(
    "expression, expected",
    [
        ("( 84.0 / 2.0 )", 42.0),
        ("( 7.0 * 30.0 )", 210.0),
        ("84", 84.0),
        ("  3.5  ", 3.5),
        ("(10 - (3 + 6))", 1.0),
        ("-3 * (2.5 + 1)", -10.5),
        ("10 - 3 - 6", 1.0),  # left-associative, not 10 - (3 - 6) == 13
        ("8 / 2 / 2", 2.0),  # left-associative, not 8 / (2 / 2) == 8
        ("2 + 3 * 4", 14.0),  # precedence
        ("-(-(4))", 4.0),
        ("+5 - -2", 7.0),
        ("( ( 12.0 + 8.0 ) - ( 2.0 * 3.0 ) ) / 7.0", 2.0),
        ("1 / 3", 1 / 3),
    ],
)
def test_values(expression, expected):
    result = safe_eval(expression)
    assert isinstance(result, float)
    assert result == pytest.approx(expected)


def test_code_injection_rejected_without_side_effect(tmp_path: Path):
    target = tmp_path / "pwned"
    expression = f"__import__('os').system('touch {target}')"
    with pytest.raises(UnsafeExpression):
        safe_eval(expression)
    assert not target.exists()
    assert equation_value_equal(expression, "1") is False
    assert not target.exists()


@pytest.mark.parametrize(
    "expression",
    [
        "(1).real",
        "x + 1",
        "abs(-3)",
        "2 ** 10",
        "9**9**9",
        "7 // 2",
        "7 % 2",
        "1 << 3",
        "6 & 3",
        "~1",
        "'abc'",
        "'a' * 3",
        "b'1'",
        "[1, 2]",
        "(1, 2)",
        "lambda: 1",
        "[x for x in (1,)]",
        "(1)[0]",
        "True + 1",
        "1j * 2",
        "not 1",
        "1 < 2",
        "1 if 1 else 2",
        "f'{1}'",
        "(x := 3)",
    ],
)
def test_forbidden_constructs(expression):
    with pytest.raises(UnsafeExpression):
        safe_eval(expression)


@pytest.mark.parametrize(
    "expression",
    [
        "(" * 200 + "1" + ")" * 200,  # over the length bound
        "(" * 100 + "1" + ")" * 100,  # within the length bound, over the nesting bound
        "-" * 200 + "1",  # deep unary chain, too many nodes
        "- " * 70 + "1",  # few nodes, but a tree deeper than the bound
        "+".join(["1"] * 120),  # long left-leaning chain / many nodes
        "1" * 100_000,
        "1 + " * 25_000 + "1",
    ],
)
def test_resource_bounds_rejected_quickly(expression):
    start = time.perf_counter()
    with pytest.raises(UnsafeExpression):
        safe_eval(expression)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize(
    "expression",
    [
        "1e300 * 1e300",
        "1e300",
        "1e999",
        "10000000000 * 10000000000",
        "1 / 0.0000000000000000001",
        "9" * 30,
    ],
)
def test_magnitude_rejected(expression):
    with pytest.raises(UnsafeExpression):
        safe_eval(expression)


@pytest.mark.parametrize("expression", ["1 / 0", "(5 - 5) / (2 - 2)", "3 / (1 - 1.0)"])
def test_division_by_zero(expression):
    with pytest.raises(InvalidExpression) as info:
        safe_eval(expression)
    assert not isinstance(info.value, UnsafeExpression)


@pytest.mark.parametrize("expression", ["", "   ", "1 +", "(1 + 2", "1 2", ")(", "1\x00"])
def test_invalid_syntax(expression):
    with pytest.raises(InvalidExpression):
        safe_eval(expression)


def test_unsafe_is_reported_before_division_by_zero():
    # The whole tree is checked first, so the forbidden name wins over 1 / 0.
    with pytest.raises(UnsafeExpression):
        safe_eval("1 / 0 + x")


def test_exception_hierarchy():
    assert issubclass(UnsafeExpression, InvalidExpression)
    assert issubclass(InvalidExpression, ValueError)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("84 / 2 = 42", "84 / 2"),
        ("( 84.0 / 2.0 )", "( 84.0 / 2.0 )"),
        ("The answer is ( 7.0 * 30.0 )", "( 7.0 * 30.0 )"),
        ("x = 3", ""),
        ("  12 - 5\n", "12 - 5"),
        ("", ""),
    ],
)
def test_extract_equation(text, expected):
    assert extract_equation(text) == expected


def test_equation_value_equal():
    gold = "( 84.0 / 2.0 )"
    assert equation_value_equal("(84 / 2)", gold)
    assert equation_value_equal("( 84.0 / 2.0 ) = 42", gold)
    assert equation_value_equal("21 * 2", gold)
    assert equation_value_equal("( 1.0 / 3.0 )", "0.33333")  # within tolerance
    assert not equation_value_equal("84 + 2", gold)
    assert not equation_value_equal("( 1.0 / 3.0 )", "0.333")
    nested = "(" * 100 + "1" + ")" * 100
    for bad in ["", "garbage", "((((", "9**9**9", "1 / 0", nested, "x" * 100_000]:
        assert equation_value_equal(bad, gold) is False
    assert equation_value_equal("42", "__import__('os')") is False  # bad gold too
    assert equation_value_equal(None, gold) is False


def test_exact_match():
    assert exact_match("  Yes ", "yes")
    assert exact_match("neutral\n", "Neutral")
    assert exact_match("the  river\tbank", "The river bank")
    assert not exact_match("yes", "no")
    assert not exact_match("riverbank", "river bank")
    assert exact_match("", "   ")


def test_score():
    preds, golds = ["(84 / 2)", "1 + 1", "x"], ["( 84.0 / 2.0 )", "3", "1"]
    accuracy, correct = score(preds, golds, "equation")
    assert accuracy == pytest.approx(1 / 3) and correct == [True, False, False]
    assert score(["Yes", "no "], ["yes", "no"], "text") == (1.0, [True, True])
    assert score(["yes"], ["no"], "text") == (0.0, [False])
    assert score([], [], "text") == (0.0, [])
    assert score(("a",), ("A",), "text") == (1.0, [True])  # any sequence
    assert score(["4"], ["( 2 + 2 )"], "text")[0] == 0.0  # text compares the strings, not their values


@pytest.mark.parametrize("answer, gold, kind, right", [
    ("(84 / 2)", "( 84.0 / 2.0 )", "equation", True),  # by value
    ("( 2 + 2 ) = 4", "4", "equation", True),  # the part before "=" counts
    ("x", "1", "equation", False),  # not an equation: wrong, no error
    ("4", "( 2 + 2 )", "text", False),  # text compares the strings
    (" Yes ", "yes", "text", True),
    ("river  bank", "river bank", "text", True),
    (None, "4", "equation", False),  # no answer (no usable CoT, nothing to vote on)
    (None, "yes", "text", False),
])
def test_is_correct(answer, gold, kind, right):
    assert metrics.is_correct(answer, gold, kind) is right


@pytest.mark.parametrize("family, kind", [("svamp", "equation"), ("cqa", "text"), ("anli1", "text")])
def test_family_metric(family, kind):
    assert formats.family_metric(family) == kind


def test_module_never_calls_builtin_evaluators():
    source = Path(metrics.__file__).read_text(encoding="utf-8")
    assert not re.search(r"(^|[^_.a-zA-Z])(eval|exec)\(", source, re.MULTILINE)
    assert "import torch" not in source
