"""build_task_rows: the real seed sample, every file layout, branches, bad records and the
validation split. Alignment (each row's input, label and rationale belong together) is checked
on every build, since misaligned rows are the failure the original code is known for."""

from __future__ import annotations

import collections
import json
import math
from pathlib import Path

import pytest

from datafixtures import (  # noqa: F401  (data and seed_dir are fixtures)
    ANLI_NAMES,
    Q,
    data,
    parse_svamp_numbers,
    seed_dir,
    svamp_questions,
    verdict_of,
)
from mindmirror.data.formats import DataError
from mindmirror.data.registry import SELF_EVAL, build_task_rows

VERDICTS = {"correct", "wrong", "uncertain"}


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def questions_of(rows) -> list[str]:
    """Distinct inputs in order of first appearance."""
    return list(dict.fromkeys(r.input for r in rows))


# ---------------------------------------------------------------------------------------------
# Alignment checks for the synthetic tree data


def assert_tree1_aligned(out, train_qs: list[Q], test_qs: list[Q], label_type: str, branches: int):
    by_input = {q.input: q for q in train_qs}
    per_question = collections.defaultdict(list)
    for r in out["train"]:
        q = by_input[r.input]
        assert train_qs[r.record].input == r.input, "row points at another teacher record"
        assert r.label == (q.label if label_type == "gt" else q.llm_labels[r.branch])
        assert r.rationale == q.rationales[r.branch]
        per_question[r.input].append(r.branch)
    assert all(b == list(range(branches)) for b in per_question.values()), per_question
    for r in out["valid"]:
        q = by_input[r.input]
        assert (r.label, r.rationale, r.branch) == (q.label, q.rationales[0], 0)
    test_by_input = {q.input: q for q in test_qs}
    for r in out["test"]:
        q = test_by_input[r.input]
        assert (r.label, r.rationale) == (q.label, q.rationales[0])
    assert not set(per_question) & {r.input for r in out["valid"]}


def assert_tree2_aligned(rows, questions: list[Q]):
    by_cot = {cot: (q, b) for q in questions for b, cot in enumerate(q.cots)}
    for r in rows:
        q, b = by_cot[r.input]
        assert b == r.branch
        assert f"{r.rationale}\n\nEvaluation result: the given answer is {r.label}." in q.evals[b]


def train_indices(data_dir: Path, name: str, train_qs: list[Q], **kw) -> list[int]:
    """Indices (in the train file) of the questions the valid carve leaves in train."""
    out, _ = build_task_rows(name, data_dir, **kw)
    inputs = [q.input for q in train_qs]
    return sorted({inputs.index(r.input) for r in out["train"]})


def strict_then_skipping(dataset: str, root: Path, stops_at: str, **flags):
    """Build ``dataset`` with 5 branches twice: with --strict_data, which must stop at the bad record with a
    message starting ``stops_at``, then by default, which skips its question (one of a tiny split, so the
    share limit is raised). Returns the second build."""
    with pytest.raises(DataError) as err:
        build_task_rows(dataset, root, num_train_branches=5, strict_data=True, **flags)
    assert str(err.value).startswith(stops_at) and "--strict_data" in str(err.value)
    return build_task_rows(dataset, root, num_train_branches=5, max_bad_fraction=0.2, **flags)


# ---------------------------------------------------------------------------------------------
# 1. The real seed sample

SEED_LLM = {"Luke scored": ["(84 / 2)"] * 5, "Faye was": ["(30 * 7)"] + ["(7 * 30)"] * 4}


@pytest.mark.parametrize("branches", [1, 5])
@pytest.mark.parametrize("label_type", ["gt", "llm"])
def test_seed_sample_tree1(seed_dir, label_type, branches):
    out, report = build_task_rows("svamp_tree1", seed_dir, label_type=label_type, num_train_branches=branches)
    train_gt = jsonl(seed_dir / "svamp_tree1" / "svamp_tree1_train.json")
    test_gt = jsonl(seed_dir / "svamp_tree1" / "svamp_tree1_test.json")
    gold = {o["input"]: o["label"] for o in train_gt + test_gt}

    train_q, valid_q = questions_of(out["train"]), questions_of(out["valid"])
    assert len(train_q) == 1 and len(valid_q) == 1  # 2 training questions: 1 carved off for valid
    assert set(train_q) | set(valid_q) == {o["input"] for o in train_gt}
    assert len(out["train"]) == branches and len(out["valid"]) == 1
    assert [r.branch for r in out["train"]] == list(range(branches))
    assert [(r.input, r.label) for r in out["test"]] == [(o["input"], o["label"]) for o in test_gt]
    assert report.rows == {"train": branches, "valid": 1, "test": 2}
    assert report.questions == {"train": 1, "valid": 1, "test": 2}
    assert report.skipped == []

    for r in out["valid"] + out["test"]:
        assert r.label == gold[r.input]
    for r in out["train"]:
        if label_type == "gt":
            assert r.label == gold[r.input]
        else:
            expected = next(v for k, v in SEED_LLM.items() if r.input.startswith(k))
            assert r.label == expected[r.branch]
    for r in out["train"] + out["valid"] + out["test"]:
        assert r.rationale and r.rationale.endswith("."), r.rationale
        assert "answer is" not in r.rationale.lower()


def test_seed_sample_tree1_llm_label_example(seed_dir):
    out, _ = build_task_rows("svamp_tree1", seed_dir, label_type="llm")
    assert [r.label for r in out["train"]] == ["(84 / 2)"]


