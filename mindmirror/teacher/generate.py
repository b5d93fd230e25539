"""The tree-of-thought teacher run: per question one "sample" draw and one "value" draw per CoT.

As in the paper's data, one tree-of-thought step starts from an empty partial answer: the sample
draw asks for ``n_generate_sample`` CoTs at once (``n``), then each usable CoT gets
``n_evaluate_sample`` self-evaluations from its own value draw, CoTs with identical text included.

A draw walks the samples of its prompt in order, request by request (the store keys a request by
its kind, CoT slot and first sample index), and keeps the usable ones (:mod:`~mindmirror.teacher.replies`):
a reply cut at ``max_tokens`` or without the answer or verdict the parsers need is replaced by
drawing further, at most ``max_redraws`` samples beyond the ``n`` asked; a server that returns fewer
choices than asked is topped up the same way. A cut CoT is never sent for evaluation. ``max_tokens``
is not part of a key but recorded with each response: a larger ``max_tokens`` later reuses every
complete reply, and the replies cut under a smaller one no longer count against the bound, so only
they are drawn again. Every response passes through the :class:`~mindmirror.teacher.store.ResponseStore`
before it is used, and questions come back in input order whatever order their requests finish in.
"""

from __future__ import annotations

import asyncio
import collections
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from mindmirror.teacher import replies
from mindmirror.teacher.client import ChatClient, FieldRejected, RequestFailed, ServerRefused
from mindmirror.teacher.prompts import Prompts
from mindmirror.teacher.store import ResponseStore, request_key

KINDS = ("sample", "value")
UNUSABLE_CHECK_AFTER = 50  # replies of this run before --max_unusable_share is checked


@dataclass(frozen=True)
class Question:
    """One ground-truth question of a split; ``idx`` is its place in the split."""

    idx: int
    input: str
    label: str


@dataclass(frozen=True)
class Sampling:
    """The teacher model and how it is sampled.

    ``stop`` holds the stop sequences of each kind of call and ``extra_body`` the fields merged
    into every request; both decide the replies, so they are part of the request keys with the
    model, the temperature and ``top_p``. ``max_tokens`` is not: it is recorded per response.
    """

    model: str
    n_generate_sample: int = 5
    n_evaluate_sample: int = 5
    temperature: float = 0.7
    max_tokens: int = 512
    top_p: float | None = None
    n_per_request: int = 0  # most choices asked in one request; 0: all of a draw at once
    max_redraws: int = 10  # samples drawn beyond n, per draw, to replace unusable ones
    stop: dict[str, list[str]] = field(default_factory=dict)  # kind -> stop sequences sent
    extra_body: dict = field(default_factory=dict)

    def params(self, kind: str) -> dict:
        """The body fields that decide a reply of ``kind`` besides ``model``, ``messages`` and ``n``."""
        params = {"temperature": self.temperature} | ({"top_p": self.top_p} if self.top_p is not None else {})
        return params | ({"stop": self.stop[kind]} if self.stop.get(kind) else {}) | self.extra_body

    def per_request(self, remaining: int) -> int:
        """Choices to ask for in the next request when ``remaining`` are still missing."""
        return min(remaining, self.n_per_request) if self.n_per_request > 0 else remaining


class TooManyFailures(RuntimeError):
    """More questions failed than ``--max_failures`` allows, or too many replies are unusable."""


def estimate_tokens(messages: list[dict]) -> int:
    """Rough prompt size: 4 characters a token plus a few tokens of framing per message."""
    return sum(math.ceil(len(m["content"]) / 4) + 4 for m in messages)


