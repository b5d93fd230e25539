"""``mindmirror-recipes``: the paper's five recipes, end to end, for a dataset, a model and seeds.

| recipe | stage 1 | stage 2 |
|---|---|---|
| ``standard`` | standard, 300 epochs | - |
| ``cot1`` | tree1, 1 branch, 300 epochs | - |
| ``cot1_se`` | tree2 (self-evaluation), 5 branches, 150 epochs | tree1, 1 branch, 300 epochs |
| ``cot5`` | tree1, 5 branches, 60 epochs | - |
| ``cot5_se`` | tree2 (self-evaluation), 5 branches, 50 epochs | tree1, 5 branches, 80 epochs |

Every stage is a real ``train/main.py`` run through ``accelerate launch`` (``--config_file`` picks
the Accelerate config: DDP, ZeRO, several nodes); stage 2 starts from stage 1's validation-selected
export (``--init_from <stage1>/best``, fresh optimizer). The paper's hyper-parameters are the
defaults (batch 16, lr 5e-5 constant, 1,024 input tokens, alpha 0.5); ``--epoch_scale`` multiplies
every stage's epochs for small studies and ``--se_epoch_scale`` the self-evaluation stages' alone
(they see 25 rows a question, so at the paper's epochs they cost several times the rest). After the
last stage the selected model is evaluated on the test split with test-time self-evaluation
(:mod:`mindmirror.evaluation.eval_cli`). ``--data_dir`` names the folder holding ``<dataset>_tree1`` and
``<dataset>_tree2`` (what ``mindmirror-teacher run --output_dir`` wrote; default: the bundled data).
Runs go to ``<output_dir>/<dataset>/<model>/<recipe>/s<run>/stage<i>``;
finished stages are skipped, so a stopped study continues where it was; ``mindmirror-report
<output_dir>`` makes the results table.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from mindmirror import runfiles
from mindmirror.data.formats import FAMILIES
from mindmirror.data.registry import SELF_EVAL
from mindmirror.tools.launching import LAUNCH_LOG, TRAIN_SCRIPT, failure_reason, local_launch, log_tail


@dataclass(frozen=True)
class Stage:
    model_type: str
    branches: int
    epochs: float  # the paper's

    @property
    def self_evaluation(self) -> bool:
        return self.model_type == SELF_EVAL


@dataclass(frozen=True)
class Recipe:
    name: str
    title: str
    stages: tuple[Stage, ...]


RECIPES = {r.name: r for r in (
    Recipe("standard", "standard distillation", (Stage("standard", 1, 300),)),
    Recipe("cot1", "1 CoT", (Stage("task_prefix_tree1", 1, 300),)),
    Recipe("cot1_se", "1 CoT + SE", (Stage(SELF_EVAL, 5, 150), Stage("task_prefix_tree1", 1, 300))),
    Recipe("cot5", "5 CoTs", (Stage("task_prefix_tree1", 5, 60),)),
    Recipe("cot5_se", "5 CoTs + SE", (Stage(SELF_EVAL, 5, 50), Stage("task_prefix_tree1", 5, 80))),
)}


def run_dir(args, recipe: Recipe, seed: int) -> Path:
    """Where one recipe's run for one seed keeps its stages."""
    return Path(args.output_dir) / args.dataset / Path(args.model).name / recipe.name / f"s{seed}"


