"""The datasets mindmirror knows, where their files live, and how they become task rows.

``--data_dir D`` holds one folder per dataset, as in the original code::

    D/svamp/SVAMP.json                      D/svamp/llm/{train,test}_CoT_{k}.json     (DSS layout)
    D/cqa/cqa_{train,test}.json             D/cqa/llm/{train,test}_CoT_{k}.json       (DSS layout)
    D/anli1/anli1_{train,valid,test}.json   D/anli1/llm/{split}_CoT_{k}.json          (DSS layout)
    D/svamp_tree1/svamp_tree1_{train,test}.json   D/svamp_tree1/llm/{split}_CoT_{k}.json (tree)
    D/svamp_tree2/svamp_tree2_{train,test}.json   D/svamp_tree2/llm/{split}_CoT_{k}.json (tree)
    ... and likewise cqa_tree1, cqa_tree2, anli1_tree1, anli1_tree2

A *task row* is what the student trains on: ``input`` (without the ``predict: ``/``explain: ``
prefix), ``label`` (the answer task's target), ``rationale`` (the explain task's target),
``branch`` (which teacher CoT it came from) and where it came from (``source``, ``record``).
"""

from __future__ import annotations

import collections
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mindmirror.data import formats
from mindmirror.data.formats import NO_ANSWER, NO_EVALUATIONS, NO_VERDICT, TOO_FEW_COTS, DataError

SELF_EVAL = "task_prefix_tree2"  # the model type that trains on self-evaluations (verdicts of CoTs)
MODEL_TYPES = ("standard", "task_prefix_tree1", SELF_EVAL)
LABEL_TYPES = ("gt", "llm")
BUNDLED_DATA_DIR = Path(__file__).resolve().parent.parent / "assets" / "data"


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    family: str  # svamp | cqa | anli1: decides parsing rules, input layout and metric
    layout: str  # "dss" or "tree"
    has_valid: bool = False  # ships its own validation split (ANLI)

    @property
    def metric(self) -> str:
        return "equation" if self.family == "svamp" else "text"

    def gt_path(self, data_dir: Path, split: str) -> Path:
        if self.name == "svamp":
            return data_dir / "svamp" / "SVAMP.json"
        return data_dir / self.name / f"{self.name}_{split}.json"

    def llm_dir(self, data_dir: Path) -> Path:
        return data_dir / self.name / "llm"


DATASETS = {
    spec.name: spec
    for family in formats.FAMILIES
    for spec in (
        DatasetSpec(family, family, "dss", has_valid=family == "anli1"),
        DatasetSpec(f"{family}_tree1", family, "tree", has_valid=family == "anli1"),
        DatasetSpec(f"{family}_tree2", family, "tree", has_valid=family == "anli1"),
    )
}


@dataclass
class TaskRow:
    input: str
    label: str
    rationale: str
    branch: int
    source: str
    record: int


@dataclass
class Skip:
    """A question left out of a split, and why (one line of ``skipped_records.jsonl``)."""

    split: str
    file: str
    record: int | None
    reason: str  # one of formats.MESSY_REASONS, or "bad_record" (skipped under --skip_bad_records)
    problem: str
    excerpt: str = ""

    def __str__(self) -> str:
        return str(DataError(self.file, self.record, self.problem))


def _by_reason(skipped: list[Skip]) -> dict[str, int]:
    """How many of ``skipped`` there are for each reason, by reason name."""
    return dict(sorted(collections.Counter(s.reason for s in skipped).items()))


def _reason_counts(skipped: list[Skip]) -> str:
    """The counts of :func:`_by_reason` as text: ``no_answer 3, no_verdict 1``."""
    return ", ".join(f"{k} {v}" for k, v in _by_reason(skipped).items())


