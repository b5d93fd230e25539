"""``mindmirror-teacher``: generate tree-of-thought teacher data from an OpenAI-compatible LLM.

``mindmirror-teacher run`` reads the ground-truth questions of a dataset, asks the teacher for
CoTs and self-evaluations, and writes ``<family>_tree1`` and ``<family>_tree2`` under
``--output_dir``, ready for ``train/main.py --data_dir <output_dir>``. With ``--shard i/n`` it
answers one block of each split; ``mindmirror-teacher merge`` then writes the data from all shards.
See docs/teacher.md.

Exit codes: 0 every question has all its CoTs and self-evaluations; 3 the run finished but questions
failed or have fewer usable CoTs than asked (the data of the others is written, unless a split has
none; the data card lists them); 1 stopped (too many failed questions or unusable replies); 2 a
user error or an endpoint that cannot serve the run (one line naming the cause); 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from mindmirror.data import registry
from mindmirror.data.formats import DataError
from mindmirror.teacher import layout, replies
from mindmirror.teacher.client import (
    TOKEN_PARAMS,
    ChatClient,
    RateLimiter,
    RetryPolicy,
    ServerRefused,
    check_base_url,
    public_url,
)
from mindmirror.teacher.generate import Progress, Sampling, Teacher, TooManyFailures, answer_all
from mindmirror.teacher.prompts import PromptError, load_prompts
from mindmirror.teacher.report import incomplete
from mindmirror.teacher.store import ResponseStore, StoreLockedError

PROG = "mindmirror-teacher"
INCOMPLETE = 3  # the exit code of a run that finished with failed or short questions
# Body fields the teacher sets itself, and the flag that sets each.
_OWN_FIELDS = {"model": "--model", "messages": "the prompts", "n": "--n_generate_sample/--n_per_request",
               "stream": "mindmirror-teacher (never streamed)", "max_tokens": "--max_tokens",
               "max_completion_tokens": "--max_tokens", "temperature": "--temperature", "top_p": "--top_p",
               "stop": "--stop"}


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


def _extra_body(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e})") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError('expected a JSON object, such as \'{"seed": 1, "top_k": 20}\'')
    for name in value:
        if name in _OWN_FIELDS:
            raise argparse.ArgumentTypeError(f"{name!r} is set by {_OWN_FIELDS[name]}, not --extra_body")
    return value


def _hedge_after(text: str) -> float | None:
    if text == "auto":
        return None
    return _non_negative(float)(text)


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
    parser = argparse.ArgumentParser(prog=PROG, formatter_class=_Help,
                                     description="Generate tree-of-thought teacher data (CoTs and self-evaluations) "
                                                 "from an OpenAI-compatible LLM, in the layout the trainer reads.",
                                     epilog="Run 'mindmirror-teacher run --help' for the flags of a run.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{run,merge}")
    _add_run(sub)
    _add_merge(sub)
    return parser


def _add_run(sub) -> None:
    """``run`` and its flags, group by group."""
    run = sub.add_parser("run", formatter_class=_Help, help="query the teacher and write the data (or one shard)",
                         description="Query an OpenAI-compatible chat-completions endpoint for tree-of-thought CoTs "
                                     "and self-evaluations of a dataset's questions, and write the tree1/tree2 data.",
                         epilog="Exit codes: 0 every question has all its CoTs; 3 finished, but questions failed or "
                                "have fewer usable CoTs than asked (listed in the data card; the rest is written); "
                                "1 stopped (--max_failures, --max_unusable_share); 2 a user error or an endpoint "
                                "that cannot serve the run; 130 interrupted. See docs/teacher.md.")
    _add_data_flags(run.add_argument_group("data"))
    _add_teacher_flags(run.add_argument_group("teacher"))
    _add_limit_flags(run.add_argument_group("throughput and failures"))
    _add_cost_flags(run.add_argument_group("cost and progress"))


def _add_data_flags(data) -> None:
    """``run``'s data flags: where the questions come from, where the data goes, which block of it."""
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


