"""Readers for the file formats of the paper's data, and the rules that parse teacher text.

Three layouts exist (see the README's "Data formats"):

* tree-of-thought teacher files ``llm/{split}_CoT_{k}.json``: one record per question holding
  several chains of thought (CoTs) and, per CoT, several self-evaluations;
* prepared JSON-lines files ``<name>_{split}.json`` with ``{"input", "label"}`` per line (or a
  dataset's raw ground-truth fields, such as CQA's ``question``/``choices``);
* the distilling-step-by-step (DSS) layout: ground truth plus ``llm/{split}_CoT_{k}.json`` chunks
  that each hold a JSON list of CoT strings, one per question.

Every reader reports a problem as a :class:`DataError` that names the file, the record and what
was wrong, so a user can find the line. Text parsers return ``None`` for text they cannot parse
and leave the decision (error or skip) to the caller. A file ``X.json`` may also be stored as
``X.json.gz``.
"""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FAMILIES = ("svamp", "cqa", "anli1")
ANLI_LABELS = ("entailment", "neutral", "contradiction")
VERDICTS = ("uncertain", "wrong", "correct")  # checked in this order, as the original code does
# The tree-of-thought evaluator's value of a verdict; a CoT's value sums its self-evaluations' verdicts
# (five of them give the real files' 100.0 / 80.001 / 22.002).
VERDICT_VALUE = {"correct": 20.0, "uncertain": 1.0, "wrong": 0.001}

# Why a record's teacher text is unusable. Teacher LLM output is always messy, so records with these
# problems are skipped (counted and listed) by default; any other problem is structural and stops the run.
NO_ANSWER, NO_VERDICT, NO_EVALUATIONS, TOO_FEW_COTS = "no_answer", "no_verdict", "no_evaluations", "too_few_cots"
MESSY_REASONS = (NO_ANSWER, NO_VERDICT, NO_EVALUATIONS, TOO_FEW_COTS)


def family_metric(family: str) -> str:
    """How a data set family's answers are compared: ``"equation"`` (SVAMP: by value) or ``"text"``
    (the ``kind`` of :func:`mindmirror.evaluation.metrics.is_correct`)."""
    return "equation" if family == "svamp" else "text"


class DataError(ValueError):
    """A data file holds something the trainer cannot use.

    ``path`` and ``record`` (0-based index in the file, ``None`` for the whole file) say where;
    ``cot`` and ``evaluation`` (0-based) narrow it to one CoT of a tree-of-thought record and one
    self-evaluation of that CoT. ``reason`` is one of :data:`MESSY_REASONS` when the problem is messy
    teacher text (skippable by default), else ``None``; ``excerpt`` is a short piece of the offending text.
    """

    def __init__(self, path: str | Path, record: int | None, problem: str, reason: str | None = None,
                 excerpt: str = "", cot: int | None = None, evaluation: int | None = None):
        self.path, self.record, self.problem, self.reason, self.excerpt = str(path), record, problem, reason, excerpt
        self.cot, self.evaluation = cot, evaluation
        where = self.path if record is None else f"{self.path}: record {record}"
        super().__init__(f"{where}: {problem}")