@dataclass
class BuildReport:
    """What building the rows did: counts per split and the bad records that were skipped."""

    rows: dict[str, int] = field(default_factory=dict)
    questions: dict[str, int] = field(default_factory=dict)
    skipped: list[Skip] = field(default_factory=list)
    cached: bool = False  # set by the loader when the tables came from the cache, not from parsing the files

    def counts(self) -> dict:
        """Skipped questions in all, by reason and by split (for ``summary.json``)."""
        return {"total": len(self.skipped),
                "by_reason": _by_reason(self.skipped),
                "by_split": dict(collections.Counter(s.split for s in self.skipped))}

    def summary(self, name: str) -> str:
        parts = [f"{split} {self.rows[split]} rows ({self.questions[split]} questions)" for split in self.rows]
        line = f"{name}: " + ", ".join(parts)
        if not self.skipped:
            return line + "; no bad records"
        return line + f"; skipped {len(self.skipped)} questions with unusable teacher text " \
                      f"({_reason_counts(self.skipped)}; first: {self.skipped[0]})"

    def to_dict(self) -> dict:
        return {"rows": self.rows, "questions": self.questions,
                "skipped": [dataclasses.asdict(s) for s in self.skipped]}

    @classmethod
    def from_dict(cls, d: dict) -> "BuildReport":
        return cls(d["rows"], d["questions"], [Skip(**s) for s in d["skipped"]])


@dataclass
class _Question:
    """A question with its gold label and the teacher material that belongs to it."""

    input: str
    gold: str
    source: str
    record: int
    teacher: formats.TeacherRecord | tuple | None = None  # tree record, or (file, index, text) for DSS
    error: DataError | None = None  # a broken ground-truth record, kept as a placeholder for alignment


class _Skipper:
    """Decides what a bad record does: stop the run (raise) or be recorded so the caller drops its question.

    Default: messy teacher text (``error.reason`` set) is skipped, structural faults raise. ``strict``:
    everything raises. ``skip_all`` (--skip_bad_records): every bad record is skipped.
    """

    def __init__(self, report: BuildReport, strict: bool, skip_all: bool):
        self.report, self.strict, self.skip_all = report, strict, skip_all

    def __call__(self, error: DataError, split: str) -> None:
        if self.strict:
            raise DataError(error.path, error.record, error.problem + " (--strict_data stops at the first bad record)")
        if error.reason is None and not self.skip_all:
            raise DataError(error.path, error.record,
                            error.problem + " (pass --skip_bad_records to skip such records and count them)")
        self.report.skipped.append(Skip(split, error.path, error.record, error.reason or "bad_record",
                                        error.problem, error.excerpt))


def _load_questions(spec: DatasetSpec, data_dir: Path, split: str, eos_token: str) -> list[_Question]:
    """Ground truth of one split, with the teacher records attached where the split has them."""
    files = formats.chunk_files(spec.llm_dir(data_dir), split)
    teacher = (formats.read_teacher_records(files) if spec.layout == "tree" else formats.read_dss_cots(files)) \
        if files else []
    if spec.name.endswith("_tree2"):
        # Self-evaluation datasets: the prepared jsonl holds (CoT, verdict) pairs, not questions.
        if not files:
            raise DataError(spec.llm_dir(data_dir), None, f"no {split}_CoT_0.json teacher file")
        _check_tree2_jsonl(spec.gt_path(data_dir, split), teacher)
        return [_Question(t.question or "", "", t.source, t.record, t) for t in teacher]

    path, entries = read_ground_truth(spec, data_dir, split, eos_token)
    questions = [_Question("", "", str(path), e.record, error=e) if isinstance(e, DataError)
                 else _Question(e[1], e[2], str(path), e[0]) for e in entries]
    if files and len(teacher) != len(questions):
        raise DataError(spec.llm_dir(data_dir), None,
                        f"the {split} chunk files ({', '.join(p.name for p in files)}) hold {len(teacher)} "
                        f"records in total, but {path.name} has {len(questions)} questions: "
                        "chunks must add up to the split")
    for q, t in zip(questions, teacher):
        q.teacher = t
    return questions


