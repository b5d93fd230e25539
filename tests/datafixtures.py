"""Helpers for the data-pipeline tests: a small builder that writes every file layout the trainer
reads (tree-of-thought teacher files, prepared jsonl, the DSS layout, CQA and ANLI ground truth)
into ``tmp_path``, plus :func:`write_seed_format`, two questions per split in the exact form of the
paper's released files (indented teacher records, one-line jsonl with escaped slashes, CoTs that
repeat, answers in two orders, mixed verdicts), written by the project, not copied.

Test modules import this file (``from datafixtures import ...``) and re-export the ``data`` and
``seed_dir`` fixtures. Nothing here imports mindmirror, so the files are written from the format
description (MISSION.md), not from the code under test, and no test reads outside the repository.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

ANLI_NAMES = ("entailment", "neutral", "contradiction")
# Verdicts of the 5 self-evaluations of every CoT in the synthetic data (2 wrong, 1 uncertain).
DEFAULT_VERDICTS = ("correct", "wrong", "correct", "uncertain", "wrong")


# ---------------------------------------------------------------------------------------------
# Synthetic questions


@dataclass
class Q:
    """One synthetic question with its gold label and its teacher material."""

    input: str
    label: str  # gold label
    cots: list[str] = field(default_factory=list)
    evals: list[list[str]] = field(default_factory=list)  # evals[i] judge cots[i]
    llm_labels: list[str] = field(default_factory=list)  # the answer each CoT gives (parsed form)
    rationales: list[str] = field(default_factory=list)  # the rationale each CoT gives (parsed form)


def svamp_evaluation(a: int, b: int, e: int, verdict: str) -> str:
    body = f"Evaluation:\n\nThe given answer adds {a} and {b} (check {e}).\nThe steps are explained."
    return f"{body}\n\nEvaluation result: the given answer is {verdict}."


def evaluation_rationale(a: int, b: int, e: int) -> str:
    return f"Evaluation:\n\nThe given answer adds {a} and {b} (check {e}).\nThe steps are explained."


def svamp_question(i: int, branches: int = 5, evals: int = 5, verdicts=DEFAULT_VERDICTS) -> Q:
    """Question i: 'Jack has a apples ... b more' -> '( a.0 + b.0 )'; CoT k answers '(a + b)'
    (odd k: '(b + a)', so branches differ), each CoT with ``evals`` self-evaluations."""
    a, b = 10 + 3 * i, 2 + i
    q = Q(input=f"Jack has {a} apples. He buys {b} more.\nHow many apples does Jack have now?",
          label=f"( {a}.0 + {b}.0 )")
    for k in range(branches):
        expr = f"({a} + {b})" if k % 2 == 0 else f"({b} + {a})"
        rationale = f"Jack starts with {a} apples (way {k}). He buys {b} more, so he has {expr[1:-1]} = {a + b} apples."
        q.cots.append(f"{rationale} The answer is {expr}.")
        q.rationales.append(rationale)
        q.llm_labels.append(expr)
        q.evals.append([svamp_evaluation(a, b, e, verdicts[e % len(verdicts)]) for e in range(evals)])
    return q


def svamp_questions(n: int, start: int = 0, **kw) -> list[Q]:
    return [svamp_question(i, **kw) for i in range(start, start + n)]


def parse_svamp_numbers(text: str) -> tuple[int, int]:
    """The (a, b) of a synthetic SVAMP question/CoT/label, for alignment checks."""
    import re
    nums = [int(float(x)) for x in re.findall(r"\d+(?:\.\d+)?", text)]
    return nums[0], nums[1]


# ---------------------------------------------------------------------------------------------
# File writers


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1), encoding="utf-8")
    return path


def write_jsonl(path: Path, objs: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(o) + "\n" for o in objs), encoding="utf-8")
    return path


def gzip_file(path: Path) -> Path:
    """Replace ``path`` by ``path.gz``."""
    gz = path.with_name(path.name + ".gz")
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write(path.read_text(encoding="utf-8"))
    path.unlink()
    return gz


def tree_record(idx: int, q: Q) -> dict:
    """A tree-of-thought teacher record in the layout of the paper's files."""
    x = json.dumps({"input": q.input})[1:-1] + "\n"  # raw JSON-lines fragment: "input":"..."
    return {
        "idx": idx,
        "ys": q.cots[:1],
        "usage_so_far": {"completion_tokens": 100, "prompt_tokens": 300, "cost": 0.001},
        "steps": [{
            "step": 0,
            "x": x,
            "ys": [""],
            "new_ys": list(q.cots),
            "value_outputs_list": [list(e) for e in q.evals],
            "values": [100.0] * len(q.cots),
            "select_new_ys": q.cots[:1],
        }],
    }


