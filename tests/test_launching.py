"""How a launched run's failure is told: out of memory, the trainer's own error, or the first exception."""

from __future__ import annotations

from mindmirror.tools.launching import failure_reason


def test_failure_reasons():
    assert failure_reason(1, "torch.OutOfMemoryError: CUDA out of memory. Tried")[0] == "out of memory"
    assert failure_reason(-9, "")[0] == "out of memory"
    status, reason = failure_reason(1, "x\nValueError: --dataset 'nope' is unknown\nmore")
    assert status == "failed" and reason == "ValueError: --dataset 'nope' is unknown"
    assert failure_reason(3, "no message") == ("failed", "exit code 3")


def test_failure_reason_prefers_the_trainers_message_to_the_launchers():
    log = ("mindmirror: error: the global batch (200 = ...) is larger than the 120 training rows\n"
           "subprocess.CalledProcessError: Command '[...]' returned non-zero exit status 2.")
    assert failure_reason(1, log) == ("failed", log.splitlines()[0])
