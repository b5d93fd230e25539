"""Elastic resume (mindmirror/core/elastic.py) never loses work, in real processes on CPU (gloo): a checkpoint
resumes across process counts, ZeRO stages and DeepSpeed or not, and every layout reads the same layout-free state
from it (mindmirror/core/weights.py), whole or a ZeRO-3 rank's slice.

The reference run, the saved runs of ZeRO-2 and of one process, the global batch and the tolerance are
conftest.py's, shared with test_checkpoint.py."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import KILL_AT_4, REPO, assert_finished_like_baseline, copy_of, log_lines, one, run_train, two
from mindmirror.config import TrainConfig

pytestmark = pytest.mark.slow


def zero3_json(deepspeed_json):
    return deepspeed_json("zero3", stage3_param_persistence_threshold=0)  # partition even the tiny model


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
