"""The one training configuration: a dataclass, parsed from the command line or a JSON/YAML file.

``TrainConfig`` is made of six groups, one per part of the trainer (:data:`GROUPS`: data, model,
optimisation, checkpointing, evaluation, logging), and reads flat (``cfg.lr``; config.json holds flat keys);
``group(cfg, DataConfig)`` gives one group's values, typed. ``--help`` and the README's flag table show the
groups as sections. The original flags that nothing acts on are listed once, in :data:`COMPAT_FLAGS`.

The defaults are the embedded default run (a tiny T5 on the bundled synthetic data, a few minutes
on two CPU cores). The original ``run.py`` flags keep their names and meaning. Precision, ZeRO
stage and world size are not here: they come from the Accelerate config (``launch/*.yaml``) and
the DeepSpeed JSON (``ds_configs/``), as Accelerate users expect.
"""

from __future__ import annotations

import copy
import json
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from mindmirror import runfiles
from mindmirror.data.registry import DATASETS, LABEL_TYPES, MODEL_TYPES, SELF_EVAL
from mindmirror.model import SIZES, builds_from_config

SCHEDULERS = ("constant", "linear", "cosine")


# T5's only position information is its relative position-bias tables, and AdamW moves each entry by about the
# learning rate per step: at 2e-3 with warm-up and linear decay the embedded default's 1,176 steps move an entry by
# at most ~1.2 in all, too little for a model trained from scratch to single out a neighbouring token (README,
# "The embedded default"). Ten times the rate gives the tables the range within the first epochs.
AUTO_POSITION_BIAS_LR_SCALE = 10.0


# Marks a DataConfig field's metadata may carry besides its help text (HfArgumentParser passes metadata to
# argparse, so the parser drops these first): ``rows``, a flag that shapes the task rows (passed to
# ``build_task_rows``); ``tokens``, one that shapes their tokens (passed to ``tokenize_rows``). Both key the
# data cache (:mod:`mindmirror.data.loader`).
MARKS = ("rows", "tokens")


def _arg(default, help, **marks):
    if set(marks) - set(MARKS):
        raise TypeError(f"unknown marks {sorted(set(marks) - set(MARKS))}; known: {', '.join(MARKS)}")
    return field(default=default, metadata={"help": help, **marks})


@dataclass(frozen=True)
class Compat:
    """An original ``run.py`` flag that nothing in mindmirror acts on: accepted, so that the original command
    lines run unchanged, and at most recorded (config.json) or refused for a value mindmirror cannot honour."""

    meaning: str  # what the flag meant in the original code
    effect: str  # what it does here
    refused: Callable[[Any], bool] | None = None  # the values validate() refuses,
    refusal: str = ""  # with this message ({value!r} filled in)

    def help(self) -> str:
        return f"{self.meaning}. Accepted for compatibility: {self.effect}."


# The one list of the flags accepted for compatibility: their help texts, the README's flag table and
# TrainConfig.validate() read it.
COMPAT_FLAGS: dict[str, Compat] = {
    "llm": Compat("Name of the teacher whose files are read", "recorded in config.json; the files decide"),
    "prompt": Compat("Original flag: prepend the (empty) prompt of the original code", "no effect"),
    "local_rank": Compat("Set by launchers", "no effect (Accelerate reads the environment)"),
    "parallelize": Compat("Original naive model parallelism",
                          "not supported, refused when given (shard with DeepSpeed ZeRO-3)",
                          refused=bool,
                          refusal="--parallelize (naive model parallelism) is not supported: shard the model with "
                                  "DeepSpeed ZeRO-3 instead (accelerate launch --config_file launch/zero3.yaml "
                                  "train/main.py ...)"),
    "optimizer_name": Compat("Optimizer", "AdamW only, any other name refused (or the one named in a DeepSpeed JSON)",
                             refused=lambda name: name.lower() != "adamw",
                             refusal="--optimizer_name {value!r}: only AdamW is built in; name another optimizer "
                                     "in a DeepSpeed JSON (ds_configs/) instead"),
}


def _compat(default, name: str):
    return _arg(default, COMPAT_FLAGS[name].help())