def stage_command(args, recipe: Recipe, i: int, seed: int) -> list[str]:
    """The ``train/main.py`` flags of stage ``i`` (0-based) of ``recipe`` for seed ``seed``."""
    stage, root = recipe.stages[i], run_dir(args, recipe, seed)
    scale = args.se_epoch_scale if stage.self_evaluation else args.epoch_scale
    dataset = f"{args.dataset}_tree2" if stage.self_evaluation else f"{args.dataset}_tree1"
    flags = ["--from_pretrained", args.model, "--dataset", dataset, "--model_type", stage.model_type,
             "--num_train_branches", str(stage.branches), "--num_train_epochs", f"{stage.epochs * scale:.6g}",
             "--run", str(seed), "--batch_size", str(args.batch_size), "--lr", str(args.lr),
             "--lr_scheduler", args.lr_scheduler, "--warmup_ratio", str(args.warmup_ratio),
             "--max_input_length", str(args.max_input_length), "--alpha", str(args.alpha),
             "--label_type", args.label_type, *(["--data_dir", str(Path(args.data_dir).resolve())] if args.data_dir
                                                else []), "--experiment", recipe.name if i == len(recipe.stages) - 1
             else f"{recipe.name}/stage{i + 1}", "--output_dir", str(root / f"stage{i + 1}"), "--resume"]
    if i > 0:
        previous = (root / f"stage{i}" / runfiles.BEST).resolve()  # valid from any working directory
        flags += ["--init_from", str(previous), "--tokenizer", str(previous)]
    return flags + args.train_args


def launcher(args) -> tuple[list[str], dict]:
    """``accelerate launch`` with the user's config, or one process (bf16 on GPU, fp32 on CPU)."""
    if args.config_file:  # its port too: every node of a multi-node config must agree on it
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", args.config_file], env
    import torch

    cmd, env = local_launch(1)
    return cmd + ["--mixed_precision", "bf16" if torch.cuda.is_available() else "no"], env


def run_stage(args, recipe: Recipe, i: int, seed: int) -> str | None:
    """Run one stage; ``None`` on success, else why it failed (its console output is ``console.txt`` in its
    folder, its full log ``log.txt``)."""
    out = run_dir(args, recipe, seed) / f"stage{i + 1}"
    out.mkdir(parents=True, exist_ok=True)
    cmd, env = launcher(args)
    cmd += [str(TRAIN_SCRIPT)] + stage_command(args, recipe, i, seed)
    with open(out / LAUNCH_LOG, "a") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        code = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if code == 0 and runfiles.finished_summary(out) is not None:
        return None
    return failure_reason(code, log_tail(out / LAUNCH_LOG))[1]


def evaluate_final(args, recipe: Recipe, seed: int) -> None:
    """Test the last stage's selected model with greedy decoding and both votes (skipped when done)."""
    from mindmirror.evaluation.eval_cli import main as evaluate

    final = run_dir(args, recipe, seed) / f"stage{len(recipe.stages)}"
    if not (final / "eval_best_test.json").is_file():
        evaluate([str(final / runfiles.BEST), "--self_eval_samples", str(args.self_eval_samples),
                  "--temperature", str(args.temperature), "--seed", str(seed)])