@dataclass
class Draw:
    """The usable samples of one draw, in their written form, and what was left out of it."""

    texts: list[str] = field(default_factory=list)
    cut: int = 0  # replies cut at max_tokens (left out)
    unparsable: int = 0  # complete replies without the answer or verdict the parsers need (left out)
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Teacher:
    """Draws CoTs and self-evaluations for questions, through the store and the client."""

    def __init__(self, client: ChatClient | None, store: ResponseStore, prompts: Prompts, family: str,
                 sampling: Sampling, max_unusable_share: float = 0.5):
        self.client, self.store, self.prompts = client, store, prompts
        self.family, self.sampling = family, sampling
        self.max_unusable_share = max_unusable_share
        self._params = {kind: sampling.params(kind) for kind in KINDS}
        # Where a reply is cut: the prompt's next few-shot example, and the stop sequences sent.
        self.markers = {kind: list(dict.fromkeys(replies.few_shot_markers(template) + sampling.stop.get(kind, [])))
                        for kind, template in zip(KINDS, (prompts.sample, prompts.value), strict=True)}
        self._inflight: dict[str, asyncio.Task] = {}
        self._n_cap = 0  # 1 once the server has rejected the n field
        self.counts: collections.Counter = collections.Counter()  # replies of this run: replies, cut, unparsable

    def _key(self, messages: list[dict], kind: str, slot: int | None, start: int) -> str:
        return request_key(self.sampling.model, messages, self._params[kind], [kind, slot, start])

    def usable(self, kind: str, text: str, finish_reason: str | None) -> str | None:
        """A reply's written form, or ``None`` when it is unusable (see :mod:`~mindmirror.teacher.replies`)."""
        if kind == "sample":
            return replies.usable_cot(text, finish_reason, self.family, self.markers[kind])
        return replies.usable_evaluation(text, finish_reason, self.markers[kind])

    def _take(self, draw: Draw, kind: str, entry: dict, n: int) -> int:
        """Add ``entry``'s choices to ``draw`` until it has ``n`` usable; returns how many of them count
        against the redraw bound (a reply cut under a smaller ``max_tokens`` than now does not)."""
        stale = entry.get("max_tokens", 0) < self.sampling.max_tokens
        counted = 0
        for text, reason in zip(entry["choices"], entry["finish_reasons"], strict=True):
            if len(draw.texts) == n:
                break
            written = self.usable(kind, text, reason)
            if written is not None:
                draw.texts.append(written)
            elif reason == replies.CUT:
                draw.cut += 1
                counted -= stale
            else:
                draw.unparsable += 1
            counted += 1
        draw.prompt_tokens += entry["usage"]["prompt_tokens"]
        draw.completion_tokens += entry["usage"]["completion_tokens"]
        return counted

    async def draw(self, kind: str, messages: list[dict], n: int, slot: int | None = None) -> Draw:
        """``n`` usable samples for ``messages`` if the redraw bound allows: stored ones first, then
        requests for the rest, at most ``n + max_redraws`` counted samples in all.

        The store keys count samples from 0 (``start``), so a rerun walks the same keys and a larger
        ``n`` later reuses the samples already drawn.
        """
        draw, start, counted = Draw(), 0, 0
        while len(draw.texts) < n:
            key = self._key(messages, kind, slot, start)
            entry = self.store.get(key)
            if entry is None:
                ask = min(n - len(draw.texts), n + self.sampling.max_redraws - counted)
                if ask <= 0:
                    break
                entry = await self._fetch(key, kind, messages, self.sampling.per_request(ask), start)
            counted += self._take(draw, kind, entry, n)
            start += len(entry["choices"])
        return draw

    async def _fetch(self, key: str, kind: str, messages: list[dict], n: int, start: int) -> dict:
        """Request ``key`` once, however many questions ask for it at the same time (equal prompts)."""
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(self._request(key, kind, messages, n, start))
            self._inflight[key] = task
            task.add_done_callback(lambda _: self._inflight.pop(key, None))
        return await task

    async def _request(self, key: str, kind: str, messages: list[dict], n: int, start: int) -> dict:
        s = self.sampling
        while True:
            ask = min(n, self._n_cap) if self._n_cap else n
            body = {"model": s.model, "messages": messages, **({"n": ask} if ask > 1 else {}), **self._params[kind]}
            if isinstance(s.extra_body.get("seed"), int):
                body["seed"] = s.extra_body["seed"] + start  # each request of a draw its own seed: redraws differ
            try:
                est_tokens = estimate_tokens(messages) + ask * s.max_tokens
                completion = await self.client.complete(body, s.max_tokens, est_tokens)
                break
            except FieldRejected as e:
                if e.field == "n" and ask > 1:
                    if not self._n_cap:
                        print(f"mindmirror-teacher: {e}; asking one choice per request from now on "
                              "(as --n_per_request 1 does)", file=sys.stderr)
                    self._n_cap = 1
                    continue
                raise ServerRefused(f"{e}: {_REJECTED_ADVICE.get(e.field, 'drop it from --extra_body')}") from e
        entry = {"kind": kind, "n": ask, "max_tokens": s.max_tokens, "choices": completion.choices,
                 "finish_reasons": completion.finish_reasons,
                 "usage": {"prompt_tokens": completion.prompt_tokens,
                           "completion_tokens": completion.completion_tokens}}
        await self.store.put(key, entry)  # durable before anything uses it
        self._count_replies(kind, entry)
        return entry

    def _count_replies(self, kind: str, entry: dict) -> None:
        """Count this run's replies and stop the run when most are unusable (a wrong --max_tokens or
        prompt costs every question its redraws: better to stop and say so)."""
        for text, reason in zip(entry["choices"], entry["finish_reasons"], strict=True):
            self.counts["replies"] += 1
            if self.usable(kind, text, reason) is None:
                self.counts["cut" if reason == replies.CUT else "unparsable"] += 1
        total, unusable = self.counts["replies"], self.counts["cut"] + self.counts["unparsable"]
        if total >= UNUSABLE_CHECK_AFTER and unusable > self.max_unusable_share * total:
            raise TooManyFailures(
                f"{unusable} of the {total} replies of this run are unusable ({self.counts['cut']} cut "
                f"at --max_tokens {self.sampling.max_tokens}, {self.counts['unparsable']} without the answer or "
                f"verdict the parsers need), more than --max_unusable_share {self.max_unusable_share:g}: raise "
                "--max_tokens or check the prompts and the model. Completed responses are kept in "
                f"{self.store.folder}: the same command continues")

    async def answer(self, q: Question) -> dict:
        """The teacher's usable CoTs and self-evaluations of ``q`` as a row.

        ``error`` is set when a request failed; ``missing`` lists what the redraw bound left short.
        """
        s = self.sampling
        row = {"idx": q.idx, "input": q.input, "label": q.label, "cots": [], "evaluations": [],
               "cut_cots": 0, "unparsable_cots": 0, "cut_evaluations": 0, "unparsable_evaluations": 0,
               "missing": [], "prompt_tokens": 0, "completion_tokens": 0, "error": None}
        try:
            sample = await self.draw("sample", self.prompts.sample_messages(q.input, self.family),
                                     s.n_generate_sample)
        except RequestFailed as e:
            return row | {"error": f"sample request: {e}"}
        values = await asyncio.gather(
            *(self.draw("value", self.prompts.value_messages(q.input, self.family, cot), s.n_evaluate_sample, i)
              for i, cot in enumerate(sample.texts)), return_exceptions=True)
        for i, value in enumerate(values):
            if isinstance(value, RequestFailed):
                return row | {"error": f"value request of CoT {i}: {value}"}
            if isinstance(value, BaseException):
                raise value
        missing = []
        if len(sample.texts) < s.n_generate_sample:
            missing.append(f"{len(sample.texts)} of {s.n_generate_sample} CoTs usable ({sample.cut} cut at "
                           f"max_tokens, {sample.unparsable} without an answer; --max_redraws {s.max_redraws} spent)")
        missing += [f"CoT {i}: {len(v.texts)} of {s.n_evaluate_sample} self-evaluations usable ({v.cut} cut at "
                    f"max_tokens, {v.unparsable} without a verdict; --max_redraws {s.max_redraws} spent)"
                    for i, v in enumerate(values) if len(v.texts) < s.n_evaluate_sample]
        draws = [sample, *values]
        return row | {
            "cots": sample.texts,
            "evaluations": [v.texts for v in values],
            "cut_cots": sample.cut, "unparsable_cots": sample.unparsable,
            "cut_evaluations": sum(v.cut for v in values),
            "unparsable_evaluations": sum(v.unparsable for v in values),
            "missing": missing,
            "prompt_tokens": sum(d.prompt_tokens for d in draws),
            "completion_tokens": sum(d.completion_tokens for d in draws),
        }

    # -- the dry run ---------------------------------------------------------------------------------

    def observed_rates(self) -> dict[str, tuple[float, float]]:
        """Per kind, from the store: the share of asked choices returned and the share of replies unusable
        ((1, 0) where nothing of that kind is stored yet)."""
        asked, returned, unusable = collections.Counter(), collections.Counter(), collections.Counter()
        for entry in self.store.values():
            kind = entry.get("kind")
            if kind not in KINDS:
                continue
            asked[kind] += entry.get("n", len(entry["choices"]))
            returned[kind] += len(entry["choices"])
            unusable[kind] += sum(self.usable(kind, t, r) is None
                                  for t, r in zip(entry["choices"], entry["finish_reasons"], strict=True))
        return {kind: (min(1.0, returned[kind] / asked[kind]) if asked[kind] else 1.0,
                       unusable[kind] / returned[kind] if returned[kind] else 0.0) for kind in KINDS}

    def plan(self, q: Question, expected_cot_chars: int, rates: dict[str, tuple[float, float]]) -> dict:
        """What :meth:`answer` would still request for ``q`` (for ``--dry_run``).

        Stored responses are walked as :meth:`draw` walks them. For what is missing, "expected"
        assumes the shares of returned choices and of unusable replies in ``rates``; "most" is the
        bound: every unusable reply re-requested alone up to ``max_redraws``.
        """
        s = self.sampling
        plan = collections.Counter()

        def walk(kind, messages, n, slot):
            draw, start, counted = Draw(), 0, 0
            while len(draw.texts) < n and (entry := self.store.get(self._key(messages, kind, slot, start))):
                plan["stored"] += 1
                counted += self._take(draw, kind, entry, n)
                start += len(entry["choices"])
            need, budget = n - len(draw.texts), n + s.max_redraws - counted
            if need > 0 and budget > 0:
                first = s.per_request(min(need, budget))
                fill, unusable = rates[kind]
                samples = min(budget, need / max(1e-9, 1 - unusable))
                requests = (math.ceil(need / first) + (samples - need) / first) / max(fill, 1e-9)
                most = math.ceil(min(need, budget) / first) + max(0, budget - need)
                prompt = estimate_tokens(messages)
                plan["requests"] += requests
                plan["requests_most"] += most
                plan["prompt_tokens"] += requests * prompt
                plan["prompt_tokens_most"] += most * prompt
                plan["completions"] += samples
                plan["completions_most"] += budget
            return draw.texts

        cots = walk("sample", self.prompts.sample_messages(q.input, self.family), s.n_generate_sample, None)
        for i in range(s.n_generate_sample):
            cot = cots[i] if i < len(cots) else "x" * expected_cot_chars
            walk("value", self.prompts.value_messages(q.input, self.family, cot), s.n_evaluate_sample, i)
        return plan