@dataclass
class DataConfig:
    """What the run trains and evaluates on: the data set, its teacher files, the splits and how bad records
    are handled, the token lengths, and the cache of tokenized tables."""

    _argument_group_name = "data"

    dataset: str = _arg("svamp_tree1", f"Dataset folder under --data_dir: {', '.join(DATASETS)}.", rows=True)
    data_dir: str = _arg("", "Folder holding one folder per dataset; empty: the bundled synthetic data.", rows=True)
    model_type: str = _arg("task_prefix_tree1", "standard (answer task only, alpha ignored), task_prefix_tree1 "
                                                "(answer + rationale on CoT data), task_prefix_tree2 (verdict + "
                                                "evaluation on self-evaluation data).", rows=True)
    label_type: str = _arg("gt", "gt: ground-truth labels; llm: labels parsed from the teacher's answers.", rows=True)
    llm: str = _compat("gpt-3.5-turbo", "llm")
    prompt: bool = _compat(False, "prompt")
    num_train_branches: int = _arg(1, "CoTs used per training question: its first N usable ones (1 to what the "
                                      "teacher files hold).", rows=True)
    valid_fraction: float = _arg(0.1, "Fraction of training questions carved out as the validation split.", rows=True)
    subsample: float = _arg(1.0, "Fraction of training questions kept (seed --run).", rows=True)
    skip_bad_records: bool = _arg(False, "Skip and count every bad record, structural faults included, with no "
                                         "--max_bad_fraction limit.", rows=True)
    strict_data: bool = _arg(False, "Stop at the first bad record, even a CoT or self-evaluation that cannot be "
                                    "parsed (by default those are dropped and listed in skipped_records.jsonl).",
                             rows=True)
    max_bad_fraction: float = _arg(0.05, "Stop when more than this share of a split's questions are left out for "
                                         "unusable teacher text (a wrong file or format shows up as mostly bad); "
                                         "CoTs and self-evaluations dropped from questions that are kept do not "
                                         "count.", rows=True)
    max_input_length: int = _arg(1024, "Inputs are truncated to this many tokens.", tokens=True)
    max_target_length: int = _arg(256, "Labels and rationales are truncated to this many tokens.", tokens=True)
    cache_dir: str = _arg("", "Tokenized-data cache; empty: $MINDMIRROR_CACHE or ~/.cache/mindmirror.")
    preprocessing_num_workers: int = _arg(0, "Processes that tokenize the training rows the first time a data set "
                                             "is used; 0: up to 8 for 20,000 rows or more, else 1.")


@dataclass
class ModelConfig:
    """The student: which weights or architecture it starts from, its tokenizer, and how it is held and computed
    (precision, activation checkpointing)."""

    _argument_group_name = "model"

    from_pretrained: str = _arg("tiny", "Model: a Hub id (google/t5-v1_1-base), a local folder, or a size name "
                                        f"({', '.join(SIZES)}). Size names and --random_init build the "
                                        "architecture from configs shipped with mindmirror, without weights.")
    tokenizer: str = _arg("", "Tokenizer folder or Hub id; empty: the model's own, or the bundled one for "
                              "size names and --random_init.")
    random_init: bool = _arg(False, "Build the named t5-v1_1 architecture with random weights (no download).")
    vocab_size: int = _arg(0, "Built models (size names, --random_init): embedding rows; 0: the tokenizer's size "
                              "rounded up to 128 (32128 gives the published t5-v1_1 architecture).")
    init_from: str = _arg("", "Stage 2: initialise the weights from this stage-1 export (fresh optimizer).")
    continue_train: bool = _arg(False, "Stage 2: start from the best export of the finished stage-1 run "
                                       "(task_prefix_tree2 on the same dataset family, model and --run) in its "
                                       "default --output_dir under runs/, whatever its branch count, alpha and "
                                       "label type; see README.")
    gradient_checkpointing: bool = _arg(False, "Recompute activations in the backward pass to save memory.")
    bf16: bool = _arg(False, "bf16 mixed precision when the Accelerate config does not say otherwise.")
    parallelize: bool = _compat(False, "parallelize")


