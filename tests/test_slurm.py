"""The SLURM template under a real Slurm: a two-node cluster of slurmd daemons on this machine.

Needs root and Debian's slurm-wlm (``.ci/run`` installs it where it can); skips, saying why, elsewhere.
"""

from __future__ import annotations

import functools
import json
import os
import pwd
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import FAST, REPO, launch_env, read_metrics
from mindmirror.tools.launching import free_port

pytestmark = pytest.mark.slow
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "squeue")


def _run(*cmd, env=None, check=True, timeout=60):
    return subprocess.run(list(cmd), env=env, capture_output=True, text=True, check=check, timeout=timeout)


def _start_munge():
    if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0:
        return None  # already running
    munge = pwd.getpwnam("munge")
    for d in ("/etc/munge", "/run/munge", "/var/lib/munge", "/var/log/munge"):
        Path(d).mkdir(parents=True, exist_ok=True)
        os.chown(d, munge.pw_uid, munge.pw_gid)
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        key.write_bytes(os.urandom(1024))
        os.chown(key, munge.pw_uid, munge.pw_gid)
        key.chmod(0o400)
    proc = subprocess.Popen(["munged", "--force", "--foreground"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(50):
        if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0:
            return proc
        time.sleep(0.1)
    proc.kill()
    pytest.skip("munged did not start")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running two-node Slurm (nodes n1 and n2 on 127.0.0.1); yields the environment to talk to it."""
    if os.geteuid() != 0:
        pytest.skip("starting munge and Slurm daemons needs root")
    missing = [d for d in DAEMONS if shutil.which(d) is None]
    if missing:
        pytest.skip(f"Slurm is not installed (missing {', '.join(missing)}; apt-get install slurm-wlm)")
    tmp = tmp_path_factory.mktemp("slurm")
    munged = _start_munge()
    ctld, node_a, node_b = free_port(), free_port(), free_port()
    conf = tmp / "slurm.conf"
    conf.write_text(f"""ClusterName=mmtest
SlurmctldHost=localhost
SlurmctldPort={ctld}
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
StateSaveLocation={tmp}/state
SlurmdSpoolDir={tmp}/spool-%n
SlurmctldPidFile={tmp}/slurmctld.pid
SlurmdPidFile={tmp}/slurmd-%n.pid
SlurmctldLogFile={tmp}/ctld.log
SlurmdLogFile={tmp}/slurmd-%n.log
SlurmUser=root
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port={node_a} CPUs=1 RealMemory=4000
NodeName=n2 NodeHostname=localhost NodeAddr=127.0.0.1 Port={node_b} CPUs=1 RealMemory=4000
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
""")
    (tmp / "state").mkdir()
    env = dict(os.environ, SLURM_CONF=str(conf))
    daemons = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for cmd in (["slurmctld", "-D", "-i", "-f", str(conf)], ["slurmd", "-D", "-N", "n1", "-f", str(conf)],
                           ["slurmd", "-D", "-N", "n2", "-f", str(conf)])]
    try:
        for _ in range(100):
            out = _run("sinfo", "-h", "-o", "%T %D", env=env, check=False).stdout.split()
            if out[:2] == ["idle", "2"]:
                break
            time.sleep(0.3)
        else:
            pytest.skip(f"Slurm did not come up: sinfo says {out}; see {tmp}/ctld.log")
        yield env
    finally:
        for proc in daemons + ([munged] if munged else []):
            proc.terminate()
        for proc in daemons + ([munged] if munged else []):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def _wait_for_job(job: str, env: dict, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not _run("squeue", "-h", "-j", job, env=env, check=False).stdout.strip():
            return
        time.sleep(1)
    raise AssertionError(f"job {job} still queued after {timeout} s")


def _job_env(tmp_path: Path, slurm_env: dict) -> dict:
    """The submitting shell's environment: this Python's tools, CPU processes, the repository."""
    return slurm_env | launch_env(tmp_path) | {"SLURM_CONF": slurm_env["SLURM_CONF"], "ACCELERATE_USE_CPU": "true",
                                                "MINDMIRROR_ROOT": str(REPO)}


def _submit(tmp_path: Path, env: dict, args: list[str], extra_env: dict | None = None,
            template: str = "train.sbatch", sbatch_args: tuple = ("--nodes=2",)) -> str:
    (tmp_path / "logs").mkdir(exist_ok=True)
    job_env = _job_env(tmp_path, env) | (extra_env or {})
    out = _run("sbatch", "--parsable", *sbatch_args, "--cpus-per-task=1", "--gpus-per-node=0", "--chdir", str(tmp_path),
               str(REPO / "launch" / "slurm" / template), *args, env=job_env)
    return out.stdout.strip().split(";")[0]


# Several processes write progress bars into one log at once and can split a character between them.
def _job_log(tmp_path: Path, job: str) -> str:
    return (tmp_path / "logs" / f"mindmirror-{job}.out").read_text(errors="replace")


def _sweep_log(tmp_path: Path, job: str, task: int = 0) -> str:
    return (tmp_path / "logs" / f"mindmirror-sweep-{job}_{task}.out").read_text(errors="replace")


def _wait_for_losses(out: Path, count: int, job: str, env: dict, log) -> None:
    """Until ``out/metrics.jsonl`` has ``count`` training losses: the trainers are past their start-up."""
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count('"loss"') >= count):
        assert _run("squeue", "-h", "-j", job, env=env, check=False).stdout.strip(), log()[-3000:]
        time.sleep(0.2)


def _preempt_and_wait_for_restart(job: str, env: dict, log) -> None:
    """Send the preemption signal as Slurm does before the time limit; return once the requeued job has started."""
    _run("scancel", "--signal=USR1", "--batch", job, env=env)
    # The job saves and requeues itself; Slurm may hold a requeued job back for a while: start it now.
    deadline = time.time() + 400
    while time.time() < deadline and "restart 1" not in log():
        state = _run("squeue", "-h", "-j", job, "-o", "%T", env=env, check=False).stdout.strip()
        if state == "PENDING":
            # slurmd refuses credentials issued in the second the old run was revoked: let it pass.
            time.sleep(3)
            _run("scontrol", "update", f"jobid={job}", "starttime=now", env=env, check=False)
        time.sleep(0.5)
    assert "restart 1" in log(), log()[-3000:]


def test_template_trains_on_two_nodes(slurm, tmp_path):
    job = _submit(tmp_path, slurm, FAST + ["--max_steps", "4", "--batch_size", "4", "--output_dir", "out"])
    _wait_for_job(job, slurm)
    log = _job_log(tmp_path, job)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["final_step"] == 4, log[-3000:]
    assert "on 2 node(s)" in log and "main 127.0.0.1:" in log


def test_preempted_job_checkpoints_requeues_and_resumes(slurm, tmp_path):
    args = FAST + ["--max_steps", "40", "--batch_size", "4", "--save_steps", "1000", "--output_dir", "out"]
    # The uninterrupted reference, on one machine with the same global batch.
    from conftest import run_train

    run_train(tmp_path, FAST + ["--max_steps", "40", "--batch_size", "8", "--output_dir", "ref"])
    job = _submit(tmp_path, slurm, args)
    _wait_for_losses(tmp_path / "out", 5, job, slurm, functools.partial(_job_log, tmp_path, job))
    _preempt_and_wait_for_restart(job, slurm, functools.partial(_job_log, tmp_path, job))
    _wait_for_job(job, slurm)
    log = _job_log(tmp_path, job)
    assert "requeueing" in log and "restart 1" in log, log[-3000:]
    assert "resumed from step" in log
    losses = {m["step"]: m["loss"] for m in read_metrics(tmp_path / "out") if "loss" in m}
    reference = [m["loss"] for m in read_metrics(tmp_path / "ref") if "loss" in m]
    assert [losses[s] for s in range(1, 41)] == pytest.approx(reference, abs=2e-5)


def test_sweep_array_runs_one_task_per_line(slurm, tmp_path):
    sweep = tmp_path / "sweep.txt"
    sweep.write_text("# recipes x seeds\n--run 0 --output_dir runs/s0\n\n--run 1 --alpha 0.3 --output_dir runs/s1\n")
    job = _submit(tmp_path, slurm, [str(sweep), *FAST, "--max_steps", "2", "--batch_size", "4"],
                  template="sweep.sbatch", sbatch_args=("--array=0-1",))
    _wait_for_job(job, slurm)
    for seed, alpha in ((0, 0.5), (1, 0.3)):
        out = tmp_path / "runs" / f"s{seed}"
        config = json.loads((out / "config.json").read_text())
        assert (config["run"], config["alpha"]) == (seed, alpha)
        assert json.loads((out / "summary.json").read_text())["final_step"] == 2


# A checkpoint that takes longer to save than torchrun's default 30 s between forwarding SIGTERM and SIGKILL;
# the templates' shutdown timeout (270 s) must let it finish.
SLOW_SAVE_S, SLOW_SAVE_STEPS = 40, 50
SLOW_SAVE_ARGS = FAST + ["--max_steps", str(SLOW_SAVE_STEPS), "--batch_size", "4", "--save_steps", "1000"]


def _assert_saved_slowly_requeued_and_resumed(out: Path, job: str, env: dict, log) -> None:
    """The preempted run saved after the injected delay, the job requeued, and the new run resumed from that save."""
    _wait_for_job(job, env)
    saved = re.search(r"stop requested by a signal: saved step (\d+) in \S+ in (\d+) s", log())
    assert saved, log()[-3000:]
    step, seconds = int(saved[1]), int(saved[2])
    assert seconds >= SLOW_SAVE_S and (out / "checkpoints" / f"step_{step}").is_dir(), log()[-3000:]
    assert "requeueing" in log() and f"resumed from step {step} " in log(), log()[-3000:]
    assert "forcefully exiting" not in log()  # torchrun's SIGKILL
    assert json.loads((out / "summary.json").read_text())["final_step"] == SLOW_SAVE_STEPS


def test_slow_save_on_preemption_finishes_with_two_processes_per_node(slurm, tmp_path):
    # 2 nodes x 2 processes: each node's torchrun agent forwards SIGTERM and waits for its two trainers.
    job = _submit(tmp_path, slurm, SLOW_SAVE_ARGS + ["--output_dir", "out"],
                  extra_env={"GPUS_PER_NODE": "2", "MINDMIRROR_FAULT_SLOW_SAVE_S": str(SLOW_SAVE_S)})
    log = functools.partial(_job_log, tmp_path, job)
    _wait_for_losses(tmp_path / "out", 5, job, slurm, log)
    _preempt_and_wait_for_restart(job, slurm, log)
    _assert_saved_slowly_requeued_and_resumed(tmp_path / "out", job, slurm, log)
    assert log().count("shutdown timeout 270 s") == 4  # the templates' default, on both nodes, in both runs


def test_slow_save_on_preemption_finishes_in_a_one_process_sweep_task(slurm, tmp_path):
    # One process: the trainer runs in place of accelerate's one-process launcher, which would kill it 5 s
    # after a SIGTERM (launch/accelerate_exec.py); tests/test_preemption.py runs this without Slurm.
    sweep = tmp_path / "sweep.txt"
    sweep.write_text("--run 0 --output_dir out\n")
    job = _submit(tmp_path, slurm, [str(sweep), *SLOW_SAVE_ARGS], template="sweep.sbatch", sbatch_args=("--array=0",),
                  extra_env={"MINDMIRROR_FAULT_SLOW_SAVE_S": str(SLOW_SAVE_S)})
    log = functools.partial(_sweep_log, tmp_path, job)
    _wait_for_losses(tmp_path / "out", 5, job, slurm, log)
    _preempt_and_wait_for_restart(f"{job}_0", slurm, log)
    _assert_saved_slowly_requeued_and_resumed(tmp_path / "out", job, slurm, log)