def split_in_chunks(items: list, sizes: list[int] | None) -> list[list]:
    sizes = sizes or [len(items)]  # sizes need not add up: tests write bad chunkings on purpose
    out, start = [], 0
    for s in sizes:
        out.append(items[start:start + s])
        start += s
    return out


def verdict_of(evaluation: str) -> str | None:
    """The verdict the synthetic evaluations state (last line), None when absent."""
    last = evaluation.strip().split("\n")[-1].lower()
    for v in ("uncertain", "wrong", "correct"):
        if f"given answer is {v}" in last:
            return v
    return None


class DataBuilder:
    """Writes dataset folders under ``root`` (use ``root`` as ``data_dir``)."""

    def __init__(self, root: Path):
        self.root = root

    # -- tree-of-thought layout ----------------------------------------------------------------

    def tree(self, name: str, splits: dict[str, list[Q]], chunks: dict[str, list[int]] | None = None,
             prepared: bool = True) -> Path:
        """``root/name/{name}_{split}.json`` (prepared jsonl) and ``root/name/llm/{split}_CoT_{k}.json``.

        For ``*_tree2`` the prepared jsonl holds one (CoT, verdict) row per evaluation that has a
        verdict; otherwise one ``{"input", "label"}`` row per question.
        """
        folder = self.root / name
        for split, questions in splits.items():
            records = [tree_record(i, q) for i, q in enumerate(questions)]
            for k, part in enumerate(split_in_chunks(records, (chunks or {}).get(split))):
                for j, rec in enumerate(part):
                    rec["idx"] = j
                write_json(folder / "llm" / f"{split}_CoT_{k}.json", part)
            if prepared:
                if name.endswith("_tree2"):
                    rows = [{"input": cot, "label": v} for q in questions
                            for cot, evs in zip(q.cots, q.evals, strict=True)
                            for v in map(verdict_of, evs) if v is not None]
                else:
                    rows = [{"input": q.input, "label": q.label} for q in questions]
                write_jsonl(folder / f"{name}_{split}.json", rows)
        return folder

    def teacher_path(self, name: str, split: str, k: int = 0) -> Path:
        return self.root / name / "llm" / f"{split}_CoT_{k}.json"

    def edit_teacher(self, name: str, split: str, fn, k: int = 0) -> Path:
        """Load a teacher chunk (a JSON list), let ``fn`` change the list in place, write it back."""
        path = self.teacher_path(name, split, k)
        records = json.loads(path.read_text(encoding="utf-8"))
        fn(records)
        write_json(path, records)
        return path

    # -- DSS layout ----------------------------------------------------------------------------

    @staticmethod
    def svamp_problem(i: int) -> dict:
        a, b = 20 + 7 * i, 3 + i
        return {"ID": f"chal-{i}", "Body": f"Mia has {a} stickers. She gets {b} more from her friend.",
                "Question": "How many stickers does Mia have now?", "Equation": f"( {a}.0 + {b}.0 ) ",
                "Answer": float(a + b), "Type": "Addition"}

    @staticmethod
    def svamp_dss_cot(problem: dict) -> str:
        a, b = parse_svamp_numbers(problem["Body"])
        return (f"Mia has {a} stickers and gets {b} more, so she has {a} + {b} = {a + b}. The answer is ({a} + {b})."
                "\n\nQ: Tom has 5 cars and loses 2. How many cars does Tom have?\n"
                "A: Tom has 5 - 2 = 3 cars. The answer is (5 - 2).")

    @staticmethod
    def svamp_split(n: int) -> dict[str, list[int]]:
        """The documented SVAMP split: seed-0 permutation, first 80% train."""
        idx = np.random.RandomState(seed=0).permutation(n)
        n_train = int(round(0.8 * n))
        return {"train": idx[:n_train].tolist(), "test": idx[n_train:].tolist()}

    def svamp_dss(self, n: int = 10, chunks: dict[str, list[int]] | None = None, cot_fn=None) -> list[dict]:
        """``root/svamp/SVAMP.json`` with ``n`` problems and ``llm/{split}_CoT_{k}.json`` chunks in split order."""
        problems = [self.svamp_problem(i) for i in range(n)]
        write_json(self.root / "svamp" / "SVAMP.json", problems)
        cot_fn = cot_fn or self.svamp_dss_cot
        split = self.svamp_split(n)
        chunks = chunks or {"train": [len(split["train"])], "test": [len(split["test"])]}
        for name, order in split.items():
            cots = [cot_fn(problems[i]) for i in order]
            for k, part in enumerate(split_in_chunks(cots, chunks[name])):
                write_json(self.root / "svamp" / "llm" / f"{name}_CoT_{k}.json", part)
        return problems

    @staticmethod
    def cqa_record(i: int) -> dict:
        words = ["river", "desert", "kitchen", "forest", "garage", "office", "bakery", "harbor"]
        choices = [words[(i + j) % len(words)] + " area" * (j == 4) for j in range(5)]
        return {"id": f"q{i}", "question": f"Where would you most likely find item number {i}?",
                "choices": choices, "answer": choices[i % 5],
                "abstractive_explanation": "because", "extractive_explanation": "because"}

    @staticmethod
    def cqa_cot(rec: dict, i: int) -> str:
        # The teacher is wrong on every third question, so llm labels differ from gold ones there.
        pick = (i % 5 + (1 if i % 3 == 2 else 0)) % 5
        letter = "abcde"[pick]
        return (f"Item {i} is usually kept in such a place. So the answer is ({letter}) {rec['choices'][pick]}."
                "\n\nQ: What do people drink?\nAnswer Choices:\n(a) water\n(b) sand\n(c) rock\n(d) air\n(e) fire\n"
                "A: People drink water. So the answer is (a) water.")

    def cqa_dss(self, n_train: int = 6, n_test: int = 3, chunks: dict[str, list[int]] | None = None) -> dict:
        folder = self.root / "cqa"
        out = {}
        for split, n, start in (("train", n_train, 0), ("test", n_test, 100)):
            recs = [self.cqa_record(start + i) for i in range(n)]
            write_jsonl(folder / f"cqa_{split}.json", recs)
            cots = [self.cqa_cot(r, start + i) for i, r in enumerate(recs)]
            for k, part in enumerate(split_in_chunks(cots, (chunks or {}).get(split))):
                write_json(folder / "llm" / f"{split}_CoT_{k}.json", part)
            out[split] = (recs, cots)
        return out

    @staticmethod
    def anli_record(i: int) -> dict:
        return {"uid": f"u{i}", "premise": f"The cat number {i} sat on the mat all day.",
                "hypothesis": f"Cat {i} was {'on the mat' if i % 3 == 0 else 'asleep' if i % 3 == 1 else 'in space'}.",
                "label": i % 3, "reason": "because"}

    @staticmethod
    def anli_cot(rec: dict, i: int) -> str:
        return (f"The premise describes cat {i}. So the answer is {ANLI_NAMES[(rec['label'] + (i % 4 == 3)) % 3]}."
                "\n\nQ: Premise: A dog runs. Hypothesis: An animal moves.\n"
                "A: A dog is an animal. So the answer is entailment.")

    def anli_dss(self, n: dict[str, int] | None = None, with_eval_cots: bool = True) -> dict:
        n = n or {"train": 6, "valid": 3, "test": 3}
        folder = self.root / "anli1"
        out = {}
        for s, (split, count) in enumerate(n.items()):
            recs = [self.anli_record(100 * s + i) for i in range(count)]
            write_jsonl(folder / f"anli1_{split}.json", recs)
            cots = [self.anli_cot(r, 100 * s + i) for i, r in enumerate(recs)]
            if split == "train" or with_eval_cots:
                write_json(folder / "llm" / f"{split}_CoT_0.json", cots)
            out[split] = (recs, cots)
        return out