@dataclass
class OptimConfig:
    """How the student is trained and for how long: the seed, the loss's weights, batch and accumulation,
    AdamW and its schedule, clipping, the step plan, and the limits that stop a failing run."""

    _argument_group_name = "optimisation"

    run: int = _arg(0, "Random seed of the run (initialisation, shuffling, subsampling).")
    alpha: float = _arg(0.5, "Loss = alpha * label_loss + (1 - alpha) * rationale_loss, alpha in [0, 1].")
    batch_size: int = _arg(32, "Micro-batch size per process (questions; each gives a predict and an explain "
                               "row). Global batch = batch_size x grad_accum_steps x processes.")
    grad_accum_steps: int = _arg(1, "Micro-batches accumulated per optimizer step.")
    grad_steps: int = _arg(0, "Original name of --grad_accum_steps (0: not given).")
    lr: float = _arg(2e-3, "Peak learning rate of AdamW (the paper used 5e-5 for pretrained t5-v1_1).")
    lr_scheduler: str = _arg("linear", f"Learning-rate schedule after warm-up: {', '.join(SCHEDULERS)} "
                                       "(the original code used constant).")
    warmup_ratio: float = _arg(0.05, "Fraction of the optimizer steps spent warming the lr up from 0.")
    weight_decay: float = _arg(0.0, "AdamW weight decay.")
    position_bias_lr_scale: float = _arg(0.0, "Learning-rate multiplier of T5's relative position-bias tables (an "
                                              "AdamW group of their own, not decayed); 0: "
                                              f"{AUTO_POSITION_BIAS_LR_SCALE:g} for a model that starts from random "
                                              "weights (size names, --random_init), 1 for loaded weights (a "
                                              "pretrained model, --init_from, --continue_train). See README, "
                                              "'The embedded default'.")
    max_grad_norm: float = _arg(1.0, "Gradient clipping norm (0: no clipping).")
    optimizer_name: str = _compat("AdamW", "optimizer_name")
    num_train_epochs: float = _arg(7.0, "Epochs over the training rows (ignored when --max_steps > 0).")
    max_steps: int = _arg(-1, "Optimizer steps to train; -1: --num_train_epochs decides.")
    group_by_length: bool = _arg(True, "Group rows of similar length into the same step (less padding).")
    pad_to_multiple_of: int = _arg(0, "Pad sequence lengths to a multiple of this; 0: 8 on GPU, 1 on CPU.")
    max_nonfinite_steps: int = _arg(5, "Stop after this many non-finite losses in a row.")
    collective_timeout: float = _arg(60.0, "Minutes a process waits for the others in a collective (NCCL, gloo and "
                                           "DeepSpeed alike) before the run fails: long enough for the main "
                                           "process's own work (a data-cache build, a save or an export).")
    local_rank: int = _compat(-1, "local_rank")


@dataclass
class CheckpointConfig:
    """Where the run's folder is, and the resumable checkpoints kept in it."""

    _argument_group_name = "checkpointing"

    output_dir: str = _arg("", "Where outputs go; empty: runs/<dataset>/<model_type>/<model>/<label_type>_"
                               "b<branches>_a<alpha>_s<run>.")
    save_steps: int = _arg(0, "Save a resumable checkpoint every N optimizer steps (0: at the end only).")
    save_total_limit: int = _arg(2, "Keep this many newest checkpoints.")
    resume: bool = _arg(False, "Continue from the newest complete checkpoint in --output_dir.")


@dataclass
class EvaluationConfig:
    """Validation during the run and the test of best/: when, on how many rows, in what batches, and what is
    generated."""

    _argument_group_name = "evaluation"

    eval_steps: int = _arg(0, "Evaluate on the validation split every N optimizer steps (0: at epoch ends only).")
    max_eval_samples: int = _arg(0, "Evaluate on at most this many validation rows (0: all).")
    max_test_samples: int = _arg(0, "Test on at most this many test rows (0: all).")
    eval_batch_size: int = _arg(0, "Rows generated at once per process at evaluation (validation and the test of "
                                   "best/); 0: 4 x --batch_size. Generation keeps no activations for a backward "
                                   "pass, so it fits larger batches than training; under ZeRO-3 each generated "
                                   "token gathers the whole decoder once for the whole batch.")
    gen_max_len: int = _arg(64, "Most tokens generated per answer at evaluation.")
    output_rationale: bool = _arg(False, "At test time also generate rationales into predictions.jsonl.")


