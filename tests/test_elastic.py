"""Resume never loses work, in real processes on CPU (gloo): elastic resume across process counts,
ZeRO stages and DeepSpeed or not; one checkpoint agreed by all ranks; no training from scratch over
an earlier run's checkpoints.

Every run here has the global batch 8 (one process x 8, or two x 4), so an uninterrupted
one-process run is the reference for every layout: the global step batches make the data order the
same in all of them. Tolerance on losses: 2e-5, as between uninterrupted layouts (fp32 summation
order); elastic resume moves the exact fp32 weights and Adam moments, so it adds nothing to that."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import FAST, REPO, log_lines, read_metrics, run_train, train_losses
from mindmirror.config import TrainConfig

pytestmark = pytest.mark.slow
STEPS = ["--max_steps", "6", "--eval_steps", "3"]
TOL = 2e-5
KILL_AT_4 = {"MINDMIRROR_FAULT_KILL_AT_STEP": "4"}  # every rank dies as step 4 starts: step 3 is saved


def one(extra=()):
    return FAST + STEPS + ["--batch_size", "8", *extra]


def two(extra=()):
    return FAST + STEPS + ["--batch_size", "4", *extra]


def zero3_json(deepspeed_json):
    return deepspeed_json("zero3", stage3_param_persistence_threshold=0)  # partition even the tiny model


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """One process, no DeepSpeed, six steps without a stop: the reference losses of every layout."""
    tmp = tmp_path_factory.mktemp("baseline")
    run_train(tmp, one(["--output_dir", str(tmp / "out")]))
    return train_losses(tmp / "out")


@pytest.fixture(scope="module")
def zero2_saved(tmp_path_factory):
    """Two processes under ZeRO-2, checkpoints at steps 2 and 3, killed as step 4 starts."""
    tmp = tmp_path_factory.mktemp("zero2")
    config = json.loads((REPO / "ds_configs" / "zero2.json").read_text())  # as the deepspeed_json fixture does
    config["bf16"] = {"enabled": False}
    (tmp / "zero2.json").write_text(json.dumps(config))
    killed = run_train(tmp, two(["--save_steps", "1", "--output_dir", str(tmp / "out")]), nproc=2,
                       deepspeed_json=tmp / "zero2.json", env=KILL_AT_4, check=False)
    assert killed.returncode != 0
    assert sorted(p.name for p in (tmp / "out" / "checkpoints").iterdir()) == ["step_2", "step_3"]
    return tmp / "out"


@pytest.fixture(scope="module")
def plain_saved(tmp_path_factory):
    """One process without DeepSpeed, a checkpoint at step 3 and best/ from its evaluation, killed at step 4."""
    tmp = tmp_path_factory.mktemp("plain")
    killed = run_train(tmp, one(["--save_steps", "3", "--output_dir", str(tmp / "out")]), env=KILL_AT_4,
                       check=False)
    assert killed.returncode != 0 and (tmp / "out" / "best").is_dir()
    return tmp / "out"


@pytest.fixture(scope="module")
def zero3_saved(tmp_path_factory):
    """Two processes under ZeRO-3 (every parameter cut in two), a checkpoint at step 3, killed at step 4."""
    tmp = tmp_path_factory.mktemp("zero3")
    config = json.loads((REPO / "ds_configs" / "zero3.json").read_text())  # as the deepspeed_json fixture does
    config["bf16"] = {"enabled": False}
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp / "zero3.json").write_text(json.dumps(config))
    killed = run_train(tmp, two(["--save_steps", "3", "--output_dir", str(tmp / "out")]), nproc=2,
                       deepspeed_json=tmp / "zero3.json", env=KILL_AT_4, check=False)
    assert killed.returncode != 0
    assert sorted(p.name for p in (tmp / "out" / "checkpoints").iterdir()) == ["step_3"]
    return tmp / "out"


def copy_of(saved, tmp_path):
    shutil.copytree(saved, tmp_path / "out")
    return tmp_path / "out"


def losses_by_step(out):
    """The loss of each step; a step run again after a resume counts with its latest value."""
    return {m["step"]: m["loss"] for m in read_metrics(out) if "loss" in m}


def assert_finished_like_baseline(out, baseline, proc, resumed_from: int):
    output = proc.stdout + proc.stderr
    assert f"resumed from step {resumed_from} " in output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_step"] == 6
    losses = losses_by_step(out)
    assert [losses[s] for s in range(1, 7)] == pytest.approx(baseline, abs=TOL)
    return summary


def files(out):
    """Every file under checkpoints/ and best/, with its size."""
    return {str(p.relative_to(out)): p.stat().st_size for d in ("checkpoints", "best") for p in (out / d).rglob("*")
            if p.is_file()}


@pytest.mark.parametrize("deepspeed", [True, False], ids=["zero2", "no-deepspeed"])
def test_two_process_zero2_checkpoint_resumes_in_one_process(zero2_saved, baseline, tmp_path, deepspeed_json,
                                                             deepspeed):
    out = copy_of(zero2_saved, tmp_path)
    proc = run_train(tmp_path, one(["--save_steps", "1", "--output_dir", str(out), "--resume"]),
                     deepspeed_json=deepspeed_json("zero2") if deepspeed else None)
    now = "DeepSpeed ZeRO stage 2" if deepspeed else "no DeepSpeed"
    assert (f"elastic resume of step_3: written by 2 processes, DeepSpeed ZeRO stage 2, fp32, continuing under "
            f"1 process, {now}, fp32") in proc.stdout + proc.stderr
    summary = assert_finished_like_baseline(out, baseline, proc, resumed_from=3)
    assert summary["world_size"] == 1 and summary["zero_stage"] == (2 if deepspeed else 0)
    # The checkpoints this run wrote record its own layout.
    written = json.loads((out / "checkpoints" / "step_6" / "trainer_state.json").read_text())["layout"]
    assert written == {"processes": 1, "zero_stage": 2 if deepspeed else 0, "deepspeed": deepspeed, "precision": "no"}


def test_one_process_checkpoint_resumes_under_two_process_zero3(plain_saved, baseline, tmp_path, deepspeed_json):
    out = copy_of(plain_saved, tmp_path)
    proc = run_train(tmp_path, two(["--output_dir", str(out), "--resume"]), nproc=2,
                     deepspeed_json=zero3_json(deepspeed_json))
    output = proc.stdout + proc.stderr
    assert "written by 1 process, no DeepSpeed, fp32, continuing under 2 processes, DeepSpeed ZeRO stage 3" in output
    held = log_lines(out, "ZeRO-3 holds")
    assert len(held) == 2  # really partitioned: each rank holds about half
    for line in held:
        mine, total = (int(w) for w in line.split("holds ")[1].split(" parameter")[0].split(" of "))
        assert mine < 0.6 * total
    assert_finished_like_baseline(out, baseline, proc, resumed_from=3)


def test_zero2_checkpoint_resumes_under_zero3(zero2_saved, baseline, tmp_path, deepspeed_json):
    out = copy_of(zero2_saved, tmp_path)
    proc = run_train(tmp_path, two(["--output_dir", str(out), "--resume"]), nproc=2,
                     deepspeed_json=zero3_json(deepspeed_json))
    assert "continuing under 2 processes, DeepSpeed ZeRO stage 3" in proc.stdout + proc.stderr
    assert_finished_like_baseline(out, baseline, proc, resumed_from=3)


def test_two_process_zero3_checkpoint_resumes_under_one_process_zero3(zero3_saved, baseline, tmp_path,
                                                                      deepspeed_json):
    """ZeRO-3 into ZeRO-3 at another world size: each rank reads its own slice of every parameter, here one
    rank's slice spanning both saved ranks' pieces."""
    out = copy_of(zero3_saved, tmp_path)
    proc = run_train(tmp_path, one(["--output_dir", str(out), "--resume"]), deepspeed_json=zero3_json(deepspeed_json))
    assert ("written by 2 processes, DeepSpeed ZeRO stage 3, fp32, continuing under 1 process, DeepSpeed ZeRO "
            "stage 3") in proc.stdout + proc.stderr
    assert_finished_like_baseline(out, baseline, proc, resumed_from=3)


def test_a_load_failing_on_one_rank_moves_every_rank_to_the_previous_checkpoint(zero2_saved, baseline, tmp_path,
                                                                                deepspeed_json):
    out = copy_of(zero2_saved, tmp_path)
    proc = run_train(tmp_path, two(["--output_dir", str(out), "--resume"]), nproc=2,
                     deepspeed_json=deepspeed_json("zero2"), env={"MINDMIRROR_FAULT_LOAD_STEP": "3"})
    output = proc.stdout + proc.stderr
    assert "step_3 is not usable: failed to load (rank 1: RuntimeError: injected fault" in output
    # Both ranks took step 2: under ZeRO-2 each rank updates its own slice of the weights, so a rank
    # left on step 3 would show in every later loss and in the final weights.
    assert_finished_like_baseline(out, baseline, proc, resumed_from=2)


def test_a_resume_that_cannot_load_stops_and_keeps_every_file(zero2_saved, tmp_path, deepspeed_json):
    out = copy_of(zero2_saved, tmp_path)
    before = files(out)
    # Another model (a larger vocabulary) cannot take these checkpoints: every one fails to load.
    proc = run_train(tmp_path, two(["--output_dir", str(out), "--resume", "--vocab_size", "768"]), nproc=2,
                     deepspeed_json=deepspeed_json("zero2"), check=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("mindmirror: error: --resume: none of")]
    assert len(errors) == 2, proc.stderr[-3000:]  # raised on every rank, as one line each
    assert ("none of the 2 checkpoint(s)" in errors[0] and "The newest, step_3, was written by layout: 2 processes, "
            "DeepSpeed ZeRO stage 2, fp32; this run's layout: 2 processes, DeepSpeed ZeRO stage 2, fp32" in errors[0])
    assert "size mismatch" in errors[0] and "another --output_dir" in errors[0]
    assert files(out) == before
    assert not (out / "summary.json").exists()


def test_a_run_without_resume_refuses_an_earlier_runs_folder(plain_saved, tmp_path):
    out = copy_of(plain_saved, tmp_path)
    before = files(out)
    proc = run_train(tmp_path, one(["--output_dir", str(out)]), check=False)
    assert proc.returncode != 0
    assert "mindmirror: error: " in proc.stderr and "already holds an earlier run's checkpoints/step_3, best/: pass " \
        "--resume to continue that run, or choose another --output_dir" in proc.stderr
    assert files(out) == before


def test_every_layout_reads_the_same_state(zero2_saved, plain_saved):
    """The layout-free state read from ZeRO-2 shards is the plain checkpoint's of the same step (to
    summation-order noise), and its weights are exactly those DeepSpeed's own zero_to_fp32 consolidates."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from mindmirror.core import elastic, weights
    from mindmirror.core.objective import DistillationObjective
    from mindmirror.core.optim import param_groups
    from mindmirror.model import load_model, load_tokenizer

    model = DistillationObjective(load_model("tiny", load_tokenizer("", "tiny", False), False, "", 0))
    order = [name for group in param_groups(model, TrainConfig()) for name, _ in group]  # the runs' groups
    sharded = weights.SavedState(zero2_saved / "checkpoints" / "step_3", order)
    plain = weights.SavedState(plain_saved / "checkpoints" / "step_3", order)
    assert sorted(sharded.names) == sorted(order) == sorted(plain.names)
    assert sharded.step == plain.step == 3 and sharded.keys == plain.keys == ("exp_avg", "exp_avg_sq")
    for name in order:
        a, b = sharded.tensors(name), plain.tensors(name)
        for kind in a:
            assert (a[kind] - b[kind]).norm() <= 2e-5 * b[kind].norm(), (name, kind)
    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(zero2_saved / "checkpoints" / "step_3"),
                                                            tag="pytorch_model")
    assert all(torch.equal(consolidated[name], sharded.tensors(name)["param"]) for name in order)
    # A checkpoint that does not record its layout is judged by its files.
    assert elastic.infer_layout(zero2_saved / "checkpoints" / "step_3") == elastic.Layout(2, 2, True, "unknown")
    assert elastic.infer_layout(plain_saved / "checkpoints" / "step_3") == elastic.Layout(1, 0, False, "unknown")


