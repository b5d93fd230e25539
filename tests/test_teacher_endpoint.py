"""mindmirror-teacher against endpoints as they are in the wild, over real HTTP on 127.0.0.1
(tests/chat_server.py): fatal endpoint errors stop within seconds naming their cause, hung requests
are hedged, the completion limit's field name and a refused ``n`` are detected from the server's
400, and the text of replies is brought to the paper's form."""

from __future__ import annotations

import json
import socket
import time

import pytest
from test_teacher import KEY, N, api_key, data_files, server, svamp, teacher_args  # noqa: F401  (fixtures)

from mindmirror.data import formats
from mindmirror.teacher import cli, replies
from mindmirror.teacher.prompts import PROMPT_DIR, load_prompts


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("endpoint", ["refused", "unresolvable", "tls", "not json"])
def test_an_endpoint_that_cannot_work_stops_the_run_within_seconds_naming_the_cause(endpoint, server, svamp,
                                                                                   tmp_path, capsys):
    src, _ = svamp
    base_url = {"refused": f"http://127.0.0.1:{closed_port()}/v1", "unresolvable": "http://teacher-node.invalid:8000/v1",
                "tls": server.url.replace("http://", "https://"), "not json": server.url}[endpoint]
    server.plan = lambda info, attempt: "nonjson"  # a login page where the API should be
    start = time.monotonic()
    # the default backoff (1 s doubling, 6 retries) would take about a minute
    assert cli.main(teacher_args(server, src, tmp_path / "out", base_url=base_url, fast_retry=False)) == 2
    assert time.monotonic() - start < 10
    err = capsys.readouterr().err
    cause = {"refused": "connection refused: nothing listens at 127.0.0.1:",
             "unresolvable": "the host name 'teacher-node.invalid' does not resolve",
             "tls": "TLS failure with 127.0.0.1", "not json": "a 200 reply that is not JSON (text/html"}[endpoint]
    assert cause in err and "no request has succeeded, so the run stops" in err
    if endpoint == "not json":  # its first bytes are shown, without the key the page echoed
        assert "'<!DOCTYPE html><html><body>Sign in (Bearer [API key])" in err
    assert KEY not in err and "train with" not in err and not (tmp_path / "out" / "svamp_tree1").exists()


def test_credentials_in_the_base_url_are_refused(server, svamp, tmp_path, capsys):
    src, _ = svamp
    url = server.url.replace("http://", "http://teacher:sk-in-the-url@")
    assert cli.main(teacher_args(server, src, tmp_path / "out", base_url=url)) == 2
    err = capsys.readouterr().err
    assert "--base_url holds a user name or password" in err and "$OPENAI_API_KEY" in err
    assert "sk-in-the-url" not in err and server.log == []


def test_a_run_where_every_question_failed_offers_no_data(server, svamp, tmp_path, capsys):
    src, _ = svamp
    server.plan = lambda info, attempt: "500"
    out = tmp_path / "out"
    assert cli.main(teacher_args(server, src, out, "--max_retries", "0", "--max_failures", "100")) == cli.INCOMPLETE
    err = capsys.readouterr().err
    assert "the train split has no question with a usable CoT (8 of 8 failed" in err and "no data written" in err
    assert "train with" not in err and not (out / "svamp_tree1").exists()
    assert "incomplete" not in err  # the one line says it; the part files keep the rows for a rerun


def hangs(info: dict) -> bool:
    """One request in five (by question, kind and judged CoT) hangs on its first attempt."""
    return (3 * info["question"] + (info["way"] or [-1])[0] + 2 * (info["kind"] == "value")) % 5 == 0


def test_hung_requests_do_not_stall_the_run(server, svamp, tmp_path, capsys):
    src, _ = svamp
    server.delay_s = 0.1  # a server that takes 0.1 s a reply
    start = time.monotonic()
    assert cli.main(teacher_args(server, src, tmp_path / "calm", hedge_after="auto")) == 0
    calm = time.monotonic() - start
    server.reset()
    server.plan = lambda info, attempt: ("hang", 6) if attempt == 0 and hangs(info) else "ok"
    capsys.readouterr()
    start = time.monotonic()
    assert cli.main(teacher_args(server, src, tmp_path / "hung", hedge_after="auto")) == 0
    hung = time.monotonic() - start
    hung_requests = sum(1 for info in server.log if info["action"] == "hang")
    assert hung_requests >= 6 and hung <= 3 * calm, (hung, calm, hung_requests)
    err = capsys.readouterr().err
    assert "hedges of slow requests" in err  # what it cost is said
    assert data_files(tmp_path / "hung") == {k.replace("calm", "hung"): v for k, v in
                                             data_files(tmp_path / "calm").items()}