@dataclass
class LoggingConfig:
    """What the run reports and where: loss lines, trackers, the console, and the label its seeds share."""

    _argument_group_name = "logging"

    experiment: str = _arg("", "Label of this run's group of seeds in summary.json; mindmirror-report averages the "
                               "runs of one label (empty: <model_type> b<branches>).")
    logging_steps: int = _arg(10, "Log losses every N optimizer steps.")
    report_to: str = _arg("tensorboard", "Accelerate tracker(s): tensorboard, wandb, mlflow, ..., or none.")
    no_log: bool = _arg(False, "No TensorBoard/tracker logging (metrics.jsonl is still written).")
    verbose: bool = _arg(False, "Show every library's messages on the console too (they always go to "
                                "<output_dir>/log.txt).")


# The groups in the order of their sections in --help and the README; TrainConfig's fields run in this order.
GROUPS = (DataConfig, ModelConfig, OptimConfig, CheckpointConfig, EvaluationConfig, LoggingConfig)
G = TypeVar("G")


def group(cfg, cls: type[G]) -> G:
    """The values of ``cfg`` that the group ``cls`` holds, as a ``cls`` (a copy: ``cfg`` stays as it is)."""
    return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls)})


def marked(mark: str) -> tuple[str, ...]:
    """The DataConfig fields that carry ``mark`` (:data:`MARKS`): those that shape the rows or their tokens."""
    return tuple(f.name for f in fields(DataConfig) if f.metadata.get(mark))