@pytest.mark.parametrize("branches", [1, 5])
def test_seed_sample_tree2(seed_dir, branches):
    out, report = build_task_rows("svamp_tree2", seed_dir, model_type=SELF_EVAL,
                                  num_train_branches=branches)
    prepared = {s: jsonl(seed_dir / "svamp_tree2" / f"svamp_tree2_{s}.json") for s in ("train", "test")}
    # 5 evaluations per CoT: 5 rows per branch in train, all 25 rows per question in valid/test
    assert len(out["train"]) == 5 * branches and len(out["valid"]) == 25 and len(out["test"]) == 50
    assert report.questions == {"train": 1, "valid": 1, "test": 2}
    assert sorted(collections.Counter(r.branch for r in out["train"]).items()) == [(b, 5) for b in range(branches)]
    for r in out["train"] + out["valid"] + out["test"]:
        assert r.label in VERDICTS
        assert r.rationale.strip()
        assert "Evaluation result" not in r.rationale.splitlines()[-1]
        assert not r.rationale.rstrip().endswith(f"the given answer is {r.label}.")
    # test split: exactly the prepared (CoT, verdict) pairs, in order
    assert [(r.input, r.label) for r in out["test"]] == [(o["input"], o["label"]) for o in prepared["test"]]
    assert collections.Counter(r.label for r in out["test"]) == {"correct": 35, "wrong": 13, "uncertain": 2}
    if branches == 5:
        got = collections.Counter((r.input, r.label) for r in out["train"] + out["valid"] + out["test"])
        want = collections.Counter((o["input"], o["label"]) for o in prepared["train"] + prepared["test"])
        assert got == want


# ---------------------------------------------------------------------------------------------
# 3. DSS layout


def test_dss_svamp_chunks_make_the_seed0_split(data):
    problems = data.svamp_dss(10, chunks={"train": [5, 3], "test": [2]})
    split = data.svamp_split(10)
    for label_type in ("gt", "llm"):
        out, report = build_task_rows("svamp", data.root, label_type=label_type)
        train_valid = out["train"] + out["valid"]
        assert len(train_valid) == 8 and len(out["test"]) == 2
        expected_inputs = {f"{problems[i]['Body']}\n{problems[i]['Question']}" for i in split["train"]}
        assert {r.input for r in train_valid} == expected_inputs
        assert [r.input for r in out["test"]] == [f"{problems[i]['Body']}\n{problems[i]['Question']}"
                                                  for i in split["test"]]
        by_input = {f"{p['Body']}\n{p['Question']}": (i, p) for i, p in enumerate(problems)}
        for r in train_valid + out["test"]:
            i, p = by_input[r.input]
            a, b = parse_svamp_numbers(p["Body"])
            is_train_row = r in out["train"]
            assert r.label == (f"({a} + {b})" if label_type == "llm" and is_train_row else p["Equation"].strip())
            assert r.rationale == f"Mia has {a} stickers and gets {b} more, so she has {a} + {b} = {a + b}."
            if is_train_row:  # the row points at the chunk and index that hold its CoT
                pos = split["train"].index(i)
                assert (Path(r.source).name, r.record) == \
                    (("train_CoT_0.json", pos) if pos < 5 else ("train_CoT_1.json", pos - 5))
        assert report.skipped == []


@pytest.mark.parametrize("skip", [False, True])
def test_dss_chunks_that_do_not_add_up(data, skip):
    data.svamp_dss(10, chunks={"train": [5, 2], "test": [2]})  # 7 CoTs for 8 training problems
    with pytest.raises(DataError) as err:
        build_task_rows("svamp", data.root, skip_bad_records=skip)
    msg = str(err.value)
    assert str(data.root / "svamp" / "llm") in msg
    assert "7" in msg and "8" in msg and "train_CoT_0.json" in msg and "train_CoT_1.json" in msg


def test_dss_non_consecutive_chunks(data):
    data.svamp_dss(10, chunks={"train": [5, 3], "test": [2]})
    llm = data.root / "svamp" / "llm"
    (llm / "train_CoT_1.json").rename(llm / "train_CoT_2.json")
    with pytest.raises(DataError) as err:
        build_task_rows("svamp", data.root)
    assert str(llm) in str(err.value) and "train_CoT_2.json" in str(err.value)


def test_dss_cqa(data):
    written = data.cqa_dss(n_train=6, n_test=3, chunks={"train": [4, 2], "test": [3]})
    recs = {f"{r['question']}\nAnswer Choices:\n"
            + "\n".join(f"({k}) {c}" for k, c in zip("abcde", r["choices"], strict=True)):
            (r, cot) for split in ("train", "test") for r, cot in zip(*written[split], strict=True)}
    for label_type in ("gt", "llm"):
        out, _ = build_task_rows("cqa", data.root, label_type=label_type)
        assert len(out["train"]) + len(out["valid"]) == 6 and len(out["test"]) == 3
        for split, rows in out.items():
            for r in rows:
                rec, cot = recs[r.input]  # KeyError: input not in the documented layout
                teacher_label = cot.split("So the answer is (")[1].split(") ", 1)[1].split(".\n")[0]
                assert r.label == (teacher_label if label_type == "llm" and split == "train" else rec["answer"])
                assert r.rationale.startswith("Item ") and r.rationale.endswith("kept in such a place.")
        if label_type == "llm":  # the teacher is wrong on some questions: llm labels are its answers
            assert any(r.label != recs[r.input][0]["answer"] for r in out["train"])
    assert [r.input.split("\n")[0] for r in out["test"]] == [r["question"] for r in written["test"][0]]


