"""An asynchronous client for OpenAI-compatible chat-completions endpoints (OpenAI, vLLM, TGI, llama.cpp).

It speaks the one call the teacher needs, ``POST {base_url}/chat/completions``, over ``httpx2``
(the maintained httpx line, already installed with the Hugging Face hub client, and the transport
of the ``openai`` package itself): owning the retry loop means exactly one policy decides what is
retried (429, 5xx, timeouts, dropped connections, cut or malformed bodies), how long to wait
(exponential backoff with jitter, never less than the server's ``Retry-After``) and how often
(bounded), and the raw choices and usage go to the response store as the server sent them.

The API key only ever travels in the ``Authorization`` header: no error message, log line or
stored field holds it, and text echoed from the server is scrubbed of it before it is shown.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
import urllib.parse
from dataclasses import dataclass, field

import httpx2

FATAL_STATUS = {401: "the API key was refused", 403: "the API key may not use this model or endpoint",
                404: "no such endpoint or model"}


def public_url(url: str) -> str:
    """``url`` without user name, password or query: what records and messages may show."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def retryable_status(status: int) -> bool:
    """Statuses worth another try: rate limits, request timeouts, conflicts and server errors."""
    return status in (408, 409, 425, 429) or status >= 500


class RequestFailed(Exception):
    """One request still failed after its retries (or failed in a way retrying cannot fix)."""


class ServerRefused(Exception):
    """The server refuses every request (bad key, unknown model or URL): the run must stop."""


@dataclass(frozen=True)
class Completion:
    """What one chat-completions response holds that the teacher uses."""

    choices: list[str]
    finish_reasons: list[str | None]
    prompt_tokens: int
    completion_tokens: int


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

    sent: int = 0
    completed: int = 0
    retried: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    problems: dict[str, int] = field(default_factory=dict)  # retried or failed attempts by kind


class ChatClient:
    """Chat completions with at most ``max_concurrency`` requests in flight and bounded retries."""

    def __init__(self, base_url: str, api_key: str | None, *, max_concurrency: int = 16, timeout: float = 120.0,
                 retry: RetryPolicy = RetryPolicy(), limiter: RateLimiter | None = None):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = base_url.rstrip("/") + "/chat/completions"
        self._http = httpx2.AsyncClient(
            headers=headers, timeout=httpx2.Timeout(timeout),
            limits=httpx2.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency))
        self._secret = api_key
        self._timeout = timeout
        self._slots = asyncio.Semaphore(max_concurrency)
        self.retry = retry
        self.limiter = limiter or RateLimiter()
        self._rng = random.Random()
        self.stats = ClientStats()

    def scrub(self, text: str) -> str:
        """``text`` (from the server) shortened to one line and without the API key in it."""
        text = " ".join(str(text).split())[:300]
        return text.replace(self._secret, "[API key]") if self._secret else text

    async def complete(self, body: dict, est_tokens: int) -> Completion:
        """POST one chat-completions request, retrying what may pass on a second try.

        Raises :class:`RequestFailed` when the retries are spent or the request itself is refused
        (another 4xx), :class:`ServerRefused` when the server refuses the key, model or URL.
        """
        for attempt in range(self.retry.max_retries + 1):
            await self.limiter.acquire(est_tokens)
            retry_after = None
            async with self._slots:
                self.stats.sent += 1
                try:
                    response = await asyncio.wait_for(self._http.post(self.url, json=body), self._timeout)
                except (asyncio.TimeoutError, httpx2.TimeoutException):
                    kind, problem = "timeout", f"no response within {self._timeout:g} s"
                except httpx2.TransportError as e:
                    kind, problem = "connection", f"connection failed or dropped ({type(e).__name__})"
                else:
                    status = response.status_code
                    if status == 200:
                        try:
                            completion = self._parse(response)
                        except ValueError as e:
                            kind, problem = "malformed", f"malformed response: {e}"
                        else:
                            self.stats.completed += 1
                            self.stats.prompt_tokens += completion.prompt_tokens
                            self.stats.completion_tokens += completion.completion_tokens
                            return completion
                    else:
                        detail = f"HTTP {status}: {self.scrub(response.text)}"
                        if status in FATAL_STATUS:
                            raise ServerRefused(f"{public_url(self.url)} answered {detail} ({FATAL_STATUS[status]}); "
                                                "check --base_url, --model and the API key")
                        if not retryable_status(status):
                            self._count("http", failed=True)
                            raise RequestFailed(f"{detail} (not retried: the request itself was refused)")
                        kind, problem = f"http {status}", detail
                        retry_after = retry_after_seconds(response.headers)
            if attempt == self.retry.max_retries:
                break
            self._count(kind)
            delay = self.retry.delay(attempt, retry_after, self._rng)
            if kind == "http 429":
                self.limiter.pause(delay)  # everyone backs off, not just this request
            await asyncio.sleep(delay)
        self._count(kind, failed=True)
        raise RequestFailed(f"gave up after {self.retry.max_retries + 1} attempts; the last: {problem}")

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
            raise ValueError(f"not JSON ({len(response.content)} bytes, {e})") from e
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
            texts.append(content or "")  # no text (a refusal, say) is kept as an unparsable reply
            reasons.append(c.get("finish_reason"))
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        tokens = [usage.get(name) if isinstance(usage.get(name), int) else 0
                  for name in ("prompt_tokens", "completion_tokens")]
        return Completion(texts, reasons, *tokens)

    async def aclose(self) -> None:
        """Close the connections."""
        await self._http.aclose()
