"""Cluster runs that keep their work, in real processes on CPU (gloo), without root or Slurm: a stop signal
saves whatever the launcher (one process and two, through launch/multinode.sh and launch/slurm/sweep.sbatch),
also in the middle of an evaluation; collectives wait as long as ``--collective_timeout`` says; two nodes
with node-local data caches build them at once without harm.

The Slurm commands that the templates call (srun, scancel, scontrol) are small stand-ins written by these
tests: srun runs the step in a process group of its own, and ``scancel --signal`` signals that whole
group, as Slurm signals every process of a step. tests/test_slurm.py runs the same templates under a real
Slurm where it can (root).

Test-only hooks (environment variables nothing else sets): MINDMIRROR_FAULT_SLOW_SAVE_S (the save on a stop
signal takes 20 s more, a multi-GB checkpoint), MINDMIRROR_FAULT_SLOW_EVAL_S (each evaluation batch takes
longer, a large model's generation), MINDMIRROR_FAULT_SLOW_BUILD_S (the data-cache build takes longer).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from datasets import Dataset

from conftest import FAST, REPO, launch_env, log_lines, read_metrics, run_train
from mindmirror.core.checkpoint import checkpoint_problem, list_checkpoints
from mindmirror.core.loop import EXIT_PREEMPTED
from mindmirror.tools.launching import free_port

pytestmark = pytest.mark.slow
# Global batch 8 everywhere (one process x 8, two x 4, four x 2): one uninterrupted process is the reference.
ARGS = FAST + ["--max_steps", "24", "--eval_steps", "4", "--max_eval_samples", "48"]
SLOW_SAVE = {"MINDMIRROR_FAULT_SLOW_SAVE_S": "20"}
TOL = 2e-5  # between process counts (fp32 summation order), as in the resume tests (conftest.py)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, no stop: every step's loss and every evaluation."""
    tmp = tmp_path_factory.mktemp("reference")
    run_train(tmp, ARGS + ["--batch_size", "8", "--output_dir", str(tmp / "out")])
    return read_metrics(tmp / "out")


@pytest.fixture
def started():
    """Processes a test starts in sessions of their own; whatever is left of them is killed at the end."""
    procs = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def losses(metrics: list[dict]) -> dict[int, float]:
    """The loss of each step; a step run again after a resume counts with its latest value."""
    return {m["step"]: m["loss"] for m in metrics if "loss" in m}


def evaluations(metrics: list[dict]) -> dict[int, tuple[float, int]]:
    return {m["step"]: (m["accuracy"], m["rows"]) for m in metrics if m.get("split") == "valid"}


def wait_for(condition, procs, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert all(p.poll() is None for p in procs), f"a process ended before {what}"
        assert time.time() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.1)


def logged_losses(out: Path) -> int:
    metrics = out / "metrics.jsonl"
    return metrics.read_text().count('"loss"') if metrics.exists() else 0