def test_dss_anli_uses_its_own_valid_split(data):
    written = data.anli_dss({"train": 6, "valid": 3, "test": 3})
    for label_type in ("gt", "llm"):
        out, report = build_task_rows("anli1", data.root, label_type=label_type)
        for split in ("train", "valid", "test"):
            recs, cots = written[split]
            rows = out[split]
            assert [r.input for r in rows] == [f"{o['premise']}</s>{o['hypothesis']}" for o in recs]
            if split == "train" and label_type == "llm":
                assert [r.label for r in rows] == [c.split("So the answer is ")[1].split(".")[0] for c in cots]
            else:
                assert [r.label for r in rows] == [ANLI_NAMES[o["label"]] for o in recs]
        assert report.questions == {"train": 6, "valid": 3, "test": 3}  # no carve from train
    assert {r.label for r in out["valid"]} <= set(ANLI_NAMES)


def test_dss_anli_custom_eos_token(data):
    data.anli_dss({"train": 3, "valid": 1, "test": 1})
    out, _ = build_task_rows("anli1", data.root, eos_token="<EOS>")
    assert all("<EOS>" in r.input and "</s>" not in r.input for r in out["train"])


# ---------------------------------------------------------------------------------------------
# 4. Branches


@pytest.fixture
def tree1(data):
    """svamp_tree1 with 10 training and 3 test questions, 5 CoTs each."""
    train_qs, test_qs = svamp_questions(10), svamp_questions(3, start=50)
    data.tree("svamp_tree1", {"train": train_qs, "test": test_qs})
    return data, train_qs, test_qs


@pytest.mark.parametrize("label_type", ["gt", "llm"])
@pytest.mark.parametrize("branches", [1, 2, 5])
def test_branches_expand_each_question(tree1, branches, label_type):
    data, train_qs, test_qs = tree1
    out, report = build_task_rows("svamp_tree1", data.root, label_type=label_type, num_train_branches=branches)
    n_train_q = report.questions["train"]
    assert n_train_q + report.questions["valid"] == 10
    assert len(out["train"]) == branches * n_train_q
    assert len(out["valid"]) == report.questions["valid"] and len(out["test"]) == 3
    assert_tree1_aligned(out, train_qs, test_qs, label_type, branches)


def test_more_branches_than_cots(data):
    train_qs = svamp_questions(6, branches=3)
    data.tree("svamp_tree1", {"train": train_qs, "test": svamp_questions(2, start=50)})
    build_task_rows("svamp_tree1", data.root, num_train_branches=3)  # fine
    with pytest.raises(DataError) as err:  # every question short: a wrong flag, not messy data, so never skipped
        build_task_rows("svamp_tree1", data.root, num_train_branches=5, max_bad_fraction=1.0)
    assert err.value.path.endswith("train_CoT_0.json")
    assert "at most 3 CoTs per question, but --num_train_branches asks for 5" in str(err.value)


def test_dss_layout_rejects_several_branches(data):
    data.svamp_dss(10)
    with pytest.raises(ValueError, match="num_train_branches"):
        build_task_rows("svamp", data.root, num_train_branches=2)
    with pytest.raises(ValueError, match="svamp_tree2"):
        build_task_rows("svamp", data.root, model_type=SELF_EVAL)


def test_tree2_dataset_needs_tree2_model_type(data):
    data.tree("svamp_tree2", {"train": svamp_questions(4), "test": svamp_questions(2, start=50)})
    with pytest.raises(ValueError, match="svamp_tree1"):
        build_task_rows("svamp_tree2", data.root, model_type="task_prefix_tree1")


# ---------------------------------------------------------------------------------------------
# 5. Bad data


def test_broken_json_line_in_jsonl(tree1):
    data, train_qs, test_qs = tree1
    i = train_indices(data.root, "svamp_tree1", train_qs)[2]
    path = data.root / "svamp_tree1" / "svamp_tree1_train.json"
    lines = path.read_text().splitlines()
    lines[i] = lines[i][:25]  # truncated line
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        build_task_rows("svamp_tree1", data.root)
    msg = str(err.value)
    assert "svamp_tree1_train.json" in msg and f"record {i}" in msg and f"line {i + 1}" in msg


def test_broken_json_line_in_jsonl_is_skipped(tree1):
    """--skip_bad_records drops the question of a broken ground-truth line and keeps the rest of
    the split (and its teacher records) aligned."""
    data, train_qs, test_qs = tree1
    i = train_indices(data.root, "svamp_tree1", train_qs)[2]
    path = data.root / "svamp_tree1" / "svamp_tree1_train.json"
    lines = path.read_text().splitlines()
    lines[i] = lines[i][:25]
    path.write_text("\n".join(lines) + "\n")
    out, report = build_task_rows("svamp_tree1", data.root, skip_bad_records=True, num_train_branches=2)
    assert len(report.skipped) == 1 and f"record {i}" in str(report.skipped[0])
    assert report.skipped[0].reason == "bad_record"
    assert report.questions["train"] + report.questions["valid"] == 9
    assert train_qs[i].input not in {r.input for r in out["train"] + out["valid"]}
    assert_tree1_aligned(out, train_qs, test_qs, "gt", 2)


def _corrupt_cot(data, i, branch, text="I think it is about seven apples, roughly"):
    def edit(records):
        records[i]["steps"][0]["new_ys"][branch] = text
    return data.edit_teacher("svamp_tree1", "train", edit)