def _add_teacher_flags(teacher) -> None:
    """``run``'s teacher flags: the endpoint, the model and what each request asks of it."""
    teacher.add_argument("--model", required=True, help="model name sent to the server")
    teacher.add_argument("--base_url", default=os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1",
                         help="OpenAI-compatible API root, e.g. http://node17:8000/v1 for vLLM; $OPENAI_BASE_URL "
                              "sets the default. No user name or password in it: the key goes in --api_key_env")
    teacher.add_argument("--api_key_env", default="OPENAI_API_KEY",
                         help="environment variable holding the API key (sent as a Bearer token; unset: no key)")
    teacher.add_argument("--n_generate_sample", type=_positive(int), default=5, help="CoTs per question (N)")
    teacher.add_argument("--n_evaluate_sample", type=_positive(int), default=5, help="self-evaluations per CoT (M)")
    teacher.add_argument("--temperature", type=_non_negative(float), default=0.7, help="sampling temperature")
    teacher.add_argument("--max_tokens", type=_positive(int), default=512,
                         help="most tokens per completion; a reply cut there is drawn again (--max_redraws). Not "
                              "part of a stored response's key: raising it later reuses every complete reply and "
                              "draws again only the cut ones")
    teacher.add_argument("--token_param", choices=("auto", *TOKEN_PARAMS), default="auto",
                         help="the body field that carries --max_tokens; auto: max_tokens, and "
                              "max_completion_tokens for the rest of the run once the server's 400 rejects it "
                              "(OpenAI's reasoning models)")
    teacher.add_argument("--top_p", type=float, default=None, help="nucleus sampling; unset: not sent")
    teacher.add_argument("--n_per_request", type=_non_negative(int), default=0,
                         help="most choices asked for in one request, for servers that cap n; 0: all N (or M). "
                              "One choice is asked without the n field; a server whose 400 rejects n gets one "
                              "choice per request from then on")
    teacher.add_argument("--max_redraws", type=_non_negative(int), default=10,
                         help="replies drawn beyond N (or M) per sample or value call to replace unusable ones: cut "
                              "at --max_tokens, or without the answer sentence or verdict the parsers need. What is "
                              "still missing then is left out and listed in the data card; cut CoTs are never "
                              "evaluated")
    teacher.add_argument("--stop", action="append", default=None, metavar="TEXT",
                         help="a stop sequence sent with every request (repeat the flag for more; \\n is a "
                              "newline); 'none': send none. Default: the prompt's question header on a new line "
                              "(\\nProblem: for SVAMP, \\nQuestion: for CQA, \\nPremise: for ANLI), where a model "
                              "would start a new few-shot example; replies are also cut there")
    teacher.add_argument("--extra_body", type=_extra_body, default=None, metavar="JSON",
                         help="fields merged into every request body, such as '{\"seed\": 1, \"top_k\": 20}' or "
                              "'{\"reasoning_effort\": \"low\"}'; part of the stored responses' keys. A seed goes "
                              "as seed + the request's first sample index, so redraws differ")
    teacher.add_argument("--prompt_file", default="",
                         help="YAML file with 'sample' and 'value' templates (and optional 'system'); empty: the "
                              "shipped prompts of the dataset's family")


