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
``branch`` (which teacher CoT it came from: its index in the record) and where it came from (``source``,
``record``).

Messy teacher text costs the smallest piece it can: a question trains on its first N usable CoTs
(N = ``--num_train_branches``) and is left out only when fewer than N are usable (self-evaluation data: when
none is); a self-evaluation without a verdict costs its own row. Every unusable piece met is listed
(:class:`Skip`, ``skipped_records.jsonl``).
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
# Bump when the rules that turn the files into rows change: it is part of the tokenized-data cache key (loader.py),
# so tables built by older rules are never reused. 2: unusable CoTs and evaluations are dropped one by one.
ROW_RULES = 2
# What an unusable piece of teacher text cost (Skip.dropped), from the smallest to the largest.
EVALUATION, COT, QUESTION = "evaluation", "cot", "question"
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
        return formats.family_metric(self.family)

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
    """An unusable piece of teacher text (or a bad record), what it cost, and why: one line of
    ``skipped_records.jsonl``.

    ``cot`` and ``evaluation`` say which CoT of the record, and which self-evaluation of that CoT, could not be
    used (``None``: the record as a whole). ``dropped`` says what was left out for it: ``"evaluation"`` (that
    evaluation's row), ``"cot"`` (that CoT's rows: the question used its next usable CoT instead) or ``"question"``
    (the question is out of the split: fewer usable CoTs than asked, or a bad record). A question left out for
    several unusable CoTs has a line for each.
    """

    split: str
    file: str
    record: int | None
    reason: str  # one of formats.MESSY_REASONS, or "bad_record" (skipped under --skip_bad_records)
    problem: str
    excerpt: str = ""
    cot: int | None = None
    evaluation: int | None = None
    dropped: str = QUESTION

    def __str__(self) -> str:
        return str(DataError(self.file, self.record, self.problem))


def _by_reason(skipped: list[Skip]) -> dict[str, int]:
    """How many of ``skipped`` there are for each reason, by reason name."""
    return dict(sorted(collections.Counter(s.reason for s in skipped).items()))


def _reason_counts(skipped: list[Skip]) -> str:
    """The counts of :func:`_by_reason` as text: ``no_answer 3, no_verdict 1``."""
    return ", ".join(f"{k} {v}" for k, v in _by_reason(skipped).items())


def _lost_questions(skipped: list[Skip]) -> list[Skip]:
    """The questions left out, each once (by its first line)."""
    first: dict[tuple, Skip] = {}
    for s in skipped:
        if s.dropped == QUESTION:
            first.setdefault((s.split, s.file, s.record), s)
    return list(first.values())


def _dropped_pieces(skipped: list[Skip]) -> tuple[int, int]:
    """How many CoTs and how many self-evaluations were dropped from questions that were kept."""
    return (len({(s.split, s.file, s.record, s.cot) for s in skipped if s.dropped == COT}),
            sum(s.dropped == EVALUATION for s in skipped))


