"""mindmirror-teacher against a chat-completions server on 127.0.0.1 (tests/chat_server.py), through the
real HTTP client: the seed's layout and text form, training on the output, faults, cut replies drawn again
and a larger --max_tokens sending only those, stop sequences, SIGKILL and rerun, shards and merge, the API
key, the dry run, the response store and the retry policy. Endpoint faults: test_teacher_endpoint.py."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from email.utils import formatdate
from pathlib import Path

import httpx2
import pytest

from chat_server import ChatServer, wrong_label
from conftest import FAST, REPO, run_train
from datafixtures import seed_dir  # noqa: F401  (a fixture)
from mindmirror.data import formats, registry
from mindmirror.teacher import cli
from mindmirror.teacher.client import RateLimiter, RetryPolicy, retry_after_seconds
from mindmirror.teacher.prompts import PROMPT_DIR, load_prompts
from mindmirror.teacher.store import ResponseStore, StoreLockedError

KEY = "sk-test-9f3Kq7-never-in-a-file"
N, M = 3, 3  # CoTs per question, self-evaluations per CoT
FAST_RETRY = ["--retry_base_delay", "0.01", "--retry_max_delay", "0.05"]


def svamp_problems(count: int = 10) -> list[dict]:
    return [{"Body": f"Jack has {10 + 3 * i} apples. He buys {2 + i} more.",
             "Question": "How many apples does Jack have now?", "Equation": f"( {10 + 3 * i}.0 + {2 + i}.0 )",
             "Answer": 12 + 4 * i} for i in range(count)]


@pytest.fixture
def svamp(tmp_path):
    """SVAMP in the DSS layout (10 problems: 8 train, 2 test); returns (data_dir, input -> gold in split order)."""
    problems = svamp_problems()
    (tmp_path / "src" / "svamp").mkdir(parents=True)
    (tmp_path / "src" / "svamp" / "SVAMP.json").write_text(json.dumps(problems))
    questions = {}
    for split in ("train", "test"):
        for i in formats.svamp_split(problems)[split]:
            questions[f"{problems[i]['Body']}\n{problems[i]['Question']}"] = problems[i]["Equation"]
    return tmp_path / "src", questions


@pytest.fixture
def server(svamp):
    chat = ChatServer(svamp[1], "svamp", api_key=KEY)
    yield chat
    chat.close()


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


def teacher_args(server: ChatServer, src: Path, out: Path, *extra: str, base_url: str | None = None,
                 fast_retry: bool = True, hedge_after: str = "0") -> list[str]:
    """A run's flags. No hedging by default: on a busy CI machine a request can be slow enough to be hedged,
    and the tests count requests exactly (test_teacher_endpoint.py tests hedging)."""
    return ["run", "--dataset", "svamp", "--data_dir", str(src), "--output_dir", str(out), "--model", "teacher-7b",
            "--base_url", base_url or server.url, "--n_generate_sample", str(N), "--n_evaluate_sample", str(M),
            "--chunk_size", "3", "--max_concurrency", "4", "--no_progress", *(FAST_RETRY if fast_retry else []),
            "--hedge_after", hedge_after, *extra]


def data_files(out: Path, with_parts: bool = True) -> dict[str, bytes]:
    """Every file of the written data (and the shards' part files), by relative path."""
    files = {str(p.relative_to(out)): p.read_bytes() for d in ("svamp_tree1", "svamp_tree2")
             for p in (out / d).rglob("*") if p.is_file()}
    if with_parts:
        files |= {str(p.relative_to(out)): p.read_bytes() for p in (out / "svamp_teacher").glob("*.part-*")}
    return files


def right(qi: int, j: int) -> bool:
    """Whether the server's CoT j of question qi is right (see chat_server)."""
    return (qi + j) % 3 != 2


def test_writes_the_seed_layout_in_input_order(server, svamp, tmp_path, seed_dir):
    src, questions = svamp
    out = tmp_path / "out"
    assert cli.main(teacher_args(server, src, out, "--prompt_price", "0.0015", "--completion_price", "0.002")) == 0
    assert server.unauthorized == 0  # the key went in the Authorization header
    seed = json.loads((seed_dir / "svamp_tree1" / "llm" / "train_CoT_0.json").read_text())
    gt = {"train": list(questions)[:8], "test": list(questions)[8:]}
    for split, n_chunks in (("train", 3), ("test", 1)):
        chunks = [out / "svamp_tree1" / "llm" / f"{split}_CoT_{k}.json" for k in range(n_chunks)]
        assert formats.chunk_files(out / "svamp_tree1" / "llm", split) == chunks
        for chunk in chunks:  # byte-identical tree2 copy, formatted as the seed's files are
            text = chunk.read_text()
            assert (out / "svamp_tree2" / "llm" / chunk.name).read_text() == text
            assert json.dumps(json.loads(text), indent=4) == text
        records = [r for c in chunks for r in json.loads(c.read_text())]
        assert [r["idx"] for r in records] == list(range(len(gt[split])))
        usage = 0
        for record, question in zip(records, gt[split], strict=True):
            assert list(record) == list(seed[0]) and list(record["steps"][0]) == list(seed[0]["steps"][0])
            assert list(record["usage_so_far"]) == list(seed[0]["usage_so_far"])
            step = record["steps"][0]
            assert formats.parse_question_fragment(step["x"]) == question and step["x"].endswith("\n")
            # the paper's text form, though the server's replies start with a space, mostly lack the "Evaluation:"
            # header and go on with a new "Problem:" where the stop sequence does not end them
            for cot, evals in zip(step["new_ys"], step["value_outputs_list"], strict=True):
                assert cot == cot.strip() and "Problem:" not in cot and cot.endswith(").")
                for e in evals:
                    assert e.startswith("Evaluation:\n\nThe given answer (way ") and "Problem:" not in e
                    assert e.endswith(f"\n\nEvaluation result: the given answer is {formats.evaluation_verdict(e)[1]}.")
            assert step["ys"] == [""] and len(step["new_ys"]) == N
            assert [len(e) for e in step["value_outputs_list"]] == [M] * N
            qi = list(questions).index(question)
            # server verdicts: a right CoT gets correct, correct, correct; a wrong one wrong, wrong, wrong
            assert step["values"] == [60.0 if right(qi, j) else 0.003 for j in range(N)]
            assert record["ys"] == step["select_new_ys"] == [step["new_ys"][step["values"].index(60.0)]]
            assert record["usage_so_far"]["prompt_tokens"] > usage
            usage = record["usage_so_far"]["prompt_tokens"]
        u = records[-1]["usage_so_far"]
        assert u["cost"] == pytest.approx((u["prompt_tokens"] * 0.0015 + u["completion_tokens"] * 0.002) / 1000)
        gt_rows = formats.read_jsonl(out / "svamp_tree1" / f"svamp_tree1_{split}.json")
        assert [r["input"] for r in gt_rows] == gt[split]
        assert [r["label"] for r in gt_rows] == [questions[q] for q in gt[split]]
        se_text = (out / "svamp_tree2" / f"svamp_tree2_{split}.json").read_text()
        se_rows = [json.loads(line) for line in se_text.split("\n")]
        assert "\n".join(json.dumps(r, separators=(",", ":")) for r in se_rows) == se_text  # the seed's form
        assert se_rows == [{"input": cot, "label": formats.evaluation_verdict(e)[1]} for r in records
                           for cot, evals in zip(r["steps"][0]["new_ys"], r["steps"][0]["value_outputs_list"],
                                                 strict=True)
                           for e in evals]
    for dataset, model_type, label_type in (("svamp_tree1", "task_prefix_tree1", "gt"),
                                            ("svamp_tree1", "task_prefix_tree1", "llm"),
                                            ("svamp_tree2", registry.SELF_EVAL, "llm")):
        rows, report = registry.build_task_rows(dataset, out, model_type=model_type, label_type=label_type,
                                                num_train_branches=N)
        assert report.skipped == [] and len(rows["test"]) == (2 if dataset == "svamp_tree1" else 2 * N * M)
    card = json.loads((out / "svamp_tree1" / "teacher_report.json").read_text())
    assert (out / "svamp_tree2" / "teacher_report.json").read_text() == json.dumps(card, indent=2) + "\n"
    train = card["splits"]["train"]
    assert train["teacher_accuracy"]["all_cots"] == pytest.approx(2 / 3, abs=1e-4)  # one CoT in three is wrong
    assert train["teacher_accuracy"]["value_selected"] == 1.0 and train["verdict_agreement"]["agreement"] == 1.0
    n_right = sum(right(qi, j) for qi in range(8) for j in range(N))
    assert train["verdicts"] == {"uncertain": 0, "wrong": M * (8 * N - n_right), "correct": M * n_right, "none": 0}
    assert train["unparsable_cots"] == train["truncated_cots"] == train["failed_questions"] == 0
    assert train["failed"] == []
    assert "| accuracy: every CoT |" in (out / "svamp_tree1" / "teacher_report.md").read_text()
    assert not any(KEY.encode() in data for data in data_files(out).values())


@pytest.mark.slow
def test_the_trainer_trains_on_the_output(server, svamp, tmp_path):
    src, _ = svamp
    out = tmp_path / "out"
    assert cli.main(teacher_args(server, src, out)) == 0
    for dataset, model_type, label_type in (("svamp_tree1", "task_prefix_tree1", "gt"),
                                            ("svamp_tree1", "task_prefix_tree1", "llm"),
                                            ("svamp_tree2", registry.SELF_EVAL, "gt")):
        run_dir = tmp_path / f"run_{dataset}_{label_type}"
        run_train(tmp_path, ["--data_dir", str(out), "--dataset", dataset, "--model_type", model_type,
                             "--label_type", label_type, "--num_train_branches", "2", "--batch_size", "2",
                             "--max_steps", "2", "--output_dir", str(run_dir), "--skip_bad_records", *FAST,
                             "--subsample", "1.0", "--valid_fraction", "0.1"], timeout=300)
        assert json.loads((run_dir / "summary.json").read_text())["final_step"] == 2


def fault_plan(info: dict, attempt: int):
    """Question 0: 429 + Retry-After; 1: two 500s; 2: a hung request; 3: a dropped connection on CoT 1's
    value call; 4: a cut body; 5: a CoT and an evaluation cut at the token limit; 6: 500 forever; 7: too few
    choices."""
    qi, kind, way = info["question"], info["kind"], info["way"]
    sample = kind == "sample"
    if qi == 0 and sample and attempt == 0:
        return ("429", 1)
    if qi == 1 and sample and attempt < 2:
        return "500"
    if qi == 2 and sample and attempt == 0:
        return "hang"
    if qi == 3 and not sample and way[0] == 1 and attempt == 0:
        return "drop"
    if qi == 4 and sample and attempt == 0:
        return "truncate"
    if qi == 5 and (sample or way[0] == 2) and info["n"] == N:  # the first request; the redraw is fine
        return "offformat"
    if qi == 6 and sample:
        return "500"
    if qi == 7 and sample and info["n"] == N:
        return "fewer"
    return "ok"


def test_faults_are_retried_within_bounds_and_cut_replies_drawn_again(server, svamp, tmp_path, capsys):
    src, _ = svamp
    out = tmp_path / "out"
    server.plan = fault_plan
    assert cli.main(teacher_args(server, src, out, "--request_timeout", "1", "--chunk_size", "100",
                                 "--max_retries", "3", "--max_failures", "1")) == cli.INCOMPLETE  # question 6 failed
    err = capsys.readouterr().err
    assert "incomplete: 1 of 10 questions failed" in err and "run the same command again to retry only them" in err
    attempts = {qi: server.attempts_of(question=qi, kind="sample") for qi in range(8)}
    assert attempts[0] == [2] and attempts[1] == [3] and attempts[2] == [2] and attempts[4] == [2]
    assert attempts[6] == [4]  # bounded: 1 + --max_retries, then the question is recorded as failed
    assert sorted(server.attempts_of(question=3, kind="value")) == [1, 1, 2]
    assert sorted(server.attempts_of(question=7, kind="sample")) == [1, 1]  # n=3 gave 2 choices, topped up by n=1
    assert sorted(server.attempts_of(question=5, kind="sample")) == [1, 1]  # the cut CoT drawn again (n=1)
    key0 = next(k for k, info in server.info.items() if info["question"] == 0 and info["kind"] == "sample")
    assert server.times[key0][1] - server.times[key0][0] >= 1.0  # Retry-After honoured
    # 9 answered questions, one top-up, two redraws, question 6's 4 attempts, 6 retries: nothing else was sent
    assert sum(server.attempts.values()) == 9 * (1 + N) + 1 + 2 + 4 + (1 + 2 + 1 + 1 + 1)
    # no cut CoT was sent for evaluation: every judged CoT is complete
    judged = [info["judged"] for info in server.log if info["kind"] == "value"]
    assert server.cut_texts and all(formats.tree_cot_answer(j, "svamp") for j in judged)
    assert not {t.strip() for t in server.cut_texts} & set(judged)

    records = json.loads((out / "svamp_tree1" / "llm" / "train_CoT_0.json").read_text())
    assert [r["idx"] for r in records] == list(range(8))  # input order, whatever finished first
    assert [len(r["steps"][0]["new_ys"]) for r in records] == [N] * 6 + [0, N]
    assert [len(e) for e in records[5]["steps"][0]["value_outputs_list"]] == [M] * N
    assert "HTTP 500" in records[6]["error"] and "after 4 attempts" in records[6]["error"]
    cots = [c for r in records for c in r["steps"][0]["new_ys"]]
    evaluations = [e for r in records for evals in r["steps"][0]["value_outputs_list"] for e in evals]
    tree2 = formats.read_jsonl(out / "svamp_tree2" / "svamp_tree2_train.json")
    assert all(formats.tree_cot_answer(c, "svamp") for c in cots + [row["input"] for row in tree2])  # none cut
    assert all(formats.evaluation_verdict(e) for e in evaluations) and len(tree2) == len(evaluations)
    assert not {t.strip() for t in server.cut_texts} & set(cots + evaluations)
    card = json.loads((out / "svamp_tree1" / "teacher_report.json").read_text())["splits"]["train"]
    assert card["failed_questions"] == 1 and card["failed"] == [{"idx": 6, "reason": records[6]["error"]}]
    assert card["truncated_cots"] == 1 and card["truncated_evaluations"] == 1 and card["short_questions"] == 0
    for dataset, model_type in (("svamp_tree1", "task_prefix_tree1"), ("svamp_tree2", registry.SELF_EVAL)):
        rows, _ = registry.build_task_rows(dataset, out, model_type=model_type, num_train_branches=N,
                                           valid_fraction=0.5, skip_bad_records=True)  # skips question 6
        assert {r.record for r in rows["train"]} <= {0, 1, 2, 3, 4, 5, 7} and len(rows["test"]) > 0


def test_raising_max_tokens_sends_again_only_the_cut_requests(server, svamp, tmp_path, capsys):
    src, _ = svamp
    out = tmp_path / "out"
    # choice 0 of the first sample request of questions 1 and 4, and of the value request of question 8's CoT 1,
    # needs 700 tokens
    long = {1: "sample", 4: "sample", 8: "value"}
    server.plan = lambda info, attempt: ("long", 700) if long.get(info["question"]) == info["kind"] and \
        info["n"] == N and (info["way"] or [1])[0] == 1 else "ok"
    assert cli.main(teacher_args(server, src, out, "--max_redraws", "0")) == cli.INCOMPLETE
    err = capsys.readouterr().err
    assert "2 of 10 questions have fewer than 3 usable CoTs" in err and "1 CoTs have fewer than 3 usable" in err
    card = json.loads((out / "svamp_tree1" / "teacher_report.json").read_text())["splits"]
    assert [f["idx"] for f in card["train"]["failed"]] == [1, 4] and card["train"]["truncated_cots"] == 2
    assert card["test"]["failed"][0]["idx"] == 0 and "CoT 1: 2 of 3 self" in card["test"]["failed"][0]["reason"]
    judged = [info["judged"] for info in server.log if info["kind"] == "value"]
    assert len(judged) == 10 * N - 2 and not {t.strip() for t in server.cut_texts} & set(judged)  # cut: not judged
    records = json.loads((out / "svamp_tree1" / "llm" / "train_CoT_0.json").read_text())
    assert len(records[1]["steps"][0]["new_ys"]) == N - 1  # written without the cut one

    # what a larger limit will cost: the three cut replies drawn again, and the two new CoTs evaluated
    assert cli.main(teacher_args(server, src, out, "--max_redraws", "0", "--max_tokens", "1024", "--dry_run")) == 0
    assert dry_run_total(capsys.readouterr().out)[2].startswith("5 / ")
    server.reset()
    assert cli.main(teacher_args(server, src, out, "--max_redraws", "0", "--max_tokens", "1024")) == 0
    sent = [(info["question"], info["kind"], info["n"], info["limit"]) for info in server.log]
    assert sorted(sent) == [(1, "sample", 1, 1024), (1, "value", M, 1024), (4, "sample", 1, 1024),
                            (4, "value", M, 1024), (8, "value", 1, 1024)]  # nothing complete was sent again
    card = json.loads((out / "svamp_tree1" / "teacher_report.json").read_text())["splits"]
    assert card["train"]["failed"] == card["test"]["failed"] == [] and card["train"]["cots"] == 8 * N
    reference = data_files(out, with_parts=False)
    server.reset()
    assert cli.main(teacher_args(server, src, out, "--max_redraws", "0", "--max_tokens", "1024")) == 0
    assert cli.main(teacher_args(server, src, out, "--max_redraws", "0")) == 0  # back at 512: all stored and complete
    assert server.log == [] and {k: v for k, v in data_files(out, with_parts=False).items() if "llm" in k} == \
        {k: v for k, v in reference.items() if "llm" in k}


def test_without_stop_sequences_the_text_is_still_cut_at_the_next_example(server, svamp, tmp_path, capsys):
    src, _ = svamp
    stopped, unstopped = tmp_path / "stopped", tmp_path / "unstopped"
    assert cli.main(teacher_args(server, src, stopped, "--max_questions", "4")) == 0
    assert {tuple(info["stop"]) for info in server.log} == {("\nProblem:",)}  # the shipped prompt's header
    server.reset()
    assert cli.main(teacher_args(server, src, unstopped, "--max_questions", "4", "--stop", "none",
                                 "--extra_body", '{"seed": 5, "top_k": 3}')) == 0
    assert {info["stop"] for info in server.log} == {None} and {info["seed"] for info in server.log} == {5}
    for path in (stopped / "svamp_tree1" / "llm").glob("*.json"):  # the same text, though the replies went on
        steps = [[r["steps"][0][k] for k in ("new_ys", "value_outputs_list")] for r in json.loads(path.read_text())]
        again = json.loads((unstopped / "svamp_tree1" / "llm" / path.name).read_text())
        assert steps == [[r["steps"][0][k] for k in ("new_ys", "value_outputs_list")] for r in again]
    with pytest.raises(SystemExit) as stopped_by:
        cli.main(teacher_args(server, src, unstopped, "--extra_body", '{"max_tokens": 3}'))
    assert stopped_by.value.code == 2 and "is set by --max_tokens" in capsys.readouterr().err


def test_too_many_failures_stop_the_run(server, svamp, tmp_path, capsys):
    src, _ = svamp
    server.plan = lambda info, attempt: "500"
    assert cli.main(teacher_args(server, src, tmp_path / "out", "--max_retries", "0", "--max_failures", "2")) == 1
    err = capsys.readouterr().err
    assert "3 questions failed, more than --max_failures 2" in err and "run the same command again" in err
    assert not (tmp_path / "out" / "svamp_tree1").exists()


def test_a_model_whose_replies_are_mostly_unusable_stops_the_run(server, svamp, tmp_path, capsys):
    src, _ = svamp
    server.plan = lambda info, attempt: "noanswer"  # choice 0 of every reply lacks its answer or verdict
    assert cli.main(teacher_args(server, src, tmp_path / "out", "--n_generate_sample", "1", "--n_evaluate_sample",
                                 "1")) == 1
    err = capsys.readouterr().err
    assert "replies of this run are unusable" in err and "more than --max_unusable_share 0.5" in err
    assert 50 <= len(server.log) <= 60 and not (tmp_path / "out" / "svamp_tree1").exists()


def store_lines(out: Path) -> int:
    path = out / "svamp_teacher" / "responses-0-of-1.jsonl"
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_sigkill_then_the_same_command_repeats_no_completed_request(server, svamp, tmp_path):
    src, _ = svamp
    reference = tmp_path / "reference"
    assert cli.main(teacher_args(server, src, reference)) == 0
    server.reset()
    out = tmp_path / "out"
    command = [sys.executable, "-m", "mindmirror.teacher.cli", *teacher_args(server, src, out)]
    env = dict(os.environ, OPENAI_API_KEY=KEY)
    server.hold_after(9)  # then every new request hangs until the kill
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (server.active == 0 and sum(server.completed.values()) >= 9
               and store_lines(out) == sum(server.completed.values())):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stored = store_lines(out)
    assert 9 <= stored < 10 * (1 + N) and not (out / "svamp_tree1").exists()  # killed mid-run
    server.release()
    rerun = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{stored} responses in the store" in rerun.stderr
    assert set(server.completed.values()) == {1}  # no completed request was made twice ...
    assert len(server.completed) == 10 * (1 + N)  # ... and none is missing
    assert data_files(out) == data_files(reference)


def test_two_shards_of_the_slurm_array_and_a_merge_equal_one_run(server, svamp, tmp_path, capsys):
    src, _ = svamp
    one, sharded = tmp_path / "one", tmp_path / "sharded"
    assert cli.main(teacher_args(server, src, one)) == 0
    env = dict(os.environ, TEACHER_BASE_URL=server.url, TEACHER_MODEL="teacher-7b", SLURM_ARRAY_TASK_MAX="1",
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    flags = teacher_args(server, src, sharded)[1:]
    for flag in ("--base_url", "--model"):  # the template adds them
        del flags[flags.index(flag):flags.index(flag) + 2]
    tasks = [subprocess.Popen(["bash", str(REPO / "launch" / "slurm" / "teacher.sbatch"), *flags], cwd=tmp_path,
                              env=env | {"SLURM_ARRAY_TASK_ID": str(i)}, stderr=subprocess.PIPE, text=True)
             for i in range(2)]  # the two array tasks run at the same time, as under Slurm
    for task in tasks:
        assert task.wait(timeout=120) == 0, task.stderr.read()
        assert "shard" in task.stderr.read() and not (sharded / "svamp_tree1").exists()  # a part each, no data
    assert cli.main(["merge", "--dataset", "svamp", "--output_dir", str(sharded), "--shards", "3"]) == 2
    assert "train.part-0-of-3.json: missing" in capsys.readouterr().err
    assert cli.main(["merge", "--dataset", "svamp", "--output_dir", str(sharded)]) == 0
    assert data_files(sharded, with_parts=False) == data_files(one, with_parts=False)


def test_the_api_key_stays_out_of_files_and_messages(svamp, tmp_path, capsys, monkeypatch):
    src, questions = svamp
    chat = ChatServer(questions, "svamp", api_key="sk-other")
    try:
        monkeypatch.setenv("TEACHER_KEY", "sk-other")
        monkeypatch.delenv("OPENAI_API_KEY")
        out = tmp_path / "out"
        assert cli.main(teacher_args(chat, src, out, "--api_key_env", "TEACHER_KEY")) == 0
        assert chat.unauthorized == 0
        written = [p for p in out.rglob("*") if p.is_file()]
        assert len(written) > 15 and not any(b"sk-other" in p.read_bytes() for p in written)
        chat.plan = lambda info, attempt: "401echo"  # a server that echoes the key it was sent
        assert cli.main(teacher_args(chat, src, tmp_path / "out2", "--api_key_env", "TEACHER_KEY")) == 2
        captured = capsys.readouterr()
        assert "HTTP 401" in captured.err and "[API key]" in captured.err
        assert "sk-other" not in captured.err + captured.out
        assert not any(b"sk-other" in p.read_bytes() for p in (tmp_path / "out2").rglob("*") if p.is_file())
    finally:
        chat.close()


def dry_run_total(text: str) -> list[str]:
    """The columns of the dry run's total line ("expected / at most" pairs as one column)."""
    line = next(line for line in text.splitlines() if line.strip().startswith("total"))
    return re.findall(r"\$?[\d,.]+ / \$?[\d,.]+|\S+", line)


def test_dry_run_sends_nothing_and_counts_what_is_stored(server, svamp, tmp_path, capsys):
    src, _ = svamp
    out = tmp_path / "out"
    prices = ["--prompt_price", "1.0", "--completion_price", "2.0", "--expected_completion_tokens", "50"]
    assert cli.main(teacher_args(server, src, out, "--dry_run", *prices)) == 0
    assert sum(server.attempts.values()) == 0 and not out.exists()
    total, redraws = dry_run_total(capsys.readouterr().out), 10  # --max_redraws' default
    # at most: every unusable reply drawn again alone, up to --max_redraws per draw
    assert total[1:4] == ["10", f"{10 * (1 + N)} / {10 * (1 + N) * (1 + redraws)}", "0"]  # questions, requests, stored
    completions, most = 10 * (N + N * M), 10 * (1 + N) * (N + redraws)
    assert total[5] == f"{completions * 50:,} / {most * 512:,}"
    assert cli.main(teacher_args(server, src, out)) == 0
    sent = sum(server.attempts.values())
    assert cli.main(teacher_args(server, src, out, "--dry_run")) == 0
    assert dry_run_total(capsys.readouterr().out)[2:4] == ["0 / 0", str(10 * (1 + N))]  # all stored
    assert cli.main(teacher_args(server, src, out, "--dry_run", "--max_tokens", "1024")) == 0
    assert dry_run_total(capsys.readouterr().out)[2:4] == ["0 / 0", str(10 * (1 + N))]  # complete replies reused
    assert cli.main(teacher_args(server, src, out, "--dry_run", "--temperature", "0.5")) == 0
    changed = [dry_run_total(capsys.readouterr().out)]
    prompt_file = tmp_path / "prompt.yaml"
    prompt_file.write_text((PROMPT_DIR / "svamp.yaml").read_text().replace("Solve the", "Please solve the"))
    for flags in (["--prompt_file", str(prompt_file)], ["--extra_body", '{"seed": 7}'], ["--stop", "none"]):
        assert cli.main(teacher_args(server, src, out, "--dry_run", *flags)) == 0
        changed.append(dry_run_total(capsys.readouterr().out))
    assert sum(server.attempts.values()) == sent
    for total in changed:  # another temperature, prompt, body field or stop sequence reuses nothing
        assert total[2].startswith(f"{10 * (1 + N)} / ") and total[3] == "0"


@pytest.mark.parametrize("family", ["cqa", "anli1"])
def test_cqa_and_anli_with_the_shipped_prompts(family, tmp_path):
    src = tmp_path / "src" / family
    src.mkdir(parents=True)
    splits = ("train", "valid", "test") if family == "anli1" else ("train", "test")
    questions = {}
    for split in splits:
        objs = []
        for i in range(4):
            if family == "cqa":
                choices = [f"place {c}{i}" for c in "abcde"]
                objs.append({"id": f"{split}{i}", "question": f"Where is thing {i} of {split} kept?",
                             "choices": choices, "answer": choices[i % 5]})
            else:
                objs.append({"uid": f"{split}{i}", "premise": f"Item {i} of {split} was made in {1900 + i}.",
                             "hypothesis": f"Item {i} is from the year {1900 + i}.", "label": i % 3})
            text, label = formats.gt_example(objs[-1], family, src, i)
            questions[text] = label
        (src / f"{family}_{split}.json").write_text("\n".join(json.dumps(o) for o in objs))
    chat = ChatServer(questions, family)
    try:
        out = tmp_path / "out"
        assert cli.main(["run", "--dataset", family, "--data_dir", str(tmp_path / "src"), "--output_dir", str(out),
                         "--model", "m", "--base_url", chat.url, "--n_generate_sample", "2",
                         "--n_evaluate_sample", "2", "--no_progress"]) == 0
    finally:
        chat.close()
    for dataset, model_type in ((f"{family}_tree1", "task_prefix_tree1"), (f"{family}_tree2", registry.SELF_EVAL)):
        rows, report = registry.build_task_rows(dataset, out, model_type=model_type, label_type="llm",
                                                num_train_branches=2)
        assert report.skipped == []
    tree1, _ = registry.build_task_rows(f"{family}_tree1", out, label_type="llm", num_train_branches=2)
    for row in tree1["train"]:  # the teacher's answers parse back to what the server said
        qi, gold = list(questions).index(row.input), questions[row.input]
        assert row.label == (gold if right(qi, row.branch) else wrong_label(gold, family))
    card = json.loads((out / f"{family}_tree1" / "teacher_report.json").read_text())
    assert list(card["splits"]) == list(splits) and card["splits"]["train"]["unparsable_cots"] == 0
    assert card["splits"]["train"]["teacher_accuracy"]["first_cot"] == 0.75  # (qi + 0) % 3 == 2 is wrong


@pytest.mark.parametrize("family", ["svamp", "cqa", "anli1"])
def test_shipped_prompts_show_the_sentences_the_parsers_read(family):
    prompts = load_prompts(family)
    answers = [line for line in prompts.sample.splitlines() if line.startswith("Answer: ")]
    assert len(answers) >= 4
    for line in answers:
        assert formats.tree_cot_answer(line, family) is not None and formats.tree_cot_rationale(line, family)
    verdicts = [line for line in prompts.value.splitlines() if line.startswith("Evaluation result:")]
    assert {formats.evaluation_verdict(v)[1] for v in verdicts} == {"correct", "wrong", "uncertain"}
    question = "Q one</s>Q two" if family == "anli1" else "Q one"
    messages = prompts.value_messages(question, family, "My CoT.")
    assert messages[-1]["content"].endswith("Given answer: My CoT.\nEvaluation:") and "{" not in \
        messages[-1]["content"].split("Q one")[-1]
    assert (PROMPT_DIR / f"{family}.yaml").is_file()


def test_the_store_drops_a_line_cut_by_a_kill_and_refuses_a_second_writer(tmp_path):
    folder = tmp_path / "work"
    folder.mkdir()
    lines = [json.dumps({"key": f"k{i}", "choices": [str(i)]}) for i in range(2)]
    (folder / "responses-0-of-1.jsonl").write_text("\n".join(lines) + "\n" + '{"key": "k2", "cho')
    store = ResponseStore(folder, "0-of-1")
    assert len(store) == 2 and store.get("k1") == {"choices": ["1"]} and "k2" not in store
    with pytest.raises(StoreLockedError, match="in use by another"):
        ResponseStore(folder, "0-of-1")
    asyncio.run(store.put("k3", {"choices": ["3"]}))
    store.close()
    assert (folder / "responses-0-of-1.jsonl").read_text().splitlines()[-1] == '{"key":"k3","choices":["3"]}'
    assert len(ResponseStore(folder, "1-of-2", readonly=True)) == 3


def test_retry_after_and_backoff():
    assert retry_after_seconds(httpx2.Headers({"Retry-After": "2"})) == 2.0
    assert retry_after_seconds(httpx2.Headers({"retry-after-ms": "250", "Retry-After": "9"})) == 0.25
    assert 28 < retry_after_seconds(httpx2.Headers({"Retry-After": formatdate(time.time() + 30, usegmt=True)})) <= 30
    assert retry_after_seconds(httpx2.Headers({"Retry-After": "soon"})) is None
    policy, rng = RetryPolicy(max_retries=5, base_delay=1.0, max_delay=8.0), random.Random(0)
    for retry, (low, high) in enumerate([(0.5, 1), (1, 2), (2, 4), (4, 8), (4, 8)]):
        assert all(low <= policy.delay(retry, None, rng) <= high for _ in range(50))
    assert policy.delay(0, 30.0, rng) == 30.0  # the server's Retry-After is a floor


def test_rate_limits_keep_their_pace():
    async def pace(limiter, calls, tokens):
        start = time.monotonic()
        for _ in range(calls):
            await limiter.acquire(tokens)
        return time.monotonic() - start

    # 600 requests a minute = 10 a second, a bucket of 1: 6 requests take 0.5 s
    assert 0.45 < asyncio.run(pace(RateLimiter(rpm=600, burst_s=0.1), 6, 1)) < 2.0
    # 6,000 tokens a minute = 100 a second, a bucket of 10: three requests of 50 tokens take 1 s
    assert 0.9 < asyncio.run(pace(RateLimiter(tpm=6000, burst_s=0.1), 3, 50)) < 2.5


def test_help_names_both_commands():
    result = subprocess.run([sys.executable, "-m", "mindmirror.teacher.cli", "run", "--help"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0 and "--max_concurrency" in result.stdout and "--shard" in result.stdout