def read_ground_truth(spec: DatasetSpec, data_dir: Path, split: str,
                      eos_token: str = "</s>") -> tuple[Path, list[tuple[int, str, str] | DataError]]:
    """The ground-truth questions of ``split`` in the order its teacher files follow: ``(record, input, label)``
    for each, or the :class:`DataError` of a broken record, kept in its place so that positions stay aligned
    with the teacher files. Returns the file read too."""
    path = formats.resolve(spec.gt_path(data_dir, split)) or spec.gt_path(data_dir, split)
    if spec.name == "svamp":
        problems = formats.read_json(path)
        if not isinstance(problems, list):
            raise DataError(path, None, "expected a JSON list of SVAMP problems")
        return path, [(i, *formats.gt_example(problems[i], "svamp", path, i))
                      for i in formats.svamp_split(problems)[split]]
    errors: list[DataError] = []
    entries: list[tuple[int, str, str] | DataError] = []
    for i, obj in enumerate(formats.read_jsonl(path, on_error=errors.append)):
        try:
            if obj is None:
                raise errors.pop(0)
            entries.append((i, *formats.gt_example(obj, spec.family, path, i, eos_token)))
        except DataError as e:
            entries.append(e)
    return path, entries


def _check_tree2_jsonl(path: Path, teacher: list[formats.TeacherRecord]) -> None:
    """A tree2 dataset's prepared jsonl must list the teacher's (CoT, verdict) pairs in order.

    The original code wrote it leaving out evaluations without a verdict; other tools write a row for
    every evaluation. Both are accepted (told apart by the row count). A verdict-less evaluation is not a
    fault of the prepared file: the question it belongs to is reported against the teacher file and
    skipped when the rows are built.
    """
    found = formats.resolve(path)
    if found is None:
        return
    pairs = [(cot, (formats.evaluation_verdict(e) or (None, None))[1])
             for t in teacher for cot, evals in zip(t.cots, t.evaluations) for e in evals]
    with_verdict = [(cot, v) for cot, v in pairs if v is not None]
    prepared = formats.read_jsonl(found)
    if len(prepared) not in (len(with_verdict), len(pairs)):
        raise DataError(found, None, f"holds {len(prepared)} (CoT, verdict) rows, but the teacher files give "
                                     f"{len(with_verdict)} evaluations with a verdict ({len(pairs)} in all): the "
                                     "files are out of step")
    expected = with_verdict if len(prepared) == len(with_verdict) else pairs
    for i, (obj, (cot, verdict)) in enumerate(zip(prepared, expected)):
        if str(obj.get("input", "")).strip() != cot.strip() or \
                (verdict is not None and str(obj.get("label", "")).strip() != verdict):
            raise DataError(found, i, "does not match the teacher file's CoT and verdict at this position")


def _check_order(q: _Question) -> None:
    """The teacher record attached to a question must be about that question."""
    t = q.teacher
    if isinstance(t, formats.TeacherRecord) and t.question is not None and q.gold \
            and " ".join(t.question.split()) != " ".join(q.input.split()):
        raise DataError(t.source, t.record, f"question does not match record {q.record} of {q.source}: "
                                            "teacher files and ground truth are out of order")


def _tree_rows(q: _Question, family: str, model_type: str, label_type: str, branches: int) -> list[TaskRow]:
    """Rows of one question from its tree-of-thought record (raises DataError for bad text)."""
    t: formats.TeacherRecord = q.teacher
    _check_order(q)
    if len(t.cots) < branches:
        raise DataError(t.source, t.record, f"has {len(t.cots)} CoTs, fewer than the {branches} requested "
                                            "(--num_train_branches)", TOO_FEW_COTS)
    rows = []
    for b in range(branches):
        cot = t.cots[b]
        if model_type == SELF_EVAL:
            if b >= len(t.evaluations) or not t.evaluations[b]:
                raise DataError(t.source, t.record, f"CoT {b} has no self-evaluations", NO_EVALUATIONS,
                                formats.excerpt(cot))
            for e, evaluation in enumerate(t.evaluations[b]):
                parsed = formats.evaluation_verdict(evaluation)
                if parsed is None:
                    raise DataError(t.source, t.record, f"evaluation {e} of CoT {b} has no verdict "
                                                        "('given answer is correct/wrong/uncertain')", NO_VERDICT,
                                    formats.excerpt(evaluation))
                rows.append(TaskRow(cot, parsed[1], parsed[0], b, t.source, t.record))
            continue
        rationale, answer = formats.tree_cot_rationale(cot, family), formats.tree_cot_answer(cot, family)
        if rationale is None or answer is None:
            raise DataError(t.source, t.record, f"CoT {b} has no parsable answer ('the answer is ...')", NO_ANSWER,
                            formats.excerpt(cot))
        rows.append(TaskRow(q.input, q.gold if label_type == "gt" else answer, rationale, b, t.source, t.record))
    return rows