@dataclass
class BuildReport:
    """What building the rows did: counts per split and the bad records that were skipped."""

    rows: dict[str, int] = field(default_factory=dict)
    questions: dict[str, int] = field(default_factory=dict)
    skipped: list[Skip] = field(default_factory=list)
    cached: bool = False  # set by the loader when the tables came from the cache, not from parsing the files

    def counts(self) -> dict:
        """For ``summary.json``: the lines of ``skipped_records.jsonl`` (``total``, ``by_reason``, ``by_split``), the
        questions left out, and the CoTs and self-evaluations dropped from questions that were kept."""
        cots, evaluations = _dropped_pieces(self.skipped)
        return {"total": len(self.skipped), "questions_left_out": len(_lost_questions(self.skipped)),
                "cots_dropped": cots, "evaluations_dropped": evaluations,
                "by_reason": _by_reason(self.skipped),
                "by_split": dict(collections.Counter(s.split for s in self.skipped))}

    def summary(self, name: str) -> str:
        parts = [f"{split} {self.rows[split]} rows ({self.questions[split]} questions)" for split in self.rows]
        line = f"{name}: " + ", ".join(parts)
        if not self.skipped:
            return line + "; no bad records"
        lost = _lost_questions(self.skipped)
        if lost:
            line += f"; skipped {len(lost)} questions with unusable teacher text ({_reason_counts(lost)}; " \
                    f"first: {lost[0]})"
        pieces = [s for s in self.skipped if s.dropped != QUESTION]
        if pieces:
            cots, evaluations = _dropped_pieces(pieces)
            what = " and ".join(f"{n} {kind}" for n, kind in ((cots, "CoTs"), (evaluations, "self-evaluations")) if n)
            line += f"; dropped {what} with unusable text from questions it kept ({_reason_counts(pieces)}; " \
                    f"first: {pieces[0]})"
        return line

    def to_dict(self) -> dict:
        return {"rows": self.rows, "questions": self.questions,
                "skipped": [dataclasses.asdict(s) for s in self.skipped]}

    @classmethod
    def from_dict(cls, d: dict) -> BuildReport:
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

    def __call__(self, error: DataError, split: str, dropped: str = QUESTION) -> None:
        if self.strict:
            raise DataError(error.path, error.record, error.problem + " (--strict_data stops at the first bad record)")
        if error.reason is None and not self.skip_all:
            raise DataError(error.path, error.record,
                            error.problem + " (pass --skip_bad_records to skip such records and count them)")
        self.report.skipped.append(Skip(split, error.path, error.record, error.reason or "bad_record",
                                        error.problem, error.excerpt, error.cot, error.evaluation, dropped))


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
    # Without chunk files teacher is empty and the questions keep none; with them the counts were checked above.
    for q, t in zip(questions, teacher, strict=False):
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
    fault of the prepared file: it is reported against the teacher file and dropped when the rows are built.
    """
    found = formats.resolve(path)
    if found is None:
        return
    # A record may list fewer evaluation lists than CoTs: the CoTs left without one give no pair (reported as
    # "no self-evaluations" when the rows are built).
    pairs = [(cot, (formats.evaluation_verdict(e) or (None, None))[1])
             for t in teacher for cot, evals in zip(t.cots, t.evaluations, strict=False) for e in evals]
    with_verdict = [(cot, v) for cot, v in pairs if v is not None]
    prepared = formats.read_jsonl(found)
    if len(prepared) not in (len(with_verdict), len(pairs)):
        raise DataError(found, None, f"holds {len(prepared)} (CoT, verdict) rows, but the teacher files give "
                                     f"{len(with_verdict)} evaluations with a verdict ({len(pairs)} in all): the "
                                     "files are out of step")
    expected = with_verdict if len(prepared) == len(with_verdict) else pairs
    for i, (obj, (cot, verdict)) in enumerate(zip(prepared, expected, strict=True)):
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


def _tree1_cot(cot: str, family: str) -> tuple[str, str] | None:
    """``(rationale, answer)`` of a tree-of-thought CoT, or ``None`` when it is unusable. Both must parse whatever
    --label_type says, so gt and llm runs train on the same CoTs."""
    rationale, answer = formats.tree_cot_rationale(cot, family), formats.tree_cot_answer(cot, family)
    return None if rationale is None or answer is None else (rationale, answer)


def _cot_rows(q: _Question, b: int, family: str, model_type: str,
              label_type: str) -> tuple[list[TaskRow], list[DataError]]:
    """The rows CoT ``b`` of a question's tree record gives, and its unusable pieces. A CoT gives one row when its
    answer parses; for self-evaluation training it gives one row per evaluation with a verdict (the others are its
    unusable pieces), and no rows when none has one."""
    t: formats.TeacherRecord = q.teacher
    cot = t.cots[b]
    if model_type != SELF_EVAL:
        parsed = _tree1_cot(cot, family)
        if parsed is None:
            return [], [DataError(t.source, t.record, f"CoT {b} has no parsable answer ('the answer is ...')",
                                  NO_ANSWER, formats.excerpt(cot), cot=b)]
        return [TaskRow(q.input, q.gold if label_type == "gt" else parsed[1], parsed[0], b, t.source, t.record)], []
    evaluations = t.evaluations[b] if b < len(t.evaluations) else []
    if not evaluations:
        return [], [DataError(t.source, t.record, f"CoT {b} has no self-evaluations", NO_EVALUATIONS,
                              formats.excerpt(cot), cot=b)]
    rows, bad = [], []
    for e, evaluation in enumerate(evaluations):
        parsed = formats.evaluation_verdict(evaluation)
        if parsed is None:
            bad.append(DataError(t.source, t.record, f"evaluation {e} of CoT {b} has no verdict ('given answer is "
                                                     "correct/wrong/uncertain')", NO_VERDICT,
                                 formats.excerpt(evaluation), cot=b, evaluation=e))
        else:
            rows.append(TaskRow(cot, parsed[1], parsed[0], b, t.source, t.record))
    return rows, bad


def _tree_rows(q: _Question, family: str, model_type: str, label_type: str, take: int | None,
               need: int) -> tuple[list[TaskRow], list[tuple[DataError, str]]]:
    """Rows of one question from its tree-of-thought record: those of its first ``take`` usable CoTs (every usable
    one when ``None``), in record order. Returns them with each unusable piece met on the way and what it cost
    (:data:`COT` or :data:`EVALUATION`), or, when fewer than ``need`` CoTs are usable, no rows and every piece
    costing the :data:`QUESTION`. CoTs after the first ``take`` usable ones are not read. Raises DataError for a
    record with fewer than ``need`` CoTs written, or one about another question."""
    t: formats.TeacherRecord = q.teacher
    _check_order(q)
    flag = " (--num_train_branches)" if take is not None else ""
    if len(t.cots) < need:
        raise DataError(t.source, t.record, f"has {len(t.cots)} CoTs, fewer than the {need} requested{flag}",
                        TOO_FEW_COTS)
    rows, bad, used = [], [], 0
    for b in range(len(t.cots)):
        if used == take:
            break
        cot_rows, cot_bad = _cot_rows(q, b, family, model_type, label_type)
        used += bool(cot_rows)
        rows += cot_rows
        bad += [(e, EVALUATION if cot_rows else COT) for e in cot_bad]
    if used >= need:
        return rows, bad
    note = " (the question has no usable CoT: left out)" if need == 1 else \
        f" (the question has {used} usable CoTs, fewer than the {need} requested{flag}: left out)"
    return [], [(DataError(e.path, e.record, e.problem + note, e.reason, e.excerpt, e.cot, e.evaluation), QUESTION)
                for e, _ in bad]


def _train_rows(q: _Question, spec: DatasetSpec, model_type: str, label_type: str,
                branches: int) -> tuple[list[TaskRow], list[tuple[DataError, str]]]:
    """Training rows of one question and the unusable pieces dropped (see :func:`_tree_rows`); raises DataError
    when the whole question is unusable in a way no piece explains (no teacher text, a DSS CoT without answer).

    A tree1 question needs ``branches`` usable CoTs, so that every question appears ``branches`` times; a
    self-evaluation question, whose rows are its evaluations with a verdict (a number that varies anyway), needs
    one, and trains on what its first ``branches`` usable CoTs give."""
    if model_type == "standard" and label_type == "gt":  # plain fine-tuning: no teacher text needed
        return [TaskRow(q.input, q.gold, "", 0, q.source, q.record)], []
    if q.teacher is None:
        raise DataError(q.source, q.record, "no teacher CoT for this question (llm/ chunk files missing)")
    if spec.layout == "tree":
        return _tree_rows(q, spec.family, model_type, label_type, branches, 1 if model_type == SELF_EVAL else branches)
    source, index, text = q.teacher
    parsed = formats.dss_cot(text, spec.family)
    if parsed is None:
        raise DataError(source, index, "CoT has no parsable answer ('The answer is (...)' / 'So the answer is')",
                        NO_ANSWER, formats.excerpt(text))
    return [TaskRow(q.input, q.gold if label_type == "gt" else parsed[1], parsed[0], 0, source, index)], []


def _eval_rows(q: _Question, spec: DatasetSpec, model_type: str) -> tuple[list[TaskRow], list[tuple[DataError, str]]]:
    """Evaluation rows: gold labels, one per question, never dropped for its teacher text (the rationale is the
    first usable CoT's, or empty). Self-evaluation data: a row for every evaluation with a verdict, of every CoT;
    the question is left out only when none has one."""
    if model_type == SELF_EVAL:
        return _tree_rows(q, spec.family, model_type, "llm", None, 1)
    _check_order(q)
    rationale = ""
    if isinstance(q.teacher, formats.TeacherRecord):
        rationale = next((p[0] for p in (_tree1_cot(c, spec.family) for c in q.teacher.cots) if p), "")
    elif isinstance(q.teacher, tuple):
        rationale = (formats.dss_cot(q.teacher[2], spec.family) or ("", ""))[0]
    return [TaskRow(q.input, q.gold, rationale, 0, q.source, q.record)], []


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

    Messy teacher text costs the smallest piece it can, and every piece dropped is listed in the report: a
    training question uses its first ``num_train_branches`` usable CoTs (a tree1 CoT is usable when its answer
    parses, a self-evaluation CoT when at least one of its evaluations has a verdict); a tree1 question is left
    out only when fewer are usable, a self-evaluation question only when none is, and a self-evaluation without
    a verdict drops its own row. Evaluation splits keep every question with gold labels (self-evaluation data:
    every evaluation with a verdict). When more than ``max_bad_fraction`` of a split's questions are left out
    (dropped CoTs and evaluations of questions that are kept do not count), the files are probably in another
    format: :class:`DataError`. Structural faults stop with a :class:`DataError`. ``strict_data`` stops at the
    first bad record or piece of any kind; ``skip_bad_records`` skips every bad record, with no threshold.
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
        rows, questions = _split_rows(splits[split], split, spec, model_type, label_type, num_train_branches, skipper)
        out[split] = rows
        report.rows[split], report.questions[split] = len(rows), questions
        if not skip_bad_records:
            _check_bad_fraction(report, split, len(splits[split]), max_bad_fraction, data_dir / spec.name)
        if not rows:
            raise DataError(data_dir / spec.name, None, f"the {split} split has no usable rows")
    return out, report


def _split_rows(questions: list[_Question], split: str, spec: DatasetSpec, model_type: str, label_type: str,
                branches: int, skipper: _Skipper) -> tuple[list[TaskRow], int]:
    """The rows of one split's questions, and how many questions gave rows. Each bad record or piece met goes to
    ``skipper``, which raises or records it in the report."""
    rows, kept = [], 0
    for q in questions:
        try:
            if q.error is not None:
                raise q.error
            rows_q, bad = (_train_rows(q, spec, model_type, label_type, branches) if split == "train"
                           else _eval_rows(q, spec, model_type))
        except DataError as e:
            skipper(e, split)
            continue
        for error, dropped in bad:
            skipper(error, split, dropped)
        rows.extend(rows_q)
        kept += bool(rows_q)
    return rows, kept


def _check_branches_written(questions: list[_Question], branches: int) -> None:
    """Asking for more CoTs than the teacher wrote for any question is a wrong flag, not messy data."""
    written = [len(q.teacher.cots) for q in questions if isinstance(q.teacher, formats.TeacherRecord)]
    if written and max(written) < branches:
        raise DataError(questions[0].teacher.source, None,
                        f"the teacher files hold at most {max(written)} CoTs per question, but "
                        f"--num_train_branches asks for {branches}")


def _check_bad_fraction(report: BuildReport, split: str, total: int, limit: float, where: Path) -> None:
    """Stop when a split is mostly bad: a wrong file or format, not a few messy generations. Counts the questions
    left out; CoTs and evaluations dropped from questions that were kept do not count."""
    bad = _lost_questions([s for s in report.skipped if s.split == split])
    if total and len(bad) / total > limit:
        raise DataError(where, None,
                        f"{len(bad)} of the {total} questions of the {split} split ({len(bad) / total:.1%}) have "
                        f"unusable teacher text ({_reason_counts(bad)}), more than --max_bad_fraction {limit:g}: are "
                        f"these files in the format of this dataset? First: {bad[0]}. To train on the rest anyway, "
                        "raise --max_bad_fraction (or pass --skip_bad_records)")


def row_dicts(rows: list[TaskRow]) -> dict[str, list]:
    """Column-wise dict of rows (for ``datasets.Dataset.from_dict``)."""
    return {f.name: [getattr(r, f.name) for r in rows] for f in dataclasses.fields(TaskRow)}