def parse_args(argv=None):
    """The runner's flags; those after ``--`` go to every stage."""
    def csv_list(kind):
        return lambda text: [kind(x) for x in text.split(",") if x.strip()]

    p = argparse.ArgumentParser(prog="mindmirror-recipes", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--recipes", type=csv_list(str), default=list(RECIPES), help=f"from {', '.join(RECIPES)}")
    p.add_argument("--dataset", default="svamp", choices=FAMILIES,
                   help="dataset family: stages read <dataset>_tree1 and <dataset>_tree2")
    p.add_argument("--data_dir", default="",
                   help="folder holding <dataset>_tree1 and <dataset>_tree2, e.g. the --output_dir of "
                        "mindmirror-teacher run; empty: the bundled data")
    p.add_argument("--model", default="google/t5-v1_1-base", help="--from_pretrained of stage 1 (a Hub id, folder "
                                                                  "or size name)")
    p.add_argument("--runs", type=csv_list(int), default=[0], help="seeds (--run), one run of each recipe per seed")
    p.add_argument("--epoch_scale", type=float, default=1.0, help="multiplies the paper's epochs of every stage")
    p.add_argument("--se_epoch_scale", type=float, default=None,
                   help="multiplies the self-evaluation stages' epochs instead (default: --epoch_scale)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--lr_scheduler", default="constant")
    p.add_argument("--warmup_ratio", type=float, default=0.0)
    p.add_argument("--max_input_length", type=int, default=1024)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--label_type", default="gt", choices=("gt", "llm"))
    p.add_argument("--self_eval_samples", type=int, default=5,
                   help="k of the test-time votes after the last stage (0: greedy only)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of the votes")
    p.add_argument("--config_file", default="", help="Accelerate config for every stage (launch/*.yaml); "
                                                     "default: one process")
    p.add_argument("--output_dir", default="runs/recipes")
    p.add_argument("--dry_run", action="store_true", help="print the stages' commands; run nothing")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: more train/main.py flags for every stage")
    args = p.parse_args(argv)
    args.train_args = [a for a in args.train_args if a != "--"]
    args.se_epoch_scale = args.epoch_scale if args.se_epoch_scale is None else args.se_epoch_scale
    for name in args.recipes:
        if name not in RECIPES:
            p.error(f"--recipes: {name!r} is not one of {', '.join(RECIPES)}")
    if any(a == "--data_dir" or a.startswith("--data_dir=") for a in args.train_args):
        p.error("give --data_dir to mindmirror-recipes itself, not after --")
    if args.data_dir:
        needed = {f"{args.dataset}_tree2" if stage.self_evaluation else f"{args.dataset}_tree1"
                  for name in args.recipes for stage in RECIPES[name].stages}
        missing = sorted(d for d in needed if not (Path(args.data_dir) / d).is_dir())
        if missing:
            p.error(f"--data_dir {args.data_dir} has no {' or '.join(missing)} folder, which the recipes "
                    f"{', '.join(args.recipes)} train on (mindmirror-teacher run --dataset {args.dataset} "
                    f"--output_dir {args.data_dir} writes both)")
    return args


def main(argv=None) -> int:
    """Run every stage of every (recipe, seed) not yet done, then evaluate; 1 if any failed."""
    args = parse_args(argv)
    jobs = [(RECIPES[name], seed) for seed in args.runs for name in args.recipes]
    if args.dry_run:
        for recipe, seed in jobs:
            for i in range(len(recipe.stages)):
                print(f"# {recipe.title}, seed {seed}, stage {i + 1}\naccelerate launch train/main.py "
                      + shlex.join(stage_command(args, recipe, i, seed)))
        return 0
    total = sum(len(r.stages) for r, _ in jobs)
    print(f"mindmirror-recipes: {len(jobs)} run(s) of {', '.join(args.recipes)} x seeds {args.runs}, {total} "
          f"stage(s) -> {Path(args.output_dir) / args.dataset / Path(args.model).name}", flush=True)
    failed, n, t_all = [], 0, time.time()
    for recipe, seed in jobs:
        for i, stage in enumerate(recipe.stages):
            n += 1
            t0 = time.time()
            print(f"[{n}/{total}] {recipe.name} s{seed} stage {i + 1} ({stage.model_type}, {stage.branches} "
                  f"branch(es)) ...", end=" ", flush=True)
            if runfiles.finished_summary(run_dir(args, recipe, seed) / f"stage{i + 1}") is not None:
                print("already done", flush=True)
                continue
            reason = run_stage(args, recipe, i, seed)
            if reason:
                print(f"failed: {reason} (log: {run_dir(args, recipe, seed) / f'stage{i + 1}' / LAUNCH_LOG})",
                      flush=True)
                failed.append(f"{recipe.name} s{seed}")
                break
            print(f"done ({time.time() - t0:.0f} s)", flush=True)
        else:
            try:
                evaluate_final(args, recipe, seed)
            except Exception as e:  # a failed evaluation must not stop the other runs
                print(f"evaluation of {recipe.name} s{seed} failed: {type(e).__name__}: {e}", flush=True)
                failed.append(f"{recipe.name} s{seed} (evaluation)")
    print(f"{len(jobs) - len(failed)} of {len(jobs)} run(s) finished in {time.time() - t_all:.0f} s"
          + (f"; failed: {', '.join(failed)}" if failed else "")
          + f"\ntable: mindmirror-report {args.output_dir}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
