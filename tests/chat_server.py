"""A chat-completions server for the teacher tests: real HTTP on 127.0.0.1, scripted replies and faults.

It answers ``POST /v1/chat/completions`` like an OpenAI-compatible server. Replies are a pure
function of the request: the server finds which known question the prompt is about, and answers a
"sample" prompt with CoTs ``" ... (way j of n) ... <answer sentence>"`` (every third CoT wrong) and
a "value" prompt (recognised by its ``Given answer:`` line) with self-evaluations whose verdicts
mostly fit the judged CoT. Like a real model after a prompt ending in ``Answer:`` or
``Evaluation:``, a reply starts with a space, an evaluation mostly lacks the ``Evaluation:`` header
(one in three repeats it), and every other reply goes on with a new few-shot ``Problem:`` unless
the request's ``stop`` ends it there. A request with more than ``max_tokens`` (or
``max_completion_tokens``) of text to say is cut there (finish_reason ``length``).

``plan(info, attempt)`` scripts faults per request and attempt: ``ok``, ``("429", seconds)``,
``500``, ``hang`` or ``("hang", seconds)``, ``drop`` (connection closed without a reply),
``truncate`` (the body cut short), ``offformat`` (choice 0 cut before its answer or verdict,
finish_reason ``length``), ``("long", tokens)`` (choice 0 needs that many tokens, so a smaller
limit cuts it), ``noanswer`` (choice 0 complete but without its answer or verdict), ``fewer`` (two
choices only), ``nonjson`` (a 200 with an HTML page), ``401echo`` (refuses the key and echoes the
header). ``rejects`` names body fields the server refuses with a 400, as OpenAI words it.
``delay_s`` is every reply's latency.

It counts attempts and completed replies by a hash of the request body, so a test can say that no
completed request was sent twice, and logs every request's ``info`` (``log``; a value call's
``judged`` CoT among it); ``cut_texts`` holds every text it cut at the token limit.
``hold_after(k)`` makes every request after ``k`` completed replies wait, unanswered, until
:meth:`release` (then the connection is closed without a reply).
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from mindmirror.data.formats import ANLI_LABELS
from mindmirror.evaluation.selfeval import answer_sentence

WAY = re.compile(r"way (\d+) of (\d+)")
JUDGED = re.compile(r"Given answer: (.*)\nEvaluation:$", re.DOTALL)
SPILL_HEADER = {"svamp": "Problem", "cqa": "Question", "anli1": "Premise"}  # the prompts' question headers
TOKENS_PER_CHAR = 0.25


def wrong_label(gold: str, family: str) -> str:
    if family == "svamp":
        return "( 1.0 + 2.0 )"
    if family == "anli1":
        return ANLI_LABELS[(ANLI_LABELS.index(gold) + 1) % 3]
    return "nothing at all"


class ChatServer:
    """The server, started in a thread; ``url`` is its ``/v1`` root."""

    def __init__(self, questions: dict[str, str], family: str, api_key: str | None = None):
        self.questions = list(questions.items())  # (input, gold label)
        self.family, self.api_key = family, api_key
        # What a model says next when nothing stops it: a new few-shot example.
        self.spill = f"\n\n{SPILL_HEADER[family]}: A made-up next one.\nAnswer: It goes on. The answer is (1 + 1)."
        self.plan = lambda info, attempt: "ok"
        self.hang_s = 5.0
        self.delay_s = 0.0
        self.rejects: set[str] = set()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self._release = threading.Event()
        self._hold_after: int | None = None
        self.reset()
        self.httpd = _Server(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.chat = self
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def reset(self) -> None:
        """Forget the counts (between runs that should be compared, not added up)."""
        with self.lock:
            self.attempts: Counter = Counter()
            self.completed: Counter = Counter()
            self.times: dict[str, list[float]] = {}
            self.info: dict[str, dict] = {}
            self.log: list[dict] = []
            self.cut_texts: set[str] = set()
            self.unauthorized = 0
            self.active = 0  # requests being answered now (held ones not counted)

    def hold_after(self, k: int | None) -> None:
        self._hold_after = k
        self._release.clear()

    def release(self) -> None:
        self._hold_after = None
        self._release.set()

    def close(self) -> None:
        self.stop.set()
        self._release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def attempts_of(self, **match) -> list[int]:
        """Attempt counts of the requests whose info has these values (e.g. question=3, kind="sample")."""
        return [self.attempts[k] for k, info in self.info.items() if all(info.get(f) == v for f, v in match.items())]

    # -- replies ---------------------------------------------------------------------------------

    def describe(self, body: dict) -> dict:
        """Which question, which kind of call and (for a value call) which CoT a request is about."""
        text = "\n".join(m["content"] for m in body["messages"])
        kind = "value" if WAY.search(text) else "sample"  # only a judged CoT holds "way j of n"
        for qi, (question, _gold) in enumerate(self.questions):
            parts = question.split("</s>") if self.family == "anli1" else [question]
            if all(p.strip() in text for p in parts):
                way = WAY.search(text) if kind == "value" else None
                judged = JUDGED.search(body["messages"][-1]["content"]) if kind == "value" else None
                limit = [f for f in ("max_tokens", "max_completion_tokens") if f in body]
                return {"question": qi, "kind": kind, "n": body.get("n", 1), "has_n": "n" in body,
                        "way": [int(way.group(1)), int(way.group(2))] if way else None,
                        "judged": judged.group(1) if judged else None,
                        "limit_field": limit[0] if limit else None, "limit": body[limit[0]] if limit else None,
                        "stop": body.get("stop"), "seed": body.get("seed")}
        raise KeyError("the prompt holds none of the server's questions")

    def choices(self, info: dict) -> list[str]:
        question, gold = self.questions[info["question"]]
        n, qi = info["n"], info["question"]
        if info["kind"] == "sample":
            out = []
            for j in range(n):
                right = (qi + j) % 3 != 2
                label = gold if right else wrong_label(gold, self.family)
                out.append(f" Reading the question carefully (way {j} of {n}), the steps lead to one result. "
                           f"{answer_sentence(label, self.family)}" + (self.spill if j % 2 else ""))
            return out
        j, of = info["way"]
        right = (qi + j) % 3 != 2
        out = []
        for k in range(n):
            verdict = ("correct" if k != 3 else "uncertain") if right else ("wrong" if k != 4 else "correct")
            header = "Evaluation:\n\n" if k % 3 == 0 else " "
            out.append(f"{header}The given answer (way {j} of {of}) is checked step by step, check {k}."
                       f"\n\nEvaluation result: the given answer is {verdict}." + (self.spill if k % 2 else ""))
        return out


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # socketserver's 5 would drop the connections a run opens at once (a 1 s SYN retry)

    def handle_error(self, request, client_address):
        # A client that hung up before its request line (the TLS test's client, on this plain-HTTP server) is
        # expected; socketserver would print its traceback into pytest's progress line. Anything else still prints.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def _send(self, status: int, payload: dict, headers: dict | None = None, cut: bool = False) -> bool:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data[: len(data) // 2] if cut else data)
        self.wfile.flush()
        if cut:
            self.close_connection = True
        return not cut

    def do_POST(self):
        chat: ChatServer = self.server.chat
        with chat.lock:
            chat.active += 1
        try:
            self._answer(chat)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up on this request (a hedge won, a stop)
            self.close_connection = True
        finally:
            with chat.lock:
                chat.active -= 1

    def _answer(self, chat: ChatServer) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        try:
            body = json.loads(raw)
        except ValueError:  # a client that went away mid-request
            self._send(400, {"error": {"message": "the body is not JSON"}})
            return
        key = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        info = chat.describe(body)
        with chat.lock:
            attempt = chat.attempts[key]
            chat.attempts[key] += 1
            chat.times.setdefault(key, []).append(time.monotonic())
            chat.info[key] = info
            hold = chat._hold_after is not None and sum(chat.completed.values()) >= chat._hold_after
        if hold:
            with chat.lock:
                chat.active -= 1
            chat._release.wait(30)
            with chat.lock:
                chat.active += 1
            self.close_connection = True
            return
        if chat.api_key is not None and self.headers.get("Authorization") != f"Bearer {chat.api_key}":
            with chat.lock:
                chat.unauthorized += 1
        action = chat.plan(info, attempt)
        code = action[0] if isinstance(action, tuple) else action
        with chat.lock:
            chat.log.append(info | {"attempt": attempt, "action": code})
        if chat.delay_s:
            chat.stop.wait(chat.delay_s)
        if not self._fail(chat, body, action, code):
            self._reply(chat, body, key, info, action, code)

    def _fail(self, chat: ChatServer, body: dict, action, code: str) -> bool:
        """Answer as the plan's failure says, if it names one (a field rejected, an error status, a hang, a dropped
        connection, a page that is not JSON); False when the request is to be answered."""
        rejected = sorted(chat.rejects & set(body))
        if rejected:
            self._send(400, {"error": {"message": f"Unsupported parameter: '{rejected[0]}' is not supported with "
                                                  "this model.", "type": "invalid_request_error",
                                       "param": rejected[0], "code": "unsupported_parameter"}})
        elif code == "401echo":
            self._send(401, {"error": {"message": f"invalid key in header {self.headers.get('Authorization')}"}})
        elif code == "429":
            self._send(429, {"error": {"message": "rate limited"}}, {"Retry-After": str(action[1])})
        elif code == "500":
            self._send(500, {"error": {"message": "internal error"}})
        elif code == "hang":
            chat.stop.wait(action[1] if isinstance(action, tuple) else chat.hang_s)
            self.close_connection = True
        elif code == "drop":
            self.close_connection = True
        elif code == "nonjson":
            page = f"<!DOCTYPE html><html><body>Sign in ({self.headers.get('Authorization')})</body></html>".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)
        else:
            return False
        return True

    def _reply(self, chat: ChatServer, body: dict, key: str, info: dict, action, code: str) -> None:
        """The completion, shaped as the plan says (fewer choices, one cut or without an answer, a long one, a reply
        cut in the middle), each choice ending at a stop sequence and cut at the completion limit."""
        texts = chat.choices(info)
        finish = ["stop"] * len(texts)
        if code == "fewer":
            texts, finish = texts[:2], finish[:2]
        if code == "offformat":
            texts[0], finish[0] = texts[0][: texts[0].index("step")], "length"
            with chat.lock:
                chat.cut_texts.add(texts[0])
        if code == "noanswer":
            texts[0] = texts[0][: texts[0].index("step")] + "steps, and that is all."
        needs = [action[1] if code == "long" and i == 0 else len(t) * TOKENS_PER_CHAR for i, t in enumerate(texts)]
        for i in range(len(texts)):
            for stop in body.get("stop") or []:
                if stop in texts[i]:
                    texts[i] = texts[i][: texts[i].index(stop)]
            if info["limit"] is not None and needs[i] > info["limit"]:
                texts[i], finish[i] = texts[i][: len(texts[i]) // 3], "length"
                with chat.lock:
                    chat.cut_texts.add(texts[i])
        payload = {"id": "chatcmpl-test", "object": "chat.completion", "model": body["model"],
                   "choices": [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": f}
                               for i, (t, f) in enumerate(zip(texts, finish, strict=True))],
                   "usage": {"prompt_tokens": sum(len(m["content"]) for m in body["messages"]) // 4,
                             "completion_tokens": sum(len(t) for t in texts) // 4}}
        if self._send(200, payload, cut=code == "truncate"):
            with chat.lock:
                chat.completed[key] += 1