def _add_limit_flags(limits) -> None:
    """``run``'s throughput and failure flags: concurrency, rate limits, timeouts, retries, when to stop."""
    limits.add_argument("--max_concurrency", type=_positive(int), default=16, help="requests in flight")
    limits.add_argument("--rpm", type=_non_negative(float), default=0, help="requests per minute; 0: no limit")
    limits.add_argument("--tpm", type=_non_negative(float), default=0,
                        help="tokens per minute (prompt estimate + n x max_tokens a request); 0: no limit")
    limits.add_argument("--request_timeout", type=_positive(float), default=120.0,
                        help="seconds for one attempt of a request, hedges included (connecting: at most 10)")
    limits.add_argument("--hedge_after", type=_hedge_after, default=None, metavar="auto|SECONDS",
                        help="hedge a request that has not been answered after this many seconds: send a copy, take "
                             "the first answer and cancel the rest; again after as long, up to 7 copies, one in "
                             "flight beside the request, at most max_concurrency/4 requests hedged at a time; auto: "
                             "2 x the 90th percentile of the latencies seen, at least 0.25 s; 0: never. Hedges are "
                             "counted in the end-of-run line [default: auto]")
    limits.add_argument("--max_retries", type=_non_negative(int), default=6,
                        help="retries of a request after a 429, 5xx, timeout, dropped connection or malformed reply")
    limits.add_argument("--retry_base_delay", type=_non_negative(float), default=1.0,
                        help="first backoff in seconds; doubles per retry, jittered, at least the server's "
                             "Retry-After")
    limits.add_argument("--retry_max_delay", type=_non_negative(float), default=60.0, help="longest backoff (s)")
    limits.add_argument("--max_failures", type=_non_negative(int), default=10,
                        help="stop when more questions than this have failed after their retries")
    limits.add_argument("--max_unusable_share", type=_non_negative(float), default=0.5,
                        help="stop when more than this share of the run's replies are unusable (checked from the "
                             "50th reply on): a --max_tokens or prompt that does not fit the model")


def _add_cost_flags(cost) -> None:
    """``run``'s cost and progress flags."""
    cost.add_argument("--prompt_price", type=_non_negative(float), default=0.0,
                      help="price per 1K prompt tokens (the paper's gpt-3.5-turbo: 0.0015)")
    cost.add_argument("--completion_price", type=_non_negative(float), default=0.0,
                      help="price per 1K completion tokens (the paper's gpt-3.5-turbo: 0.002)")
    cost.add_argument("--dry_run", action="store_true",
                      help="print the requests, estimated tokens and cost still to spend, top-ups and redraws "
                           "included (expected from the store's replies so far, and at most); send nothing")
    cost.add_argument("--expected_completion_tokens", type=_positive(int), default=100,
                      help="tokens a completion is expected to take, for --dry_run's estimate")
    cost.add_argument("--no_progress", action="store_true", help="no progress bar")


def _add_merge(sub) -> None:
    """``merge`` and its flags."""
    merge = sub.add_parser("merge", formatter_class=_Help, help="write the data from the part files of all shards",
                           description="Join the shards' part files of each split into the tree1/tree2 data and "
                                       "the data card.")
    merge.add_argument("--dataset", required=True, help="as given to the shards")
    merge.add_argument("--output_dir", required=True, help="as given to the shards")
    merge.add_argument("--splits", type=_splits, default=None, help="comma-separated; default: every split with parts")
    merge.add_argument("--shards", type=_non_negative(int), default=0,
                       help="number of shards n; 0: the one n that part files exist for")


def _settings(args, prompts) -> dict:
    return {"dataset": args.dataset, "model": args.model, "base_url": public_url(args.base_url),
            "n_generate_sample": args.n_generate_sample, "n_evaluate_sample": args.n_evaluate_sample,
            "temperature": args.temperature, "max_tokens": args.max_tokens, "top_p": args.top_p,
            "max_redraws": args.max_redraws, "stop": _stop(args, prompts), "extra_body": args.extra_body or {},
            "prompt_file": prompts.source, "prompt_sha256": prompts.sha256,
            "prompt_price": args.prompt_price, "completion_price": args.completion_price,
            "chunk_size": args.chunk_size, "max_questions": args.max_questions}


def _stop(args, prompts) -> dict[str, list[str]]:
    """The stop sequences of each kind of call (see ``--stop``)."""
    if args.stop is None:
        return {"sample": replies.few_shot_markers(prompts.sample), "value": replies.few_shot_markers(prompts.value)}
    sequences = [text.replace("\\n", "\n").replace("\\t", "\t") for text in args.stop if text != "none"]
    if len(sequences) > 4:
        raise ValueError(f"--stop given {len(sequences)} times: OpenAI-compatible servers take at most 4")
    return {"sample": sequences, "value": sequences} if sequences else {}