def test_max_completion_tokens_is_detected_from_the_servers_400(server, svamp, tmp_path, capsys):
    src, _ = svamp
    server.rejects = {"max_tokens"}  # as OpenAI's reasoning models answer
    out = tmp_path / "out"
    assert cli.main(teacher_args(server, src, out)) == 0
    err = capsys.readouterr().err
    assert "the server rejects 'max_tokens'" in err and "sending 'max_completion_tokens' from now on" in err
    fields = [info["limit_field"] for info in server.log]
    assert fields.count("max_completion_tokens") == 10 * (1 + N)  # every request, once switched
    assert 1 <= fields.count("max_tokens") <= 4  # those in flight before the switch, at --max_concurrency 4
    server.reset()
    start = time.monotonic()
    assert cli.main(teacher_args(server, src, tmp_path / "named", "--token_param", "max_tokens")) == 2
    assert time.monotonic() - start < 10
    assert "run with --token_param max_completion_tokens" in capsys.readouterr().err


def test_a_server_that_rejects_n_gets_one_choice_per_request(server, svamp, tmp_path, capsys):
    src, _ = svamp
    server.rejects = {"n"}
    assert cli.main(teacher_args(server, src, tmp_path / "auto")) == 0
    err = capsys.readouterr().err
    assert "the server rejects the field 'n'" in err and "asking one choice per request from now on" in err
    refused = [info for info in server.log if info["has_n"]]
    assert 1 <= len(refused) <= 4 and len(server.log) - len(refused) == 10 * (N + N * 3)
    server.reset()
    assert cli.main(teacher_args(server, src, tmp_path / "flag", "--n_per_request", "1")) == 0
    assert not any(info["has_n"] for info in server.log)  # one choice asked: no n field at all
    assert data_files(tmp_path / "flag") == {k: v for k, v in data_files(tmp_path / "auto").items()}


@pytest.mark.parametrize("family", ["svamp", "cqa", "anli1"])
def test_the_stop_sequence_is_the_prompts_question_header(family):
    prompts = load_prompts(family)
    header = {"svamp": "\nProblem:", "cqa": "\nQuestion:", "anli1": "\nPremise:"}[family]
    assert replies.few_shot_markers(prompts.sample) == replies.few_shot_markers(prompts.value) == [header]
    assert (PROMPT_DIR / f"{family}.yaml").is_file()


@pytest.mark.parametrize("reply", [
    " The check passes.\n\nEvaluation result: the given answer is correct.",
    "Evaluation:\n\nThe check passes.\n\nEvaluation result: the given answer is correct.",
    "Evaluation: The check passes.\nEvaluation result: the given answer is correct.\n\nProblem: Next one.",
    "Given answer: x\nEvaluation:\n\nThe check passes.\n\nEvaluation result: The given answer is correct. I hope so.",
])
def test_every_evaluation_is_written_in_the_seeds_form(reply):
    expected = "Evaluation:\n\nThe check passes.\n\nEvaluation result: the given answer is correct."
    assert replies.usable_evaluation(reply, "stop", ["\nProblem:"]) == expected
    assert formats.evaluation_verdict(expected) == ("Evaluation:\n\nThe check passes.", "correct")


def test_cut_or_unparsable_replies_are_not_usable():
    markers = ["\nProblem:"]
    cot = " Tom has 63 marbles, 18 more than Sam. The answer is (63 - 18).\n\nProblem: Next.\nAnswer: (1 + 1)."
    assert replies.usable_cot(cot, "stop", "svamp", markers) == "Tom has 63 marbles, 18 more than Sam. The answer is " \
                                                                "(63 - 18)."
    assert replies.usable_cot(cot, "length", "svamp", markers) is None  # cut, whatever it holds
    assert replies.usable_cot(" Tom has 63 marbles, so", "stop", "svamp", markers) is None
    assert replies.usable_evaluation(" It looks right, so", "stop", markers) is None
    assert replies.usable_evaluation(" Fine.\n\nEvaluation result: the given answer is correct.", "length",
                                     markers) is None
    assert replies.usable_evaluation(" So the given answer is wrong.", "stop", markers) == \
        "Evaluation:\n\nSo the given answer is wrong.\n\nEvaluation result: the given answer is wrong."
    assert json.dumps(replies.usable_evaluation("Evaluation result: the given answer is uncertain.", None, [])) == \
        json.dumps("Evaluation:\n\nEvaluation result: the given answer is uncertain.")