_REJECTED_ADVICE = {"stop": "run with --stop none", "temperature": "give the one --temperature it allows",
                    "top_p": "leave --top_p unset"}


async def answer_all(teacher: Teacher, questions: list[Question], *, max_concurrency: int, max_failures: int,
                     on_done: Callable[[dict], None] = lambda row: None) -> list[dict]:
    """Rows of all ``questions`` in their order; at most ``max_concurrency`` questions at a time.

    A question whose requests fail is kept as a row with its ``error``; once more than
    ``max_failures`` questions have failed the run stops with :class:`TooManyFailures`.
    """
    gate = asyncio.Semaphore(max_concurrency)  # FIFO: questions start roughly in input order
    rows: list[dict | None] = [None] * len(questions)
    failed: list[dict] = []

    async def one(i: int, q: Question) -> None:
        async with gate:
            rows[i] = row = await teacher.answer(q)
        if row["error"]:
            failed.append(row)
            if len(failed) > max_failures:
                raise TooManyFailures(
                    f"{len(failed)} questions failed, more than --max_failures {max_failures}; the last: question "
                    f"{row['idx']}: {row['error']}. Completed responses are kept in {teacher.store.folder}: fix the "
                    "cause and run the same command again to continue")
        on_done(row)

    tasks = [asyncio.ensure_future(one(i, q)) for i, q in enumerate(questions)]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return rows