def _dry_run(args, teacher: Teacher, questions: dict, shard: tuple[int, int]) -> None:
    mean_cot_chars = 4 * args.expected_completion_tokens
    rates = teacher.observed_rates()
    keys = ("requests", "requests_most", "stored", "prompt_tokens", "prompt_tokens_most", "completions",
            "completions_most")
    total = dict.fromkeys(keys, 0)
    print(f"{PROG} dry run (nothing is sent): {args.dataset} with {args.model}, {args.n_generate_sample} CoTs x "
          f"{args.n_evaluate_sample} self-evaluations, shard {shard[0]}/{shard[1]}")
    print(f"  {'split':<6} {'questions':>9} {'requests':>19} {'stored':>8} {'prompt tok':>25} "
          f"{'completion tok':>25} {'cost':>23}")
    print(f"  {'':<6} {'':>9} {'expected / at most':>19} {'':>8} {'expected / at most':>25} "
          f"{'expected / at most':>25} {'expected / at most':>23}")

    def pair(a, b, money=False):
        return f"${a:,.2f} / ${b:,.2f}" if money else f"{round(a):,} / {round(b):,}"

    def line(name, n_questions, plan):
        completion = [plan["completions"] * args.expected_completion_tokens, plan["completions_most"] * args.max_tokens]
        cost = [(prompt * args.prompt_price + c * args.completion_price) / 1000
                for prompt, c in zip((plan["prompt_tokens"], plan["prompt_tokens_most"]), completion, strict=True)]
        print(f"  {name:<6} {n_questions:>9,} {pair(plan['requests'], plan['requests_most']):>19} "
              f"{plan['stored']:>8,} {pair(plan['prompt_tokens'], plan['prompt_tokens_most']):>25} "
              f"{pair(*completion):>25} {pair(*cost, money=True):>23}")

    for split, qs in questions.items():
        plan = dict.fromkeys(keys, 0)
        for q in qs:
            for key, value in teacher.plan(q, mean_cot_chars, rates).items():
                plan[key] += value
        line(split, len(qs), plan)
        for key in total:
            total[key] += plan[key]
    line("total", sum(map(len, questions.values())), total)
    shares = ", ".join(f"{kind} calls {100 * fill:.0f}% of the choices asked returned, {100 * bad:.0f}% unusable"
                       for kind, (fill, bad) in rates.items())
    print(f"  Requests and tokens still to spend; 'stored' requests are answered by the response store. Expected: "
          f"with the replies stored so far ({shares}), {args.expected_completion_tokens} tokens a completion and "
          f"prompts of 4 characters a token. At most: every unusable reply drawn again alone up to --max_redraws "
          f"{args.max_redraws}, {args.max_tokens} tokens each.")


async def _generate(args, teacher: Teacher, questions: dict, sizes: dict, shard: tuple[int, int], settings: dict,
                    out: Path, family: str) -> list[dict]:
    """Answer every split and write its part file; returns all rows."""
    client, everything = teacher.client, []
    try:
        for split, qs in questions.items():
            progress = None if args.no_progress else Progress(len(qs), f"{family} {split}", teacher,
                                                              (args.prompt_price, args.completion_price))
            sent_before = client.stats.sent
            try:
                rows = await answer_all(teacher, qs, max_concurrency=args.max_concurrency,
                                        max_failures=args.max_failures, on_done=progress or (lambda row: None))
            finally:
                if progress is not None:
                    progress.close()
            path = layout.write_part(out, family, split, shard, sizes[split], settings, rows)
            tally = incomplete(rows, args.n_generate_sample, args.n_evaluate_sample)
            failed, short = tally["failed_questions"], tally["short_questions"]
            print(f"{PROG}: {family} {split}: {len(rows)} questions ({failed} failed, {short} with fewer than "
                  f"{args.n_generate_sample} usable CoTs), {client.stats.sent - sent_before} requests sent -> {path}",
                  file=sys.stderr)
            everything += rows
    finally:
        await client.aclose()
    return everything


