"""The recipes runner: stage chaining, scaled epochs and the data folder in dry runs; and, with the results
report, two recipes end to end on the tiny model in real ``accelerate launch`` runs, skipping what is done
when run again (the report on hand-made runs: test_report.py)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from conftest import read_csv
from mindmirror.data.registry import SELF_EVAL
from mindmirror.tools import recipes, report


def parse(command: list[str]) -> dict:
    """``--flag value`` pairs (a flag without a value maps to True)."""
    flags = {}
    for i, token in enumerate(command):
        if token.startswith("--"):
            following = command[i + 1] if i + 1 < len(command) else "--"
            flags[token] = True if following.startswith("--") else following
    return flags


def test_dry_run_chains_the_stages_and_scales_the_epochs(capsys):
    assert recipes.main(["--dry_run", "--model", "google/t5-v1_1-large", "--runs", "3", "--epoch_scale", "0.1",
                         "--se_epoch_scale", "0.01", "--output_dir", "out", "--", "--max_test_samples", "9"]) == 0
    commands = [shlex.split(line)[3:] for line in capsys.readouterr().out.splitlines() if line.startswith("accelerate")]
    flags = [parse(c) for c in commands]
    assert len(flags) == 7  # five recipes, two of them in two stages
    by_output = {Path(f["--output_dir"]).relative_to("out/svamp/t5-v1_1-large").as_posix(): f for f in flags}
    assert set(by_output) == {"standard/s3/stage1", "cot1/s3/stage1", "cot1_se/s3/stage1", "cot1_se/s3/stage2",
                              "cot5/s3/stage1", "cot5_se/s3/stage1", "cot5_se/s3/stage2"}
    expected = {"standard/s3/stage1": ("standard", "svamp_tree1", "1", "30"),
                "cot1_se/s3/stage1": (SELF_EVAL, "svamp_tree2", "5", "1.5"),
                "cot1_se/s3/stage2": ("task_prefix_tree1", "svamp_tree1", "1", "30"),
                "cot5/s3/stage1": ("task_prefix_tree1", "svamp_tree1", "5", "6"),
                "cot5_se/s3/stage1": (SELF_EVAL, "svamp_tree2", "5", "0.5"),
                "cot5_se/s3/stage2": ("task_prefix_tree1", "svamp_tree1", "5", "8")}
    for name, (model_type, dataset, branches, epochs) in expected.items():
        f = by_output[name]
        assert (f["--model_type"], f["--dataset"], f["--num_train_branches"], f["--num_train_epochs"]) == \
            (model_type, dataset, branches, epochs), name
    for f in by_output.values():  # the paper's hyper-parameters, the seed, the extra flag
        assert (f["--batch_size"], f["--lr"], f["--max_input_length"], f["--run"], f["--max_test_samples"]) == \
            ("16", "5e-05", "1024", "3", "9")
        assert f["--from_pretrained"] == "google/t5-v1_1-large"
    for recipe in ("cot1_se", "cot5_se"):
        stage2 = by_output[f"{recipe}/s3/stage2"]
        stage1_best = Path("out/svamp/t5-v1_1-large") / recipe / "s3" / "stage1" / "best"
        assert stage2["--init_from"] == str(stage1_best.resolve())
        assert stage2["--experiment"] == recipe
        assert by_output[f"{recipe}/s3/stage1"]["--experiment"] == f"{recipe}/stage1"
    assert "--init_from" not in by_output["cot5/s3/stage1"]
    assert all(f["--resume"] is True for f in flags)  # a stopped stage continues


def test_unknown_recipe_is_refused(capsys):
    with pytest.raises(SystemExit):
        recipes.main(["--recipes", "cot3", "--dry_run"])
    assert "'cot3' is not one of standard, cot1, cot1_se, cot5, cot5_se" in capsys.readouterr().err


def test_data_dir_reaches_every_stage_and_must_hold_the_datasets(tmp_path, capsys):
    """--data_dir (mindmirror-teacher's --output_dir) goes to every stage, as an absolute path; a folder
    without the recipes' datasets is refused before anything runs."""
    teacher_out = tmp_path / "teacher"
    with pytest.raises(SystemExit):
        recipes.main(["--dry_run", "--data_dir", str(teacher_out), "--recipes", "cot1_se"])
    err = capsys.readouterr().err
    assert "has no svamp_tree1 or svamp_tree2 folder" in err and "mindmirror-teacher run --dataset svamp" in err
    (teacher_out / "svamp_tree1").mkdir(parents=True)
    with pytest.raises(SystemExit):  # cot1_se's stage 1 reads the self-evaluations
        recipes.main(["--dry_run", "--data_dir", str(teacher_out), "--recipes", "cot1_se"])
    assert "has no svamp_tree2 folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        recipes.main(["--dry_run", "--recipes", "cot1", "--", "--data_dir", str(teacher_out)])
    assert "give --data_dir to mindmirror-recipes itself" in capsys.readouterr().err

    (teacher_out / "svamp_tree2").mkdir()
    assert recipes.main(["--dry_run", "--data_dir", str(teacher_out), "--recipes", "cot1,cot1_se"]) == 0
    commands = [shlex.split(line)[3:] for line in capsys.readouterr().out.splitlines() if line.startswith("accelerate")]
    assert len(commands) == 3 and all(parse(c)["--data_dir"] == str(teacher_out.resolve()) for c in commands)
    assert recipes.main(["--dry_run", "--recipes", "cot1"]) == 0  # the bundled data: no --data_dir at all
    assert "--data_dir" not in capsys.readouterr().out


# ---- the real thing -----------------------------------------------------------------------------


@pytest.mark.slow
def test_two_recipes_end_to_end_make_the_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MINDMIRROR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MINDMIRROR_NUM_THREADS", "1")
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.chdir(tmp_path)
    args = ["--recipes", "standard,cot1_se", "--model", "tiny", "--runs", "0", "--batch_size", "8", "--lr", "3e-3",
            "--epoch_scale", "0.005", "--se_epoch_scale", "0.0002", "--self_eval_samples", "2", "--output_dir", "study",
            "--", "--subsample", "0.02", "--valid_fraction", "0.01", "--max_eval_samples", "12",
            "--max_test_samples", "12", "--gen_max_len", "12", "--max_target_length", "48", "--report_to", "none"]
    assert recipes.main(args) == 0
    root = Path("study/svamp/tiny")
    stage1, stage2, standard = (root / "cot1_se/s0/stage1", root / "cot1_se/s0/stage2", root / "standard/s0/stage1")

    # Stage 2 was started from stage 1's selected export, and knows what stage 1 cost.
    config1, config2 = (json.loads((s / "config.json").read_text()) for s in (stage1, stage2))
    assert (config1["model_type"], config1["dataset"], config1["num_train_branches"]) == \
        (SELF_EVAL, "svamp_tree2", 5)
    assert (config2["model_type"], config2["dataset"], config2["num_train_branches"]) == \
        ("task_prefix_tree1", "svamp_tree1", 1)
    assert config2["init_from"] == str((stage1 / "best").resolve())
    assert (stage1 / "best" / "model.safetensors").is_file()
    summary1, summary2 = (json.loads((s / "summary.json").read_text()) for s in (stage1, stage2))
    assert summary2["init_from"] == str((stage1 / "best").resolve())
    assert [s["final_step"] for s in summary2["stages"]] == [summary1["final_step"], summary2["final_step"]]

    # The last stage was evaluated: greedy equals the trainer's own test figure, plus both votes.
    for folder, votes in ((stage2, {"majority_vote_accuracy", "self_eval_vote_accuracy"}),
                          (standard, {"majority_vote_accuracy"})):
        result = json.loads((folder / "eval_best_test.json").read_text())
        summary = json.loads((folder / "summary.json").read_text())
        assert result["accuracy"] == summary["test_accuracy"] and result["rows"] == summary["rows"]["test"] == 12
        assert votes <= result.keys() and ("self_eval_vote_accuracy" in result) == ("self_eval_vote_accuracy" in votes)
        predictions = [json.loads(line) for line in (folder / "eval_best_test_predictions.jsonl").open()]
        trainer = [json.loads(line) for line in (folder / "predictions.jsonl").open()]
        assert [p["prediction"] for p in predictions] == [t["prediction"] for t in trainer]
    assert not (stage1 / "eval_best_test.json").exists()

    # Run again: everything is done already and nothing is rewritten.
    stamps = {p: p.stat().st_mtime_ns for p in Path("study").rglob("*.json")}
    capsys.readouterr()
    assert recipes.main(args) == 0
    assert capsys.readouterr().out.count("already done") == 3
    assert {p: p.stat().st_mtime_ns for p in Path("study").rglob("*.json")} == stamps

    # The table.
    assert report.main(["study", "--output_dir", "table"]) == 0
    rows = read_csv("table/results.csv")
    assert [r["title"] for r in rows] == ["standard distillation", "1 CoT + SE"]
    assert float(rows[1]["steps_mean"]) == summary1["final_step"] + summary2["final_step"]
    assert float(rows[1]["test_accuracy_mean"]) == summary2["test_accuracy"]
    assert "| 1 CoT + SE | tiny | svamp_tree1 | 1 |" in Path("table/results.md").read_text()