class Progress:
    """A tqdm bar of questions done with the requests/s, tokens and cost of the requests sent meanwhile,
    and what went wrong on the way (retries, hedges of slow requests, unusable replies drawn again)."""

    def __init__(self, total: int, desc: str, teacher: Teacher, prices: tuple[float, float]):
        from tqdm.auto import tqdm

        self.teacher, self.prices, self.start = teacher, prices, time.monotonic()
        self.base = self._now()
        # In a log file (a Slurm job) every refresh is kept: refresh twice a minute there.
        self.bar = tqdm(total=total, desc=desc, unit="q", dynamic_ncols=True,
                        mininterval=0.5 if sys.stderr.isatty() else 30)

    def _now(self) -> tuple[int, ...]:
        st, counts = self.teacher.client.stats, self.teacher.counts
        return (st.sent, st.prompt_tokens, st.completion_tokens, st.retried, st.hedged,
                counts["cut"] + counts["unparsable"])

    def __call__(self, row: dict) -> None:
        sent, prompt, completion, retried, hedged, unusable = (now - before for now, before in
                                                               zip(self._now(), self.base, strict=True))
        rate = sent / max(time.monotonic() - self.start, 1e-9)
        cost = (prompt * self.prices[0] + completion * self.prices[1]) / 1000
        self.bar.set_postfix_str(f"{sent} req ({rate:.1f}/s), {prompt + completion:,} tok, ${cost:.4f}, "
                                 f"{retried} retried, {hedged} hedged, {unusable} unusable", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        """End the bar."""
        self.bar.close()
