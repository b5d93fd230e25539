"""Where the teacher reads questions and writes data: the layouts the trainer reads.

Questions come from any ground-truth layout of ``mindmirror.data.registry``: the DSS layout
(``svamp/SVAMP.json`` with the seed-0 800/200 split, ``cqa/cqa_{split}.json``,
``anli1/anli1_{split}.json``) or a tree dataset's prepared ``<name>_{split}.json``. The output is
the tree-of-thought layout, under ``--output_dir OUT``::

    OUT/<family>_tree1/<family>_tree1_{split}.json   {"input", "label"} per question (ground truth)
    OUT/<family>_tree1/llm/{split}_CoT_{k}.json      teacher records, --chunk_size per file
    OUT/<family>_tree2/<family>_tree2_{split}.json   {"input": CoT, "label": verdict} per self-evaluation
    OUT/<family>_tree2/llm/{split}_CoT_{k}.json      the same teacher records
    OUT/<family>_tree{1,2}/teacher_report.{json,md}  the data card
    OUT/<family>_teacher/                            work folder: response store, one part file per shard

A shard writes its questions' rows to a part file; merging the parts of a split (one part for an
unsharded run) writes the final files, each atomically. Merging is a pure function of the parts,
so shards merged give the same bytes as one run. Rows hold only usable teacher text (see
:mod:`~mindmirror.teacher.replies`): what stayed unusable is left out and listed in the data card.
A split in which no question has a usable CoT is not written at all.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from mindmirror.atomic import write_atomic
from mindmirror.data import formats, registry
from mindmirror.data.formats import DataError
from mindmirror.teacher import report
from mindmirror.teacher.generate import Question

PART_FORMAT = "mindmirror-teacher-part/2"
# Settings that may differ between the shards of one split (where the requests went).
_LOCAL_SETTINGS = ("base_url",)


class NothingUsable(RuntimeError):
    """A split has no question with a usable CoT: there is no data to offer the trainer."""


def source_spec(dataset: str) -> registry.DatasetSpec:
    """The dataset whose ground truth is read: a family (DSS layout) or a ``*_tree1`` dataset."""
    spec = registry.DATASETS.get(dataset)
    if spec is None or spec.name.endswith("_tree2"):
        known = ", ".join(name for name in registry.DATASETS if not name.endswith("_tree2"))
        raise ValueError(f"--dataset {dataset!r}: expected a dataset with ground-truth questions, one of {known}")
    return spec


def dataset_splits(spec: registry.DatasetSpec) -> tuple[str, ...]:
    """The splits the trainer reads for this dataset."""
    return ("train", "valid", "test") if spec.has_valid else ("train", "test")


def read_questions(spec: registry.DatasetSpec, data_dir: Path, split: str) -> list[Question]:
    """The ground-truth questions of ``split`` in the order the trainer reads them."""
    path, entries = registry.read_ground_truth(spec, data_dir, split)
    for entry in entries:
        if isinstance(entry, DataError):
            raise entry
    if not entries:
        raise DataError(path, None, f"no questions in the {split} split")
    return [Question(i, text, label) for i, (_, text, label) in enumerate(entries)]


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not int(m.group(1)) < int(m.group(2)):
        raise ValueError(f"--shard {text!r}: expected i/n with 0 <= i < n, such as 0/4")
    return int(m.group(1)), int(m.group(2))


def shard_range(total: int, shard: tuple[int, int]) -> tuple[int, int]:
    """The contiguous block of question indices shard ``(i, n)`` answers."""
    i, n = shard
    return total * i // n, total * (i + 1) // n


def work_dir(out: Path, family: str) -> Path:
    """The work folder: the response store and the part files."""
    return out / f"{family}_teacher"


def part_path(out: Path, family: str, split: str, shard: tuple[int, int]) -> Path:
    """The part file of shard ``(i, n)`` of ``split``."""
    return work_dir(out, family) / f"{split}.part-{shard[0]}-of-{shard[1]}.json"


def write_part(out: Path, family: str, split: str, shard: tuple[int, int], total: int, settings: dict,
               rows: list[dict]) -> Path:
    """Save one shard's rows of a split."""
    path = part_path(out, family, split, shard)
    part = {"format": PART_FORMAT, "family": family, "split": split, "shard": list(shard),
            "questions_in_split": total, "range": list(shard_range(total, shard)), "settings": settings, "rows": rows}
    write_atomic(path, json.dumps(part, ensure_ascii=True))
    return path


def _read_parts(out: Path, family: str, split: str, shards: int) -> tuple[list[dict], dict]:
    """All rows of a split from its ``shards`` part files, checked to cover it once with one set of settings."""
    parts = []
    for i in range(shards):
        path = part_path(out, family, split, (i, shards))
        if not path.is_file():
            raise DataError(path, None, f"missing: shard {i}/{shards} of the {split} split has not finished "
                                        f"(run it with --shard {i}/{shards})")
        part = formats.read_json(path)
        if not isinstance(part, dict) or part.get("format") != PART_FORMAT:
            raise DataError(path, None, f"not a {PART_FORMAT} file")
        parts.append((path, part))
    first_path, first = parts[0]
    rows = []
    for path, part in parts:
        differ = sorted(k for k in set(part["settings"]) | set(first["settings"]) if k not in _LOCAL_SETTINGS
                        and part["settings"].get(k) != first["settings"].get(k))
        if differ or part["questions_in_split"] != first["questions_in_split"]:
            what = ", ".join(differ) or "the number of questions"
            raise DataError(path, None, f"made with other settings than {first_path.name} ({what} differ): "
                                        "rerun the shards with the same flags")
        if part["range"] != list(shard_range(part["questions_in_split"], tuple(part["shard"]))) or \
                [r["idx"] for r in part["rows"]] != list(range(*part["range"])):
            raise DataError(path, None, "does not hold the questions of its shard")
        rows += part["rows"]
    return rows, first["settings"]