@pytest.mark.parametrize("label_type", ["gt", "llm"])
def test_cot_without_parsable_answer(tree1, label_type):
    data, train_qs, test_qs = tree1
    i = train_indices(data.root, "svamp_tree1", train_qs)[3]
    path = _corrupt_cot(data, i, branch=3)
    # branch 3 is not used with 1 branch
    _, report = build_task_rows("svamp_tree1", data.root, label_type=label_type, num_train_branches=1)
    assert report.skipped == []
    # --strict_data stops at it; by default, with 5 branches, the question has 4 usable CoTs and is skipped (1 of 9
    # here, so the share limit is raised for this tiny split).
    out, report = strict_then_skipping("svamp_tree1", data.root, f"{path}: record {i}: CoT 3 has no parsable answer",
                                       label_type=label_type)
    assert len(report.skipped) == 1 and str(report.skipped[0]).startswith(f"{path}: record {i}: CoT 3")
    skip = report.skipped[0]
    assert (skip.split, skip.file, skip.record, skip.reason) == ("train", str(path), i, "no_answer")
    assert (skip.cot, skip.evaluation, skip.dropped) == (3, None, "question")
    assert "4 usable CoTs, fewer than the 5 requested" in skip.problem
    assert "roughly" in skip.excerpt
    # (issue 21 added the counts of what each line cost)
    assert report.counts() == {"total": 1, "questions_left_out": 1, "cots_dropped": 0, "evaluations_dropped": 0,
                               "by_reason": {"no_answer": 1}, "by_split": {"train": 1}}
    assert report.questions["train"] == len(train_indices(data.root, "svamp_tree1", train_qs)) - 1
    assert train_qs[i].input not in {r.input for r in out["train"]}
    assert_tree1_aligned(out, train_qs, test_qs, label_type, 5)


def test_fewer_cots_than_branches_is_skipped(tree1):
    data, train_qs, test_qs = tree1
    i = train_indices(data.root, "svamp_tree1", train_qs)[0]

    def edit(records):
        del records[i]["steps"][0]["new_ys"][2:]
    path = data.edit_teacher("svamp_tree1", "train", edit)
    out, report = strict_then_skipping("svamp_tree1", data.root,
                                       f"{path}: record {i}: has 2 CoTs, fewer than the 5 requested")
    assert len(report.skipped) == 1 and f"record {i}" in str(report.skipped[0])
    assert report.skipped[0].reason == "too_few_cots"
    assert len(out["train"]) == 5 * report.questions["train"]
    assert train_qs[i].input not in {r.input for r in out["train"]}
    assert_tree1_aligned(out, train_qs, test_qs, "gt", 5)


def test_unparsable_verdict_in_tree2(data):
    train_qs, test_qs = svamp_questions(10), svamp_questions(2, start=50)
    data.tree("svamp_tree2", {"train": train_qs, "test": test_qs})
    clean, _ = build_task_rows("svamp_tree2", data.root, model_type=SELF_EVAL, num_train_branches=5)
    in_train = questions_of(clean["train"])  # inputs are CoTs here
    i = next(k for k, q in enumerate(train_qs) if q.cots[0] in in_train)
    train_qs[i].evals[1][2] = "Evaluation:\n\nI am not able to judge this.\n\nEvaluation result: unclear."
    data.tree("svamp_tree2", {"train": train_qs, "test": test_qs})  # prepared jsonl leaves it out, as the original
    path = data.teacher_path("svamp_tree2", "train")
    out, report = strict_then_skipping("svamp_tree2", data.root,
                                       f"{path}: record {i}: evaluation 2 of CoT 1 has no verdict",
                                       model_type=SELF_EVAL)
    # Since issue 21 only that evaluation is dropped: the question keeps its other 24 (it was skipped whole before).
    assert len(report.skipped) == 1 and f"record {i}" in str(report.skipped[0])
    skip = report.skipped[0]
    assert (skip.reason, skip.file, skip.cot, skip.evaluation, skip.dropped) == ("no_verdict", str(path), 1, 2,
                                                                                  "evaluation")
    assert "unclear" in skip.excerpt
    assert report.counts()["questions_left_out"] == 0 and report.counts()["evaluations_dropped"] == 1
    assert len(out["train"]) == len(clean["train"]) - 1
    assert sum(r.input in train_qs[i].cots for r in out["train"]) == 24
    assert [r.branch for r in out["train"] if r.input == train_qs[i].cots[1]] == [1] * 4
    for split in ("train", "valid"):
        assert_tree2_aligned(out[split], train_qs)
    assert_tree2_aligned(out["test"], test_qs)
    assert collections.Counter(r.label for r in out["train"]) == \
        collections.Counter(verdict_of(e) for q in train_qs if q.cots[0] in questions_of(out["train"])
                            for evs in q.evals for e in evs if verdict_of(e) is not None)


def test_tree2_prepared_jsonl_out_of_step_with_teacher(data):
    train_qs = svamp_questions(4)
    data.tree("svamp_tree2", {"train": train_qs, "test": svamp_questions(2, start=50)})
    path = data.root / "svamp_tree2" / "svamp_tree2_train.json"
    rows = jsonl(path)
    rows[7]["label"] = "uncertain" if rows[7]["label"] != "uncertain" else "correct"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"svamp_tree2_train\.json: record 7: does not match"):
        build_task_rows("svamp_tree2", data.root, model_type=SELF_EVAL)


