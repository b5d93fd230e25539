"""Flags: --help and the README list them all; bad values fail with a message that says what to do."""

from dataclasses import fields

import pytest

from conftest import REPO
from mindmirror.cli import train_main
from mindmirror.config import TrainConfig, parse_args

ORIGINAL_FLAGS = ["from_pretrained", "dataset", "model_type", "label_type", "llm", "alpha", "batch_size",
                  "max_input_length", "run", "prompt", "num_train_branches", "num_train_epochs", "lr",
                  "continue_train", "subsample", "max_steps", "eval_steps", "optimizer_name", "grad_steps",
                  "local_rank", "gen_max_len", "parallelize", "bf16", "no_log", "output_rationale"]


def test_help_and_readme_list_every_flag(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out
    readme = (REPO / "README.md").read_text()
    for f in fields(TrainConfig):
        assert f"--{f.name}" in text and f"`--{f.name}`" in readme, f.name
    assert set(ORIGINAL_FLAGS) <= {f.name for f in fields(TrainConfig)}


def test_original_command_line_parses_unchanged():
    cfg = parse_args(["--dataset", "svamp_tree1", "--model_type", "task_prefix_tree1", "--label_type", "llm",
                      "--llm", "gpt-3.5-turbo", "--alpha", "0.5", "--batch_size", "16", "--max_input_length", "1024",
                      "--run", "1", "--num_train_branches", "5", "--num_train_epochs", "60", "--lr", "5e-5",
                      "--grad_steps", "2", "--bf16", "--prompt"])
    assert cfg.grad_accum_steps == 2 and cfg.bf16 and cfg.num_train_branches == 5 and cfg.lr == 5e-5
    assert cfg.output_dir.endswith("svamp_tree1/task_prefix_tree1/tiny/llm_b5_a0.5_s1")


@pytest.mark.parametrize("argv, message", [
    (["--alpha", "1.5"], "--alpha must be in [0, 1]"),
    (["--dataset", "gsm8k"], "--dataset 'gsm8k' is unknown"),
    (["--model_type", "task_prefix"], "--model_type 'task_prefix' is unknown"),
    (["--label_type", "human"], "choose gt or llm"),
    (["--num_train_branches", "0"], "--num_train_branches must be at least 1"),
    (["--parallelize"], "shard the model with DeepSpeed ZeRO-3"),
    (["--optimizer_name", "Adafactor"], "only AdamW is built in"),
    (["--grad_steps", "2", "--grad_accum_steps", "4"], "disagree"),
    (["--init_from", "no/such/folder"], "no such folder"),
    (["--continue_train", "--output_dir", "x"], "--continue_train looks for the stage-1 export"),
])
def test_bad_flags_fail_with_a_clear_message(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert train_main(argv) == 2
    assert message in capsys.readouterr().err


def test_more_branches_than_the_teacher_wrote_is_a_clear_error(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert train_main(["--num_train_branches", "6", "--report_to", "none", "--cache_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "train_CoT_0.json" in err and "hold at most 5 CoTs per question, but --num_train_branches asks for 6" in err


def test_readme_flag_table_matches_the_code():
    from mindmirror.config import flags_markdown

    readme = (REPO / "README.md").read_text()
    block = readme.split("<!-- flags:start")[1].split("-->", 1)[1].split("<!-- flags:end -->")[0].strip()
    assert block == flags_markdown(), "regenerate the README table with mindmirror.config.flags_markdown()"
