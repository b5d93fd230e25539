"""A first run on real teacher files: messy pieces are dropped and listed (the smallest piece: a CoT, an
evaluation, a question only when it has too few usable CoTs), a mostly bad file or --strict_data stops with a
clear error, and a data set smaller than the batch still trains. Real trainer processes on fixtures the tests
write (and on the seed's sample files where they are present)."""

from __future__ import annotations

import json

import pytest

from conftest import FAST, run_train
from datafixtures import data, svamp_questions, write_seed_format  # noqa: F401  (data is a fixture)
from mindmirror.data.registry import SELF_EVAL

pytestmark = pytest.mark.slow
SHORT = FAST + ["--max_steps", "2", "--batch_size", "4"]


def skipped(out) -> list[dict]:
    return [json.loads(line) for line in (out / "skipped_records.jsonl").read_text().splitlines()]


def test_messy_tree_data_trains_and_lists_what_it_skipped(data, tmp_path):
    train_qs, test_qs = svamp_questions(40), svamp_questions(4, start=60)
    train_qs[7].cots[0] = "Jack has 10 apples and buys 2 more, so he has 10 +"  # truncated: no answer
    data.tree("svamp_tree1", {"train": train_qs, "test": test_qs})
    train_qs[11].evals[1][4] = "Evaluation:\n\nThe first step is"  # an evaluation cut off before its verdict
    data.tree("svamp_tree2", {"train": train_qs, "test": test_qs})
    # All 40 questions (FAST subsamples), one carved out for validation (question 22): 7 and 11 are trained on.
    data_flags = ["--data_dir", str(data.root), "--subsample", "1", "--valid_fraction", "0.01"]

    # Since issue 21 a bad piece costs only itself: at 1 branch question 7 trains on its CoT 1.
    proc = run_train(tmp_path, SHORT + data_flags + ["--output_dir", "tree1"])
    listed = skipped(tmp_path / "tree1")
    teacher = data.teacher_path("svamp_tree1", "train")
    assert [(s["split"], s["file"], s["record"], s["reason"], s["cot"], s["evaluation"], s["dropped"])
            for s in listed] == [("train", str(teacher), 7, "no_answer", 0, None, "cot")]
    assert listed[0]["excerpt"].endswith("10 +")
    summary = json.loads((tmp_path / "tree1" / "summary.json").read_text())
    assert summary["final_step"] == 2 and summary["skipped_records"]["by_reason"] == {"no_answer": 1}
    assert summary["skipped_records"]["questions_left_out"] == 0 and summary["skipped_records"]["cots_dropped"] == 1
    assert "dropped 1 CoTs with unusable text from questions it kept (no_answer 1" in proc.stdout + proc.stderr

    run_train(tmp_path, SHORT + data_flags + ["--dataset", "svamp_tree2", "--model_type", SELF_EVAL,
                                              "--num_train_branches", "5", "--output_dir", "tree2"])
    listed = skipped(tmp_path / "tree2")
    assert [(s["file"], s["record"], s["reason"], s["cot"], s["evaluation"], s["dropped"]) for s in listed] == \
        [(str(data.teacher_path("svamp_tree2", "train")), 11, "no_verdict", 1, 4, "evaluation")]
    assert "evaluation 4 of CoT 1" in listed[0]["problem"]
    summary = json.loads((tmp_path / "tree2" / "summary.json").read_text())
    assert summary["rows"]["train"] == 5 * 5 * 39 - 1  # question 11 keeps its other 24 evaluations


def test_a_mostly_bad_file_and_strict_data_stop_naming_file_and_record(data, tmp_path):
    data.svamp_dss(30, cot_fn=lambda p: "Let me think step by step about")
    proc = run_train(tmp_path, SHORT + ["--data_dir", str(data.root), "--dataset", "svamp", "--output_dir", "bad"],
                     check=False)
    assert proc.returncode != 0  # the trainer exits 2; accelerate launch reports it as 1
    assert "have unusable teacher text (no_answer" in proc.stderr and "--max_bad_fraction 0.05" in proc.stderr
    assert not (tmp_path / "bad" / "checkpoints").exists()

    train_qs = svamp_questions(40)
    train_qs[5].cots[0] = "no answer here"
    data.tree("svamp_tree1", {"train": train_qs, "test": svamp_questions(4, start=60)})
    proc = run_train(tmp_path, SHORT + ["--data_dir", str(data.root), "--subsample", "1", "--strict_data",
                                        "--output_dir", "strict"],
                     check=False)
    assert proc.returncode != 0  # the trainer exits 2; accelerate launch reports it as 1
    assert f"{data.teacher_path('svamp_tree1', 'train')}: record 5: CoT 0 has no parsable answer" in proc.stderr


@pytest.mark.parametrize("source", ["fixture", "seed-form"])
def test_a_two_question_data_set_trains_at_batch_16(data, tmp_path, source):
    """The seed README's command lines (batch 16) on 2 questions: the batch is clamped to the data."""
    if source == "seed-form":
        write_seed_format(data.root)
    else:
        data.tree("svamp_tree1", {"train": svamp_questions(2), "test": svamp_questions(2, start=50)})
    proc = run_train(tmp_path, ["--data_dir", str(data.root), "--dataset", "svamp_tree1", "--batch_size", "16",
                                "--num_train_branches", "5", "--max_steps", "2", "--report_to", "none",
                                "--gen_max_len", "8", "--output_dir", "out"])
    assert "--batch_size 16 lowered to" in proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["final_step"] == 2 and summary["rows"]["test"] == 2 and summary["batch_size"] == 5
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    assert (tmp_path / "out" / "predictions.jsonl").read_text().count("\n") == 2