def test_teacher_records_out_of_order(tree1):
    data, train_qs, test_qs = tree1
    idx = train_indices(data.root, "svamp_tree1", train_qs)
    i, j = idx[1], idx[4]

    def swap(records):
        records[i], records[j] = records[j], records[i]
    path = data.edit_teacher("svamp_tree1", "train", swap)
    with pytest.raises(DataError) as err:
        build_task_rows("svamp_tree1", data.root)
    msg = str(err.value)
    assert msg.startswith(f"{path}: record {i}: question does not match record {i} of ")
    assert "svamp_tree1_train.json" in msg and "out of order" in msg
    out, report = build_task_rows("svamp_tree1", data.root, skip_bad_records=True, num_train_branches=5,
                                  label_type="llm")
    assert len(report.skipped) == 2
    assert report.questions["train"] == len(idx) - 2
    assert not {train_qs[i].input, train_qs[j].input} & {r.input for r in out["train"]}
    assert_tree1_aligned(out, train_qs, test_qs, "llm", 5)


def test_teacher_out_of_order_in_test_split_is_detected(tree1):
    """A test-split teacher file out of step with the ground truth silently gives test rows the
    rationale of another question: it must be reported like the same problem in train."""
    data, train_qs, test_qs = tree1

    def swap(records):
        records[0], records[1] = records[1], records[0]
    path = data.edit_teacher("svamp_tree1", "test", swap)
    with pytest.raises(DataError, match="out of order") as err:
        build_task_rows("svamp_tree1", data.root)
    assert err.value.path == str(path)


@pytest.mark.parametrize("skip", [False, True])
def test_tree_chunks_that_do_not_add_up(data, skip):
    data.tree("svamp_tree1", {"train": svamp_questions(10), "test": svamp_questions(3, start=50)},
              chunks={"train": [6, 3]})
    with pytest.raises(DataError) as err:
        build_task_rows("svamp_tree1", data.root, skip_bad_records=skip)
    msg = str(err.value)
    assert str(data.root / "svamp_tree1" / "llm") in msg and "9" in msg and "10" in msg


def test_tree_chunked_teacher_files_are_concatenated(data):
    train_qs, test_qs = svamp_questions(10), svamp_questions(3, start=50)
    data.tree("svamp_tree1", {"train": train_qs, "test": test_qs}, chunks={"train": [6, 4], "test": [1, 2]})
    out, _ = build_task_rows("svamp_tree1", data.root, num_train_branches=2, label_type="llm")
    assert len(questions_of(out["train"])) + len(out["valid"]) == 10 and len(out["test"]) == 3
    by_input = {q.input: k for k, q in enumerate(train_qs)}
    for r in out["train"]:
        k = by_input[r.input]
        assert (Path(r.source).name, r.record) == (("train_CoT_0.json", k) if k < 6 else ("train_CoT_1.json", k - 6))
        assert r.label == train_qs[k].llm_labels[r.branch]


def test_summary_reports_rows_per_split_and_skips(tree1):
    data, train_qs, _ = tree1
    i, j = train_indices(data.root, "svamp_tree1", train_qs)[:2]
    _corrupt_cot(data, i, branch=0)  # CoTs 1 and 2 are used instead
    for branch in range(4):  # 1 usable CoT of the 2 asked: the question is skipped
        _corrupt_cot(data, j, branch=branch)
    out, report = build_task_rows("svamp_tree1", data.root, num_train_branches=2, skip_bad_records=True)
    line = report.summary("svamp_tree1")
    n = {s: len(out[s]) for s in out}
    q = {s: len(questions_of(out[s])) for s in out}
    assert line.startswith("svamp_tree1: ")
    for split in ("train", "valid", "test"):
        assert f"{split} {n[split]} rows ({q[split]} questions)" in line
    assert f"skipped 1 questions with unusable teacher text (no_answer 1; first: {report.skipped[1]})" in line
    assert f"record {j}: CoT 0 has no parsable answer" in line
    assert f"dropped 1 CoTs with unusable text from questions it kept (no_answer 1; first: {report.skipped[0]})" in line
    assert f"record {i}: CoT 0 has no parsable answer" in line
    assert report.rows == n and report.questions == q


def test_summary_without_skips(tree1):
    data, _, _ = tree1
    _, report = build_task_rows("svamp_tree1", data.root)
    assert report.summary("x").endswith("; no bad records")


def test_missing_teacher_files_for_tree1(data):
    data.tree("svamp_tree1", {"train": svamp_questions(5), "test": svamp_questions(2, start=50)})
    for f in (data.root / "svamp_tree1" / "llm").glob("train_CoT_*.json"):
        f.unlink()
    with pytest.raises(DataError, match="no teacher CoT"):
        build_task_rows("svamp_tree1", data.root)
    out, _ = build_task_rows("svamp_tree1", data.root, model_type="standard")  # gt labels need no teacher
    assert len(out["train"]) + len(out["valid"]) == 5


def test_unknown_dataset_and_missing_folder(data):
    with pytest.raises(ValueError, match="unknown dataset"):
        build_task_rows("gsm8k", data.root)
    with pytest.raises(FileNotFoundError, match="svamp_tree1"):
        build_task_rows("svamp_tree1", data.root)


# ---------------------------------------------------------------------------------------------
# 6. Validation split


@pytest.fixture
def tree1_20(data):
    train_qs, test_qs = svamp_questions(20), svamp_questions(4, start=50)
    data.tree("svamp_tree1", {"train": train_qs, "test": test_qs})
    return data, train_qs, test_qs


def _split_inputs(out):
    return {s: questions_of(out[s]) for s in ("train", "valid", "test")}


