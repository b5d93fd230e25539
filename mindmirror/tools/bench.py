"""``mindmirror-bench``: the mindmirror loop against the original code's Hugging Face Trainer.

Both sides train the same model (same architecture, initial weights and seed) on the same
tokenized rows, with the same micro-batch, precision, learning rate and number of optimizer
steps, one after the other, each in a fresh subprocess so neither inherits the other's memory or
threads:

* **baseline** — built as the original research code is: a ``Seq2SeqTrainer`` subclass whose
  ``compute_loss`` runs one full forward per task (``model(**pred)`` then ``model(**expl)``), fed
  by a ``DataCollatorForSeq2Seq`` on randomly sampled batches;
* **mindmirror** — ``mindmirror.core.loop.train`` with the given trainer flags (``--variant`` adds
  more mindmirror runs with other flags, to measure one change at a time).

Throughput is samples (questions) per second over the steps after ``--warmup_steps``, timed from
the end of one optimizer step to the end of the next (data loading included on both sides), by the
same clock on both sides (:mod:`mindmirror.tools.stepclock`), which also splits each step's time into
data, forward, backward, clipping, optimizer and the rest.
The ratio is mindmirror / baseline. ``--repeats`` alternates the runs to even out machine noise;
the median is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mindmirror import runfiles
from mindmirror.core.collate import grouping_lengths, step_batches
from mindmirror.data.loader import token_lengths
from mindmirror.tools.stepclock import PHASES, StepClock

WORKER_FLAG = "--_worker"


# ---------------------------------------------------------------------------------------------
# shared set-up


def common_trainer_args(args) -> list[str]:
    """The mindmirror trainer flags that pin what both sides train on."""
    return ["--from_pretrained", args.model, "--dataset", args.dataset, "--model_type", "task_prefix_tree1",
            "--batch_size", str(args.batch_size), "--lr", str(args.lr), "--run", str(args.seed),
            "--max_input_length", str(args.max_input_length), "--max_target_length", str(args.max_target_length),
            "--alpha", "0.5", "--max_steps", str(args.steps), "--eval_steps", "0", "--logging_steps", "1",
            "--max_eval_samples", "4", "--max_test_samples", "4", "--gen_max_len", "4", "--report_to", "none",
            "--lr_scheduler", "constant", "--warmup_ratio", "0", "--max_grad_norm", "1.0",
            "--position_bias_lr_scale", "1",  # one rate for every weight, as the baseline's Trainer
            "--vocab_size", str(args.vocab_size), "--subsample", str(args.subsample)] + \
        (["--bf16"] if args.bf16 else []) + (["--data_dir", args.data_dir] if args.data_dir else [])


def padding_fractions(table, global_batch: int, seed: int) -> dict[str, float]:
    """Fraction of padded positions over one epoch, random batches vs length-grouped batches."""
    lens = token_lengths(table)
    grouping_key = grouping_lengths(lens)  # the loop's key
    out = {}
    for grouped in (False, True):
        padded = real = 0
        for batch in step_batches(grouping_key, global_batch, seed, 0, group_by_length=grouped):
            for v in lens.values():
                padded += int(v[batch].max()) * len(batch)
                real += int(v[batch].sum())
        out["grouped" if grouped else "random"] = 1 - real / padded
    return out


# ---------------------------------------------------------------------------------------------
# the two workers (each runs in its own process)


def run_mindmirror(args, extra: list[str], workdir: Path) -> dict:
    from mindmirror.config import parse_args
    from mindmirror.core import step
    from mindmirror.core.loop import Trainer, train
    from mindmirror.core.objective import DistillationObjective

    flags = common_trainer_args(args) + ["--output_dir", str(workdir / "out")] + extra
    cfg = parse_args(flags)
    t0 = time.time()
    with StepClock() as clock:
        clock.wrap(Trainer, "collate_step", "data")  # the step's rows read and collated
        clock.wrap(DistillationObjective, "forward", "forward")
        clock.wrap(step, "gradient_norm", "clip")  # the clip itself is AdamW's, as it steps
        train(cfg)
    wall = time.time() - t0
    records = [json.loads(line) for line in (workdir / "out" / runfiles.METRICS).read_text().splitlines()]
    losses = [r["loss"] for r in records if "samples_per_s" in r]
    return {"wall_s": wall, "final_loss": losses[-1], "split": clock.split(skip=args.warmup_steps)}


def run_baseline(args, workdir: Path) -> dict:
    """The original code's trainer: one forward per task, random batches padded by the collator."""
    import torch
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments
    from transformers.trainer_utils import set_seed

    from mindmirror.model import load_model

    cfg, tokenizer, t = train_table(args)
    features = Dataset.from_dict({
        "input_ids": t["input_ids"], "attention_mask": [[1] * len(x) for x in t["input_ids"]], "labels": t["labels"],
        "expl_input_ids": t["expl_input_ids"], "expl_attention_mask": [[1] * len(x) for x in t["expl_input_ids"]],
        "aux_labels": t["rationale_ids"]})

    class TaskPrefixDataCollator(DataCollatorForSeq2Seq):
        def __call__(self, features, return_tensors=None):
            pred = [{"input_ids": f["input_ids"], "attention_mask": f["attention_mask"], "labels": f["labels"]}
                    for f in features]
            expl = [{"input_ids": f["expl_input_ids"], "attention_mask": f["expl_attention_mask"],
                     "labels": f["aux_labels"]} for f in features]
            return {"pred": super().__call__(pred, return_tensors), "expl": super().__call__(expl, return_tensors)}

    class TaskPrefixTrainer(Seq2SeqTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            pred_outputs = model(**inputs["pred"])
            expl_outputs = model(**inputs["expl"])
            loss = 0.5 * pred_outputs.loss + 0.5 * expl_outputs.loss
            return (loss, {"pred": pred_outputs, "expl": expl_outputs}) if return_outputs else loss

    set_seed(args.seed)
    model = load_model(cfg.from_pretrained, tokenizer, cfg.random_init, vocab_size=cfg.vocab_size,
                       speedups=False)  # the stock transformers model, as the original code trains
    training_args = Seq2SeqTrainingArguments(
        output_dir=str(workdir / "baseline"), per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
        max_steps=args.steps, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, seed=args.seed,
        bf16=args.bf16, use_cpu=not torch.cuda.is_available(), remove_unused_columns=False, save_strategy="no",
        eval_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True, optim="adamw_torch")
    trainer = TaskPrefixTrainer(model=model, args=training_args, train_dataset=features,
                                data_collator=TaskPrefixDataCollator(tokenizer=tokenizer, model=model))
    start = time.perf_counter()
    with StepClock() as clock:
        clock.wrap(Dataset, "__getitems__", "data")  # the rows read
        clock.wrap(TaskPrefixDataCollator, "__call__", "data")
        clock.wrap(TaskPrefixTrainer, "compute_loss", "forward")
        result = trainer.train()
    return {"wall_s": time.perf_counter() - start, "final_loss": result.training_loss,
            "split": clock.split(skip=args.warmup_steps)}


# ---------------------------------------------------------------------------------------------
# the driver


def spawn(args, role: str, extra: list[str], workdir: Path) -> dict:
    cmd = [sys.executable, "-m", "mindmirror.tools.bench", *args.argv, WORKER_FLAG, role, "--_workdir", str(workdir),
           f"--_extra={shlex.join(extra)}"]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    result_file = workdir / "result.json"
    if proc.returncode != 0 or not result_file.exists():
        raise RuntimeError(f"the {role} run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(result_file.read_text())


def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(prog="mindmirror-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="t5-v1_1-small", help="size name or model folder")
    p.add_argument("--dataset", default="svamp_tree1")
    p.add_argument("--data_dir", default="")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    p.add_argument("--warmup_steps", type=int, default=2, help="first steps left out of the timing")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--subsample", type=float, default=1.0, help="fraction of the training rows loaded")
    p.add_argument("--vocab_size", type=int, default=32128,
                   help="embedding rows of a built model (32128: the published t5-v1_1 architecture; "
                        "0: the tokenizer's)")
    p.add_argument("--max_input_length", type=int, default=1024)
    p.add_argument("--max_target_length", type=int, default=256)
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision on both sides")
    p.add_argument("--repeats", type=int, default=1, help="alternate baseline and mindmirror runs this many times")
    p.add_argument("--variant", action="append", default=[], metavar='NAME="FLAGS"',
                   help='another mindmirror run with extra trainer flags, e.g. pad8="--pad_to_multiple_of 8"')
    p.add_argument("--flags", default="", help="extra trainer flags for the main mindmirror run")
    p.add_argument("--skip_baseline", action="store_true")
    p.add_argument("--output", default="", help="write the figures as JSON here")
    p.add_argument(WORKER_FLAG, default="", help=argparse.SUPPRESS)
    p.add_argument("--_workdir", default="", help=argparse.SUPPRESS)
    p.add_argument("--_extra", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = [a for a in (argv if argv is not None else sys.argv[1:])]
    return args


def main(argv: list[str] | None = None) -> int:
    run(argv)
    return 0


def run(argv: list[str] | None = None) -> dict | None:
    """Run the benchmark (or, with the hidden worker flag, one side of it); returns the figures."""
    args = parse_args(argv)
    if args._worker:  # inside a worker process
        workdir = Path(args._workdir)
        result = run_baseline(args, workdir) if args._worker == "baseline" \
            else run_mindmirror(args, shlex.split(args._extra), workdir)
        (workdir / "result.json").write_text(json.dumps(result))
        return None

    runs = ([("baseline", [])] if not args.skip_baseline else []) + [("mindmirror", shlex.split(args.flags))]
    for v in args.variant:
        name, _, flags = v.partition("=")
        runs.append((name.strip(), shlex.split(flags) + shlex.split(args.flags)))
    print(f"mindmirror-bench: {args.model}, {args.dataset}, micro-batch {args.batch_size}, {args.steps} steps "
          f"({args.warmup_steps} untimed), {'bf16' if args.bf16 else 'fp32'}, {args.repeats} repeat(s)", flush=True)

    samples: dict[str, list[float]] = {name: [] for name, _ in runs}
    splits: dict[str, list[dict]] = {name: [] for name, _ in runs}
    losses: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="mindmirror-bench-") as tmp:
        for r in range(args.repeats):
            for name, extra in runs:
                workdir = Path(tmp) / f"{name}-{r}"
                workdir.mkdir()
                result = spawn(args, "baseline" if name == "baseline" else "mindmirror", extra, workdir)
                samples[name].append(args.batch_size / result["split"]["step"])
                splits[name].append(result["split"])
                losses[name] = result["final_loss"]
                print(f"  {name:<12} repeat {r + 1}: {samples[name][-1]:7.2f} samples/s "
                      f"(run wall {result['wall_s']:.0f} s)", flush=True)
        padding = padding_fractions(train_table(args)[2], args.batch_size, args.seed)

    figures = {name: statistics.median(v) for name, v in samples.items()}
    base = figures.get("baseline")
    lines = ["", runfiles.markdown_table(["run", "samples/s", "vs baseline"],
                                         [[name, f"{value:.2f}", f"{value / base:.2f}x" if base else "-"]
                                          for name, value in figures.items()])]
    lines += ["", f"padding fraction over one epoch: random batches {padding['random']:.1%}, "
                  f"length-grouped {padding['grouped']:.1%}"]
    split = {name: {key: statistics.median(s[key] for s in v) for key in v[0]} for name, v in splits.items()}
    lines += ["", "time per optimizer step (ms; median over repeats of each run's mean over its timed steps):", "",
              split_table(split)]
    print("\n".join(lines), flush=True)
    report = {"args": {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "argv"},
              "samples_per_s": figures, "all_samples_per_s": samples, "padding": padding, "split": split,
              "ratio": figures["mindmirror"] / base if base else None, "final_loss": losses}
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2))
    return report


def split_table(split: dict[str, dict[str, float]]) -> str:
    """The runs' per-step time split (:mod:`mindmirror.tools.stepclock`) as a Markdown table, one column per run."""
    names = list(split)
    rows = [[phase] + [f"{split[n][phase] * 1e3:.0f}" for n in names] for phase in (*PHASES, "step")]
    rows.append(["host reads (count)"] + [f"{split[n]['host_reads']:.0f}" for n in names])
    rows.append(["host reads (ms, inside the phases)"] + [f"{split[n]['host_read_s'] * 1e3:.1f}" for n in names])
    return runfiles.markdown_table(["phase", *names], rows)


def train_table(args):
    """The trainer config both sides share, the tokenizer, and the tokenized training rows."""
    from mindmirror.config import read_args
    from mindmirror.data.loader import load_data
    from mindmirror.model import load_tokenizer

    cfg = read_args(common_trainer_args(args))
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.from_pretrained, cfg.random_init)
    return cfg, tokenizer, load_data(cfg, tokenizer, splits=("train",))[0]["train"]


if __name__ == "__main__":
    sys.exit(main())
