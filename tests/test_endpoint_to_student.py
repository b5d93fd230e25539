"""The user's whole path, endpoint to evaluated student, as a user starts it: ``mindmirror-teacher run``
against a chat-completions server on 127.0.0.1 that rate-limits, fails, cuts replies at the token limit
and hangs; stage 1 (``task_prefix_tree2``, 5 branches) on the generated self-evaluations; stage 2 on the
generated CoTs with ``--num_train_branches 1 --continue_train``; then ``mindmirror-eval`` of the result; and
(svamp) the same data through ``mindmirror-recipes --data_dir`` and ``mindmirror-report``.

The server eventually answers every prompt, so no question may be lost anywhere on the way, and no CoT
may be judged (a paid value call) while it is cut.
"""

from __future__ import annotations

import collections
import json
import time
from pathlib import Path

import pytest

from chat_server import ChatServer
from conftest import run_train
from mindmirror.data import formats
from mindmirror.evaluation.eval_cli import main as evaluate
from mindmirror.teacher import cli as teacher
from mindmirror.tools import recipes, report

pytestmark = pytest.mark.slow

N, M = 5, 5  # CoTs per question, self-evaluations per CoT: the paper's
MAX_TOKENS = 200
SMALL = ["--from_pretrained", "tiny", "--max_steps", "3", "--batch_size", "4", "--report_to", "none",
         "--logging_steps", "1", "--gen_max_len", "12", "--max_eval_samples", "8", "--valid_fraction", "0.1",
         "--max_target_length", "64"]


def svamp_source(root: Path) -> dict[str, str]:
    """SVAMP in the DSS layout, 60 problems (48 train, 12 test); returns input -> gold."""
    problems = [{"Body": f"Ann has {7 + 2 * i} pens. She finds {3 + i} more.", "Question": "How many pens has she?",
                 "Equation": f"( {7 + 2 * i}.0 + {3 + i}.0 )", "Answer": 10 + 3 * i} for i in range(60)]
    (root / "svamp").mkdir(parents=True)
    (root / "svamp" / "SVAMP.json").write_text(json.dumps(problems))
    return {f"{p['Body']}\n{p['Question']}": p["Equation"] for p in problems}


def cqa_source(root: Path) -> dict[str, str]:
    """CQA in the DSS layout, 14 train and 12 test questions; returns input -> gold."""
    (root / "cqa").mkdir(parents=True)
    questions = {}
    for split, count in (("train", 14), ("test", 12)):
        objs = []
        for i in range(count):
            choices = [f"place {c}{i}" for c in "abcde"]
            objs.append({"id": f"{split}{i}", "question": f"Where is thing {i} of the {split} set kept?",
                         "choices": choices, "answer": choices[i % 5]})
            text, label = formats.gt_example(objs[-1], "cqa", root / "cqa", i)
            questions[text] = label
        (root / "cqa" / f"cqa_{split}.json").write_text("\n".join(json.dumps(o) for o in objs))
    return questions


def faults(info: dict, attempt: int):
    """Every question's first tries meet one fault: 429, 500, a hang, or (1 request in 5) a reply cut at the
    token limit; every later attempt is answered."""
    if attempt > 0:
        return "ok"
    q, cot = info["question"], (info["way"] or [0])[0]
    pick = (3 * q + cot + (info["kind"] == "value")) % 10
    return {0: ("long", 2 * MAX_TOKENS), 1: ("long", 2 * MAX_TOKENS), 2: ("429", 0.2), 3: "500",
            4: ("hang", 2.0)}.get(pick, "ok")