@pytest.fixture
def data(tmp_path) -> DataBuilder:
    root = tmp_path / "data"
    root.mkdir()
    return DataBuilder(root)


@pytest.fixture
def seed_dir(tmp_path) -> Path:
    """A data folder holding ``svamp_tree1`` and ``svamp_tree2`` in the seed's exact form (see below)."""
    return write_seed_format(tmp_path / "seed-format")


# ---------------------------------------------------------------------------------------------
# The seed's exact form

# (question, gold equation, [(CoT answer, rationale, verdicts of its 5 self-evaluations)]) per split,
# modelled on the released SVAMP sample: identical CoTs, the same answer in two orders, a nested
# equation, one question whose CoTs the teacher doubts.
_SEED_FORM = {
    "train": [
        ("Luke scored 84 points after playing 2 rounds of a trivia game. If he gained the same number of points "
         "each round\nHow many points did he score per round?", "( 84.0 / 2.0 )",
         [("(84 / 2)", "Luke has 84 points from 2 rounds with equal points, so each round gave 84 / 2 points.",
           "ccccc"),
          ("(84 / 2)", "The 84 points are shared equally by the 2 rounds. Therefore, the equation is 84 / 2. \n",
           "ccccc"),
          ("(84 / 2)", "Each of the 2 rounds gave the same points, so one round gave 84 / 2 = 42.", "ccccc"),
          ("(84 / 2)", "He scored 84 / 2 = 42 points per round.", "ccccc"),
          ("(84 / 2)", "He scored 84 / 2 = 42 points per round.", "ccccc")]),
        ("Faye was placing her pencils and crayons into 7 rows with 36 pencils and 30 crayons in each row.\nHow "
         "many crayons does she have?", "( 7.0 * 30.0 )",
         [("(30 * 7)", "Each of the 7 rows holds 30 crayons, so she has 30 * 7 = 210 crayons.", "ccccc"),
          ("(7 * 30)", "There are 7 rows of 30 crayons, so she has 7 * 30 = 210 crayons.", "wcccc"),
          ("(7 * 30)", "There are 7 rows of 30 crayons, so she has 7 * 30 = 210 crayons.", "ccccc"),
          ("(7 * 30)", "The pencils do not matter. In total, she has 7 * 30 = 210 crayons.", "cccwc"),
          ("(7 * 30)", "There are 7 rows of 30 crayons, so she has 7 * 30 = 210 crayons.", "ccccc")]),
    ],
    "test": [
        ("Paige was helping her mom plant flowers and together they planted some seeds. They put 10 seeds in each "
         "flower bed. If there are 45 flowerbeds\nHow many seeds did they plant?", "( 10.0 * 45.0 )",
         [("(10 * 45)", "With 10 seeds in each of 45 beds they planted a total of 10 * 45 = 450 seeds.", "ccccc")]
         * 5),
        ("Jack received 3 emails in the afternoon, 6 emails in the morning and some more in the evening. If he "
         "received a total of 10 emails in the day\nHow many emails did jack receive in the evening?",
         "( 10.0 - ( 6.0 + 3.0 ) )",
         [("(10 - (3 + 6))", "He got 3 + 6 emails before the evening, so 10 - (3 + 6) = 1 email in the evening.",
           "wccww"),
          ("(10 - (3 + 6))", "Of the 10 emails, 3 + 6 came earlier, so 10 - (3 + 6) = 1 email in the evening.",
           "ccccc"),
          ("(10 - (3 + 6))", "He got 3 + 6 emails before the evening, so 10 - (3 + 6) = 1 email in the evening.",
           "wwcwc"),
          ("(10 - 3 - 6)", "Taking away the afternoon and the morning leaves 10 - 3 - 6 = 1 email in the evening.",
           "ucuww"),
          ("(10 - 3 - 6)", "Taking away both leaves 10 - (3 - 6) = 1 email in the evening.", "wwwww")]),
    ],
}
_SEED_VERDICTS = {"c": "correct", "w": "wrong", "u": "uncertain"}
_SEED_VALUE = {"correct": 20.0, "uncertain": 1.0, "wrong": 0.001}  # the tree-of-thought value of a verdict