@pytest.mark.parametrize("branches", [1, 5])
def test_valid_never_overlaps_train(tree1_20, branches):
    data, train_qs, _ = tree1_20
    out, report = build_task_rows("svamp_tree1", data.root, num_train_branches=branches)
    s = _split_inputs(out)
    assert not set(s["train"]) & set(s["valid"])
    assert set(s["train"]) | set(s["valid"]) == {q.input for q in train_qs}
    assert len(s["valid"]) == math.ceil(0.1 * 20)


def test_valid_is_deterministic_and_independent_of_seed(tree1_20):
    data, train_qs, test_qs = tree1_20
    ref = _split_inputs(build_task_rows("svamp_tree1", data.root)[0])
    for seed in (0, 1, 123):
        assert _split_inputs(build_task_rows("svamp_tree1", data.root, seed=seed)[0]) == ref
    # the --run seed only changes which training questions a subsample keeps
    subs = {}
    for seed in (0, 1, 2, 3):
        got = _split_inputs(build_task_rows("svamp_tree1", data.root, seed=seed, subsample=0.5)[0])
        assert got["valid"] == ref["valid"] and got["test"] == ref["test"]
        assert set(got["train"]) <= set(ref["train"]) and len(got["train"]) == 9
        subs[seed] = tuple(got["train"])
        assert _split_inputs(build_task_rows("svamp_tree1", data.root, seed=seed, subsample=0.5)[0]) == got
    assert len(set(subs.values())) > 1


def test_test_split_is_untouched(tree1_20):
    data, _, test_qs = tree1_20
    want = [(q.input, q.label) for q in test_qs]
    for kw in ({}, {"valid_fraction": 0.3}, {"subsample": 0.4, "seed": 5}, {"num_train_branches": 5}):
        out, report = build_task_rows("svamp_tree1", data.root, **kw)
        assert [(r.input, r.label) for r in out["test"]] == want
        assert report.rows["test"] == 4


def test_valid_fraction(tree1_20):
    data, _, _ = tree1_20
    out, _ = build_task_rows("svamp_tree1", data.root, valid_fraction=0.25)
    assert len(questions_of(out["valid"])) == 5 and len(questions_of(out["train"])) == 15


# ---------------------------------------------------------------------------------------------
# 6. Messy teacher data trains by default


def _truncate(problem: dict) -> str:
    """A generation cut off mid-equation, as real teacher files hold (no 'The answer is')."""
    a, b = parse_svamp_numbers(problem["Body"])
    return f"Mia has {a} stickers and gets {b} more, so she has {a} + "


def test_truncated_dss_cots_are_skipped_and_listed_by_default(data):
    bad_ids = {"chal-3", "chal-17", "chal-42"}
    problems = data.svamp_dss(100, cot_fn=lambda p: _truncate(p) if p["ID"] in bad_ids else data.svamp_dss_cot(p))
    by_input = {f"{p['Body']}\n{p['Question']}": p["ID"] for p in problems}
    out, report = build_task_rows("svamp", data.root, label_type="llm")
    trained = {by_input[r.input] for r in out["train"]}
    # A truncated CoT only matters where it is trained on (valid and test rows use gold labels): the questions
    # skipped are the bad ones found in no split.
    kept = trained | {by_input[r.input] for r in out["valid"] + out["test"]}
    expected = sorted(bad_ids - kept)
    assert len(report.skipped) == len(expected) > 0
    assert not bad_ids & trained
    for skip in report.skipped:
        assert (skip.split, skip.reason) == ("train", "no_answer") and skip.file.endswith("train_CoT_0.json")
        assert skip.excerpt.startswith("Mia has") and skip.excerpt.endswith("+")
    assert report.questions["train"] == 80 - len(out["valid"]) - len(expected)


def test_a_mostly_bad_file_stops_with_a_clear_error(data):
    data.svamp_dss(20, cot_fn=lambda p: "I cannot answer this question.")
    with pytest.raises(DataError) as err:
        build_task_rows("svamp", data.root)
    msg = str(err.value)
    assert "of the" in msg and "questions of the train split (100.0%)" in msg and "no_answer" in msg
    assert "--max_bad_fraction 0.05" in msg and "train_CoT_0.json: record 0" in msg


def test_tree2_prepared_file_with_a_row_for_every_evaluation(data):
    """Some tools write a prepared row even for an evaluation without a verdict: the rows stay in step and the
    question is reported against the teacher file, record, CoT and evaluation, not the prepared file."""
    train_qs, test_qs = svamp_questions(10), svamp_questions(2, start=50)
    train_qs[4].evals[2][3] = "Evaluation:\n\nThe steps look fine but I ran out of"
    data.tree("svamp_tree2", {"train": train_qs, "test": test_qs})
    path = data.root / "svamp_tree2" / "svamp_tree2_train.json"
    rows = [{"input": cot, "label": verdict_of(e) or "unclear"} for q in train_qs
            for cot, evs in zip(q.cots, q.evals, strict=True) for e in evs]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    teacher = data.teacher_path("svamp_tree2", "train")
    out, report = strict_then_skipping("svamp_tree2", data.root,
                                       f"{teacher}: record 4: evaluation 3 of CoT 2 has no verdict",
                                       model_type=SELF_EVAL)
    assert [(s.file, s.record, s.reason, s.cot, s.evaluation, s.dropped) for s in report.skipped] == \
        [(str(teacher), 4, "no_verdict", 2, 3, "evaluation")]
    assert sum(r.input in train_qs[4].cots for r in out["train"] + out["valid"]) == 24  # the other evaluations
    assert_tree2_aligned(out["train"], train_qs)
    rows[7]["label"] = "uncertain" if rows[7]["label"] != "uncertain" else "correct"  # a real contradiction
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"svamp_tree2_train\.json: record 7: does not match"):
        build_task_rows("svamp_tree2", data.root, model_type=SELF_EVAL, max_bad_fraction=0.2)


