"""``mindmirror-eval``: evaluate an export or a checkpoint of a run on a split.

``MODEL`` is a Hugging Face export (a run's ``best/`` or ``final/``, or any T5 folder) or a
resumable checkpoint (``checkpoints/step_N/``, DeepSpeed ZeRO shards included). The run's own
``config.json`` (next to the export, or above the checkpoint) supplies the dataset, the model type
and the split carving, so ``mindmirror-eval runs/x/best`` evaluates what the run was trained for;
flags override it. Writes ``eval_<model>_<split>.json`` (accuracies) and
``eval_<model>_<split>_predictions.jsonl`` (input, predicted answer, generated rationale, gold,
correct, and with ``--self_eval_samples`` the sampled answers, rationales, verdicts and votes) to
the run folder or ``--output_dir``, and prints greedy, majority-vote and self-evaluation-vote
accuracy side by side (see :mod:`mindmirror.evaluation.selfeval`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from mindmirror import runfiles
from mindmirror.config import TrainConfig
from mindmirror.core.checkpoint import STATE_FILE, checkpoint_problem
from mindmirror.core.weights import checkpoint_state_dict, load_export
from mindmirror.data.registry import DATASETS, MODEL_TYPES, SELF_EVAL
from mindmirror.model import ModelLoadError


def run_config(run_dir: Path) -> dict:
    """The training config saved in a run folder (``{}`` when there is none)."""
    try:
        values = json.loads((run_dir / runfiles.CONFIG).read_text())
    except (OSError, ValueError):
        return {}
    return values if isinstance(values, dict) and "dataset" in values else {}  # not a T5 config.json


def started_from(run_dir: Path) -> str:
    """The export the run was initialised from (its summary's, resolved; else its config's), or ``""``."""
    return (runfiles.finished_summary(run_dir) or {}).get("init_from") or run_config(run_dir).get("init_from", "")


def learned_verdicts(run_dir: Path, depth: int = 8) -> bool:
    """Whether the run, or a run it was initialised from, trained the self-evaluation task."""
    if run_config(run_dir).get("model_type") == SELF_EVAL:
        return True
    start = started_from(run_dir)
    return bool(start) and depth > 0 and learned_verdicts(Path(start).parent, depth - 1)


def locate(model: Path) -> tuple[str, Path]:
    """``("export" | "checkpoint", run folder)`` of ``model``, or a ModelLoadError saying what was expected."""
    if (model / STATE_FILE).is_file():
        problem = checkpoint_problem(model)
        if problem:
            raise ModelLoadError(f"{model} is not a complete checkpoint: {problem}")
        return "checkpoint", model.parent.parent
    if (model / "config.json").is_file():
        return "export", model.parent
    raise ModelLoadError(f"{model} is neither a Hugging Face export (config.json and weights, such as <run>/best) "
                         f"nor a checkpoint (<run>/checkpoints/step_N with {STATE_FILE})")


def load(model: Path, kind: str, run: Path, cfg: TrainConfig, device, bf16: bool, tokenizer_name: str = ""):
    """(T5 model in eval mode on ``device``, tokenizer) from an export or a checkpoint; the tokenizer is
    ``tokenizer_name`` if given, else the export's own (for a checkpoint: the run's exports' or config's)."""
    import torch
    from transformers import AutoTokenizer

    from mindmirror.model import load_model, load_tokenizer

    if kind == "export":
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_name or model)
        t5 = load_export(model)
    else:
        exported = next((run / n for n in (runfiles.FINAL, runfiles.BEST)
                         if (run / n / "tokenizer_config.json").is_file()), None)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_name or exported) if tokenizer_name or exported else \
            load_tokenizer(cfg.tokenizer, cfg.from_pretrained, cfg.random_init)
        t5 = load_model(cfg.from_pretrained, tokenizer, cfg.random_init, cfg.init_from, cfg.vocab_size, speedups=False)
        missing, unexpected = t5.load_state_dict(checkpoint_state_dict(model), strict=False)
        missing = [k for k in missing if k not in getattr(t5, "all_tied_weights_keys", {})]
        if missing or unexpected:
            raise ModelLoadError(f"{model}: the checkpoint does not fit the run's model (missing {missing[:3]}, "
                                 f"unexpected {unexpected[:3]})")
    if bf16:
        t5 = t5.to(torch.bfloat16)
    return t5.to(device).eval(), tokenizer


def parse_args(argv=None):
    """The command's flags."""
    p = argparse.ArgumentParser(prog="mindmirror-eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="an export (<run>/best, <run>/final, a T5 folder) or <run>/checkpoints/step_N")
    p.add_argument("--split", default="test", choices=("test", "valid", "train"))
    p.add_argument("--dataset", default="", help=f"default: the run's ({', '.join(DATASETS)})")
    p.add_argument("--data_dir", default=None, help="default: the run's (empty: the bundled synthetic data)")
    p.add_argument("--model_type", default="", help=f"default: the run's ({', '.join(MODEL_TYPES)})")
    p.add_argument("--max_samples", type=int, default=None,
                   help="evaluate the first N rows of the split (0: all; default: the run's --max_test_samples or "
                        "--max_eval_samples)")
    p.add_argument("--self_eval_samples", type=int, default=5,
                   help="k: sampled answers (and rationales) per question for the two votes; 0: greedy only")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of the votes")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    p.add_argument("--batch_size", type=int, default=64, help="sequences generated at once")
    p.add_argument("--gen_max_len", type=int, default=0, help="most answer tokens (0: the run's --gen_max_len)")
    p.add_argument("--rationale_max_len", type=int, default=0,
                   help="most rationale tokens (0: the run's --max_target_length)")
    p.add_argument("--tokenizer", default="", help="default: the export's own")
    p.add_argument("--bf16", action="store_true", help="evaluate in bf16")
    p.add_argument("--output_dir", default="", help="default: the run folder (the export's parent)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    """Evaluate as the flags say; returns the result written to ``eval_<model>_<split>.json``."""
    import torch

    from mindmirror.data.loader import load_data
    from mindmirror.evaluation.evaluate import evaluate_split, metric_kind, write_records

    args = parse_args(argv)
    model = Path(args.model).resolve()
    kind, run_dir = locate(model)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in run_config(run_dir).items() if k in known}
    if not values and not (args.dataset and args.model_type):
        raise ValueError(f"{run_dir} holds no run {runfiles.CONFIG} (this is not a mindmirror run's export): name "
                         "what to evaluate with --dataset and --model_type")
    overrides = {"dataset": args.dataset, "model_type": args.model_type}
    values.update({k: v for k, v in overrides.items() if v})
    if args.data_dir is not None:
        values["data_dir"] = args.data_dir
    if args.max_samples is None:  # the rows the run itself was tested (or validated) on; all of train
        limit = {"valid": "max_eval_samples", "test": "max_test_samples"}.get(args.split)
        args.max_samples = values.get(limit, 0) if limit else 0
    values.update(output_dir=str(run_dir), init_from="", continue_train=False)
    if kind == "checkpoint":  # the architecture comes from where the run started (summary.json: resolved)
        values["init_from"] = started_from(run_dir)
        if values["init_from"] and not Path(values["init_from"]).is_dir():
            raise ModelLoadError(f"{run_dir / runfiles.CONFIG} says the run started from {values['init_from']}, "
                                 "which is not a folder from here: run mindmirror-eval from the run's working "
                                 "directory")
    cfg = TrainConfig(**values).validate()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.time()
    t5, tokenizer = load(model, kind, run_dir, cfg, device, args.bf16, args.tokenizer)
    tables, _ = load_data(cfg, tokenizer, splits=(args.split,), limits={args.split: args.max_samples})
    result, records = evaluate_split(
        t5, tokenizer, tables[args.split], family=DATASETS[cfg.dataset].family,
        kind=metric_kind(cfg.dataset, cfg.model_type), model_type=cfg.model_type,
        device=device, batch_size=args.batch_size, gen_max_len=args.gen_max_len or cfg.gen_max_len,
        rationale_max_len=args.rationale_max_len or cfg.max_target_length, samples=args.self_eval_samples,
        temperature=args.temperature, seed=args.seed, max_input_length=cfg.max_input_length)
    trained_step = None
    for info in (model / runfiles.EXPORT_INFO, model / STATE_FILE):
        if info.is_file():
            trained_step = json.loads(info.read_text()).get("step")
    voted = "majority_vote_accuracy" in result
    result = {"model": args.model, "step": trained_step, "split": args.split, "dataset": cfg.dataset,
              "model_type": cfg.model_type, **result, "self_eval_samples": args.self_eval_samples if voted else 0,
              "judge_trained": learned_verdicts(run_dir),
              "temperature": args.temperature, "seed": args.seed, "wall_s": time.time() - t0}
    out = Path(args.output_dir) if args.output_dir else run_dir
    out.mkdir(parents=True, exist_ok=True)
    stem = f"eval_{model.name}_{args.split}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    write_records(out / f"{stem}_predictions.jsonl", records)
    print_result(result, out / f"{stem}.json")
    return result


def print_result(result: dict, path: Path) -> None:
    """The accuracies side by side, as a small table."""
    k = result["self_eval_samples"]
    rows = [("model", f"{result['model']} (step {result['step']})"),
            ("split", f"{result['dataset']} {result['split']}, {result['rows']} rows"),
            ("greedy accuracy", f"{result['accuracy']:.3f}")]
    if "majority_vote_accuracy" in result:
        rows.append((f"majority vote of {k} samples", f"{result['majority_vote_accuracy']:.3f}"))
    if "self_eval_vote_accuracy" in result:
        rows.append(("self-evaluation-weighted vote", f"{result['self_eval_vote_accuracy']:.3f}" +
                      ("" if result["judge_trained"] else " (a judge never trained on verdicts: a control)")))
    rows.append(("written", str(path)))
    runfiles.print_table(rows)
