"""Flags: --help and the README list them all; bad values fail with a message that says what to do."""

import json
import os
from dataclasses import asdict, fields
from pathlib import Path

import pytest

from conftest import REPO
from mindmirror.cli import train_main
from mindmirror.config import (
    COMPAT_FLAGS,
    GROUPS,
    CheckpointConfig,
    DataConfig,
    EvaluationConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    group,
    parse_args,
)

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


# ---------------------------------------------------------------------------------------------
# The six groups (issue 23): each flag in one, read flat or as a typed group

def test_every_flag_is_in_exactly_one_group_and_train_config_is_their_union():
    names = [f.name for cls in GROUPS for f in fields(cls)]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    assert names == [f.name for f in fields(TrainConfig)]  # data first, logging last
    assert (DataConfig, ModelConfig, OptimConfig, CheckpointConfig, EvaluationConfig, LoggingConfig) == GROUPS
    assert all(issubclass(TrainConfig, cls) for cls in GROUPS)


@pytest.mark.parametrize("cls, names", [
    (DataConfig, {"dataset", "data_dir", "model_type", "label_type", "llm", "num_train_branches", "valid_fraction",
                  "subsample", "max_input_length", "max_target_length", "skip_bad_records", "strict_data",
                  "max_bad_fraction", "cache_dir", "preprocessing_num_workers", "prompt"}),
    (ModelConfig, {"from_pretrained", "tokenizer", "random_init", "vocab_size", "init_from", "continue_train",
                   "gradient_checkpointing", "parallelize", "bf16"}),
    (OptimConfig, {"run", "alpha", "batch_size", "grad_accum_steps", "grad_steps", "lr", "lr_scheduler",
                   "warmup_ratio", "weight_decay", "position_bias_lr_scale", "max_grad_norm", "optimizer_name",
                   "num_train_epochs", "max_steps", "group_by_length", "pad_to_multiple_of", "max_nonfinite_steps",
                   "collective_timeout", "local_rank"}),
    (CheckpointConfig, {"output_dir", "save_steps", "save_total_limit", "resume"}),
    (EvaluationConfig, {"eval_steps", "gen_max_len", "max_eval_samples", "max_test_samples", "eval_batch_size",
                        "output_rationale"}),
    (LoggingConfig, {"logging_steps", "report_to", "no_log", "verbose", "experiment"}),
])
def test_each_group_holds_its_flags(cls, names):
    assert names <= {f.name for f in fields(cls)}
    assert cls.__doc__ and cls._argument_group_name


