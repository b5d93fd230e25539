"""mindmirror-report on hand-made run folders: seeds averaged, a stage 1 folded into the run it fed, votes,
unreadable summaries skipped, and a root without finished runs refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import read_csv
from mindmirror.data.registry import SELF_EVAL
from mindmirror.tools import report


def write_run(folder: Path, experiment: str, run: int, test: float, stages: list[tuple[int, float]],
              init_from: str = "", votes: dict | None = None, model_type: str = "task_prefix_tree1") -> None:
    folder.mkdir(parents=True)
    summary = {"experiment": experiment, "run": run, "test_accuracy": test, "best_valid_accuracy": test,
               "final_step": stages[-1][0], "wall_s": stages[-1][1], "model": "tiny", "dataset": "svamp_tree1",
               "model_type": model_type, "init_from": init_from,
               "stages": [{"experiment": experiment, "final_step": s, "wall_s": w} for s, w in stages]}
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "best").mkdir()
    if votes:
        (folder / report.EVAL_FILE).write_text(json.dumps(votes))


def test_report_averages_seeds_and_folds_stage_one_into_the_run_it_fed(tmp_path, capsys):
    root = tmp_path / "runs"
    write_run(root / "cot1" / "s0", "cot1", 0, 0.2, [(10, 5.0)],
              votes={"majority_vote_accuracy": 0.5, "self_eval_vote_accuracy": 0.6, "self_eval_samples": 5})
    write_run(root / "cot1" / "s1", "cot1", 1, 0.4, [(12, 7.0)])
    write_run(root / "se" / "s0" / "stage1", "cot1_se/stage1", 0, 0.9, [(4, 2.0)], model_type=SELF_EVAL)
    write_run(root / "se" / "s0" / "stage2", "cot1_se", 0, 0.3, [(4, 2.0), (20, 9.0)],
              init_from=str(root / "se" / "s0" / "stage1" / "best"))
    write_run(root / "by_hand", "standard b1", 0, 0.1, [(3, 1.0)], model_type="standard")  # as the trainer labels it
    write_run(root / "cot5" / "s0", "cot5", 0, 0.25, [(8, 4.0)],
              votes={"majority_vote_accuracy": 0.2, "self_eval_vote_accuracy": 0.3, "judge_trained": False})
    # A stage 1 whose stage 2 has not finished yet is no row of its own.
    write_run(root / "se5" / "s0" / "stage1", "cot5_se/stage1", 0, 0.8, [(4, 2.0)], model_type=SELF_EVAL)
    (root / "broken").mkdir()
    (root / "broken" / "summary.json").write_text("{not json")
    assert report.main([str(root), "--output_dir", str(tmp_path / "table")]) == 0

    rows = read_csv(tmp_path / "table" / "results.csv")
    assert [r["experiment"] for r in rows] == ["cot1", "cot1_se", "cot5", "standard b1"]  # recipe order, then the rest
    cot1, se, cot5, hand = rows
    assert cot1["seeds"] == "2" and float(cot1["test_accuracy_mean"]) == pytest.approx(0.3)
    assert float(cot1["test_accuracy_std"]) == pytest.approx(0.1414, abs=1e-4)  # sample standard deviation
    assert float(cot1["majority_vote_accuracy_mean"]) == 0.5 and cot1["majority_vote_accuracy_std"] == ""
    assert float(cot1["steps_mean"]) == 11 and float(cot1["wall_s_mean"]) == 6
    assert se["seeds"] == "1" and float(se["test_accuracy_mean"]) == 0.3  # not stage 1's 0.9
    assert float(se["steps_mean"]) == 24 and float(se["wall_s_mean"]) == 11  # both stages
    assert hand["seeds"] == "1" and hand["title"] == "standard b1"
    assert len(read_csv(tmp_path / "table" / "runs.csv")) == 5
    table = (tmp_path / "table" / "results.md").read_text()
    assert "| 1 CoT | tiny | svamp_tree1 | 2 | 0.300 ± 0.141 | 0.500 | 0.600 | 11 ± 1 | 6 ± 1 |" in table
    assert "| 1 CoT + SE | tiny | svamp_tree1 | 1 | 0.300 | - | - | 24 | 11 |" in table
    assert "| 5 CoTs | tiny | svamp_tree1 | 1 | 0.250 | 0.200 | 0.300 † | 8 | 4 |" in table  # an untrained judge
    assert "† the judge never trained on verdicts" in table
    assert (tmp_path / "table" / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert "skipping" in capsys.readouterr().err


def test_report_without_runs_says_so(tmp_path, capsys):
    with pytest.raises(SystemExit):
        report.main([str(tmp_path)])
    assert "no finished runs" in capsys.readouterr().err