def test_a_span_of_the_saved_state_is_that_part_of_the_whole(zero2_saved, plain_saved, zero3_saved):
    """What a ZeRO-3 rank reads on an elastic resume (its slice of each parameter, from whichever files hold it)
    is exactly that part of what reading the whole parameter gives, in every layout a checkpoint comes from."""
    from mindmirror.core import weights
    from mindmirror.core.objective import DistillationObjective
    from mindmirror.core.optim import param_groups
    from mindmirror.model import load_model, load_tokenizer

    model = DistillationObjective(load_model("tiny", load_tokenizer("", "tiny", False), False, "", 0))
    order = [name for group in param_groups(model, TrainConfig()) for name, _ in group]  # the runs' groups
    for saved in (zero2_saved, plain_saved, zero3_saved):
        state = weights.SavedState(saved / "checkpoints" / "step_3", order)
        for name in order:
            whole = {kind: t.reshape(-1) for kind, t in state.tensors(name).items()}
            n = whole["param"].numel()
            for start, length in ((0, n), (0, (n + 1) // 2), ((n + 1) // 2, n // 2), (n // 3, n // 3 + 1), (n, 0)):
                part = state.span(name, start, length)
                for kind, t in whole.items():
                    assert torch.equal(part[kind], t[start:start + length]), (saved.parent.name, name, kind, start)
