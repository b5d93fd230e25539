"""Task metrics: a safe arithmetic evaluator for SVAMP equations, text exact match, and whether an answer
is correct (the one rule the trainer's evaluation and the teacher's data card share).

Model output is untrusted text, so equations are never handed to Python's own
evaluator: they are parsed with ``ast.parse`` and only a tiny arithmetic subset of
the tree is walked and computed here. Everything is bounded (length, bracket depth,
tree depth, node count, magnitude) so adversarial output cannot hang or crash training.
"""

from __future__ import annotations

import ast
import math
import re

__all__ = [
    "InvalidExpression",
    "UnsafeExpression",
    "safe_eval",
    "extract_equation",
    "equation_value_equal",
    "exact_match",
    "is_correct",
    "MAX_EXPRESSION_LENGTH",
    "MAX_DEPTH",
    "MAX_NODES",
    "MAX_MAGNITUDE",
]

MAX_EXPRESSION_LENGTH = 256  # SVAMP equations are a few dozen characters
MAX_DEPTH = 32  # bracket nesting; the tree depth limit is twice this
MAX_NODES = 256  # AST nodes, operators included
MAX_MAGNITUDE = 1e15  # |literal| and |intermediate result|; floats stay exact for ints below

_BINOPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
}
_UNARYOPS = {ast.USub: lambda a: -a, ast.UAdd: lambda a: +a}
_ALLOWED_NODES = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Constant, *_BINOPS, *_UNARYOPS)
# What SVAMP labels are made of; mirrors the original code's filter_string.
_NOT_EQUATION_CHARS = re.compile(r"[^0-9+\-*/.() ]")


class InvalidExpression(ValueError):
    """The expression cannot be evaluated: empty, not valid syntax, or division by zero."""


class UnsafeExpression(InvalidExpression):
    """The expression uses a forbidden construct (names, calls, attributes, strings,
    ``**``, ...) or exceeds a bound (length, nesting, node count, magnitude)."""


def _check_magnitude(value: float) -> float:
    if not math.isfinite(value) or abs(value) > MAX_MAGNITUDE:
        raise UnsafeExpression(f"magnitude above {MAX_MAGNITUDE:g}")
    return value


def _bracket_depth(text: str) -> int:
    # Brackets leave no AST node, so nesting must be measured on the text itself.
    depth = deepest = 0
    for ch in text:
        if ch in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in ")]}":
            depth -= 1
    return deepest


def _validate(tree: ast.AST) -> None:
    """Reject the whole tree before computing anything, so that an unsafe expression
    is always reported as unsafe (not, say, as a division by zero met first)."""
    for count, node in enumerate(ast.walk(tree), 1):  # iterative, so a deep tree cannot overflow the stack
        if count > MAX_NODES:
            raise UnsafeExpression(f"more than {MAX_NODES} nodes")
        if not isinstance(node, _ALLOWED_NODES):
            raise UnsafeExpression(f"forbidden construct: {type(node).__name__}")
        if isinstance(node, ast.Constant):
            # bool is an int subclass; complex and str are not numbers we accept.
            if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
                raise UnsafeExpression(f"forbidden constant: {node.value!r}")
            _check_magnitude(float(node.value))


def _compute(node: ast.AST, depth: int) -> float:
    if depth > 2 * MAX_DEPTH:  # chains like "- - - 1" or "1+1+...+1"
        raise UnsafeExpression(f"expression tree deeper than {2 * MAX_DEPTH}")
    if isinstance(node, ast.Constant):
        return float(node.value)
    if isinstance(node, ast.UnaryOp):
        return _UNARYOPS[type(node.op)](_compute(node.operand, depth + 1))
    if isinstance(node, ast.BinOp):
        left = _compute(node.left, depth + 1)
        right = _compute(node.right, depth + 1)
        if isinstance(node.op, ast.Div) and right == 0:
            raise InvalidExpression("division by zero")
        return _check_magnitude(_BINOPS[type(node.op)](left, right))
    raise UnsafeExpression(f"forbidden construct: {type(node).__name__}")  # _validate guards this


def safe_eval(expression: str) -> float:
    """Compute an arithmetic expression such as ``"( 84.0 / 2.0 )"`` without executing code.

    Only int/float literals, ``+ - * /``, unary ``+``/``-`` and parentheses are allowed.
    Raises ``UnsafeExpression`` for anything else or when a bound is exceeded (checked
    before parsing where possible), and ``InvalidExpression`` for empty input, syntax
    errors and division by zero. Returns a float.
    """
    if not isinstance(expression, str):
        raise InvalidExpression(f"expected str, got {type(expression).__name__}")
    if len(expression) > MAX_EXPRESSION_LENGTH:
        raise UnsafeExpression(f"longer than {MAX_EXPRESSION_LENGTH} characters")
    text = expression.strip()  # leading spaces would be an indentation error
    if not text:
        raise InvalidExpression("empty expression")
    if _bracket_depth(text) > MAX_DEPTH:
        raise UnsafeExpression(f"brackets nested deeper than {MAX_DEPTH}")
    try:
        tree = ast.parse(text, mode="eval")
    except (RecursionError, MemoryError) as exc:
        raise UnsafeExpression("expression too complex to parse") from exc
    except (SyntaxError, ValueError) as exc:  # ValueError: null bytes on some Pythons
        raise InvalidExpression(f"not a valid expression: {exc}") from exc
    _validate(tree)
    try:
        return _compute(tree.body, 1)
    except RecursionError as exc:
        raise UnsafeExpression("expression too deep") from exc


def extract_equation(text: str) -> str:
    """Reduce a predicted label to SVAMP's label alphabet: the part before the first
    ``=``, keeping only ``0-9 + - * / . ( )`` and spaces, stripped."""
    return _NOT_EQUATION_CHARS.sub("", text.split("=", 1)[0]).strip()


def equation_value_equal(pred: str, gold: str, tol: float = 1e-4) -> bool:
    """True when ``extract_equation(pred)`` and ``gold`` both compute and agree within
    ``tol`` (relative or absolute). Bad model output gives False, never an exception."""
    try:
        pred_value = safe_eval(extract_equation(pred))
        gold_value = safe_eval(gold)
    except (InvalidExpression, AttributeError):  # AttributeError: pred not a str
        return False
    return math.isclose(pred_value, gold_value, rel_tol=tol, abs_tol=tol)


def normalize_text(text: str) -> str:
    """Lower case, surrounding whitespace dropped, internal runs of whitespace folded to one space."""
    return " ".join(text.split()).lower()


def exact_match(pred: str, gold: str) -> bool:
    """Compare answers (CQA choices, ANLI labels, verdicts) ignoring case, surrounding
    whitespace and runs of internal whitespace."""
    return normalize_text(pred) == normalize_text(gold)


def is_correct(answer: str | None, gold: str, kind: str) -> bool:
    """Whether ``answer`` is right: by value for ``kind`` ``"equation"``, else as text (:func:`exact_match`).
    No answer (``None``) is wrong."""
    if answer is None:
        return False
    return equation_value_equal(answer, gold) if kind == "equation" else exact_match(answer, gold)