def test_strict_data_and_skip_bad_records_disagree():
    from mindmirror.config import TrainConfig

    with pytest.raises(ValueError, match="contradict"):
        TrainConfig(strict_data=True, skip_bad_records=True).validate()


# ---------------------------------------------------------------------------------------------
# 7. A bad piece costs only itself (issue 21): a question uses its first N usable CoTs, a self-evaluation
# without a verdict drops its own row, and skipped_records lists each piece with what it cost.


def _lines(report) -> list[tuple]:
    return [(s.split, s.file, s.record, s.reason, s.cot, s.evaluation, s.dropped) for s in report.skipped]


@pytest.mark.parametrize("label_type", ["gt", "llm"])
def test_a_bad_cot_is_replaced_by_the_next_usable_one(tree1, label_type):
    data, train_qs, test_qs = tree1
    i = train_indices(data.root, "svamp_tree1", train_qs)[0]
    q = train_qs[i]
    path = _corrupt_cot(data, i, branch=0)
    n_train = len(train_indices(data.root, "svamp_tree1", train_qs))

    def label(b):
        return q.label if label_type == "gt" else q.llm_labels[b]

    # 1 branch: the question is kept and trains on CoT 1; CoT 0 is listed as the piece dropped.
    out, report = build_task_rows("svamp_tree1", data.root, label_type=label_type, num_train_branches=1)
    assert [(r.branch, r.rationale, r.label) for r in out["train"] if r.input == q.input] == \
        [(1, q.rationales[1], label(1))]
    assert all(r.branch == 0 for r in out["train"] if r.input != q.input)
    assert _lines(report) == [("train", str(path), i, "no_answer", 0, None, "cot")]
    assert report.questions["train"] == n_train and report.rows["train"] == n_train
    assert report.counts() == {"total": 1, "questions_left_out": 0, "cots_dropped": 1, "evaluations_dropped": 0,
                               "by_reason": {"no_answer": 1}, "by_split": {"train": 1}}
    assert "skipped" not in report.summary("x")
    assert f"dropped 1 CoTs with unusable text from questions it kept (no_answer 1; first: {path}: record {i}: " \
           "CoT 0 has no parsable answer" in report.summary("x")

    # 4 branches: CoTs 1 to 4, still 4 rows like every other question.
    out, report = build_task_rows("svamp_tree1", data.root, label_type=label_type, num_train_branches=4)
    assert [(r.branch, r.rationale, r.label) for r in out["train"] if r.input == q.input] == \
        [(b, q.rationales[b], label(b)) for b in (1, 2, 3, 4)]
    assert _lines(report) == [("train", str(path), i, "no_answer", 0, None, "cot")]

    # 5 branches: only 4 usable, so the question is left out; the line says why.
    out, report = build_task_rows("svamp_tree1", data.root, label_type=label_type, num_train_branches=5,
                                  max_bad_fraction=0.2)
    assert q.input not in {r.input for r in out["train"]}
    assert _lines(report) == [("train", str(path), i, "no_answer", 0, None, "question")]
    assert report.skipped[0].problem == "CoT 0 has no parsable answer ('the answer is ...') (the question has 4 " \
                                        "usable CoTs, fewer than the 5 requested (--num_train_branches): left out)"
    assert report.questions["train"] == n_train - 1
    assert_tree1_aligned(out, train_qs, test_qs, label_type, 5)

    # --strict_data stops at the piece even where it would only cost a CoT.
    with pytest.raises(DataError, match=rf"record {i}: CoT 0 has no parsable answer .*--strict_data"):
        build_task_rows("svamp_tree1", data.root, label_type=label_type, num_train_branches=1, strict_data=True)


def test_evaluation_rows_keep_their_question_and_take_the_first_usable_rationale(tree1):
    """A valid or test question is never dropped for its teacher text: its label is the gold one."""
    data, train_qs, test_qs = tree1

    def edit(records):
        records[1]["steps"][0]["new_ys"][0] = "I am not sure"
    data.edit_teacher("svamp_tree1", "test", edit)
    out, report = build_task_rows("svamp_tree1", data.root)
    assert [(r.input, r.label) for r in out["test"]] == [(q.input, q.label) for q in test_qs]
    assert out["test"][1].rationale == test_qs[1].rationales[1]
    assert report.skipped == []


def test_several_bad_cots_of_one_question_count_once_against_the_threshold(tree1):
    data, train_qs, test_qs = tree1
    i = train_indices(data.root, "svamp_tree1", train_qs)[2]
    _corrupt_cot(data, i, branch=1)
    path = _corrupt_cot(data, i, branch=3)
    out, report = build_task_rows("svamp_tree1", data.root, num_train_branches=3)  # CoTs 0, 2 and 4 serve
    assert _lines(report) == [("train", str(path), i, "no_answer", b, None, "cot") for b in (1, 3)]
    assert [r.branch for r in out["train"] if r.input == train_qs[i].input] == [0, 2, 4]
    # 4 branches: 1 of the 9 training questions lost (11%) passes a 15% limit though it has two lines
    out, report = build_task_rows("svamp_tree1", data.root, num_train_branches=4, max_bad_fraction=0.15)
    assert _lines(report) == [("train", str(path), i, "no_answer", b, None, "question") for b in (1, 3)]
    assert report.counts()["questions_left_out"] == 1 and report.counts()["total"] == 2
    assert "skipped 1 questions with unusable teacher text (no_answer 1; first: " in report.summary("x")
    assert train_qs[i].input not in {r.input for r in out["train"]}
    with pytest.raises(DataError, match=r"1 of the 9 questions of the train split \(11\.1%\)"):
        build_task_rows("svamp_tree1", data.root, num_train_branches=4, max_bad_fraction=0.1)


