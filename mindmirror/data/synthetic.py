"""Deterministic generator of SVAMP-style word problems in the tree-of-thought teacher format.

The real data of the paper (SVAMP questions, a teacher LLM's chains of thought and its
self-evaluations) cannot ship with the package, so mindmirror bundles a synthetic stand-in with
exactly the same file structure as the real ``svamp_tree1`` / ``svamp_tree2`` data
(see ``shared/data/seed-sample`` and ``docs``):

* 38 templates of one- and two-operation word problems (``+ - * /``, exact integer division,
  non-negative integer answers, operands mostly 2..99), each a Body (one or two sentences) and a
  Question, with the gold equation in SVAMP's own format, e.g. ``( 84.0 / 2.0 )`` or
  ``( 10.0 - ( 3.0 + 6.0 ) )``.
* For every question, 5 chains of thought (CoTs) written by a simulated teacher: one or two short
  sentences paraphrased from a few rationale patterns, each ending exactly like the real teacher,
  ``... The answer is (84 / 2).``. About 17% of the CoTs are wrong (wrong operation, swapped
  operands, a miscopied or distractor number, a forgotten step); a wrong CoT states its wrong
  expression consistently (the computation in the reasoning is the final answer). At most 2 of
  the 5 CoTs of a question are wrong, so the majority answer is always right.
* For every CoT, 5 self-evaluations ``"Evaluation:\\n\\n<one or two sentences>\\n\\nEvaluation
  result: the given answer is <verdict>."`` with verdict ``correct`` / ``wrong`` / ``uncertain``:
  right CoT -> correct 91%, uncertain 7%, wrong 2%; wrong CoT -> wrong 86%, uncertain 8%,
  correct 6% (the teacher is a fallible judge, like the real one).
* ``values`` follow the tree-of-thought value map of the real files: each verdict scores
  correct 20, uncertain 1, wrong 0.001, summed over the 5 evaluations (100.0, 80.001, 22.002, ...);
  ``select_new_ys`` / ``ys`` hold the first CoT with the highest value.

Everything is a pure function of the seed (``random.Random(seed)``; no hash seeds, set
iteration or clock), and :func:`write_dataset` writes gzip files with a fixed header
(``mtime=0``, no file name) and fixed JSON formatting, so the bytes are identical run to run
(for a given zlib; the decompressed payload is identical everywhere).

Public API: :func:`generate`, :func:`write_dataset`, :func:`training_corpus`, :class:`Problem`,
plus the small helpers :func:`expr_value`, :func:`gold_label`, :func:`cot_expression`.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from mindmirror.data.formats import VERDICT_VALUE, cot_value

__all__ = [
    "Problem",
    "generate",
    "write_dataset",
    "training_corpus",
    "expr_value",
    "gold_label",
    "cot_expression",
    "dataset_files",
    "DATASET_NAMES",
    "NUM_COTS",
    "NUM_EVALS",
    "VERDICT_VALUE",  # data.formats' own, which the values use
]

NUM_COTS = 5
NUM_EVALS = 5
DATASET_NAMES = ("svamp_tree1", "svamp_tree2")

# How many of the 5 CoTs of a question are wrong (mean 0.85 -> 17% wrong CoTs).
_WRONG_COUNT_WEIGHTS = ((0, 0.40), (1, 0.35), (2, 0.25))
_VERDICTS_IF_RIGHT = (("correct", 0.91), ("uncertain", 0.07), ("wrong", 0.02))
_VERDICTS_IF_WRONG = (("wrong", 0.86), ("uncertain", 0.08), ("correct", 0.06))

# --------------------------------------------------------------------------------------------
# Expressions: an int leaf or a tuple (op, left, right).
# --------------------------------------------------------------------------------------------
Expr = int | tuple
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


def expr_value(e: Expr) -> Fraction:
    """Exact value of an expression tree."""
    if isinstance(e, int):
        return Fraction(e)
    op, left, right = e
    a, b = expr_value(left), expr_value(right)
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if op == "/":
        if b == 0:
            raise ZeroDivisionError("division by zero in expression")
        return a / b
    raise ValueError(f"unknown operator {op!r}")


def gold_label(e: Expr) -> str:
    """SVAMP's equation format: ``( 84.0 / 2.0 )``, ``( ( 10.0 - 3.0 ) - 6.0 )``."""
    if isinstance(e, int):
        return f"{e}.0"
    op, left, right = e
    return f"( {gold_label(left)} {op} {gold_label(right)} )"


def _inline(e: Expr) -> str:
    """Teacher-style infix without the outer parentheses: ``10 - (3 + 6)``, ``10 - 3 - 6``."""
    if isinstance(e, int):
        return str(e)
    op, left, right = e
    ls = _inline(left)
    if not isinstance(left, int) and _PREC[left[0]] < _PREC[op]:
        ls = f"({ls})"
    rs = _inline(right)
    if not isinstance(right, int):
        rs = f"({rs})"
    return f"{ls} {op} {rs}"


def cot_expression(e: Expr) -> str:
    """The expression as the teacher writes it after ``The answer is``: ``(84 / 2)``."""
    return f"({_inline(e)})"


def _is_node(e: Expr) -> bool:
    return not isinstance(e, int)


