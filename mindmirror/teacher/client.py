"""An asynchronous client for OpenAI-compatible chat-completions endpoints (OpenAI, vLLM, TGI, llama.cpp).

It speaks the one call the teacher needs, ``POST {base_url}/chat/completions``, over ``httpx2``
(the maintained httpx line, already installed with the Hugging Face hub client, and the transport
of the ``openai`` package itself): owning the retry loop means exactly one policy decides what is
retried (429, 5xx, timeouts, dropped connections, malformed bodies), how long to wait
(exponential backoff with jitter, never less than the server's ``Retry-After``) and how often
(bounded), and the raw choices and usage go to the response store as the server sent them.

It also adapts to the endpoint: the completion limit goes as ``max_tokens`` or, for servers that
reject that name (OpenAI's reasoning models), ``max_completion_tokens``; a request still waiting
when most requests have long been answered is *hedged* (sent again, the first answer taken), so a
few hung requests do not hold the run; and an endpoint that cannot work at all (nothing listening,
a name that does not resolve, a TLS failure, a reply that is not JSON) stops the run at once with
the cause named, rather than after minutes of retries.

The API key only ever travels in the ``Authorization`` header: no error message, log line or
stored field holds it, and text echoed from the server is scrubbed of it before it is shown.
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import json
import random
import re
import socket
import ssl
import sys
import time
import urllib.parse
from dataclasses import dataclass, field

import httpx2

FATAL_STATUS = {401: "the API key was refused", 403: "the API key may not use this model or endpoint",
                404: "no such endpoint or model"}
TOKEN_PARAMS = ("max_tokens", "max_completion_tokens")
CONNECT_TIMEOUT_S = 10.0  # connecting takes milliseconds; a host that does not answer in 10 s is down
HEDGE_FLOOR_S = 0.25  # never hedge sooner: a local server's jitter is not a hang
HEDGE_LATENCY_FACTOR = 2.0  # hedge a request once it took 2x the 90th percentile of answered ones
HEDGE_MIN_OBSERVED = 8  # answered requests before the percentile is trusted
HEDGE_MAX_COPIES = 8  # the request and at most seven hedges of it, one hedge in flight at a time
_REJECTED = re.compile(r"unsupported|not supported|does not support|unknown|unrecognized|not permitted|not allowed|"
                       r"extra (?:fields|inputs)|invalid (?:parameter|field)|only the default", re.IGNORECASE)


def public_url(url: str) -> str:
    """``url`` without user name, password or query: what records and messages may show."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def check_base_url(url: str) -> None:
    """Refuse a base URL that cannot be meant: not http(s), or holding a user name or password.

    Credentials in the URL would go as HTTP basic auth beside (or instead of) the bearer key, so
    which one the server reads is up to the server: the key belongs in the environment.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--base_url {public_url(url)!r}: expected http(s)://host[:port]/path, such as "
                         "http://node17:8000/v1")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"--base_url holds a user name or password ({public_url(url)} with credentials before "
                         "the host): give the URL without them and put the key in $OPENAI_API_KEY (or the variable "
                         "--api_key_env names), which is sent as a bearer token")


def retryable_status(status: int) -> bool:
    """Statuses worth another try: rate limits, request timeouts, conflicts and server errors."""
    return status in (408, 409, 425, 429) or status >= 500


class RequestFailed(Exception):
    """One request still failed after its retries (or failed in a way retrying cannot fix)."""


class ServerRefused(Exception):
    """The endpoint cannot serve this run (refused key, unknown model or URL, nothing listening, not an
    OpenAI-compatible API): the run must stop. The message names the cause."""


class FieldRejected(RequestFailed):
    """The server refused a field of the request body (400 or 422 naming it as unsupported)."""

    def __init__(self, field_name: str, detail: str):
        self.field = field_name
        super().__init__(f"the server rejects the field {field_name!r} ({detail})")


class NotJSON(ValueError):
    """A 200 reply whose body is not JSON: not an OpenAI-compatible endpoint (or not its API root)."""


@dataclass(frozen=True)
class Completion:
    """What one chat-completions response holds that the teacher uses."""

    choices: list[str]
    finish_reasons: list[str | None]
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class _Failure:
    """A try that failed in a way another try may mend: its kind (the key of ``ClientStats.problems``), what
    happened, and the wait the server asked for."""

    kind: str
    problem: str
    retry_after: float | None = None


def rejected_field(status: int, text: str, sent: list[str]) -> str | None:
    """The body field a 400/422 reply refuses as unsupported, among the ``sent`` ones, or ``None``.

    OpenAI names it in ``error.param`` (``"Unsupported parameter: 'max_tokens' is not supported with
    this model. Use 'max_completion_tokens' instead."``); validating gateways list it in their
    message or in a ``loc``. A reply that names a field without saying it is unsupported (such as
    "'max_tokens' is too large") is not a rejection of the field.
    """
    if status not in (400, 422) or not _REJECTED.search(text):
        return None
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    error = data.get("error") if isinstance(data, dict) else None
    param = error.get("param") if isinstance(error, dict) else None
    if param in sent:
        return param
    for name in sorted(sent, key=len, reverse=True):  # max_completion_tokens before max_tokens
        if re.search(rf"""['"`]{re.escape(name)}['"`]""", text) or \
                (len(name) > 2 and re.search(rf"(?<![\w']){re.escape(name)}(?![\w'])", text)):
            return name
    return None


def connection_problem(error: BaseException, url: str) -> tuple[str, str]:
    """``(kind, explanation)`` of a failed connection: ``refused``, ``dns``, ``tls``, ``connect timeout``
    (the ones that no retry fixes while the endpoint is misnamed or down) or ``connection``."""
    host = urllib.parse.urlsplit(url).hostname
    port = urllib.parse.urlsplit(url).port or (443 if url.startswith("https") else 80)
    seen, cause = set(), error
    while cause is not None and id(cause) not in seen:  # httpx2 wraps the socket error two levels down
        seen.add(id(cause))
        if isinstance(cause, ConnectionRefusedError):
            return "refused", f"connection refused: nothing listens at {host}:{port}"
        if isinstance(cause, socket.gaierror):
            return "dns", f"the host name {host!r} does not resolve ({cause.strerror or cause})"
        if isinstance(cause, ssl.SSLError):
            return "tls", (f"TLS failure with {host}:{port} ({getattr(cause, 'reason', None) or cause}): check "
                           "http:// against https:// in --base_url and the server's certificate")
        cause = cause.__cause__ or cause.__context__
    if isinstance(error, httpx2.ConnectTimeout):
        return "connect timeout", f"no connection to {host}:{port} within {CONNECT_TIMEOUT_S:g} s"
    return "connection", f"connection failed or dropped ({type(error).__name__})"


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with exponential backoff and jitter."""

    max_retries: int = 6
    base_delay: float = 1.0
    max_delay: float = 60.0

    def delay(self, retry: int, retry_after: float | None, rng: random.Random) -> float:
        """Seconds to wait before retry number ``retry`` (0-based).

        The backoff doubles from ``base_delay`` up to ``max_delay``, drawn from its upper half so
        that requests that failed together do not come back together; the server's ``Retry-After``
        is a floor.
        """
        cap = min(self.max_delay, self.base_delay * 2 ** retry)
        return max(rng.uniform(cap / 2, cap), retry_after or 0.0)


def retry_after_seconds(headers: httpx2.Headers) -> float | None:
    """The server's ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date), if any."""
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


class RateLimiter:
    """Requests-per-minute and tokens-per-minute budgets (0: none), spent evenly.

    Each budget is a bucket refilled at its per-minute rate and holding ``burst_s`` seconds' worth,
    so a run starts at the budget's pace rather than with a minute's worth at once. A request may
    take the token bucket below zero (one larger than the bucket waits for a full one), which
    keeps the long-run pace right. Callers are served in arrival order; :meth:`pause` holds
    everyone back after a 429.
    """

    def __init__(self, rpm: float = 0, tpm: float = 0, burst_s: float = 10.0):
        self.rpm, self.tpm = rpm, tpm
        self._caps = (max(1.0, rpm * burst_s / 60), tpm * burst_s / 60)
        self._requests, self._tokens = self._caps
        self._updated = time.monotonic()
        self._paused_until = 0.0
        self._lock = asyncio.Lock()

    def pause(self, seconds: float) -> None:
        """Send nothing for ``seconds`` (the server said it is overloaded)."""
        self._paused_until = max(self._paused_until, time.monotonic() + seconds)

    async def acquire(self, tokens: int) -> None:
        """Wait until one request of about ``tokens`` tokens fits the budgets, then spend them."""
        async with self._lock:
            while True:
                now = time.monotonic()
                elapsed, self._updated = now - self._updated, now
                self._requests = min(self._caps[0], self._requests + elapsed * self.rpm / 60)
                self._tokens = min(self._caps[1], self._tokens + elapsed * self.tpm / 60)
                wait = self._paused_until - now
                if self.rpm:
                    wait = max(wait, (1 - self._requests) * 60 / self.rpm)
                if self.tpm:
                    wait = max(wait, (min(tokens, self._caps[1]) - self._tokens) * 60 / self.tpm)
                if wait <= 0:
                    self._requests -= 1
                    self._tokens -= tokens
                    return
                await asyncio.sleep(wait)


@dataclass
class ClientStats:
    """Counts for the progress bar and the end-of-run summary."""

    sent: int = 0  # HTTP requests, hedges included
    completed: int = 0
    retried: int = 0
    failed: int = 0
    hedged: int = 0  # second (or third) copies of a slow request
    hedges_first: int = 0  # hedges that answered before the request they copied
    prompt_tokens: int = 0
    completion_tokens: int = 0
    problems: dict[str, int] = field(default_factory=dict)  # retried or failed attempts by kind


class ChatClient:
    """Chat completions with at most ``max_concurrency`` requests in flight and bounded retries.

    ``token_param`` names the completion limit: ``max_tokens``, ``max_completion_tokens``, or
    ``auto`` (``max_tokens`` until the server's 400 rejects it, then the other for the rest of the
    run). ``hedge_after`` is ``None`` for hedging after twice the 90th percentile of the latencies
    seen (at least :data:`HEDGE_FLOOR_S`), a number of seconds, or 0 for no hedging. Hedges go
    beside the ``max_concurrency`` requests, at most a quarter as many again (see :meth:`_exchange`).
    """

    def __init__(self, base_url: str, api_key: str | None, *, max_concurrency: int = 16, timeout: float = 120.0,
                 retry: RetryPolicy = RetryPolicy(), limiter: RateLimiter | None = None, token_param: str = "auto",
                 hedge_after: float | None = None):
        check_base_url(base_url)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = base_url.rstrip("/") + "/chat/completions"
        self._max_hedges = max(1, max_concurrency // 4)
        connections = max_concurrency + self._max_hedges
        self._http = httpx2.AsyncClient(
            headers=headers, timeout=httpx2.Timeout(timeout, connect=min(timeout, CONNECT_TIMEOUT_S)),
            limits=httpx2.Limits(max_connections=None, max_keepalive_connections=connections))
        self._secret = api_key
        self._timeout = timeout
        self._slots = asyncio.Semaphore(max_concurrency)
        self.retry = retry
        self.limiter = limiter or RateLimiter()
        self._auto_token_param = token_param == "auto"
        self.token_param = "max_tokens" if self._auto_token_param else token_param
        self._hedge_after = hedge_after
        self._hedges_in_flight = 0
        self._latencies: collections.deque[float] = collections.deque(maxlen=200)
        self._rng = random.Random()
        self.stats = ClientStats()

    def scrub(self, text: str, width: int = 300) -> str:
        """``text`` (from the server) shortened to one line and without the API key in it."""
        text = str(text).replace(self._secret, "[API key]") if self._secret else str(text)
        return " ".join(text.split())[:width]

    def hedge_delay(self) -> float | None:
        """Seconds after which a request still unanswered is sent again; ``None``: not (yet)."""
        if self._hedge_after is not None:
            return self._hedge_after or None
        if len(self._latencies) < HEDGE_MIN_OBSERVED:
            return None
        ordered = sorted(self._latencies)
        return max(HEDGE_FLOOR_S, HEDGE_LATENCY_FACTOR * ordered[int(0.9 * (len(ordered) - 1))])

    async def complete(self, body: dict, max_tokens: int, est_tokens: int) -> Completion:
        """POST one chat-completions request (``body`` plus the completion limit), retrying what may pass
        on a second try.

        Raises :class:`RequestFailed` when the retries are spent or the request itself is refused
        (another 4xx; :class:`FieldRejected` when a 400 names a field of the body), and
        :class:`ServerRefused` when the endpoint cannot serve the run: the key, model or URL is
        refused, or, before any request has succeeded, nothing listens, the host name does not
        resolve, TLS fails or the reply is not JSON.
        """
        attempt = 0
        while True:
            await self.limiter.acquire(est_tokens)
            outcome = await self._attempt(body, max_tokens, est_tokens)
            if isinstance(outcome, Completion):
                return outcome
            if outcome is None:
                continue  # the same attempt again, with the other name of the completion limit
            kind, problem = outcome.kind, outcome.problem
            if self.stats.completed == 0 and kind in ("refused", "dns", "tls", "connect timeout", "not json"):
                raise ServerRefused(f"{public_url(self.url)}: {problem}; no request has succeeded, so the run stops")
            if attempt == self.retry.max_retries:
                break
            self._count(kind)
            delay = self.retry.delay(attempt, outcome.retry_after, self._rng)
            if kind == "http 429":
                self.limiter.pause(delay)  # everyone backs off, not just this request
            await asyncio.sleep(delay)
            attempt += 1
        self._count(kind, failed=True)
        raise RequestFailed(f"gave up after {self.retry.max_retries + 1} attempts; the last: {problem}")

    async def _attempt(self, body: dict, max_tokens: int, est_tokens: int) -> Completion | _Failure | None:
        """One try of :meth:`complete`: its completion, the :class:`_Failure` that another try may mend, or
        ``None`` when the server rejected the completion limit's name (now switched: try again at once).
        Raises what no retry mends."""
        token_param = self.token_param
        payload = body | {token_param: max_tokens}
        async with self._slots:
            try:
                response = await self._exchange(payload, est_tokens)
            except (asyncio.TimeoutError, httpx2.TimeoutException) as e:
                if isinstance(e, httpx2.ConnectTimeout):
                    return _Failure(*connection_problem(e, self.url))
                return _Failure("timeout", f"no response within {self._timeout:g} s")
            except httpx2.TransportError as e:
                return _Failure(*connection_problem(e, self.url))
            if response.status_code == 200:
                return self._completed(response)
            return self._refused(response, payload, token_param)

    def _completed(self, response: httpx2.Response) -> Completion | _Failure:
        """A 200 response's completion, counted, or why it holds none."""
        try:
            completion = self._parse(response)
        except NotJSON as e:
            return _Failure("not json", str(e))
        except ValueError as e:
            return _Failure("malformed", f"malformed response: {e}")
        self.stats.completed += 1
        self.stats.prompt_tokens += completion.prompt_tokens
        self.stats.completion_tokens += completion.completion_tokens
        return completion

    def _refused(self, response: httpx2.Response, payload: dict, token_param: str) -> _Failure | None:
        """What a response other than 200 means: a retryable :class:`_Failure`, ``None`` when it rejected the
        completion limit's name ``token_param`` (see :meth:`_switch_token_param`), or an exception raised."""
        status = response.status_code
        detail = f"HTTP {status}: {self.scrub(response.text)}"
        if status in FATAL_STATUS:
            raise ServerRefused(f"{public_url(self.url)} answered {detail} ({FATAL_STATUS[status]}); "
                                "check --base_url, --model and the API key")
        rejected = rejected_field(status, response.text, [k for k in payload if k not in ("model", "messages")])
        if rejected == token_param:
            if token_param == self.token_param:  # not yet switched by a request beside this one
                self._switch_token_param(detail)
            return None
        if rejected is not None:
            self._count("http", failed=True)
            raise FieldRejected(rejected, detail)
        if not retryable_status(status):
            self._count("http", failed=True)
            raise RequestFailed(f"{detail} (not retried: the request itself was refused)")
        return _Failure(f"http {status}", detail, retry_after_seconds(response.headers))

    def _switch_token_param(self, detail: str) -> None:
        """After a 400 rejecting the completion limit's name: use the other name (``auto`` only, once)."""
        if not self._auto_token_param:
            other = TOKEN_PARAMS[1 - TOKEN_PARAMS.index(self.token_param)]
            raise ServerRefused(f"{public_url(self.url)} rejects {self.token_param!r} ({detail}): run with "
                                f"--token_param {other} (or auto)")
        if self.token_param != "max_tokens":
            raise ServerRefused(f"{public_url(self.url)} rejects both max_tokens and max_completion_tokens "
                                f"({detail}): check --base_url and --model")
        self.token_param = "max_completion_tokens"
        print(f"mindmirror-teacher: the server rejects 'max_tokens' ({detail[:160]}); sending "
              "'max_completion_tokens' from now on", file=sys.stderr)

    async def _exchange(self, payload: dict, est_tokens: int) -> httpx2.Response:
        """One HTTP exchange, hedged: while no copy has answered :meth:`hedge_delay` after the last one
        was sent, a hedge (another copy) is sent, up to :data:`HEDGE_MAX_COPIES` copies in all. The
        request itself keeps running (it may be slow, not hung) and a newer hedge replaces the older
        one; the first response wins. Copies left behind are cancelled, which closes their
        connections. Only an exchange's first hedge waits for a free place among the hedges, so at
        most ``max_concurrency`` plus that many requests are in flight. A copy that fails leaves the
        others running; the whole exchange is bounded by the request timeout."""
        start = last_sent = time.monotonic()
        first = asyncio.ensure_future(self._post(payload))
        running, dropped, copies, error = [first], [], 1, None
        self.stats.sent += 1
        try:
            while running:
                now = time.monotonic()
                wait = self._timeout - (now - start)
                if wait <= 0:
                    raise asyncio.TimeoutError
                if copies < HEDGE_MAX_COPIES and self._hedge_after != 0:
                    hedge_in = self._next_hedge_in(now, last_sent, replacing=len(running) == 2)
                    if hedge_in == 0:
                        if len(running) == 2:  # a newer hedge replaces the older: hung ones must not hold the places
                            dropped.append(running.pop(1 if running[0] is first else 0))
                            dropped[-1].cancel()
                        running.append(asyncio.ensure_future(self._hedge(payload, est_tokens)))
                        copies, last_sent = copies + 1, now
                        continue
                    wait = min(wait, hedge_in)
                done, _ = await asyncio.wait(running, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    running.remove(task)
                    if task.exception() is None:
                        if task is not first:
                            self.stats.hedges_first += 1
                        return task.result()
                    error = error or task.exception()
            raise error
        finally:
            for task in running:
                task.cancel()
            if running or dropped:
                await asyncio.gather(*running, *dropped, return_exceptions=True)

    def _next_hedge_in(self, now: float, last_sent: float, replacing: bool) -> float:
        """Seconds until an exchange looks again whether to send a hedge, 0 to send one now: it is due
        :meth:`hedge_delay` after the last copy was sent, and goes when it replaces the exchange's older hedge
        (``replacing``) or a place among the hedges is free."""
        delay = self.hedge_delay()
        if delay is None:
            return 0.25  # too few latencies seen yet: look again soon
        if now < last_sent + delay:
            return last_sent + delay - now
        if replacing or self._hedges_in_flight < self._max_hedges:
            return 0.0
        return 0.1  # due, but as many hedges are out as allowed

    async def _hedge(self, payload: dict, est_tokens: int) -> httpx2.Response:
        self._hedges_in_flight += 1
        try:
            await self.limiter.acquire(est_tokens)
            self.stats.sent += 1
            self.stats.hedged += 1
            return await self._post(payload)
        finally:
            self._hedges_in_flight -= 1

    async def _post(self, payload: dict) -> httpx2.Response:
        sent = time.monotonic()
        response = await self._http.post(self.url, json=payload)
        if response.status_code == 200:
            self._latencies.append(time.monotonic() - sent)
        return response

    def _count(self, kind: str, failed: bool = False) -> None:
        self.stats.problems[kind] = self.stats.problems.get(kind, 0) + 1
        if failed:
            self.stats.failed += 1
        else:
            self.stats.retried += 1

    def _parse(self, response: httpx2.Response) -> Completion:
        try:
            data = response.json()
        except ValueError as e:
            start = self.scrub(response.content[:120].decode("utf-8", "replace"), 120)
            kind = response.headers.get("content-type", "no content type")
            raise NotJSON(f"a 200 reply that is not JSON ({kind}, {len(response.content)} bytes, starting "
                          f"{start!r}): is --base_url the API root, such as http://host:8000/v1?") from e
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list) or not choices:
            raise ValueError("no 'choices' in the response")
        if all(isinstance(c, dict) and isinstance(c.get("index"), int) for c in choices):
            choices = sorted(choices, key=lambda c: c["index"])
        texts, reasons = [], []
        for c in choices:
            message = c.get("message") if isinstance(c, dict) else None
            if not isinstance(message, dict):
                raise ValueError("a choice without a 'message'")
            content = message.get("content")
            if content is not None and not isinstance(content, str):
                raise ValueError("a choice's message content is not text")
            texts.append(content or "")  # no text (a refusal, say) is an unusable reply, re-requested
            reasons.append(c.get("finish_reason"))
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        tokens = [usage.get(name) if isinstance(usage.get(name), int) else 0
                  for name in ("prompt_tokens", "completion_tokens")]
        return Completion(texts, reasons, *tokens)

    async def aclose(self) -> None:
        """Close the connections."""
        await self._http.aclose()