def test_dropped_cots_of_kept_questions_do_not_count_against_the_threshold(data):
    train_qs, test_qs = svamp_questions(20), svamp_questions(3, start=50)
    for q in train_qs:
        q.cots[0] = "Jack has some apples and buys more, so he has"  # cut off: no answer
    data.tree("svamp_tree1", {"train": train_qs, "test": test_qs})
    out, report = build_task_rows("svamp_tree1", data.root, num_train_branches=1)
    assert report.counts()["cots_dropped"] == 18 and report.counts()["questions_left_out"] == 0
    assert {r.branch for r in out["train"]} == {1} and report.questions["train"] == 18
    by_input = {q.input: q for q in train_qs}
    assert [r.rationale for r in out["valid"]] == [by_input[r.input].rationales[1] for r in out["valid"]]
    with pytest.raises(DataError, match=r"18 of the 18 questions of the train split \(100\.0%\)"):
        build_task_rows("svamp_tree1", data.root, num_train_branches=5)


def test_tree2_keeps_the_good_evaluations_of_a_question(data):
    train_qs, test_qs = svamp_questions(10), svamp_questions(2, start=50)
    data.tree("svamp_tree2", {"train": train_qs, "test": test_qs})
    clean, _ = build_task_rows("svamp_tree2", data.root, model_type=SELF_EVAL, num_train_branches=5)
    in_train = [k for k, q in enumerate(train_qs) if q.cots[0] in questions_of(clean["train"])]
    i, j = in_train[:2]
    cut = "Evaluation:\n\nThe first step is"
    train_qs[i].evals[0] = [cut] * 5  # CoT 0: no evaluation has a verdict
    train_qs[i].evals[2][4] = cut  # CoT 2: one evaluation without a verdict
    train_qs[j].evals = [[cut] * 5 for _ in range(5)]  # nothing usable at all
    test_qs[0].evals[3][0] = cut
    data.tree("svamp_tree2", {"train": train_qs, "test": test_qs})
    teacher = {s: str(data.teacher_path("svamp_tree2", s)) for s in ("train", "test")}

    # 1 branch: question i trains on CoT 1 (CoT 0 is dropped, CoT 2 not read); j, all read, is left out.
    out, report = build_task_rows("svamp_tree2", data.root, model_type=SELF_EVAL, num_train_branches=1,
                                  max_bad_fraction=0.2)
    assert [r.branch for r in out["train"] if r.input in train_qs[i].cots] == [1] * 5
    assert not set(train_qs[j].cots) & {r.input for r in out["train"]}
    train_lines = [line for line in _lines(report) if line[0] == "train"]
    assert train_lines == [("train", teacher["train"], i, "no_verdict", 0, e, "cot") for e in range(5)] + \
        [("train", teacher["train"], j, "no_verdict", b, e, "question") for b in range(5) for e in range(5)]
    assert report.skipped[5].problem.endswith("(the question has no usable CoT: left out)")

    # 5 branches: i keeps 19 of its 25 evaluations; j has 25 lines and is one question left out.
    out, report = build_task_rows("svamp_tree2", data.root, model_type=SELF_EVAL, num_train_branches=5,
                                  max_bad_fraction=0.2)
    assert collections.Counter(r.branch for r in out["train"] if r.input in train_qs[i].cots) == \
        {1: 5, 2: 4, 3: 5, 4: 5}
    assert _lines(report) == \
        [("train", teacher["train"], i, "no_verdict", 0, e, "cot") for e in range(5)] + \
        [("train", teacher["train"], i, "no_verdict", 2, 4, "evaluation")] + \
        [("train", teacher["train"], j, "no_verdict", b, e, "question") for b in range(5) for e in range(5)] + \
        [("test", teacher["test"], 0, "no_verdict", 3, 0, "evaluation")]
    assert {k: report.counts()[k] for k in ("total", "questions_left_out", "cots_dropped", "evaluations_dropped")} == \
        {"total": 32, "questions_left_out": 1, "cots_dropped": 1, "evaluations_dropped": 2}
    assert len(out["train"]) == len(clean["train"]) - 6 - 25
    assert len(out["test"]) == 49 and report.questions["test"] == 2
    for split in ("train", "valid"):
        assert_tree2_aligned(out[split], train_qs)
    assert_tree2_aligned(out["test"], test_qs)
    # the question lost is what --max_bad_fraction counts: 1 of 9
    with pytest.raises(DataError, match=r"1 of the 9 questions of the train split"):
        build_task_rows("svamp_tree2", data.root, model_type=SELF_EVAL, num_train_branches=5)


def test_tree2_question_with_fewer_cots_than_branches_trains_on_what_it_has(data):
    train_qs, test_qs = svamp_questions(10), svamp_questions(2, start=50)
    for q in train_qs[::3]:  # 3 CoTs written where 5 are asked
        del q.cots[3:], q.evals[3:]
    data.tree("svamp_tree2", {"train": train_qs, "test": test_qs})
    out, report = build_task_rows("svamp_tree2", data.root, model_type=SELF_EVAL, num_train_branches=5)
    assert report.skipped == []
    for q in train_qs:
        rows = [r for r in out["train"] if r.input in q.cots]
        assert len(rows) in (0, 5 * len(q.cots))  # 0: carved out for validation