def _leaves(e: Expr) -> list[int]:
    if isinstance(e, int):
        return [e]
    return _leaves(e[1]) + _leaves(e[2])


def _paths(e: Expr, prefix: tuple = ()) -> list[tuple]:
    """Paths (tuples of 1/2 child indices) of all nodes, leaves included, pre-order."""
    out = [prefix]
    if _is_node(e):
        out += _paths(e[1], prefix + (1,))
        out += _paths(e[2], prefix + (2,))
    return out


def _get(e: Expr, path: tuple) -> Expr:
    for i in path:
        e = e[i]
    return e


def _replace(e: Expr, path: tuple, new: Expr) -> Expr:
    if not path:
        return new
    parts = list(e)
    parts[path[0]] = _replace(e[path[0]], path[1:], new)
    return tuple(parts)


def _simple_phrase(op: str, x: str, y: str) -> str:
    if op == "+":
        return f"add {x} and {y}"
    if op == "-":
        return f"subtract {y} from {x}"
    if op == "*":
        return f"multiply {x} by {y}"
    return f"divide {x} by {y}"


def _verbal(e: Expr) -> str:
    """What the computation does, in words: ``add 3 and 6, then subtract the result from 10``."""
    if isinstance(e, int):
        return f"take {e}"
    op, left, right = e
    if _is_node(left) and _is_node(right):
        return (
            f"{_verbal(left)}, then {_verbal(right)}, then {_simple_phrase(op, 'the first result', 'the second')}"
        )
    if _is_node(left):
        return f"{_verbal(left)}, then {_simple_phrase(op, 'the result', _inline(right))}"
    if _is_node(right):
        return f"{_verbal(right)}, then {_simple_phrase(op, _inline(left), 'the result')}"
    return _simple_phrase(op, str(left), str(right))


def _fmt_value(v: Fraction) -> str:
    if v.denominator == 1:
        return str(v.numerator)
    return f"{float(v):.2f}"


# --------------------------------------------------------------------------------------------
# Vocabulary of the templates.
# --------------------------------------------------------------------------------------------
_NAMES = (
    ("Luke", "he"), ("Faye", "she"), ("Paige", "she"), ("Jack", "he"), ("Mary", "she"),
    ("Tom", "he"), ("Emily", "she"), ("Sam", "he"), ("Lisa", "she"), ("Ben", "he"),
    ("Anna", "she"), ("Mike", "he"), ("Kate", "she"), ("Dan", "he"), ("Rose", "she"),
    ("Paul", "he"), ("Lucy", "she"), ("Adam", "he"), ("Jane", "she"), ("Ryan", "he"),
    ("Nina", "she"), ("Carl", "he"), ("Sara", "she"), ("Owen", "he"), ("Ella", "she"),
    ("Fred", "he"), ("Amy", "she"), ("Jake", "he"), ("Zoe", "she"), ("Nick", "he"),
    ("Ruth", "she"), ("Eric", "he"), ("Beth", "she"), ("Leo", "he"), ("Mia", "she"),
    ("Alan", "he"),
)
_OBJECTS = (
    "marbles", "stickers", "pencils", "crayons", "books", "cards", "stamps", "shells",
    "balloons", "toys", "coins", "buttons", "beads", "rocks", "candies", "erasers",
)
_FOODS = ("apples", "oranges", "cookies", "cupcakes", "muffins", "peaches", "plums", "pears")
_FRUITS = ("apples", "oranges", "peaches", "plums", "pears", "lemons", "cherries", "tomatoes")
_ITEMS = (
    ("book", "books"), ("pen", "pens"), ("toy car", "toy cars"), ("ticket", "tickets"),
    ("shirt", "shirts"), ("game", "games"), ("ball", "balls"), ("hat", "hats"),
)
_CONTAINERS = (("box", "boxes"), ("bag", "bags"), ("jar", "jars"), ("basket", "baskets"), ("pack", "packs"))
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