def multinode(tmp_path: Path, args: list[str], nproc: int, env: dict | None = None, nnodes: int = 1,
              node_rank: int = 0, port: int = 0, log: str = "node0.txt") -> subprocess.Popen:
    """launch/multinode.sh as a user starts it on one node, in a session of its own."""
    full = launch_env(tmp_path) | {"NNODES": str(nnodes), "NODE_RANK": str(node_rank), "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": str(port or free_port()), "GPUS_PER_NODE": str(nproc)}
    if nnodes * nproc > 1:
        full["ACCELERATE_USE_CPU"] = "true"  # --multi_gpu on CPU: gloo
    with open(tmp_path / log, "w") as f:
        return subprocess.Popen(["bash", str(REPO / "launch" / "multinode.sh"), *args], cwd=tmp_path,
                                env=full | (env or {}), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def trainers(launcher: subprocess.Popen) -> dict[int, psutil.Process]:
    """The trainer processes under a launcher, by global rank."""
    found = {}
    for p in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if any("train/main.py" in part for part in p.cmdline()) and "RANK" in p.environ():
                found[int(p.environ()["RANK"])] = p
        except psutil.NoSuchProcess:
            pass
    return found


def assert_complete_checkpoint(out: Path) -> dict:
    saved = list_checkpoints(out / "checkpoints")
    assert len(saved) == 1 and checkpoint_problem(saved[0]) is None, saved
    assert not (out / "final").exists() and not (out / "summary.json").exists()
    return json.loads((saved[0] / "trainer_state.json").read_text())


# ---------------------------------------------------------------------------------------------
# a sweep task (one process) through the Slurm templates, with stand-ins for Slurm's commands

SRUN = """#!/usr/bin/env bash
# srun: the step (its command after the options) in a process group of its own, as slurmstepd's
while [ $# -gt 0 ] && [ "${1#--}" != "$1" ]; do shift; done
export SLURM_NODEID=0 SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_STEPID=0
setsid "$@" &
echo $! > "$FAKE_SLURM/step.pgid"
wait $!
"""
SCANCEL = """#!/usr/bin/env bash
# scancel --signal=SIG JOB.STEP: SIG to every process of the step
echo "scancel $*" >> "$FAKE_SLURM/calls"
sig=TERM
for a in "$@"; do case $a in --signal=*) sig=${a#--signal=};; esac; done
kill -s "$sig" -- "-$(cat "$FAKE_SLURM/step.pgid")"
"""
SCONTROL = """#!/usr/bin/env bash
echo "scontrol $*" >> "$FAKE_SLURM/calls"
case "$1 $2" in
  "show hostnames") echo localhost ;;
  "show node") echo "NodeName=localhost NodeAddr=127.0.0.1" ;;
esac
"""


def fake_slurm(tmp_path: Path) -> dict:
    folder = tmp_path / "fake-slurm"
    folder.mkdir()
    for name, text in (("srun", SRUN), ("scancel", SCANCEL), ("scontrol", SCONTROL)):
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    env = launch_env(tmp_path)
    env.pop("GPUS_PER_NODE", None)
    return env | {"PATH": f"{folder}:{env['PATH']}", "FAKE_SLURM": str(folder), "MINDMIRROR_ROOT": str(REPO),
                  "SLURM_JOB_ID": "4242", "SLURM_ARRAY_TASK_ID": "0", "SLURM_JOB_NODELIST": "localhost",
                  "SLURM_JOB_NUM_NODES": "1"}


def sweep_task(tmp_path: Path, env: dict, log: str) -> subprocess.Popen:
    """launch/slurm/sweep.sbatch as Slurm runs an array task's batch script (default: one GPU, one process)."""
    with open(tmp_path / log, "w") as f:
        return subprocess.Popen(["bash", str(REPO / "launch" / "slurm" / "sweep.sbatch"), "sweep.txt",
                                 *ARGS], cwd=tmp_path, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)


def test_a_one_process_sweep_task_saves_slowly_on_preemption_requeues_and_resumes_exactly(reference, tmp_path,
                                                                                           started):
    (tmp_path / "sweep.txt").write_text("--batch_size 8 --output_dir out\n")
    env = fake_slurm(tmp_path)
    out = tmp_path / "out"
    task = sweep_task(tmp_path, env | SLOW_SAVE, "task.txt")
    started.append(task)
    wait_for(lambda: logged_losses(out) >= 5, [task], "five training steps")
    task.send_signal(signal.SIGUSR1)  # Slurm's --signal=B:USR1@300 to the batch script
    assert task.wait(timeout=300) == 0  # it requeued the job
    log = (tmp_path / "task.txt").read_text(errors="replace")
    calls = (tmp_path / "fake-slurm" / "calls").read_text()
    assert "scancel --signal=TERM 4242.0" in calls and "scontrol requeue 4242" in calls, log[-3000:]
    # The trainer itself got the signal, saved for 20 s (accelerate's one-process launcher used to kill it
    # after 5 s) and exited 75; the step ended with that code.
    assert f"step ended ({EXIT_PREEMPTED}) after preemption" in log, log[-3000:]
    assert "saved step" in log and " in 20 s; exiting with code 75" in log, log[-3000:]
    state = assert_complete_checkpoint(out)
    assert 5 <= state["step"] < 24

    resumed = sweep_task(tmp_path, env | {"SLURM_RESTART_COUNT": "1"}, "requeued.txt")
    started.append(resumed)
    assert resumed.wait(timeout=300) == 0, (tmp_path / "requeued.txt").read_text()[-3000:]
    assert f"resumed from step {state['step']} " in (tmp_path / "requeued.txt").read_text()
    metrics = read_metrics(out)
    assert losses(metrics) == losses(reference)  # same process count: bit for bit
    assert evaluations(metrics) == evaluations(reference)
    assert json.loads((out / "summary.json").read_text())["final_step"] == 24


# ---------------------------------------------------------------------------------------------
# two processes through multinode.sh: the signal reaches one rank, during an evaluation


def test_two_processes_stop_between_evaluation_batches_on_a_signal_to_one_rank(reference, tmp_path, started):
    out = tmp_path / "out"
    args = ARGS + ["--batch_size", "4", "--eval_batch_size", "8", "--output_dir", "out"]
    # Each rank evaluates 24 of the 48 validation rows in 3 batches of 8, each 4 s slower than it would be.
    node = multinode(tmp_path, args, nproc=2, env=SLOW_SAVE | {"MINDMIRROR_FAULT_SLOW_EVAL_S": "4"})
    started.append(node)
    wait_for(lambda: logged_losses(out) >= 4, [node], "step 4")  # the evaluation of step 4 starts now
    ranks = trainers(node)
    assert sorted(ranks) == [0, 1]
    ranks[1].send_signal(signal.SIGTERM)  # one rank only: the ranks agree to stop
    assert node.wait(timeout=300) == EXIT_PREEMPTED, (tmp_path / "node0.txt").read_text()[-4000:]
    log = (tmp_path / "node0.txt").read_text(errors="replace")
    stopped = [line for line in log_lines(out, "stop requested by a signal: saved step 4 ")
               if "it came during the evaluation of step 4 " in line]
    assert len(stopped) == 2, log[-4000:]  # both ranks, in the middle of the evaluation
    for line in stopped:
        done = int(line.split("stopped after batch ")[1].split(" of 3")[0])
        assert done < 3 and "in 20 s; exiting with code 75" in line
    assert "saved their state on a stop signal: exit code 75" in log
    state = assert_complete_checkpoint(out)
    assert state["step"] == 4 and state["evaluation_pending"] and state["last_eval_step"] == -1
    assert 4 not in evaluations(read_metrics(out))

    again = multinode(tmp_path, args + ["--resume"], nproc=2, log="resumed.txt")
    started.append(again)
    assert again.wait(timeout=300) == 0, (tmp_path / "resumed.txt").read_text()[-4000:]
    metrics = read_metrics(out)
    resumed_at = next(i for i, m in enumerate(metrics) if m.get("split") == "valid")
    assert metrics[resumed_at]["step"] == 4  # the resumed run evaluates step 4 first, then trains step 5
    assert [m["step"] for m in metrics[resumed_at + 1:] if "loss" in m][0] == 5
    assert [losses(metrics)[s] for s in range(1, 25)] == pytest.approx(list(losses(reference).values()), abs=TOL)
    assert evaluations(metrics) == evaluations(reference)


# ---------------------------------------------------------------------------------------------
# collective timeouts and node-local data caches

SLOW_BUILD = {"MINDMIRROR_FAULT_SLOW_BUILD_S": "12"}
SHORT = FAST + ["--max_steps", "2", "--max_test_samples", "8"]


def test_a_wait_shorter_than_the_main_process_build_fails_the_run(tmp_path, started):
    """The control for the next test: with a collective wait of 6 s (standing in for a library's default,
    shortened), rank 1 gives up while rank 0 builds the data cache for 12 s longer than a build takes."""
    node = multinode(tmp_path, SHORT + ["--batch_size", "4", "--output_dir", "out", "--collective_timeout", "0.1"],
                     nproc=2, env=SLOW_BUILD)
    started.append(node)
    code = node.wait(timeout=300)
    log = (tmp_path / "node0.txt").read_text(errors="replace")
    assert code not in (0, EXIT_PREEMPTED), log[-4000:]
    # gloo's own words, with the configured wait, in the wait for the data build
    assert "Timed out waiting 6000ms" in log and "in builders_first" in log, log[-4000:]


def test_two_nodes_with_node_local_caches_build_at_once_and_wait_for_a_slow_build(tmp_path, started):
    """Two nodes (two torchrun agents on 127.0.0.1, two processes each), each with its own cache folder.
    Each node's first process builds its folder, at the same time as the other node's, for 12 s longer than
    a build takes: longer than the wait that failed the run above, and the run finishes (the default
    --collective_timeout). The other process of each node waits and maps its node's build."""
    port = free_port()
    args = SHORT + ["--batch_size", "2", "--output_dir", str(tmp_path / "out")]
    nodes = [multinode(tmp_path, args, nproc=2, nnodes=2, node_rank=rank, port=port, log=f"node{rank}.txt",
                       env=SLOW_BUILD | {"MINDMIRROR_CACHE": str(tmp_path / f"cache{rank}")}) for rank in (0, 1)]
    started.extend(nodes)
    for rank, node in enumerate(nodes):
        assert node.wait(timeout=300) == 0, (tmp_path / f"node{rank}.txt").read_text()[-4000:]
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["world_size"] == 4
    out = tmp_path / "out"
    built = {rank: [line for line in log_lines(out, f"rank {rank}: ") if "tokenized tables" in line]
             for rank in range(4)}
    for builder, mapper, cache in ((0, 1, "cache0"), (2, 3, "cache1")):
        assert len(built[builder]) == 1 and " built the tokenized tables of " in built[builder][0]
        assert f"/{cache}/" in built[builder][0]
        assert len(built[mapper]) == 1 and " mapped the tokenized tables of " in built[mapper][0]
        assert f"/{cache}/" in built[mapper][0]
    tables = []
    for cache in ("cache0", "cache1"):
        manifests = list((tmp_path / cache).glob("build-*.json"))
        assert len(manifests) == 1 and not list((tmp_path / cache).glob("*.tmp*")) \
            and not list((tmp_path / cache).glob(".probe-*"))
        folders = [p for p in (tmp_path / cache).iterdir() if p.is_dir()]
        assert len(folders) == 1  # one build in each cache
        files = json.loads(manifests[0].read_text())["files"]
        assert all(Path(f).parent == folders[0] for split in files.values() for f in split)
        tables.append({split: [Dataset.from_file(f).to_dict() for f in split_files]
                       for split, split_files in files.items()})
    assert tables[0] == tables[1]  # both nodes built the same tables