def _outcome(tally: dict, settings: dict, where: str) -> int:
    """Print what is incomplete and how to complete it; the exit code (0 or :data:`INCOMPLETE`)."""
    n, m, questions = settings["n_generate_sample"], settings["n_evaluate_sample"], tally["questions"]
    failed, short, short_evaluations = (tally[k] for k in ("failed_questions", "short_questions", "short_evaluations"))
    if failed:
        print(f"{PROG}: incomplete: {failed} of {questions} questions failed (their requests did not succeed; "
              f"listed under 'failed' in {where}): run the same command again to retry only them", file=sys.stderr)
    if short:
        print(f"{PROG}: incomplete: {short} of {questions} questions have fewer than {n} usable CoTs once "
              f"--max_redraws {settings['max_redraws']} was spent (cut at --max_tokens {settings['max_tokens']}, or "
              f"without an answer; listed under 'failed' in {where}); the trainer skips them at "
              f"--num_train_branches {n}. Raise --max_tokens or --max_redraws and run again: only the unusable "
              "replies are drawn again", file=sys.stderr)
    if short_evaluations:
        print(f"{PROG}: warning: {short_evaluations} CoTs have fewer than {m} usable self-evaluations (listed in "
              f"{where}); they are written with the evaluations they have, and their values sum fewer verdicts",
              file=sys.stderr)
    if tally["failed"]:
        print(f"{PROG}: for example, question " + "; question ".join(f"{f['idx']}: {f['reason']}"
                                                                     for f in tally["failed"][:3]), file=sys.stderr)
    return INCOMPLETE if failed or short else 0


def run(args) -> int:
    """``mindmirror-teacher run``."""
    spec = layout.source_spec(args.dataset)
    family, out = spec.family, Path(args.output_dir)
    splits = _run_splits(args, spec, out)
    shard = layout.parse_shard(args.shard)
    check_base_url(args.base_url)
    prompts = load_prompts(family, args.prompt_file or None)
    settings = _settings(args, prompts)
    questions, sizes = _read_questions(args, spec, splits, shard, prompts)
    sampling = Sampling(args.model, args.n_generate_sample, args.n_evaluate_sample, args.temperature,
                        args.max_tokens, args.top_p, args.n_per_request, args.max_redraws, settings["stop"],
                        settings["extra_body"])
    store_name = f"{shard[0]}-of-{shard[1]}"
    if args.dry_run:
        store = ResponseStore(layout.work_dir(out, family), store_name, readonly=True)
        _dry_run(args, Teacher(None, store, prompts, family, sampling, args.max_unusable_share), questions, shard)
        return 0

    api_key = _api_key(args)
    store = ResponseStore(layout.work_dir(out, family), store_name)
    try:
        print(f"{PROG}: {args.dataset} -> {out} with {args.model} at {public_url(args.base_url)}; "
              f"{len(store)} responses in the store", file=sys.stderr)

        async def generate_all():
            teacher = Teacher(_client(args, api_key), store, prompts, family, sampling, args.max_unusable_share)
            rows = await _generate(args, teacher, questions, sizes, shard, settings, out, family)
            return teacher.client.stats, teacher.counts, rows

        stats, counts, rows = asyncio.run(generate_all())
    finally:
        store.close()
    _print_totals(args, stats, counts)
    if shard[1] > 1:
        code = _outcome(incomplete(rows, args.n_generate_sample, args.n_evaluate_sample), settings,
                        f"the part files in {layout.work_dir(out, family)}")
        print(f"{PROG}: shard {shard[0]}/{shard[1]} done; once all {shard[1]} are, run: {PROG} merge --dataset "
              f"{args.dataset} --output_dir {out}", file=sys.stderr)
        return code
    return _write_data(out, family, splits, 1)


def _run_splits(args, spec, out: Path) -> list[str]:
    """The splits ``run`` answers, once ``--output_dir`` and ``--splits`` are checked."""
    if out.resolve() == registry.BUNDLED_DATA_DIR.resolve():
        raise ValueError("--output_dir is mindmirror's bundled data folder: choose a folder of your own")
    splits = args.splits or list(layout.dataset_splits(spec))
    unknown = [s for s in splits if s not in layout.dataset_splits(spec)]
    if unknown:
        raise ValueError(f"--splits: {args.dataset} has no split {unknown[0]!r}; it has {layout.dataset_splits(spec)}")
    return splits