class _Ctx:
    """Random choices for one problem (names are distinct)."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        people = rng.sample(range(len(_NAMES)), 3)
        self.n1, p1 = _NAMES[people[0]]
        self.n2, _ = _NAMES[people[1]]
        self.n3, _ = _NAMES[people[2]]
        self.he = p1
        self.He = p1.capitalize()
        self.his = "his" if p1 == "he" else "her"
        self.obj = rng.choice(_OBJECTS)
        self.food = rng.choice(_FOODS)
        self.fruit = rng.choice(_FRUITS)
        self.item, self.items = rng.choice(_ITEMS)
        self.box, self.boxes = rng.choice(_CONTAINERS)

    def n(self, lo: int = 2, hi: int = 99) -> int:
        return self.rng.randint(lo, hi)


def _p(body: str, question: str, expr: Expr, fact: str, goal: str, unit: str,
       distractors: tuple = ()) -> dict:
    return {"body": body, "question": question, "expr": expr, "fact": fact, "goal": goal,
            "unit": unit, "distractors": distractors}


# ---- one operation ------------------------------------------------------------------------
def _t_add_bought(c: _Ctx) -> dict:
    a, b = c.n(), c.n()
    return _p(f"{c.n1} had {a} {c.obj}. {c.He} bought {b} more {c.obj} at the store.",
              f"How many {c.obj} does {c.n1} have now?", ("+", a, b),
              f"{c.n1} had {a} {c.obj} and bought {b} more.", f"the number of {c.obj} {c.he} has now", c.obj)


def _t_add_two_people(c: _Ctx) -> dict:
    a, b = c.n(), c.n()
    return _p(f"{c.n1} has {a} {c.obj}. {c.n2} has {b} {c.obj}.",
              f"How many {c.obj} do they have altogether?", ("+", a, b),
              f"{c.n1} has {a} {c.obj} and {c.n2} has {b}.", f"the total number of {c.obj}", c.obj)


def _t_add_picked(c: _Ctx) -> dict:
    a, b = c.n(), c.n()
    return _p(f"{c.n1} picked {a} {c.fruit} in the morning and {b} {c.fruit} in the afternoon.",
              f"How many {c.fruit} did {c.n1} pick in all?", ("+", a, b),
              f"{c.n1} picked {a} {c.fruit} and then {b} more.", f"the number of {c.fruit} {c.he} picked", c.fruit)


def _t_add_distractor(c: _Ctx) -> dict:
    a, b, d = c.n(), c.n(), c.n()
    return _p(f"{c.n1} has {a} red {c.obj} and {b} blue {c.obj}. {c.He} also has {d} {c.boxes}.",
              f"How many {c.obj} does {c.n1} have?", ("+", a, b),
              f"{c.n1} has {a} red and {b} blue {c.obj}.", f"the number of {c.obj} {c.he} has", c.obj, (d,))


def _t_add_more_than(c: _Ctx) -> dict:
    a, b = c.n(), c.n()
    return _p(f"{c.n1} has {a} {c.obj}. {c.n2} has {b} more {c.obj} than {c.n1}.",
              f"How many {c.obj} does {c.n2} have?", ("+", a, b),
              f"{c.n2} has {b} more than the {a} {c.obj} of {c.n1}.", f"the number of {c.obj} {c.n2} has", c.obj)


def _t_sub_gave(c: _Ctx) -> dict:
    a = c.n(10, 99)
    b = c.n(2, a - 1)
    return _p(f"{c.n1} had {a} {c.obj}. {c.He} gave {b} {c.obj} to {c.n2}.",
              f"How many {c.obj} does {c.n1} have left?", ("-", a, b),
              f"{c.n1} had {a} {c.obj} and gave away {b}.", f"the number of {c.obj} left", c.obj)


def _t_sub_more(c: _Ctx) -> dict:
    a = c.n(10, 99)
    b = c.n(2, a - 1)
    return _p(f"{c.n1} has {a} {c.obj}. {c.n2} has {b} {c.obj}.",
              f"How many more {c.obj} does {c.n1} have than {c.n2}?", ("-", a, b),
              f"{c.n1} has {a} {c.obj} and {c.n2} has {b}.", "the difference", c.obj)


def _t_sub_ate(c: _Ctx) -> dict:
    a = c.n(10, 99)
    b = c.n(2, a - 1)
    return _p(f"There were {a} {c.food} on the table. The children ate {b} of them.",
              f"How many {c.food} are left?", ("-", a, b),
              f"There were {a} {c.food} and {b} were eaten.", f"the number of {c.food} left", c.food)


def _t_sub_before(c: _Ctx) -> dict:
    a = c.n(10, 99)
    b = c.n(2, a - 1)
    return _p(f"{c.n1} bought {b} {c.obj} and now has {a} {c.obj}.",
              f"How many {c.obj} did {c.n1} have before?", ("-", a, b),
              f"{c.n1} has {a} {c.obj} after buying {b}.", f"the number of {c.obj} {c.he} had before", c.obj)


def _t_sub_fewer(c: _Ctx) -> dict:
    a = c.n(10, 99)
    b = c.n(2, a - 1)
    return _p(f"{c.n1} has {a} {c.obj}. {c.n2} has {b} fewer {c.obj} than {c.n1}.",
              f"How many {c.obj} does {c.n2} have?", ("-", a, b),
              f"{c.n2} has {b} fewer than the {a} {c.obj} of {c.n1}.", f"the number of {c.obj} {c.n2} has", c.obj)


def _t_mul_rows(c: _Ctx) -> dict:
    a, b, d = c.n(2, 12), c.n(2, 40), c.n(2, 40)
    return _p(f"{c.n1} was placing {c.obj} and {c.food} into {a} rows with {d} {c.food} and {b} {c.obj} in each row.",
              f"How many {c.obj} does {c.he} have?", ("*", a, b),
              f"{c.n1} has {a} rows with {b} {c.obj} in each row.", f"the number of {c.obj}", c.obj, (d,))


def _t_mul_boxes(c: _Ctx) -> dict:
    a, b = c.n(2, 12), c.n(2, 40)
    return _p(f"Each {c.box} holds {b} {c.obj}. {c.n1} has {a} {c.boxes}.",
              f"How many {c.obj} does {c.n1} have?", ("*", a, b),
              f"{c.n1} has {a} {c.boxes} with {b} {c.obj} each.", f"the number of {c.obj}", c.obj)


def _t_mul_pages(c: _Ctx) -> dict:
    a, b = c.n(2, 12), c.n(2, 40)
    return _p(f"{c.n1} reads {b} pages every day.",
              f"How many pages does {c.he} read in {a} days?", ("*", b, a),
              f"{c.n1} reads {b} pages a day for {a} days.", "the number of pages", "pages")


def _t_mul_price(c: _Ctx) -> dict:
    a, b = c.n(2, 12), c.n(2, 40)
    return _p(f"A {c.item} costs {b} dollars.",
              f"How much do {a} {c.items} cost?", ("*", a, b),
              f"One {c.item} costs {b} dollars and we buy {a}.", "the total cost", "dollars")


def _t_mul_times(c: _Ctx) -> dict:
    a, b = c.n(2, 40), c.n(2, 9)
    return _p(f"{c.n1} has {a} {c.obj}. {c.n2} has {b} times as many {c.obj} as {c.n1}.",
              f"How many {c.obj} does {c.n2} have?", ("*", a, b),
              f"{c.n2} has {b} times the {a} {c.obj} of {c.n1}.", f"the number of {c.obj} {c.n2} has", c.obj)


def _t_mul_flowerbeds(c: _Ctx) -> dict:
    a, b = c.n(2, 12), c.n(2, 60)
    return _p(f"{c.n1} was helping plant flowers. They put {a} seeds in each flower bed. If there are {b} flower beds",
              "How many seeds did they plant?", ("*", a, b),
              f"They put {a} seeds in each of {b} flower beds.", "the number of seeds", "seeds")


def _t_div_share(c: _Ctx) -> dict:
    b = c.n(2, 9)
    q = c.n(2, 99 // b)
    return _p(f"{c.n1} has {q * b} {c.obj} and shares them equally among {b} friends.",
              f"How many {c.obj} does each friend get?", ("/", q * b, b),
              f"{c.n1} shares {q * b} {c.obj} among {b} friends.", "the number each friend gets", c.obj)


def _t_div_rounds(c: _Ctx) -> dict:
    b = c.n(2, 9)
    q = c.n(2, 99 // b)
    return _p(f"{c.n1} scored {q * b} points after playing {b} rounds of a trivia game. "
              f"If {c.he} gained the same number of points each round",
              f"How many points did {c.he} score per round?", ("/", q * b, b),
              f"{c.n1} scored {q * b} points in {b} rounds.", "the points per round", "points")


def _t_div_groups(c: _Ctx) -> dict:
    b = c.n(2, 9)
    q = c.n(2, 99 // b)
    return _p(f"There are {q * b} students in a class. The teacher puts them into groups of {b}.",
              "How many groups are there?", ("/", q * b, b),
              f"There are {q * b} students in groups of {b}.", "the number of groups", "groups")


def _t_div_speed(c: _Ctx) -> dict:
    b = c.n(2, 9)
    q = c.n(2, 99 // b)
    return _p(f"A car travels {q * b} miles in {b} hours at the same speed.",
              "How many miles does it travel each hour?", ("/", q * b, b),
              f"The car goes {q * b} miles in {b} hours.", "the miles per hour", "miles")


def _t_div_price(c: _Ctx) -> dict:
    b = c.n(2, 9)
    q = c.n(2, 99 // b)
    return _p(f"{c.n1} spent {q * b} dollars on {b} {c.items}. Each {c.item} had the same price.",
              f"How much did each {c.item} cost?", ("/", q * b, b),
              f"{c.n1} paid {q * b} dollars for {b} {c.items}.", f"the price of one {c.item}", "dollars")


# ---- two operations -----------------------------------------------------------------------
def _t_add_add(c: _Ctx) -> dict:
    a, b, d = c.n(2, 60), c.n(2, 60), c.n(2, 60)
    day1, day2, day3 = c.rng.sample(_DAYS, 3)
    return _p(f"{c.n1} collected {a} shells on {day1}, {b} shells on {day2} and {d} shells on {day3}.",
              f"How many shells did {c.n1} collect?", ("+", ("+", a, b), d),
              f"{c.n1} collected {a}, {b} and {d} shells.", "the total number of shells", "shells")


def _t_sub_sub(c: _Ctx) -> dict:
    a = c.n(20, 99)
    b = c.n(2, a // 2)
    d = c.n(2, a - b - 1)
    return _p(f"{c.n1} had {a} {c.obj}. {c.He} gave {b} to {c.n2} and {d} to {c.n3}.",
              f"How many {c.obj} does {c.n1} have left?", ("-", ("-", a, b), d),
              f"{c.n1} had {a} {c.obj} and gave away {b} and {d}.", f"the number of {c.obj} left", c.obj)


def _t_sub_evening(c: _Ctx) -> dict:
    b, d = c.n(2, 40), c.n(2, 40)
    a = b + d + c.n(1, 40)
    return _p(f"{c.n1} received {b} emails in the morning, {d} emails in the afternoon and some more in the evening. "
              f"If {c.he} received a total of {a} emails in the day",
              f"How many emails did {c.n1} receive in the evening?", ("-", a, ("+", b, d)),
              f"{c.n1} received {a} emails, {b} in the morning and {d} in the afternoon.",
              "the number of evening emails", "emails")


def _t_add_sub(c: _Ctx) -> dict:
    a, b = c.n(2, 60), c.n(2, 60)
    d = c.n(2, a + b - 1)
    return _p(f"{c.n1} had {a} {c.obj}. {c.He} found {b} more and then lost {d} of them.",
              f"How many {c.obj} does {c.n1} have now?", ("-", ("+", a, b), d),
              f"{c.n1} had {a} {c.obj}, found {b} and lost {d}.", f"the number of {c.obj} {c.he} has now", c.obj)


def _t_sub_add(c: _Ctx) -> dict:
    a = c.n(10, 99)
    b = c.n(2, a - 1)
    d = c.n(2, 60)
    return _p(f"There were {a} birds in a tree. {b} birds flew away and then {d} more birds came.",
              "How many birds are in the tree now?", ("+", ("-", a, b), d),
              f"There were {a} birds, {b} flew away and {d} came.", "the number of birds now", "birds")


def _t_mul_add(c: _Ctx) -> dict:
    a, b, d = c.n(2, 9), c.n(2, 20), c.n(2, 60)
    return _p(f"{c.n1} bought {a} {c.boxes} of {c.obj} with {b} {c.obj} in each {c.box}. "
              f"{c.He} already had {d} {c.obj}.",
              f"How many {c.obj} does {c.n1} have now?", ("+", ("*", a, b), d),
              f"{c.n1} bought {a} {c.boxes} of {b} {c.obj} and had {d}.",
              f"the number of {c.obj} {c.he} has now", c.obj)


def _t_mul_sub(c: _Ctx) -> dict:
    a, b = c.n(2, 9), c.n(5, 20)
    d = c.n(2, a * b - 1)
    return _p(f"There are {a} {c.boxes} with {b} {c.fruit} in each {c.box}. {d} of the {c.fruit} are rotten.",
              f"How many good {c.fruit} are there?", ("-", ("*", a, b), d),
              f"There are {a} {c.boxes} of {b} {c.fruit} and {d} are rotten.", f"the number of good {c.fruit}", c.fruit)


def _t_div_add(c: _Ctx) -> dict:
    b = c.n(2, 9)
    q = c.n(2, 99 // b)
    d = c.n(2, 40)
    return _p(f"{c.n1} shared {q * b} {c.obj} equally among {b} friends. "
              f"{c.n2} is one of them and already had {d} {c.obj}.",
              f"How many {c.obj} does {c.n2} have now?", ("+", ("/", q * b, b), d),
              f"Each of {b} friends gets a share of {q * b} {c.obj} and {c.n2} had {d}.",
              f"the number of {c.obj} {c.n2} has now", c.obj)


def _t_div_sub(c: _Ctx) -> dict:
    b = c.n(2, 9)
    q = c.n(3, 99 // b)
    d = c.n(1, q - 1)
    return _p(f"{c.n1} baked {q * b} cookies and put them equally into {b} bags. {c.He} ate {d} cookies from one bag.",
              "How many cookies are left in that bag?", ("-", ("/", q * b, b), d),
              f"{c.n1} put {q * b} cookies into {b} bags and ate {d} from one.",
              "the cookies left in that bag", "cookies")


def _t_add_mul(c: _Ctx) -> dict:
    a, b, d = c.n(2, 20), c.n(2, 20), c.n(2, 9)
    return _p(f"For each party {c.n1} buys {a} red balloons and {b} blue balloons. {c.He} is planning {d} parties.",
              f"How many balloons does {c.n1} buy?", ("*", ("+", a, b), d),
              f"{c.n1} buys {a} red and {b} blue balloons for each of {d} parties.",
              "the number of balloons", "balloons")


def _t_sub_mul(c: _Ctx) -> dict:
    a = c.n(5, 40)
    b = c.n(1, a - 1)
    d = c.n(2, 9)
    return _p(f"A {c.item} costs {a} dollars and {c.n1} has a coupon for {b} dollars off each {c.item}. "
              f"{c.He} buys {d} {c.items}.",
              f"How much does {c.n1} pay?", ("*", ("-", a, b), d),
              f"Each {c.item} costs {a} minus {b} dollars and {c.n1} buys {d}.", "the total cost", "dollars")


def _t_add_div(c: _Ctx) -> dict:
    d = c.n(2, 9)
    total = d * c.n(2, 99 // d)
    a = c.n(1, total - 1)
    b = total - a
    return _p(f"{c.n1} has {a} red marbles and {b} green marbles. {c.He} puts them equally into {d} jars.",
              "How many marbles are in each jar?", ("/", ("+", a, b), d),
              f"{c.n1} has {a} red and {b} green marbles in {d} jars.", "the marbles in each jar", "marbles")


def _t_sub_div(c: _Ctx) -> dict:
    d = c.n(2, 9)
    rest = d * c.n(2, 90 // d)
    b = c.n(2, 99 - rest)
    a = rest + b
    return _p(f"{c.n1} had {a} cards. {c.He} kept {b} cards and shared the rest equally among {d} friends.",
              "How many cards did each friend get?", ("/", ("-", a, b), d),
              f"{c.n1} had {a} cards, kept {b} and shared the rest among {d} friends.",
              "the cards each friend got", "cards")


def _t_mul_mul(c: _Ctx) -> dict:
    a, b, d = c.n(2, 9), c.n(2, 9), c.n(2, 12)
    return _p(f"A library has {a} shelves with {b} boxes on each shelf. Each box holds {d} books.",
              "How many books are there in the library?", ("*", ("*", a, b), d),
              f"There are {a} shelves with {b} boxes of {d} books.", "the number of books", "books")


def _t_sum_more(c: _Ctx) -> dict:
    a, b = c.n(2, 50), c.n(2, 40)
    return _p(f"{c.n1} has {a} {c.obj}. {c.n2} has {b} more {c.obj} than {c.n1}.",
              f"How many {c.obj} do they have together?", ("+", a, ("+", a, b)),
              f"{c.n1} has {a} {c.obj} and {c.n2} has {b} more than that.", "the total they have", c.obj)


def _t_change(c: _Ctx) -> dict:
    b, d = c.n(2, 9), c.n(2, 9)
    a = b * d + c.n(1, 50)
    return _p(f"{c.n1} bought {b} {c.items} that cost {d} dollars each. {c.He} paid with {a} dollars.",
              f"How much change did {c.n1} get?", ("-", a, ("*", b, d)),
              f"{c.n1} paid {a} dollars for {b} {c.items} at {d} dollars each.", "the change", "dollars")


def _t_two_days_read(c: _Ctx) -> dict:
    a, b, d = c.n(2, 40), c.n(2, 40), c.n(2, 9)
    return _p(f"{c.n1} read {a} pages on Monday and {b} pages on Tuesday. "
              f"{c.He} read the same each week for {d} weeks.",
              f"How many pages did {c.n1} read?", ("*", ("+", a, b), d),
              f"{c.n1} read {a} and {b} pages a week for {d} weeks.", "the number of pages", "pages")


TEMPLATES: tuple[Callable[[_Ctx], dict], ...] = (
    _t_add_bought, _t_add_two_people, _t_add_picked, _t_add_distractor, _t_add_more_than,
    _t_sub_gave, _t_sub_more, _t_sub_ate, _t_sub_before, _t_sub_fewer,
    _t_mul_rows, _t_mul_boxes, _t_mul_pages, _t_mul_price, _t_mul_times, _t_mul_flowerbeds,
    _t_div_share, _t_div_rounds, _t_div_groups, _t_div_speed, _t_div_price,
    _t_add_add, _t_sub_sub, _t_sub_evening, _t_add_sub, _t_sub_add, _t_mul_add, _t_mul_sub,
    _t_div_add, _t_div_sub, _t_add_mul, _t_sub_mul, _t_add_div, _t_sub_div, _t_mul_mul,
    _t_sum_more, _t_change, _t_two_days_read,
)


# --------------------------------------------------------------------------------------------
# The simulated teacher.
# --------------------------------------------------------------------------------------------
def _weighted(rng: random.Random, pairs) -> object:
    x = rng.random()
    acc = 0.0
    for value, weight in pairs:
        acc += weight
        if x < acc:
            return value
    return pairs[-1][0]


def _is_valid_wrong(e: Expr, gold: Fraction) -> bool:
    """A wrong expression whose value and intermediate values are non-negative integers."""
    try:
        values = [expr_value(_get(e, p)) for p in _paths(e)]
    except ZeroDivisionError:
        return False
    return values[0] != gold and all(v >= 0 and v.denominator == 1 for v in values)


def _commute(rng: random.Random, e: Expr) -> Expr:
    """A right CoT may write a + b as b + a (as the real teacher does)."""
    if isinstance(e, int):
        return e
    op, left, right = e
    left, right = _commute(rng, left), _commute(rng, right)
    if op in "+*" and rng.random() < 0.3:
        left, right = right, left
    return (op, left, right)


def _mutate(rng: random.Random, e: Expr, gold: Fraction, distractors: tuple) -> Expr:
    """A wrong expression (non-negative integer value, different from gold)."""
    for _ in range(100):
        kind = rng.choice(("op", "op", "swap", "number", "number", "drop"))
        paths = _paths(e)
        nodes = [p for p in paths if _is_node(_get(e, p))]
        leaves = [p for p in paths if not _is_node(_get(e, p))]
        if kind == "op":
            p = rng.choice(nodes)
            op, left, right = _get(e, p)
            new_op = rng.choice([o for o in "+-*/" if o != op])
            cand = _replace(e, p, (new_op, left, right))
        elif kind == "swap":
            sub = [p for p in nodes if _get(e, p)[0] in "-/"]
            if not sub:
                continue
            p = rng.choice(sub)
            op, left, right = _get(e, p)
            cand = _replace(e, p, (op, right, left))
        elif kind == "number":
            p = rng.choice(leaves)
            old = _get(e, p)
            if distractors and rng.random() < 0.5:
                new = rng.choice(distractors)
            else:
                new = old + rng.choice((-1, 1)) * rng.randint(1, 9)
            if new < 1 or new == old:
                continue
            cand = _replace(e, p, new)
        else:  # drop a step: keep one operand of the top operation
            if not (_is_node(e[1]) or _is_node(e[2])):
                continue
            cand = e[1] if _is_node(e[1]) else e[2]
        if _is_valid_wrong(cand, gold):
            return cand
    return ("+", e, 1)  # pragma: no cover - never reached with the shipped templates


def _cot_text(rng: random.Random, info: dict, e: Expr) -> str:
    inline = _inline(e)
    r = _fmt_value(expr_value(e))
    fact, goal, unit = info["fact"], info["goal"], info["unit"]
    end = f" The answer is {cot_expression(e)}."
    patterns = [
        lambda: f"{fact} So {goal} is {inline} = {r}.",
        lambda: f"{fact} We {_verbal(e)}: {inline} = {r}.",
        lambda: f"To find {goal}, we {_verbal(e)}. {inline} = {r} {unit}.",
        lambda: f"{fact} The equation is {inline}.",
        lambda: f"{goal[0].upper()}{goal[1:]} is {inline} = {r}.",
    ]
    if _is_node(e) and (_is_node(e[1]) != _is_node(e[2])):
        inner = e[1] if _is_node(e[1]) else e[2]
        iv = expr_value(inner)
        if iv.denominator == 1:
            outer = (e[0], iv.numerator, e[2]) if _is_node(e[1]) else (e[0], e[1], iv.numerator)
            patterns.append(
                lambda: f"{fact} First {_inline(inner)} = {_fmt_value(iv)}, then {_inline(outer)} = {r}."
            )
    return rng.choice(patterns)() + end


def _evaluation_text(rng: random.Random, info: dict, e: Expr, gold: Expr, verdict: str, right: bool) -> str:
    inline = _inline(e)
    r = _fmt_value(expr_value(e))
    goal = info["goal"]
    if verdict == "correct":
        options = [
            f"The given answer correctly finds {goal} as {inline} = {r}.",
            f"The reasoning is right: {inline} = {r} gives {goal}.",
            f"The given answer uses the right numbers and operation. {inline} = {r} is accurate.",
        ]
    elif verdict == "wrong" and not right:
        g_inline, g_r = _inline(gold), _fmt_value(expr_value(gold))
        options = [
            f"The given answer computes {inline} = {r}, but {goal} is {g_inline} = {g_r}.",
            f"The reasoning is flawed: it should {_verbal(gold)}, not {_verbal(e)}.",
            f"The given answer uses the wrong calculation. {inline} = {r} does not give {goal}.",
        ]
    elif verdict == "wrong":  # a right CoT judged wrong: the teacher errs
        options = [
            f"The given answer uses the wrong calculation. {inline} = {r} does not give {goal}.",
            f"The calculation {inline} = {r} looks incorrect for this question.",
        ]
    else:
        options = [
            f"The given answer computes {inline} = {r}, but it is not clear that this gives {goal}.",
            f"The reasoning may be right, but the question is unclear about {goal}.",
        ]
    text = rng.choice(options)
    return f"Evaluation:\n\n{text}\n\nEvaluation result: the given answer is {verdict}."


@dataclass
class Problem:
    """One synthetic question with its teacher CoTs and self-evaluations."""

    body: str
    question: str
    equation: str  # gold label in SVAMP format, e.g. "( 84.0 / 2.0 )"
    answer: int
    template: str
    cots: list[str] = field(default_factory=list)  # NUM_COTS teacher chains of thought
    cot_correct: list[bool] = field(default_factory=list)
    evaluations: list[list[str]] = field(default_factory=list)  # NUM_COTS x NUM_EVALS
    verdicts: list[list[str]] = field(default_factory=list)  # NUM_COTS x NUM_EVALS

    @property
    def input(self) -> str:
        return self.body + "\n" + self.question

    @property
    def values(self) -> list[float]:
        return [cot_value(vs) for vs in self.verdicts]

    @property
    def best_cot(self) -> str:
        values = self.values
        return self.cots[values.index(max(values))]


def _make_problem(rng: random.Random, template: Callable[[_Ctx], dict]) -> Problem:
    info = template(_Ctx(rng))
    gold_expr = info["expr"]
    gold = expr_value(gold_expr)
    assert gold >= 0 and gold.denominator == 1, (template.__name__, gold_expr)
    n_wrong = _weighted(rng, _WRONG_COUNT_WEIGHTS)
    wrong_slots = set(rng.sample(range(NUM_COTS), n_wrong))
    cots, correct, evals, verdicts = [], [], [], []
    for i in range(NUM_COTS):
        right = i not in wrong_slots
        e = _commute(rng, gold_expr) if right else _mutate(rng, gold_expr, gold, info["distractors"])
        cots.append(_cot_text(rng, info, e))
        correct.append(right)
        vs = [_weighted(rng, _VERDICTS_IF_RIGHT if right else _VERDICTS_IF_WRONG) for _ in range(NUM_EVALS)]
        verdicts.append(vs)
        evals.append([_evaluation_text(rng, info, e, gold_expr, v, right) for v in vs])
    return Problem(
        body=info["body"], question=info["question"], equation=gold_label(gold_expr),
        answer=gold.numerator, template=template.__name__[3:],
        cots=cots, cot_correct=correct, evaluations=evals, verdicts=verdicts,
    )


def generate(seed: int = 0, n_train: int = 6000, n_test: int = 400) -> dict[str, list[Problem]]:
    """``{"train": [...], "test": [...]}`` of distinct problems, a pure function of the arguments."""
    if n_train < 0 or n_test < 0:
        raise ValueError("n_train and n_test must be >= 0")
    rng = random.Random(seed)
    seen: set[str] = set()
    problems: list[Problem] = []
    total = n_train + n_test
    attempts = 0
    while len(problems) < total:
        attempts += 1
        if attempts > 50 * total + 1000:
            raise RuntimeError("could not generate enough distinct problems")
        p = _make_problem(rng, rng.choice(TEMPLATES))
        if p.input in seen:
            continue
        seen.add(p.input)
        problems.append(p)
    return {"train": problems[:n_train], "test": problems[n_train:]}


# --------------------------------------------------------------------------------------------
# Writing the files.
# --------------------------------------------------------------------------------------------
def _json_line(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=True, separators=(",", ":"))


def _teacher_records(problems: list[Problem]) -> list[dict]:
    records = []
    completion = prompt = 0
    for idx, p in enumerate(problems):
        q_tokens = math.ceil(len(p.input) / 4)
        for cot, evs in zip(p.cots, p.evaluations, strict=True):
            completion += math.ceil(len(cot) / 4) + sum(math.ceil(len(ev) / 4) for ev in evs)
            prompt += 250 + q_tokens + NUM_EVALS * (220 + q_tokens + math.ceil(len(cot) / 4))
        best = p.best_cot
        records.append({
            "steps": [{
                "step": 0,
                "x": '"input":' + json.dumps(p.input, ensure_ascii=True) + "\n",
                "ys": [""],
                "new_ys": list(p.cots),
                "value_outputs_list": [list(evs) for evs in p.evaluations],
                "values": p.values,
                "select_new_ys": [best],
            }],
            "idx": idx,
            "ys": [best],
            "usage_so_far": {
                "completion_tokens": completion,
                "prompt_tokens": prompt,
                "cost": prompt * 0.0015 / 1000 + completion * 0.002 / 1000,
            },
        })
    return records


def _gzip_bytes(text: str) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(text.encode("utf-8"))
    return buf.getvalue()


def dataset_files(problems: dict[str, list[Problem]]) -> dict[str, str]:
    """Relative path (without ``.gz``) -> file text, for both datasets and all splits."""
    files: dict[str, str] = {}
    for split in sorted(problems):
        probs = problems[split]
        teacher = json.dumps(_teacher_records(probs), indent=4, ensure_ascii=True)
        files[f"svamp_tree1/svamp_tree1_{split}.json"] = "\n".join(
            _json_line({"input": p.input, "label": p.equation}) for p in probs
        )
        files[f"svamp_tree1/llm/{split}_CoT_0.json"] = teacher
        files[f"svamp_tree2/svamp_tree2_{split}.json"] = "\n".join(
            _json_line({"input": cot, "label": v})
            for p in probs
            for cot, vs in zip(p.cots, p.verdicts, strict=True)
            for v in vs
        )
        files[f"svamp_tree2/llm/{split}_CoT_0.json"] = teacher
    return files


def write_dataset(out_dir: str | Path, problems: dict[str, list[Problem]], compress: bool = True) -> list[Path]:
    """Write ``svamp_tree1`` and ``svamp_tree2`` under ``out_dir``; returns the written paths.

    With ``compress`` (the default, used for the shipped assets) every file is ``<name>.json.gz``,
    gzip with ``mtime=0`` and no stored file name, so the bytes depend only on the content.
    Like the real files, JSON-lines files have no trailing newline.
    """
    out_dir = Path(out_dir)
    written = []
    for rel, text in dataset_files(problems).items():
        path = out_dir / (rel + ".gz" if compress else rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _gzip_bytes(text) if compress else text.encode("utf-8")
        path.write_bytes(data)
        written.append(path)
    return written


def _rationale(text: str, marker: str = "answer is ") -> str:
    """The text before the last ``marker``, cut after its last period (the paper's rule)."""
    head = text[: text.rfind(marker)] if marker in text else text
    return head[: head.rfind(".") + 1] if "." in head else head.strip()


def training_corpus(problems: list[Problem] | dict[str, list[Problem]]) -> list[str]:
    """Texts the trainer tokenizes, for training the tokenizer.

    Per problem: ``predict: `` and ``explain: `` + input, the gold label, then per CoT the CoT,
    its rationale, and per evaluation the evaluation, its rationale (without the last line) and
    the verdict. Accepts a list of problems or the dict returned by :func:`generate`.
    """
    if isinstance(problems, dict):
        problems = [p for split in sorted(problems) for p in problems[split]]
    out: list[str] = []
    for p in problems:
        out += ["predict: " + p.input, "explain: " + p.input, p.equation]
        for cot, evs, vs in zip(p.cots, p.evaluations, p.verdicts, strict=True):
            out += [cot, _rationale(cot)]
            for ev, v in zip(evs, vs, strict=True):
                out += [ev, ev[: ev.rstrip().rfind("\n")].strip(), v]
    return out