def excerpt(text: str, width: int = 160) -> str:
    """A one-line piece of ``text`` short enough for a log: its start and its end (where truncation shows)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else f"{flat[: width // 2 - 2]} ... {flat[-(width // 2 - 3):]}"


# ---------------------------------------------------------------------------------------------
# Files


def resolve(path: str | Path) -> Path | None:
    """Return ``path`` if it exists, else ``path + '.gz'`` if that exists, else ``None``."""
    path = Path(path)
    if path.exists():
        return path
    gz = path.with_name(path.name + ".gz")
    return gz if gz.exists() else None


def read_text(path: str | Path) -> tuple[Path, str]:
    """Read a (possibly gzipped) UTF-8 file; returns the path actually read and its text."""
    found = resolve(path)
    if found is None:
        raise DataError(path, None, "file not found (nor a .gz copy of it)")
    opener = gzip.open if found.suffix == ".gz" else open
    try:
        with opener(found, "rt", encoding="utf-8") as f:
            return found, f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(found, None, f"cannot be read: {e}") from e


def read_json(path: str | Path):
    """Load one JSON document (a teacher file, SVAMP.json, a DSS chunk)."""
    found, text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(found, None, f"not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from e


def read_jsonl(path: str | Path, on_error=None) -> list[dict | None]:
    """Load a JSON-lines file; a broken line is reported with its record index and line number.

    With ``on_error`` (a callable taking the DataError) a broken line is passed to it and leaves
    ``None`` in its place, so record indices stay aligned with other files; without, it raises.
    """
    found, text = read_text(path)
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise DataError(found, len(rows), f"line {lineno} is a JSON {type(obj).__name__}, expected an object")
        except (json.JSONDecodeError, DataError) as e:
            error = e if isinstance(e, DataError) else \
                DataError(found, len(rows), f"line {lineno} is not valid JSON ({e.msg}, column {e.colno})")
            if on_error is None:
                raise error from e
            on_error(error)
            obj = None
        rows.append(obj)
    return rows


def chunk_files(llm_dir: Path, split: str) -> list[Path]:
    """The teacher files ``{split}_CoT_0.json``, ``_1``, ... in order; they must be consecutive."""
    files = []
    while (found := resolve(llm_dir / f"{split}_CoT_{len(files)}.json")) is not None:
        files.append(found)
    stray = sorted(p.name for p in llm_dir.glob(f"{split}_CoT_*.json*") if p not in files) if llm_dir.is_dir() else []
    if stray:
        raise DataError(llm_dir, None, f"chunk files are not numbered consecutively from 0: found {stray} "
                                       f"but only {[p.name for p in files]} in sequence")
    return files


# ---------------------------------------------------------------------------------------------
# Ground truth


def gt_example(obj: dict, family: str, path: Path, record: int, eos_token: str = "</s>") -> tuple[str, str]:
    """``(input, label)`` of one ground-truth record, in any of the layouts the paper's data uses."""
    try:
        if "input" in obj and "label" in obj and not (family == "anli1" and "premise" in obj):
            text, label = obj["input"], obj["label"]
        elif family == "cqa":
            choices = obj["choices"]
            if len(choices) != 5:
                raise DataError(path, record, f"expected 5 answer choices, found {len(choices)}")
            lines = "\n".join(f"({letter}) {c}" for letter, c in zip("abcde", choices, strict=True))
            text, label = f"{obj['question']}\nAnswer Choices:\n{lines}", obj["answer"]
        elif family == "anli1":
            if obj["label"] not in (0, 1, 2):
                raise DataError(path, record, f"label must be 0, 1 or 2, found {obj['label']!r}")
            text, label = f"{obj['premise']}{eos_token}{obj['hypothesis']}", ANLI_LABELS[obj["label"]]
        elif family == "svamp":
            text, label = f"{obj['Body']}\n{obj['Question']}", obj["Equation"]
        else:
            raise DataError(path, record, "has neither 'input'/'label' nor the dataset's own fields")
    except KeyError as e:
        raise DataError(path, record, f"missing field {e.args[0]!r}") from e
    if not isinstance(text, str) or not isinstance(label, str):
        raise DataError(path, record, "input and label must be strings")
    return text, label.strip()


def svamp_split(problems: list, seed: int = 0, train_fraction: float = 0.8) -> dict[str, list[int]]:
    """The original SVAMP split: a seed-0 permutation, the first 80% (800 of 1,000) for training."""
    idxs = np.random.RandomState(seed=seed).permutation(len(problems))
    n_train = int(round(train_fraction * len(problems)))
    return {"train": idxs[:n_train].tolist(), "test": idxs[n_train:].tolist()}


# ---------------------------------------------------------------------------------------------
# Tree-of-thought teacher records


@dataclass
class TeacherRecord:
    """One question of a tree-of-thought teacher file."""

    source: str
    record: int
    question: str | None  # decoded from the raw ``x`` fragment when possible
    cots: list[str]
    evaluations: list[list[str]]  # evaluations[i] judge cots[i]


def parse_question_fragment(x: str) -> str | None:
    """Decode ``x`` (a raw JSON-lines fragment such as ``"input":"..."``) into the question text."""
    try:
        obj = json.loads("{" + x.strip().rstrip(",") + "}")
    except json.JSONDecodeError:
        return None
    value = obj.get("input") if isinstance(obj, dict) else None
    return value if isinstance(value, str) else None


def teacher_record(obj, path: Path, record: int) -> TeacherRecord:
    """Validate the structure of one teacher record (not its text: see the parsers below)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("steps"), list) or not obj["steps"]:
        raise DataError(path, record, "expected an object with a non-empty 'steps' list")
    step = obj["steps"][0]
    cots = step.get("new_ys") if isinstance(step, dict) else None
    if not isinstance(cots, list) or not all(isinstance(c, str) for c in cots):
        raise DataError(path, record, "steps[0].new_ys must be a list of CoT strings")
    evals = step.get("value_outputs_list", [])
    if not isinstance(evals, list) or not all(
            isinstance(e, list) and all(isinstance(s, str) for s in e) for e in evals):
        raise DataError(path, record, "steps[0].value_outputs_list must be a list of lists of strings")
    x = step.get("x")
    question = parse_question_fragment(x) if isinstance(x, str) else None
    return TeacherRecord(str(path), record, question, cots, evals)


def read_teacher_records(files: list[Path]) -> list[TeacherRecord]:
    """All records of a split's tree-of-thought chunk files, in chunk order."""
    records = []
    for path in files:
        data = read_json(path)
        if not isinstance(data, list):
            raise DataError(path, None, f"expected a JSON list of records, found {type(data).__name__}")
        records.extend(teacher_record(obj, path, i) for i, obj in enumerate(data))
    return records