def test_group_gives_a_configs_values_typed_and_flat_access_is_unchanged(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = parse_args(["--dataset", "cqa_tree1", "--subsample", "0.5", "--max_input_length", "64", "--lr", "1e-4",
                      "--run", "3", "--save_steps", "7", "--gen_max_len", "9", "--logging_steps", "2",
                      "--tokenizer", "tok"])
    data = group(cfg, DataConfig)
    assert type(data) is DataConfig
    assert (data.dataset, data.subsample, data.max_input_length) == ("cqa_tree1", 0.5, 64)
    assert not hasattr(data, "lr")
    assert (group(cfg, OptimConfig).lr, group(cfg, OptimConfig).run) == (1e-4, 3) == (cfg.lr, cfg.run)
    assert group(cfg, ModelConfig).tokenizer == "tok"
    assert group(cfg, CheckpointConfig).save_steps == 7 and group(cfg, EvaluationConfig).gen_max_len == 9
    assert group(cfg, LoggingConfig).logging_steps == 2
    data.dataset = "svamp"  # a copy
    assert cfg.dataset == "cqa_tree1"
    assert set(asdict(cfg)) == {f.name for f in fields(TrainConfig)}  # config.json stays flat


def test_help_shows_one_section_per_group(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out
    sections = [line[:-1] for line in text.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert sections[-6:] == ["data", "model", "optimisation", "checkpointing", "evaluation", "logging"]
    for cls in GROUPS:  # each flag under its group's title
        part = text.split(f"\n{cls._argument_group_name}:\n")[1].split("\n\n")[0]
        for f in fields(cls):
            assert f"--{f.name}" in part, (cls.__name__, f.name)


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_a_config_file_of_flat_keys_parses(suffix, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    values = {"dataset": "cqa_tree1", "lr": 0.001, "batch_size": 4, "save_steps": 5, "gen_max_len": 8,
              "report_to": "none", "random_init": True, "llm": "teacher"}
    path = tmp_path / f"c{suffix}"
    path.write_text(json.dumps(values))  # JSON is YAML too
    cfg = parse_args([str(path)])
    assert {k: getattr(cfg, k) for k in values} == values
    assert cfg.output_dir.endswith("cqa_tree1/task_prefix_tree1/tiny/gt_b1_a0.5_s0")


def test_a_run_config_json_parses_back():
    """config.json holds every flag, flat: read back it gives the same config (the flat keys of old runs)."""
    cfg = TrainConfig(lr=0.01, dataset="cqa_tree1", output_dir="x")
    assert TrainConfig(**json.loads(json.dumps(asdict(cfg)))) == cfg


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_an_unknown_key_in_a_config_file_is_an_error(suffix, tmp_path, capsys):
    path = tmp_path / f"c{suffix}"
    path.write_text(json.dumps({"lr": 0.01, "learning_rate": 0.01}))
    assert train_main([str(path)]) == 2
    assert "Some keys are not used by the HfArgumentParser: ['learning_rate']" in capsys.readouterr().err


def test_flags_kept_for_compatibility_are_accepted_and_say_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert set(COMPAT_FLAGS) == {"llm", "prompt", "local_rank", "parallelize", "optimizer_name"}
    assert set(COMPAT_FLAGS) <= set(ORIGINAL_FLAGS)
    cfg = parse_args(["--llm", "other", "--prompt", "--local_rank", "0", "--optimizer_name", "adamw"])
    assert (cfg.llm, cfg.prompt, cfg.local_rank) == ("other", True, 0)
    helps = {f.name: f.metadata["help"] for f in fields(TrainConfig)}
    marked = {name for name, text in helps.items() if "Accepted for compatibility" in text}
    assert marked == set(COMPAT_FLAGS)
    readme = (REPO / "README.md").read_text()
    assert ", ".join(f"`--{name}`" for name in COMPAT_FLAGS) in readme


# ---------------------------------------------------------------------------------------------
# --continue_train finds stage 1 whatever its branch count (issue 21)

STAGE1 = Path("runs/svamp_tree2/task_prefix_tree2/tiny")


def stage1_run(leaf: str, finished_at: float | None = 1_700_000_000.0) -> Path:
    """A stage-1 run folder with a best/ export, finished (summary.json) at ``finished_at`` unless None."""
    run = STAGE1 / leaf
    (run / "best").mkdir(parents=True)
    if finished_at is not None:
        (run / "summary.json").write_text(json.dumps({"final_step": 3}))
        os.utime(run / "summary.json", (finished_at, finished_at))
    return run / "best"


def stage2(*flags: str) -> list[str]:
    return ["--dataset", "svamp_tree1", "--model_type", "task_prefix_tree1", "--label_type", "llm", "--alpha", "0.5",
            "--continue_train", *flags]


def test_continue_train_takes_stage1_of_another_branch_count(tmp_path, monkeypatch, capsys):
    """The original README: stage 1 with 5 branches, stage 2 with 1 branch and --continue_train."""
    monkeypatch.chdir(tmp_path)
    export = stage1_run("llm_b5_a0.5_s0")
    stage1_run("llm_b5_a0.5_s1")  # another seed: never taken
    cfg = parse_args(stage2("--num_train_branches", "1"))
    assert cfg.init_from == str(export)
    err = capsys.readouterr().err
    assert f"--continue_train: starting from the stage-1 export {export} (--num_train_branches 5, --alpha 0.5, " \
           "--label_type llm; finished " in err and "also found" not in err


def test_continue_train_prefers_branches_then_alpha_then_label_type_then_the_newest(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    b5 = stage1_run("llm_b5_a0.5_s0")
    b1_gt = stage1_run("gt_b1_a0.3_s0")
    b1_alpha = stage1_run("gt_b1_a0.5_s0")
    stage1_run("llm_b1_a0.5_s0", finished_at=None)  # not finished: never taken
    assert parse_args(stage2("--num_train_branches", "5")).init_from == str(b5)
    assert parse_args(stage2("--num_train_branches", "1")).init_from == str(b1_alpha)
    err = capsys.readouterr().err
    assert f"starting from the stage-1 export {b1_alpha} (--num_train_branches 1, --alpha 0.5, --label_type gt" in err
    assert f"also found {b1_gt} (--num_train_branches 1, --alpha 0.3, --label_type gt), {b5} (" in err
    assert "llm_b1_a0.5_s0" not in err and "pass --init_from PATH to choose" in err
    assert parse_args(stage2("--num_train_branches", "1", "--alpha", "0.3")).init_from == str(b1_gt)
    # nothing shares more than the rest: the newest finished
    newer = stage1_run("llm_b5_a0.7_s0", finished_at=1_800_000_000.0)
    assert parse_args(stage2("--num_train_branches", "3", "--alpha", "0.2")).init_from == str(newer)


def test_continue_train_names_what_it_found_when_nothing_fits(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert train_main(stage2()) == 2
    err = capsys.readouterr().err
    assert f"--continue_train looks for the stage-1 export of a finished task_prefix_tree2 run on svamp_tree2 with " \
           f"this model and --run 0 at {STAGE1}/*_s0/best, and found none: run stage 1 first" in err
    stage1_run("llm_b5_a0.5_s1")
    unfinished = stage1_run("llm_b5_a0.5_s0", finished_at=None)
    assert train_main(stage2()) == 2
    err = capsys.readouterr().err
    assert f"found {unfinished} (--num_train_branches 5, --alpha 0.5, --label_type llm), which has not finished " \
           "(no summary.json: finish it with --resume)" in err
    assert train_main(stage2("--run", "2")) == 2
    assert "other runs there: llm_b5_a0.5_s0, llm_b5_a0.5_s1" in capsys.readouterr().err


def test_a_resumed_stage2_keeps_the_export_it_started_from(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    first = stage1_run("llm_b5_a0.5_s0")
    cfg = parse_args(stage2())
    Path(cfg.output_dir).mkdir(parents=True)
    Path(cfg.output_dir, "config.json").write_text(json.dumps({"init_from": cfg.init_from}))
    stage1_run("llm_b1_a0.5_s0", finished_at=1_800_000_000.0)  # a better fit, finished since
    assert parse_args(stage2()).init_from != str(first)
    assert parse_args(stage2("--resume")).init_from == str(first)
    assert f"--continue_train: resuming from the stage-1 export {first}, as this run started" in capsys.readouterr().err


def test_continue_train_and_init_from_conflict(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="give one"):
        parse_args(stage2("--init_from", str(stage1_run("llm_b5_a0.5_s0"))))