def _seed_evaluation(rationale: str, k: int, verdict: str) -> str:
    judgement = {"correct": "which is accurate", "wrong": "which does not follow from the question",
                 "uncertain": "but the question leaves the number open"}[verdict]
    return (f"Evaluation:\n\nThe given answer says: {rationale.strip()} Check {k + 1} reads each step, "
            f"{judgement}.\n\nEvaluation result: the given answer is {verdict}.")


def write_seed_format(root: Path) -> Path:
    """Write ``svamp_tree1`` and ``svamp_tree2`` under ``root`` exactly as the released files are laid out.

    Teacher records are a JSON list indented by 4 (keys ``steps, idx, ys, usage_so_far``); the
    prepared files are JSON lines joined by newlines with no final one and ``/`` escaped as ``\\/``
    in tree1 only; the tree2 rows hold one (CoT, verdict) pair per self-evaluation.
    """
    for split, questions in _SEED_FORM.items():
        records, gt, verdict_rows, prompt, completion = [], [], [], 0, 0
        for idx, (question, gold, cots) in enumerate(questions):
            texts = [f"{rationale}{chr(10) if rationale.endswith(chr(10)) else ' '}The answer is {answer}."
                     for answer, rationale, _ in cots]
            evaluations = [[_seed_evaluation(rationale, k, _SEED_VERDICTS[v]) for k, v in enumerate(verdicts)]
                           for _, rationale, verdicts in cots]
            values = [round(sum(_SEED_VALUE[_SEED_VERDICTS[v]] for v in verdicts), 3) for _, _, verdicts in cots]
            best = [texts[values.index(max(values))]]
            prompt, completion = prompt + 7200 + 10 * idx, completion + 2300 + 40 * idx
            records.append({
                "steps": [{"step": 0, "x": '"input":' + json.dumps(question) + "\n", "ys": [""], "new_ys": texts,
                           "value_outputs_list": evaluations, "values": values, "select_new_ys": best}],
                "idx": idx, "ys": best,
                "usage_so_far": {"completion_tokens": completion, "prompt_tokens": prompt,
                                 "cost": round((prompt * 0.0015 + completion * 0.002) / 1000, 7)}})
            gt.append({"input": question, "label": gold})
            verdict_rows += [{"input": text, "label": _SEED_VERDICTS[v]}
                             for text, (_, _, verdicts) in zip(texts, cots, strict=True) for v in verdicts]
        for name, rows in (("svamp_tree1", gt), ("svamp_tree2", verdict_rows)):
            folder = root / name
            (folder / "llm").mkdir(parents=True, exist_ok=True)
            (folder / "llm" / f"{split}_CoT_0.json").write_text(json.dumps(records, indent=4), encoding="utf-8")
            lines = [json.dumps(r, separators=(",", ":")) for r in rows]
            text = "\n".join(lines)
            (folder / f"{name}_{split}.json").write_text(text.replace("/", "\\/") if name == "svamp_tree1" else text,
                                                        encoding="utf-8")
    return root