def verdict_values(evaluations: list[list[str]]) -> list[float]:
    """ToT's value of each CoT: its verdicts scored correct 20, uncertain 1, wrong 0.001, summed."""
    values = []
    for evals in evaluations:
        verdicts = [parsed[1] for parsed in map(formats.evaluation_verdict, evals) if parsed is not None]
        values.append(formats.cot_value(verdicts))
    return values


def teacher_records(rows: list[dict], prices: tuple[float, float]) -> list[dict]:
    """Tree-of-thought records of a split, as the original files hold them (``usage_so_far`` cumulative)."""
    records, prompt, completion = [], 0, 0
    for row in rows:
        values = verdict_values(row["evaluations"])
        select = [row["cots"][values.index(max(values))]] if values else []  # greedy: the first best CoT
        prompt += row["prompt_tokens"]
        completion += row["completion_tokens"]
        record = {
            "steps": [{
                "step": 0,
                "x": '"input":' + json.dumps(row["input"], ensure_ascii=True) + "\n",
                "ys": [""],
                "new_ys": row["cots"],
                "value_outputs_list": row["evaluations"],
                "values": values,
                "select_new_ys": select,
            }],
            "idx": row["idx"],
            "ys": select,
            "usage_so_far": {"completion_tokens": completion, "prompt_tokens": prompt,
                             "cost": round((prompt * prices[0] + completion * prices[1]) / 1000, 10)},
        }
        if row["error"]:
            record["error"] = row["error"]  # no CoTs: the trainer skips it when training, tests on its label
        records.append(record)
    return records


def _jsonl(objs) -> str:
    return "\n".join(json.dumps(o, ensure_ascii=True, separators=(",", ":")) for o in objs)  # like the seed files


def _write_chunks(llm_dir: Path, split: str, chunks: list[str]) -> None:
    for k, text in enumerate(chunks):
        write_atomic(llm_dir / f"{split}_CoT_{k}.json", text)
    # A longer earlier output would leave chunks the trainer reads on: remove them (and .gz copies).
    for path in llm_dir.glob(f"{split}_CoT_*.json*"):
        m = re.fullmatch(rf"{re.escape(split)}_CoT_(\d+)\.json(\.gz)?", path.name)
        if m and (int(m.group(1)) >= len(chunks) or m.group(2)):
            path.unlink()


def merge(out: Path, family: str, splits: list[str], shards: int) -> tuple[list[Path], dict]:
    """Write the final tree1/tree2 files and the data card of ``splits`` from their part files.

    Returns the paths written and the data card. Raises :class:`NothingUsable`, writing nothing,
    when a split has no question with a usable CoT.
    """
    tree1, tree2 = out / f"{family}_tree1", out / f"{family}_tree2"
    parts = {split: _read_parts(out, family, split, shards) for split in splits}
    for split, (rows, _) in parts.items():
        if not any(r["cots"] for r in rows):
            failed = sum(1 for r in rows if r["error"])
            raise NothingUsable(f"the {split} split has no question with a usable CoT ({failed} of {len(rows)} "
                                "failed, the others' replies were all unusable): no data written")
    card_path = tree1 / "teacher_report.json"
    card = formats.read_json(card_path) if card_path.is_file() else {}
    card = {"family": family, "splits": card.get("splits", {}) if card.get("family") == family else {}}
    written = []
    for split, (rows, settings) in parts.items():
        records = teacher_records(rows, (settings["prompt_price"], settings["completion_price"]))
        size = settings["chunk_size"]
        chunks = [json.dumps(records[k:k + size], indent=4, ensure_ascii=True) for k in range(0, len(records), size)]
        for folder in (tree1, tree2):
            _write_chunks(folder / "llm", split, chunks)
        gt = _jsonl({"input": r["input"], "label": r["label"]} for r in rows)
        verdicts = _jsonl({"input": cot, "label": formats.evaluation_verdict(e)[1]} for r in rows
                          for cot, evals in zip(r["cots"], r["evaluations"], strict=True) for e in evals)
        for path, text in ((tree1 / f"{family}_tree1_{split}.json", gt),
                           (tree2 / f"{family}_tree2_{split}.json", verdicts)):
            write_atomic(path, text)
            written.append(path)
        written += [folder / "llm" / f"{split}_CoT_{k}.json" for folder in (tree1, tree2) for k in range(len(chunks))]
        card["splits"][split] = report.split_report(rows, records, family, settings)
    order = ("train", "valid", "test")
    card["splits"] = dict(sorted(card["splits"].items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 9))
    for folder in (tree1, tree2):
        write_atomic(folder / "teacher_report.json", json.dumps(card, indent=2, ensure_ascii=True) + "\n")
        write_atomic(folder / "teacher_report.md", report.markdown(card))
        written += [folder / "teacher_report.json", folder / "teacher_report.md"]
    return written, card


def find_shard_counts(out: Path, family: str, split: str) -> list[int]:
    """The shard counts ``n`` for which part files of ``split`` exist."""
    found = set()
    for path in work_dir(out, family).glob(f"{split}.part-*-of-*.json"):
        m = re.fullmatch(rf"{re.escape(split)}\.part-\d+-of-(\d+)\.json", path.name)
        if m:
            found.add(int(m.group(1)))
    return sorted(found)