@pytest.mark.parametrize("family", ["svamp", "cqa"])
def test_from_an_endpoint_to_an_evaluated_student(family, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-local")
    src, out = tmp_path / "src", tmp_path / "teacher"
    questions = svamp_source(src) if family == "svamp" else cqa_source(src)
    server = ChatServer(questions, family)
    server.plan = faults
    start = time.monotonic()
    try:
        code = teacher.main(["run", "--dataset", family, "--data_dir", str(src), "--output_dir", str(out),
                             "--model", "teacher-7b", "--base_url", server.url, "--n_generate_sample", str(N),
                             "--n_evaluate_sample", str(M), "--max_tokens", str(MAX_TOKENS), "--max_concurrency",
                             "16", "--retry_base_delay", "0.05", "--retry_max_delay", "0.2", "--no_progress"])
    finally:
        server.close()
    printed = capsys.readouterr().err
    assert code == 0, printed
    log = server.log
    actions = collections.Counter(e["action"] for e in log)
    print(f"{family}: the teacher took {time.monotonic() - start:.1f} s, {len(log)} requests at the server, faults "
          f"{dict(actions - collections.Counter(ok=len(log)))}")
    assert server.cut_texts and actions["long"] and actions["hang"] and actions["429"] and actions["500"]
    cut = {text.strip() for text in server.cut_texts}
    judged = [e["judged"].strip() for e in log if e["kind"] == "value"]
    assert judged and not cut & set(judged)  # no value call was paid for a cut CoT

    card = json.loads((out / f"{family}_tree1" / "teacher_report.json").read_text())
    for split, section in card["splits"].items():
        assert section["failed_questions"] == 0 and section["unparsable_cots"] == 0, (split, section)
        assert section["cots"] == N * section["questions"] and section["verdicts"]["none"] == 0
    for records in (json.loads(p.read_text()) for p in (out / f"{family}_tree1" / "llm").glob("*_CoT_*.json")):
        for record in records:
            step = record["steps"][0]
            assert len(step["new_ys"]) == N and not cut & {c.strip() for c in step["new_ys"]}
            assert all(e.startswith("Evaluation:\n\n") and formats.evaluation_verdict(e) is not None
                       for evals in step["value_outputs_list"] for e in evals)

    # Stage 1 on the self-evaluations, 5 branches, in its default folder (as the original README runs it).
    stage1 = run_train(tmp_path, ["--data_dir", str(out), "--dataset", f"{family}_tree2", "--model_type",
                                  "task_prefix_tree2", "--num_train_branches", str(N), *SMALL])
    stage1_dir = tmp_path / "runs" / f"{family}_tree2" / "task_prefix_tree2" / "tiny" / f"gt_b{N}_a0.5_s0"
    summary1 = json.loads((stage1_dir / "summary.json").read_text())
    assert summary1["skipped_records"]["total"] == 0, stage1.stderr[-2000:]
    n_train = card["splits"]["train"]["questions"]
    # Every evaluation of every question: 25 rows a training question (valid takes ~10% of them), 25 a test one.
    assert summary1["rows"]["train"] % (N * M) == 0 and summary1["rows"]["train"] // (N * M) >= 0.85 * n_train
    assert summary1["rows"]["test"] == card["splits"]["test"]["questions"] * N * M

    # Stage 2 on one CoT a question, from stage 1's export.
    stage2 = run_train(tmp_path, ["--data_dir", str(out), "--dataset", f"{family}_tree1", "--num_train_branches",
                                  "1", "--continue_train", "--output_dir", "stage2", *SMALL])
    assert f"starting from the stage-1 export {Path('runs') / stage1_dir.relative_to(tmp_path / 'runs') / 'best'}" \
        in stage2.stdout + stage2.stderr
    summary2 = json.loads((tmp_path / "stage2" / "summary.json").read_text())
    assert summary2["skipped_records"]["total"] == 0
    assert Path(summary2["init_from"]).resolve() == (stage1_dir / "best").resolve()
    assert summary2["rows"]["test"] == card["splits"]["test"]["questions"] == 12

    # The evaluation of the trained student on the generated test split, with test-time self-evaluation.
    monkeypatch.chdir(tmp_path)
    result = evaluate([str(tmp_path / "stage2" / "best"), "--self_eval_samples", "2"])
    assert json.loads((tmp_path / "stage2" / "eval_best_test.json").read_text()) == result
    assert result["rows"] == 12 and result["accuracy"] == summary2["test_accuracy"]
    assert {"majority_vote_accuracy", "self_eval_vote_accuracy"} <= result.keys()

    if family != "svamp":
        return
    # The same data through the one command that runs the paper's recipes and makes the table.
    monkeypatch.setenv("MINDMIRROR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MINDMIRROR_NUM_THREADS", "1")
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    assert recipes.main(["--dataset", family, "--data_dir", str(out), "--recipes", "cot1_se", "--model", "tiny",
                         "--epoch_scale", "0.001", "--se_epoch_scale", "0.0001", "--self_eval_samples", "2",
                         "--output_dir", "study", "--", *SMALL[2:]]) == 0
    stage2 = tmp_path / "study" / family / "tiny" / "cot1_se" / "s0" / "stage2"
    config = json.loads((stage2 / "config.json").read_text())
    assert Path(config["data_dir"]).resolve() == out.resolve() and config["dataset"] == f"{family}_tree1"
    assert json.loads((stage2 / "summary.json").read_text())["skipped_records"]["total"] == 0
    assert report.main(["study", "--output_dir", "table"]) == 0
    assert "| 1 CoT + SE | tiny | svamp_tree1 | 1 |" in (tmp_path / "table" / "results.md").read_text()
