"""``mindmirror-teacher``: generate tree-of-thought teacher data from an OpenAI-compatible LLM.

``mindmirror-teacher run`` reads the ground-truth questions of a dataset, asks the teacher for
CoTs and self-evaluations, and writes ``<family>_tree1`` and ``<family>_tree2`` under
``--output_dir``, ready for ``train/main.py --data_dir <output_dir>``. With ``--shard i/n`` it
answers one block of each split; ``mindmirror-teacher merge`` then writes the data from all shards.
See docs/teacher.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from mindmirror.data import registry
from mindmirror.data.formats import DataError
from mindmirror.teacher import layout
from mindmirror.teacher.client import ChatClient, RateLimiter, RetryPolicy, ServerRefused, public_url
from mindmirror.teacher.generate import Progress, Sampling, Teacher, TooManyFailures, answer_all
from mindmirror.teacher.prompts import PromptError, load_prompts
from mindmirror.teacher.store import ResponseStore, StoreLockedError

PROG = "mindmirror-teacher"


def _positive(kind):
    def parse(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def _non_negative(kind):
    def parse(text):
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
        return value
    return parse


def _splits(text: str) -> list[str]:
    return list(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except where there is none to show (required flags, empty strings, switches)."""

    def _get_help_string(self, action):
        if action.required or action.default in (None, "", False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The ``run`` and ``merge`` subcommands and their flags."""
    fmt = _Help
    parser = argparse.ArgumentParser(prog=PROG, formatter_class=fmt,
                                     description="Generate tree-of-thought teacher data (CoTs and self-evaluations) "
                                                 "from an OpenAI-compatible LLM, in the layout the trainer reads.",
                                     epilog="Run 'mindmirror-teacher run --help' for the flags of a run.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{run,merge}")

    run = sub.add_parser("run", formatter_class=fmt, help="query the teacher and write the data (or one shard)",
                         description="Query an OpenAI-compatible chat-completions endpoint for tree-of-thought CoTs "
                                     "and self-evaluations of a dataset's questions, and write the tree1/tree2 data.")
    data = run.add_argument_group("data")
    data.add_argument("--dataset", required=True,
                      help="where the questions come from: svamp, cqa, anli1 (DSS layout) or svamp_tree1, cqa_tree1, "
                           "anli1_tree1 (prepared jsonl); the output is <family>_tree1 and <family>_tree2")
    data.add_argument("--data_dir", default="", help="folder holding the dataset folder; empty: the bundled data")
    data.add_argument("--output_dir", required=True, help="folder that receives <family>_tree1/, <family>_tree2/ "
                                                          "and the work folder <family>_teacher/; give it to the "
                                                          "trainer as --data_dir")
    data.add_argument("--splits", type=_splits, default=None,
                      help="comma-separated splits; default: all the dataset has (train,test; ANLI also valid)")
    data.add_argument("--max_questions", type=_non_negative(int), default=0,
                      help="only the first N questions of each split (a pilot); 0: all")
    data.add_argument("--chunk_size", type=_positive(int), default=1000, help="teacher records per llm/ chunk file")
    data.add_argument("--shard", default="0/1", help="i/n: answer block i of n of every split (job arrays); "
                                                     "then run 'merge'. 0/1 writes the data directly")

    teacher = run.add_argument_group("teacher")
    teacher.add_argument("--model", required=True, help="model name sent to the server")
    teacher.add_argument("--base_url", default=os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1",
                         help="OpenAI-compatible API root, e.g. http://node17:8000/v1 for vLLM; $OPENAI_BASE_URL "
                              "sets the default")
    teacher.add_argument("--api_key_env", default="OPENAI_API_KEY",
                         help="environment variable holding the API key (sent as a Bearer token; unset: no key)")
    teacher.add_argument("--n_generate_sample", type=_positive(int), default=5, help="CoTs per question (N)")
    teacher.add_argument("--n_evaluate_sample", type=_positive(int), default=5, help="self-evaluations per CoT (M)")
    teacher.add_argument("--temperature", type=_non_negative(float), default=0.7, help="sampling temperature")
    teacher.add_argument("--max_tokens", type=_positive(int), default=512, help="most tokens per completion")
    teacher.add_argument("--top_p", type=float, default=None, help="nucleus sampling; unset: not sent")
    teacher.add_argument("--n_per_request", type=_non_negative(int), default=0,
                         help="most choices asked for in one request, for servers that cap n; 0: all N (or M)")
    teacher.add_argument("--prompt_file", default="",
                         help="YAML file with 'sample' and 'value' templates (and optional 'system'); empty: the "
                              "shipped prompts of the dataset's family")

    limits = run.add_argument_group("throughput and failures")
    limits.add_argument("--max_concurrency", type=_positive(int), default=16, help="requests in flight")
    limits.add_argument("--rpm", type=_non_negative(float), default=0, help="requests per minute; 0: no limit")
    limits.add_argument("--tpm", type=_non_negative(float), default=0,
                        help="tokens per minute (prompt estimate + n x max_tokens a request); 0: no limit")
    limits.add_argument("--request_timeout", type=_positive(float), default=120.0, help="seconds for one request")
    limits.add_argument("--max_retries", type=_non_negative(int), default=6,
                        help="retries of a request after a 429, 5xx, timeout, dropped connection or cut reply")
    limits.add_argument("--retry_base_delay", type=_non_negative(float), default=1.0,
                        help="first backoff in seconds; doubles per retry, jittered, at least the server's "
                             "Retry-After")
    limits.add_argument("--retry_max_delay", type=_non_negative(float), default=60.0, help="longest backoff (s)")
    limits.add_argument("--max_failures", type=_non_negative(int), default=10,
                        help="stop when more questions than this have failed after their retries")

    cost = run.add_argument_group("cost and progress")
    cost.add_argument("--prompt_price", type=_non_negative(float), default=0.0,
                      help="price per 1K prompt tokens (the paper's gpt-3.5-turbo: 0.0015)")
    cost.add_argument("--completion_price", type=_non_negative(float), default=0.0,
                      help="price per 1K completion tokens (the paper's gpt-3.5-turbo: 0.002)")
    cost.add_argument("--dry_run", action="store_true",
                      help="print the requests, estimated tokens and cost still to spend; send nothing")
    cost.add_argument("--expected_completion_tokens", type=_positive(int), default=100,
                      help="tokens a completion is expected to take, for --dry_run's estimate")
    cost.add_argument("--no_progress", action="store_true", help="no progress bar")

    merge = sub.add_parser("merge", formatter_class=fmt, help="write the data from the part files of all shards",
                           description="Join the shards' part files of each split into the tree1/tree2 data and "
                                       "the data card.")
    merge.add_argument("--dataset", required=True, help="as given to the shards")
    merge.add_argument("--output_dir", required=True, help="as given to the shards")
    merge.add_argument("--splits", type=_splits, default=None, help="comma-separated; default: every split with parts")
    merge.add_argument("--shards", type=_non_negative(int), default=0,
                       help="number of shards n; 0: the one n that part files exist for")
    return parser


def _settings(args, prompts) -> dict:
    return {"dataset": args.dataset, "model": args.model, "base_url": public_url(args.base_url),
            "n_generate_sample": args.n_generate_sample, "n_evaluate_sample": args.n_evaluate_sample,
            "temperature": args.temperature, "max_tokens": args.max_tokens, "top_p": args.top_p,
            "prompt_file": prompts.source, "prompt_sha256": prompts.sha256,
            "prompt_price": args.prompt_price, "completion_price": args.completion_price,
            "chunk_size": args.chunk_size, "max_questions": args.max_questions}


def _dry_run(args, teacher: Teacher, questions: dict, shard: tuple[int, int]) -> None:
    mean_cot_chars = 4 * args.expected_completion_tokens
    total = {"requests": 0, "stored": 0, "prompt_tokens": 0, "completions": 0}
    print(f"{PROG} dry run (nothing is sent): {args.dataset} with {args.model}, {args.n_generate_sample} CoTs x "
          f"{args.n_evaluate_sample} self-evaluations, shard {shard[0]}/{shard[1]}")
    print(f"  {'split':<6} {'questions':>9} {'requests':>9} {'stored':>8} {'prompt tok':>12} "
          f"{'completion tok (expected / at most)':>36} {'cost (expected / at most)':>27}")

    def line(name, n_questions, plan):
        expected = plan["completions"] * args.expected_completion_tokens
        most = plan["completions"] * args.max_tokens
        cost = [(plan["prompt_tokens"] * args.prompt_price + c * args.completion_price) / 1000
                for c in (expected, most)]
        print(f"  {name:<6} {n_questions:>9,} {plan['requests']:>9,} {plan['stored']:>8,} {plan['prompt_tokens']:>12,} "
              f"{f'{expected:,} / {most:,}':>36} {f'${cost[0]:,.2f} / ${cost[1]:,.2f}':>27}")

    for split, qs in questions.items():
        plan = {"requests": 0, "stored": 0, "prompt_tokens": 0, "completions": 0}
        for q in qs:
            for key, value in teacher.stored_plan(q, mean_cot_chars).items():
                plan[key] += value
        line(split, len(qs), plan)
        for key in total:
            total[key] += plan[key]
    line("total", sum(map(len, questions.values())), total)
    print("  (requests and tokens still to spend; 'stored' requests are answered by the response store. Prompt tokens "
          "are estimated at 4 characters a token.)")


async def _generate(args, teacher: Teacher, questions: dict, sizes: dict, shard: tuple[int, int], settings: dict,
                    out: Path, family: str) -> None:
    client = teacher.client
    try:
        for split, qs in questions.items():
            progress = None if args.no_progress else Progress(len(qs), f"{family} {split}", client,
                                                              (args.prompt_price, args.completion_price))
            sent_before = client.stats.sent
            try:
                rows = await answer_all(teacher, qs, max_concurrency=args.max_concurrency,
                                        max_failures=args.max_failures, on_done=progress or (lambda row: None))
            finally:
                if progress is not None:
                    progress.close()
            failed = sum(1 for r in rows if r["error"])
            path = layout.write_part(out, family, split, shard, sizes[split], settings, rows)
            print(f"{PROG}: {family} {split}: {len(rows)} questions ({failed} failed), "
                  f"{client.stats.sent - sent_before} requests sent -> {path}", file=sys.stderr)
    finally:
        await client.aclose()


def run(args) -> int:
    """``mindmirror-teacher run``."""
    spec = layout.source_spec(args.dataset)
    family = spec.family
    data_dir = Path(args.data_dir) if args.data_dir else registry.BUNDLED_DATA_DIR
    out = Path(args.output_dir)
    if out.resolve() == registry.BUNDLED_DATA_DIR.resolve():
        raise ValueError("--output_dir is mindmirror's bundled data folder: choose a folder of your own")
    splits = args.splits or list(layout.dataset_splits(spec))
    unknown = [s for s in splits if s not in layout.dataset_splits(spec)]
    if unknown:
        raise ValueError(f"--splits: {args.dataset} has no split {unknown[0]!r}; it has {layout.dataset_splits(spec)}")
    shard = layout.parse_shard(args.shard)
    prompts = load_prompts(family, args.prompt_file or None)
    settings = _settings(args, prompts)
    questions, sizes = {}, {}
    for split in splits:
        qs = layout.read_questions(spec, data_dir, split)
        qs = qs[: args.max_questions] if args.max_questions else qs
        sizes[split] = len(qs)
        start, end = layout.shard_range(len(qs), shard)
        questions[split] = qs[start:end]
        for q in questions[split]:  # a template or question that cannot be rendered fails now, not mid-run
            prompts.sample_messages(q.input, family)
    sampling = Sampling(args.model, args.n_generate_sample, args.n_evaluate_sample, args.temperature,
                        args.max_tokens, args.top_p, args.n_per_request)
    store_name = f"{shard[0]}-of-{shard[1]}"
    if args.dry_run:
        store = ResponseStore(layout.work_dir(out, family), store_name, readonly=True)
        _dry_run(args, Teacher(None, store, prompts, family, sampling), questions, shard)
        return 0

    api_key = os.environ.get(args.api_key_env) or None
    if api_key is None:
        print(f"{PROG}: ${args.api_key_env} is not set: sending requests without an API key", file=sys.stderr)
    store = ResponseStore(layout.work_dir(out, family), store_name)
    try:
        print(f"{PROG}: {args.dataset} -> {out} with {args.model} at {public_url(args.base_url)}; "
              f"{len(store)} responses in the store", file=sys.stderr)

        async def generate_all():
            client = ChatClient(args.base_url, api_key, max_concurrency=args.max_concurrency,
                                timeout=args.request_timeout,
                                retry=RetryPolicy(args.max_retries, args.retry_base_delay, args.retry_max_delay),
                                limiter=RateLimiter(args.rpm, args.tpm))
            teacher = Teacher(client, store, prompts, family, sampling)
            await _generate(args, teacher, questions, sizes, shard, settings, out, family)
            return client.stats

        stats = asyncio.run(generate_all())
    finally:
        store.close()
    problems = ", ".join(f"{k} {v}" for k, v in sorted(stats.problems.items())) or "none"
    print(f"{PROG}: {stats.sent} requests sent, {stats.completed} completed, {stats.retried} retried, "
          f"{stats.failed} given up (problems: {problems}); {stats.prompt_tokens:,} prompt and "
          f"{stats.completion_tokens:,} completion tokens", file=sys.stderr)
    if shard[1] == 1:
        _report_written(layout.merge(out, family, splits, 1), out)
    else:
        print(f"{PROG}: shard {shard[0]}/{shard[1]} done; once all {shard[1]} are, run: {PROG} merge --dataset "
              f"{args.dataset} --output_dir {out}", file=sys.stderr)
    return 0


def merge(args) -> int:
    """``mindmirror-teacher merge``."""
    spec = layout.source_spec(args.dataset)
    family, out = spec.family, Path(args.output_dir)
    splits = args.splits or [s for s in layout.dataset_splits(spec) if layout.find_shard_counts(out, family, s)]
    if not splits:
        raise FileNotFoundError(f"no part files in {layout.work_dir(out, family)}: run the shards first")
    shards = args.shards
    if not shards:
        counts = {n for s in splits for n in layout.find_shard_counts(out, family, s)}
        if len(counts) != 1:
            raise ValueError(f"part files for {sorted(counts) or 'no'} shard counts in {layout.work_dir(out, family)}: "
                             "pass --shards N")
        shards = counts.pop()
    _report_written(layout.merge(out, family, splits, shards), out)
    return 0


def _report_written(paths: list[Path], out: Path) -> None:
    folders = sorted({str(p.parent.relative_to(out)) for p in paths})
    print(f"{PROG}: wrote {len(paths)} files in {out} ({', '.join(folders)}); train with "
          f"--data_dir {out}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mindmirror-teacher``; user errors print one line and exit 2."""
    args = build_parser().parse_args(argv)
    try:
        return run(args) if args.command == "run" else merge(args)
    except (ValueError, OSError, DataError, PromptError, StoreLockedError, ServerRefused) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except TooManyFailures as e:
        print(f"{PROG}: stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; completed responses are kept: run the same command again to continue",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