def _read_questions(args, spec, splits: list[str], shard: tuple[int, int], prompts) -> tuple[dict, dict]:
    """This shard's questions of each split, and each split's size before sharding; every question's prompt is
    rendered once, so that a template or question that cannot be rendered fails now, not mid-run."""
    data_dir = Path(args.data_dir) if args.data_dir else registry.BUNDLED_DATA_DIR
    questions, sizes = {}, {}
    for split in splits:
        qs = layout.read_questions(spec, data_dir, split)
        qs = qs[: args.max_questions] if args.max_questions else qs
        sizes[split] = len(qs)
        start, end = layout.shard_range(len(qs), shard)
        questions[split] = qs[start:end]
        for q in questions[split]:
            prompts.sample_messages(q.input, spec.family)
    return questions, sizes


def _api_key(args) -> str | None:
    """The API key in the environment variable that ``--api_key_env`` names, or None (said on stderr): the
    requests then go without one."""
    api_key = os.environ.get(args.api_key_env) or None
    if api_key is None:
        print(f"{PROG}: ${args.api_key_env} is not set: sending requests without an API key", file=sys.stderr)
    return api_key


def _client(args, api_key: str | None) -> ChatClient:
    """The chat-completions client of the run's flags (made inside the run's event loop)."""
    return ChatClient(args.base_url, api_key, max_concurrency=args.max_concurrency, timeout=args.request_timeout,
                      retry=RetryPolicy(args.max_retries, args.retry_base_delay, args.retry_max_delay),
                      limiter=RateLimiter(args.rpm, args.tpm), token_param=args.token_param,
                      hedge_after=args.hedge_after)


def _print_totals(args, stats, counts: dict) -> None:
    """The end-of-run line: requests, replies, unusable ones and tokens."""
    problems = ", ".join(f"{k} {v}" for k, v in sorted(stats.problems.items())) or "none"
    hedges = f" ({stats.hedged} of them hedges of slow requests, {stats.hedges_first} answered first)" \
        if stats.hedged else ""
    print(f"{PROG}: {stats.sent} requests sent{hedges}, {stats.completed} completed, {stats.retried} retried, "
          f"{stats.failed} given up (problems: {problems}); {counts['replies']} replies, "
          f"{counts['cut'] + counts['unparsable']} of them unusable and left out ({counts['cut']} cut at --max_tokens "
          f"{args.max_tokens}, {counts['unparsable']} without the answer or verdict the parsers need); "
          f"{stats.prompt_tokens:,} prompt and {stats.completion_tokens:,} completion tokens", file=sys.stderr)


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
    return _write_data(out, family, splits, shards)


def _write_data(out: Path, family: str, splits: list[str], shards: int) -> int:
    """Merge the parts into the data, say what is incomplete, and offer the data for training only if there is
    some; the exit code."""
    try:
        paths, card = layout.merge(out, family, splits, shards)
    except layout.NothingUsable as e:
        print(f"{PROG}: {e}; see the part files in {layout.work_dir(out, family)}", file=sys.stderr)
        return INCOMPLETE
    sections = [card["splits"][split] for split in splits]
    tally = {key: sum((section[key] for section in sections), [] if key == "failed" else 0)
             for key in ("questions", "failed_questions", "short_questions", "short_evaluations", "failed")}
    code = _outcome(tally, sections[0]["settings"], str(out / f"{family}_tree1" / "teacher_report.json"))
    folders = sorted({str(p.parent.relative_to(out)) for p in paths})
    print(f"{PROG}: wrote {len(paths)} files in {out} ({', '.join(folders)}); train with --data_dir {out}"
          + (" (incomplete, as said above)" if code else "")
          + f", e.g. the paper's recipes: mindmirror-recipes --dataset {family} --data_dir {out}", file=sys.stderr)
    return code


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
