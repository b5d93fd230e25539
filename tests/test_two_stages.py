"""The original README's two-stage commands chain: stage 1 on self-evaluations with 5 branches, stage 2 on CoTs
with 1 branch and --continue_train, which finds stage 1's export whatever its branch count and says so (issue 21).
Real trainer processes on the bundled data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import FAST, run_train
from mindmirror.data.registry import SELF_EVAL

pytestmark = pytest.mark.slow
SHORT = FAST + ["--max_steps", "1", "--batch_size", "4", "--max_eval_samples", "4", "--max_test_samples", "4"]


def test_stage2_with_one_branch_continues_from_stage1_with_five(tmp_path):
    run_train(tmp_path, SHORT + ["--dataset", "svamp_tree2", "--model_type", SELF_EVAL, "--label_type", "llm",
                                 "--num_train_branches", "5"])
    stage1 = Path("runs/svamp_tree2/task_prefix_tree2/tiny/llm_b5_a0.5_s0")
    assert (tmp_path / stage1 / "best").is_dir() and (tmp_path / stage1 / "summary.json").is_file()

    proc = run_train(tmp_path, SHORT + ["--dataset", "svamp_tree1", "--model_type", "task_prefix_tree1",
                                        "--label_type", "llm", "--num_train_branches", "1", "--continue_train"])
    assert f"--continue_train: starting from the stage-1 export {stage1 / 'best'} (--num_train_branches 5, " \
           "--alpha 0.5, --label_type llm; finished " in proc.stderr
    assert proc.stderr.count("--continue_train: starting from") == 1
    stage2 = tmp_path / "runs/svamp_tree1/task_prefix_tree1/tiny/llm_b1_a0.5_s0"
    summary = json.loads((stage2 / "summary.json").read_text())
    assert summary["init_from"] == str((tmp_path / stage1 / "best").resolve())
    assert [s["experiment"] for s in summary["stages"]] == [f"{SELF_EVAL} b5", "task_prefix_tree1 b1"]
    assert json.loads((stage2 / "config.json").read_text())["init_from"] == str(stage1 / "best")