def _train_rows(q: _Question, spec: DatasetSpec, model_type: str, label_type: str, branches: int) -> list[TaskRow]:
    if model_type == "standard" and label_type == "gt":  # plain fine-tuning: no teacher text needed
        return [TaskRow(q.input, q.gold, "", 0, q.source, q.record)]
    if q.teacher is None:
        raise DataError(q.source, q.record, "no teacher CoT for this question (llm/ chunk files missing)")
    if spec.layout == "tree":
        return _tree_rows(q, spec.family, model_type, label_type, branches)
    source, index, text = q.teacher
    parsed = formats.dss_cot(text, spec.family)
    if parsed is None:
        raise DataError(source, index, "CoT has no parsable answer ('The answer is (...)' / 'So the answer is')",
                        NO_ANSWER, formats.excerpt(text))
    return [TaskRow(q.input, q.gold if label_type == "gt" else parsed[1], parsed[0], 0, source, index)]


def _eval_rows(q: _Question, spec: DatasetSpec, model_type: str) -> list[TaskRow]:
    """Evaluation rows: gold labels, one per question (every self-evaluation for tree2)."""
    if model_type == SELF_EVAL:
        t = q.teacher
        return _tree_rows(q, spec.family, model_type, "llm", len(t.cots)) if t is not None else []
    _check_order(q)
    rationale = ""
    if isinstance(q.teacher, formats.TeacherRecord) and q.teacher.cots:
        rationale = formats.tree_cot_rationale(q.teacher.cots[0], spec.family) or ""
    elif isinstance(q.teacher, tuple):
        rationale = (formats.dss_cot(q.teacher[2], spec.family) or ("", ""))[0]
    return [TaskRow(q.input, q.gold, rationale, 0, q.source, q.record)]


def validate_choice(model_type: str, label_type: str, spec: DatasetSpec, branches: int) -> None:
    """Reject combinations of flags that the dataset cannot serve."""
    if model_type == SELF_EVAL and spec.layout != "tree":
        raise ValueError(f"--model_type {SELF_EVAL} needs self-evaluations, which only tree-of-thought "
                         f"datasets have; {spec.name} is in the DSS layout (use {spec.family}_tree2)")
    if model_type != SELF_EVAL and spec.name.endswith("_tree2"):
        raise ValueError(f"{spec.name} holds self-evaluation rows; --model_type {model_type} trains on "
                         f"questions: use --dataset {spec.family}_tree1")
    if spec.layout == "dss" and branches != 1:
        raise ValueError(f"{spec.name} (DSS layout) has one CoT per question: --num_train_branches must be 1")