def read_dss_cots(files: list[Path]) -> list[tuple[str, int, str]]:
    """All CoT strings of a split's DSS chunk files as ``(file, index, text)``, in chunk order."""
    cots = []
    for path in files:
        data = read_json(path)
        if not isinstance(data, list):
            raise DataError(path, None, f"expected a JSON list of CoT strings, found {type(data).__name__}")
        for i, text in enumerate(data):
            if not isinstance(text, str):
                raise DataError(path, i, f"expected a CoT string, found {type(text).__name__}")
            cots.append((str(path), i, text))
    return cots


# ---------------------------------------------------------------------------------------------
# Text parsers (the original code's rules; None where it would have produced a blank row)

_SVAMP_ANSWER = re.compile(r"answer is (.*?)\.")
_SVAMP_KEEP = re.compile(r"[^0-9+\-*/.() ]")
_CQA_ANSWER = re.compile(r'the answer is ("[^"]+"|[a-zA-Z ]+)')
_ANLI_ANSWERS = [(label, re.compile(rf"the answer is ['\"]?{label}['\"]?", re.IGNORECASE)) for label in ANLI_LABELS]
_VERDICTS = [(v, re.compile(rf"given answer is ['\"]?{v}['\"]?", re.IGNORECASE)) for v in VERDICTS]


def tree_cot_rationale(cot: str, family: str) -> str | None:
    """Rationale of a tree-of-thought CoT: the text before the last ``the answer is`` (SVAMP:
    ``answer is``), cut after its last period. ``None`` when the CoT has no such phrase."""
    sep = "answer is " if family == "svamp" else "the answer is "
    # ANLI's answer pattern ignores case, so its rationale split does too ("So The answer is ...").
    at = (cot.lower() if family == "anli1" else cot).rfind(sep)
    if at < 0:
        return None
    before = cot[:at]
    return before[: before.rfind(".") + 1].strip()


def tree_cot_answer(cot: str, family: str) -> str | None:
    """The teacher's answer in a tree-of-thought CoT (the ``llm`` label), or ``None``."""
    if family == "svamp":
        m = _SVAMP_ANSWER.search(cot)
        label = _SVAMP_KEEP.sub("", m.group(1).split("=")[0]).strip() if m else ""
        return label or None
    if family == "cqa":
        m = _CQA_ANSWER.search(cot)
        label = m.group(1).strip('"').strip() if m else ""
        return label or None
    for label, pattern in _ANLI_ANSWERS:
        if pattern.search(cot):
            return label
    return None


def dss_cot(text: str, family: str) -> tuple[str, str] | None:
    """``(rationale, answer)`` of a DSS CoT string, or ``None``.

    Spill-over few-shot text from the first ``Q:`` on is cut off; the string is split at the first
    ``So the answer is`` (CQA, ANLI) or ``The answer is`` (SVAMP).
    """
    text = text.split("Q:")[0]
    sep = "The answer is" if family == "svamp" else "So the answer is"
    if sep not in text:
        return None
    rationale, tail = text.split(sep, 1)
    rationale = rationale.strip()
    if family == "svamp":
        m = re.search(r"\(.*\)", tail)  # greedy within the line: keeps nested parentheses
        answer = m.group(0).strip() if m else ""
    elif family == "cqa":
        parts = re.split(r"\(.\)", tail, maxsplit=1)
        answer = parts[1].strip() if len(parts) == 2 else ""
        answer = answer[:-1] if answer.endswith(".") else answer
    else:
        found = [(tail.lower().find(lab), lab) for lab in ANLI_LABELS if lab in tail.lower()]
        answer = min(found)[1] if found else ""
    return (rationale, answer) if answer else None


def evaluation_verdict(evaluation: str) -> tuple[str, str] | None:
    """``(rationale, verdict)`` of a self-evaluation: the verdict after ``given answer is``, the
    rationale the evaluation without its last line. ``None`` when no verdict is found."""
    for verdict, pattern in _VERDICTS:
        if pattern.search(evaluation):
            return "\n".join(evaluation.rstrip().split("\n")[:-1]).strip(), verdict
    return None


def cot_value(verdicts) -> float:
    """A CoT's tree-of-thought value (``values`` in the teacher files): its verdicts' values, summed."""
    return round(sum(VERDICT_VALUE[v] for v in verdicts), 3)