# Dataclass fields are collected in reverse MRO order, so the bases are listed last group first: the fields (and
# --help, the README table and config.json) run data, model, optimisation, checkpointing, evaluation, logging.
@dataclass
class TrainConfig(LoggingConfig, EvaluationConfig, CheckpointConfig, OptimConfig, ModelConfig, DataConfig):
    """A run's flags, flat (``cfg.lr``), made of the six groups of :data:`GROUPS` (``group(cfg, OptimConfig)``)."""

    @property
    def seed(self) -> int:
        """The run's random seed: the original flag ``--run``, read under the name of what it is (beside
        :class:`mindmirror.core.build.Run`, the run itself)."""
        return self.run

    # -----------------------------------------------------------------------------------------
    def validate(self) -> TrainConfig:
        """Fill derived values and reject bad ones with a message that says what to do."""
        self._check_choices()
        if self.grad_steps:
            if self.grad_accum_steps not in (1, self.grad_steps):
                raise ValueError(f"--grad_steps {self.grad_steps} and --grad_accum_steps {self.grad_accum_steps} "
                                 "disagree")
            self.grad_accum_steps = self.grad_steps
        self._check_values()
        self._check_folders()
        if not self.output_dir:
            self.output_dir = str(default_output_dir(self))
        if self.continue_train:
            export, line = find_stage1_export(self)
            self.init_from = str(export)
            if os.environ.get("RANK", "0") == "0":  # the console of the main process (before logging is set up)
                sys.stderr.write(line + "\n")
        return self

    def _check_choices(self) -> None:
        """The data set, method and optimizer named exist and are supported."""
        if self.dataset not in DATASETS:
            raise ValueError(f"--dataset {self.dataset!r} is unknown; choose one of {', '.join(DATASETS)}")
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"--model_type {self.model_type!r} is unknown; choose one of {', '.join(MODEL_TYPES)}")
        if self.label_type not in LABEL_TYPES:
            raise ValueError(f"--label_type {self.label_type!r} is unknown; choose gt or llm")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"--alpha must be in [0, 1], got {self.alpha}")
        if self.num_train_branches < 1:
            raise ValueError(f"--num_train_branches must be at least 1, got {self.num_train_branches}")
        for name, compat in COMPAT_FLAGS.items():  # e.g. --parallelize, --optimizer_name Adafactor
            value = getattr(self, name)
            if compat.refused is not None and compat.refused(value):
                raise ValueError(compat.refusal.format(value=value))
        if self.lr_scheduler not in SCHEDULERS:
            raise ValueError(f"--lr_scheduler must be one of {', '.join(SCHEDULERS)}")

    def _check_values(self) -> None:
        """Sizes, fractions and limits in their ranges, the data flags in agreement, and a length to train."""
        for name in ("batch_size", "grad_accum_steps", "max_input_length", "max_target_length", "gen_max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1")
        if self.position_bias_lr_scale < 0:
            raise ValueError("--position_bias_lr_scale must be at least 0 (0: automatic), got "
                             f"{self.position_bias_lr_scale}")
        if self.eval_batch_size < 0:
            raise ValueError(f"--eval_batch_size must be at least 1 (0: 4 x --batch_size), got {self.eval_batch_size}")
        if not 0.0 < self.subsample <= 1.0:
            raise ValueError(f"--subsample must be in (0, 1], got {self.subsample}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"--max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        if not self.collective_timeout > 0:
            raise ValueError(f"--collective_timeout must be a positive number of minutes, got "
                             f"{self.collective_timeout}")
        if self.strict_data and self.skip_bad_records:
            raise ValueError("--strict_data and --skip_bad_records contradict each other: give one")
        if not 0.0 < self.valid_fraction < 1.0:
            raise ValueError(f"--valid_fraction must be in (0, 1), got {self.valid_fraction}")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ValueError("give --max_steps or a positive --num_train_epochs")

    def _check_folders(self) -> None:
        """The folders named exist, and one stage-1 model at most is named."""
        if self.init_from and self.continue_train:
            raise ValueError("--init_from and --continue_train both name a stage-1 model: give one")
        if self.init_from and not Path(self.init_from).is_dir():
            raise ValueError(f"--init_from {self.init_from}: no such folder (expected a stage-1 export such as "
                             "<run>/best)")
        if self.data_dir and not Path(self.data_dir).is_dir():
            raise ValueError(f"--data_dir {self.data_dir}: no such folder")


def position_bias_lr_scale(cfg: TrainConfig) -> float:
    """``--position_bias_lr_scale`` resolved: as given, or for 0 the automatic choice (random weights or loaded)."""
    if cfg.position_bias_lr_scale > 0:
        return cfg.position_bias_lr_scale
    starts_random = builds_from_config(cfg.from_pretrained, cfg.random_init) and not cfg.init_from
    return AUTO_POSITION_BIAS_LR_SCALE if starts_random else 1.0


def default_output_dir(cfg: TrainConfig, **override) -> Path:
    """``runs/<dataset>/<model_type>/<model>/<label_type>_b<branches>_a<alpha>_s<run>``."""
    values = {f.name: getattr(cfg, f.name) for f in fields(cfg)} | override
    model = Path(values["from_pretrained"]).name or values["from_pretrained"]
    leaf = f"{values['label_type']}_b{values['num_train_branches']}_a{values['alpha']}_s{values['run']}"
    return Path("runs") / values["dataset"] / values["model_type"] / model / leaf


def _finished(run_dir: Path) -> float | None:
    """When the run in ``run_dir`` finished (its summary.json, written last), or ``None`` if it has not."""
    summary = runfiles.finished_summary(run_dir)
    try:
        return (run_dir / runfiles.SUMMARY).stat().st_mtime if summary and "final_step" in summary else None
    except OSError:  # removed meanwhile
        return None


def find_stage1_export(cfg: TrainConfig) -> tuple[Path, str]:
    """The stage-1 export ``--continue_train`` starts from, and a console line saying which and why.

    Stage 1 is a finished ``task_prefix_tree2`` run on ``<family>_tree2`` with the same model and ``--run``, in
    its default folder ``runs/<family>_tree2/task_prefix_tree2/<model>/<label_type>_b<B>_a<A>_s<run>``. Its
    branch count, alpha and label type may differ from this run's: the paper's stage 1 uses 5 branches whatever
    stage 2 uses, alpha weighs other tasks (verdict and evaluation), and self-evaluation labels are the teacher's
    verdicts whatever --label_type says. When several fit, the one with this run's --num_train_branches, then
    --alpha, then --label_type is taken, then the newest finished; the line names the others. A resumed run
    (--resume) keeps the export it started from. Raises ValueError, listing what was found, when none fits.
    """
    family = DATASETS[cfg.dataset].family
    folder = default_output_dir(cfg, model_type=SELF_EVAL, dataset=f"{family}_tree2").parent
    started = Path(cfg.output_dir) / runfiles.CONFIG
    if cfg.resume and started.is_file():
        try:
            recorded = json.loads(started.read_text()).get("init_from", "")
        except (OSError, ValueError, AttributeError):
            recorded = ""
        if recorded and Path(recorded).is_dir():
            return Path(recorded), f"--continue_train: resuming from the stage-1 export {recorded}, as this run started"
    leaf = re.compile(rf"({'|'.join(LABEL_TYPES)})_b(\d+)_a(.+)_s{cfg.run}")
    found = []  # (export, its flags as text, when it finished or None, preference)
    for run_dir in sorted(folder.iterdir()) if folder.is_dir() else []:
        m = leaf.fullmatch(run_dir.name)
        if m is None or not (run_dir / runfiles.BEST).is_dir():
            continue
        label_type, branches, alpha = m.group(1), int(m.group(2)), m.group(3)
        try:
            same_alpha = float(alpha) == cfg.alpha
        except ValueError:
            continue
        finished = _finished(run_dir)
        flags = f"--num_train_branches {branches}, --alpha {alpha}, --label_type {label_type}"
        found.append((run_dir / runfiles.BEST, flags, finished, (branches == cfg.num_train_branches, same_alpha,
                                                                 label_type == cfg.label_type, finished or 0.0)))
    usable = sorted((f for f in found if f[2] is not None), key=lambda f: f[3], reverse=True)
    where = f"{folder}/*_s{cfg.run}/{runfiles.BEST}"
    if not usable:
        unfinished = "".join(f"; found {export} ({flags}), which has not finished (no {runfiles.SUMMARY}: finish it "
                             "with --resume)" for export, flags, *_ in found)
        seeds = sorted(d.name for d in folder.iterdir() if (d / runfiles.BEST).is_dir()) if folder.is_dir() else []
        others = f"; other runs there: {', '.join(seeds)}" if seeds and not found else ""
        raise ValueError(f"--continue_train looks for the stage-1 export of a finished {SELF_EVAL} run on "
                         f"{family}_tree2 with this model and --run {cfg.run} at {where}, and found none"
                         f"{unfinished}{others}: run stage 1 first, or pass --init_from PATH")
    export, flags, finished, _ = usable[0]
    line = f"--continue_train: starting from the stage-1 export {export} ({flags}; finished " \
           f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(finished))})"
    if len(usable) > 1:
        line += "; also found " + ", ".join(f"{e} ({fl})" for e, fl, *_ in usable[1:]) + \
                " (taken: the same --num_train_branches, then --alpha, then --label_type, then the newest; pass " \
                "--init_from PATH to choose)"
    return export, line


