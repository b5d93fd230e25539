"""The tree-of-thought teacher run: per question one "sample" call and one "value" call per CoT.

As in the paper's data, one tree-of-thought step starts from an empty partial answer: the sample
call asks for ``n_generate_sample`` CoTs at once (``n``), then each CoT gets ``n_evaluate_sample``
self-evaluations from its own value call, CoTs with identical text included. A server that
returns fewer choices than asked is topped up with further calls. Every response passes through
the :class:`~mindmirror.teacher.store.ResponseStore` before it is used, and questions come back in
input order whatever order their requests finish in.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from dataclasses import dataclass
from typing import Callable

from mindmirror.teacher.client import ChatClient, RequestFailed
from mindmirror.teacher.prompts import Prompts
from mindmirror.teacher.store import ResponseStore, request_key


@dataclass(frozen=True)
class Question:
    """One ground-truth question of a split; ``idx`` is its place in the split."""

    idx: int
    input: str
    label: str


@dataclass(frozen=True)
class Sampling:
    """The teacher model and how it is sampled (all of it goes into the request keys)."""

    model: str
    n_generate_sample: int = 5
    n_evaluate_sample: int = 5
    temperature: float = 0.7
    max_tokens: int = 512
    top_p: float | None = None
    n_per_request: int = 0  # most choices asked in one request; 0: all of a draw at once

    def params(self) -> dict:
        """The sampling parameters sent with every request (besides ``model``, ``messages``, ``n``)."""
        params = {"temperature": self.temperature, "max_tokens": self.max_tokens}
        return params | ({"top_p": self.top_p} if self.top_p is not None else {})

    def per_request(self, remaining: int) -> int:
        """Choices to ask for in the next request when ``remaining`` are still missing."""
        return min(remaining, self.n_per_request) if self.n_per_request > 0 else remaining


class TooManyFailures(RuntimeError):
    """More questions failed than ``--max_failures`` allows."""


def estimate_tokens(messages: list[dict]) -> int:
    """Rough prompt size: 4 characters a token plus a few tokens of framing per message."""
    return sum(math.ceil(len(m["content"]) / 4) + 4 for m in messages)


class Teacher:
    """Draws CoTs and self-evaluations for questions, through the store and the client."""

    def __init__(self, client: ChatClient | None, store: ResponseStore, prompts: Prompts, family: str,
                 sampling: Sampling):
        self.client, self.store, self.prompts = client, store, prompts
        self.family, self.sampling = family, sampling
        self._params = sampling.params()
        self._inflight: dict[str, asyncio.Task] = {}

    def _key(self, messages: list[dict], kind: str, slot: int | None, start: int) -> str:
        return request_key(self.sampling.model, messages, self._params, [kind, slot, start])

    async def draw(self, kind: str, messages: list[dict], n: int, slot: int | None = None) -> dict:
        """``n`` samples for ``messages``: stored ones first, then requests for the rest.

        Returns ``{"choices", "finish_reasons", "prompt_tokens", "completion_tokens"}``. The store
        keys count samples from 0 (``start``), so a rerun walks the same keys and a larger ``n``
        later reuses the samples already drawn.
        """
        out = {"choices": [], "finish_reasons": [], "prompt_tokens": 0, "completion_tokens": 0}
        start = 0
        while len(out["choices"]) < n:
            key = self._key(messages, kind, slot, start)
            entry = self.store.get(key)
            if entry is None:
                entry = await self._fetch(key, kind, messages, self.sampling.per_request(n - len(out["choices"])))
            take = n - len(out["choices"])
            out["choices"] += entry["choices"][:take]
            out["finish_reasons"] += entry["finish_reasons"][:take]
            out["prompt_tokens"] += entry["usage"]["prompt_tokens"]
            out["completion_tokens"] += entry["usage"]["completion_tokens"]
            start += len(entry["choices"])
        return out

    async def _fetch(self, key: str, kind: str, messages: list[dict], n: int) -> dict:
        """Request ``key`` once, however many questions ask for it at the same time (equal prompts)."""
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(self._request(key, kind, messages, n))
            self._inflight[key] = task
            task.add_done_callback(lambda _: self._inflight.pop(key, None))
        return await task

    async def _request(self, key: str, kind: str, messages: list[dict], n: int) -> dict:
        body = {"model": self.sampling.model, "messages": messages, "n": n, **self._params}
        completion = await self.client.complete(body, estimate_tokens(messages) + n * self.sampling.max_tokens)
        entry = {"kind": kind, "choices": completion.choices, "finish_reasons": completion.finish_reasons,
                 "usage": {"prompt_tokens": completion.prompt_tokens,
                           "completion_tokens": completion.completion_tokens}}
        await self.store.put(key, entry)  # durable before anything uses it
        return entry

    async def answer(self, q: Question) -> dict:
        """The teacher's CoTs and self-evaluations of ``q`` as a row (``error`` set if a request failed)."""
        s = self.sampling
        row = {"idx": q.idx, "input": q.input, "label": q.label, "cots": [], "evaluations": [],
               "truncated_cots": 0, "truncated_evaluations": 0, "prompt_tokens": 0, "completion_tokens": 0,
               "error": None}
        try:
            sample = await self.draw("sample", self.prompts.sample_messages(q.input, self.family),
                                     s.n_generate_sample)
        except RequestFailed as e:
            return row | {"error": f"sample request: {e}"}
        values = await asyncio.gather(
            *(self.draw("value", self.prompts.value_messages(q.input, self.family, cot), s.n_evaluate_sample, i)
              for i, cot in enumerate(sample["choices"])), return_exceptions=True)
        for i, value in enumerate(values):
            if isinstance(value, RequestFailed):
                return row | {"error": f"value request of CoT {i}: {value}"}
            if isinstance(value, BaseException):
                raise value
        draws = [sample, *values]
        return row | {
            "cots": sample["choices"],
            "evaluations": [v["choices"] for v in values],
            "truncated_cots": sample["finish_reasons"].count("length"),
            "truncated_evaluations": sum(v["finish_reasons"].count("length") for v in values),
            "prompt_tokens": sum(d["prompt_tokens"] for d in draws),
            "completion_tokens": sum(d["completion_tokens"] for d in draws),
        }

    def stored_plan(self, q: Question, expected_cot_chars: int) -> dict:
        """What :meth:`answer` would still request for ``q`` (for ``--dry_run``): requests and their
        estimated prompt tokens, and how many requests the store already answers."""
        s = self.sampling
        plan = {"requests": 0, "stored": 0, "prompt_tokens": 0, "completions": 0}

        def walk(kind, messages, n, slot):
            have, start, choices = 0, 0, []
            while have < n and (entry := self.store.get(self._key(messages, kind, slot, start))) is not None:
                plan["stored"] += 1
                choices += entry["choices"][: n - have]
                have, start = len(choices), start + len(entry["choices"])
            while have < n:
                ask = s.per_request(n - have)
                plan["requests"] += 1
                plan["prompt_tokens"] += estimate_tokens(messages)
                plan["completions"] += ask
                have += ask
            return choices if len(choices) == n else None

        cots = walk("sample", self.prompts.sample_messages(q.input, self.family), s.n_generate_sample, None)
        for i in range(s.n_generate_sample):
            cot = cots[i] if cots is not None else "x" * expected_cot_chars
            walk("value", self.prompts.value_messages(q.input, self.family, cot), s.n_evaluate_sample, i)
        return plan


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
    """A tqdm bar of questions done with the requests/s, tokens and cost of the requests sent meanwhile."""

    def __init__(self, total: int, desc: str, client: ChatClient, prices: tuple[float, float]):
        from tqdm.auto import tqdm

        self.client, self.prices, self.start = client, prices, time.monotonic()
        st = client.stats
        self.base = (st.sent, st.prompt_tokens, st.completion_tokens, st.retried)
        # In a log file (a Slurm job) every refresh is kept: refresh twice a minute there.
        self.bar = tqdm(total=total, desc=desc, unit="q", dynamic_ncols=True,
                        mininterval=0.5 if sys.stderr.isatty() else 30)

    def __call__(self, row: dict) -> None:
        st = self.client.stats
        sent, prompt, completion, retried = (now - before for now, before in
                                             zip((st.sent, st.prompt_tokens, st.completion_tokens, st.retried),
                                                 self.base))
        rate = sent / max(time.monotonic() - self.start, 1e-9)
        cost = (prompt * self.prices[0] + completion * self.prices[1]) / 1000
        self.bar.set_postfix_str(f"{sent} req ({rate:.1f}/s), {prompt + completion:,} tok, ${cost:.4f}, "
                                 f"{retried} retried", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        """End the bar."""
        self.bar.close()