def build_task_rows(dataset: str, data_dir: str | Path | None = None, *, model_type: str = "task_prefix_tree1",
                    label_type: str = "gt", num_train_branches: int = 1, valid_fraction: float = 0.1,
                    subsample: float = 1.0, seed: int = 0, skip_bad_records: bool = False,
                    strict_data: bool = False, max_bad_fraction: float = 0.05,
                    eos_token: str = "</s>") -> tuple[dict[str, list[TaskRow]], BuildReport]:
    """Read a dataset's files and return task rows for ``train``, ``valid`` and ``test``.

    The validation split is carved from the training questions with a fixed seed (0), before
    branches are expanded, so no question is in both; datasets with their own validation split
    use it. ``subsample`` keeps that fraction of the remaining training questions (seed ``seed``).

    Bad records: a question whose teacher text cannot be parsed (no answer, no verdict, fewer CoTs than
    asked) is skipped whole and listed in the report, unless more than ``max_bad_fraction`` of a split's
    questions are (then the files are probably in another format: :class:`DataError`). Structural faults
    stop with a :class:`DataError`. ``strict_data`` stops at the first bad record of any kind;
    ``skip_bad_records`` skips every bad record, with no threshold.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(sorted(DATASETS))}")
    spec = DATASETS[dataset]
    validate_choice(model_type, label_type, spec, num_train_branches)
    data_dir = Path(data_dir) if data_dir is not None else BUNDLED_DATA_DIR
    if not (data_dir / spec.name).is_dir():
        raise FileNotFoundError(f"dataset folder {data_dir / spec.name} not found (--data_dir {data_dir})")

    splits = {s: _load_questions(spec, data_dir, s, eos_token)
              for s in (("train", "valid", "test") if spec.has_valid else ("train", "test"))}
    if not spec.has_valid:
        order = np.random.RandomState(seed=0).permutation(len(splits["train"]))
        n_valid = max(1, int(math.ceil(valid_fraction * len(order))))
        splits["valid"] = [splits["train"][i] for i in sorted(order[:n_valid])]
        splits["train"] = [splits["train"][i] for i in sorted(order[n_valid:])]
    if subsample < 1.0:
        keep = np.random.RandomState(seed=seed).permutation(len(splits["train"]))
        keep = sorted(keep[: max(1, int(round(subsample * len(keep))))])
        splits["train"] = [splits["train"][i] for i in keep]

    if spec.layout == "tree" and not (model_type == "standard" and label_type == "gt"):
        _check_branches_written(splits["train"], num_train_branches)
    report = BuildReport()
    skipper = _Skipper(report, strict=strict_data, skip_all=skip_bad_records)
    out: dict[str, list[TaskRow]] = {}
    for split in ("train", "valid", "test"):
        rows, questions = [], 0
        for q in splits[split]:
            try:
                if q.error is not None:
                    raise q.error
                rows_q = (_train_rows(q, spec, model_type, label_type, num_train_branches) if split == "train"
                          else _eval_rows(q, spec, model_type))
            except DataError as e:
                skipper(e, split)
                continue
            rows.extend(rows_q)
            questions += 1
        out[split] = rows
        report.rows[split], report.questions[split] = len(rows), questions
        if not skip_bad_records:
            _check_bad_fraction(report, split, len(splits[split]), max_bad_fraction, data_dir / spec.name)
        if not rows:
            raise DataError(data_dir / spec.name, None, f"the {split} split has no usable rows")
    return out, report


def _check_branches_written(questions: list[_Question], branches: int) -> None:
    """Asking for more CoTs than the teacher wrote for any question is a wrong flag, not messy data."""
    written = [len(q.teacher.cots) for q in questions if isinstance(q.teacher, formats.TeacherRecord)]
    if written and max(written) < branches:
        raise DataError(questions[0].teacher.source, None,
                        f"the teacher files hold at most {max(written)} CoTs per question, but "
                        f"--num_train_branches asks for {branches}")


def _check_bad_fraction(report: BuildReport, split: str, total: int, limit: float, where: Path) -> None:
    """Stop when a split is mostly bad: a wrong file or format, not a few messy generations."""
    bad = [s for s in report.skipped if s.split == split]
    if total and len(bad) / total > limit:
        raise DataError(where, None,
                        f"{len(bad)} of the {total} questions of the {split} split ({len(bad) / total:.1%}) have "
                        f"unusable teacher text ({_reason_counts(bad)}), more than --max_bad_fraction {limit:g}: are "
                        f"these files in the format of this dataset? First: {bad[0]}. To train on the rest anyway, "
                        "raise --max_bad_fraction (or pass --skip_bad_records)")


def row_dicts(rows: list[TaskRow]) -> dict[str, list]:
    """Column-wise dict of rows (for ``datasets.Dataset.from_dict``)."""
    return {f.name: [getattr(r, f.name) for r in rows] for f in dataclasses.fields(TaskRow)}