def flags_markdown() -> str:
    """The flag tables of the README, one per group under its name in bold (kept in sync by a test)."""
    tables = [f"**{cls._argument_group_name}**: {' '.join(cls.__doc__.split())}\n\n" + runfiles.markdown_table(
        ["flag", "default", "meaning"],
        [[f"`--{f.name}`", "(empty)" if f.default == "" else f"`{f.default}`", f.metadata["help"].replace("|", "/")]
         for f in fields(cls)]) for cls in GROUPS]
    compat = ", ".join(f"`--{name}`" for name in COMPAT_FLAGS)
    return "\n\n".join(tables + [f"Accepted for compatibility, so that the original command lines run unchanged, "
                                  f"and recorded or refused but otherwise not acted on: {compat}."])


def parser():
    """The command line's parser: one argparse section per group (``--help``), every flag under its own name."""
    from transformers import HfArgumentParser

    class Parser(HfArgumentParser):
        @staticmethod
        def _parse_dataclass_field(parser, field):  # argparse takes the help text, not the marks
            field = copy.copy(field)
            field.metadata = MappingProxyType({k: v for k, v in field.metadata.items() if k not in MARKS})
            HfArgumentParser._parse_dataclass_field(parser, field)

    return Parser(GROUPS, description="Train a T5 student on a teacher LLM's chains of thought and "
                                      "self-evaluations (Mind's Mirror).")


def read_args(argv: list[str] | None = None) -> TrainConfig:
    """Flags (or a single ``.json``/``.yaml`` config file path of flat keys) into a config, not yet validated."""
    p = parser()
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        loader = p.parse_json_file if argv[0].endswith(".json") else p.parse_yaml_file
        parts = loader(argv[0])  # a key no group holds: ValueError
    else:
        parts = p.parse_args_into_dataclasses(args=argv)  # a flag no group holds: ValueError
    return TrainConfig(**{f.name: getattr(part, f.name) for part in parts for f in fields(part)})


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Parse flags (or a single ``.json``/``.yaml`` config file path) into a validated config."""
    return read_args(argv).validate()
