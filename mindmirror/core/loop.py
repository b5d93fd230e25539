"""The training loop: read it top to bottom.

:func:`train` is the whole run: :func:`mindmirror.core.build.setup` builds the accelerator, data, model, optimizer and
schedule into a :class:`~mindmirror.core.build.Run`; :meth:`Trainer.start` resumes (or starts) a :class:`TrainState`;
then epoch after epoch, for each optimizer step: collate its rows, stop?, :meth:`Trainer.train_step` (this rank's
micro-batches, one clip and step), ``maybe_log``, ``maybe_evaluate`` (stop? before each batch), ``maybe_save``;
at each epoch's end a validation; at the end the ``final/`` export, the test of the ``best/`` export, and
``summary.json``. The loop raises; the command line (:mod:`mindmirror.cli`) turns errors and a preemption into
exit codes and sets up logging.

A step never waits for the device (no device-to-host read) except at logging steps: the step's token counts
come from the rows' lengths, known on every rank; the stop vote is a sum over a CPU (gloo) group, started at
the end of a step and read at the start of the next; a non-finite step is skipped on the device (a fused
AdamW's ``found_inf``, or DeepSpeed's own check) and the loop reads the steps' finiteness and gradient norms
at the next log line. Only a non-fused optimizer (a foreach AdamW resumed from a checkpoint it saved) needs
the finiteness before its step. So the host collates the next step while the device works on this one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import psutil
import torch
from tqdm.auto import tqdm

from mindmirror import logs, runfiles
from mindmirror.atomic import write_atomic
from mindmirror.config import TrainConfig
from mindmirror.core import checkpoint, results, runtime
from mindmirror.core.build import Run, setup
from mindmirror.core.collate import step_batches
from mindmirror.core.flops import peak_flops
from mindmirror.core.optim import param_groups
from mindmirror.core.runtime import Preemption, peak_memory_mb, shut_down
from mindmirror.core.step import StepBatch, clip_and_step, collate_step, forward_backward, hold_schedule
from mindmirror.core.tracking import LogWindow, MetricsLog
from mindmirror.evaluation import evaluate

log = logging.getLogger("mindmirror")
EXIT_PREEMPTED = 75  # a signal asked us to stop: state saved; the SLURM template requeues on this code
# Fault injection for tests (harmless when unset, and nothing sets them but the tests): make the loss of
# these (comma-separated) steps NaN; SIGKILL every rank when it is about to run this step; make the
# checkpoint saved on a stop signal take this many seconds longer (a multi-GB save), its files appearing
# only at the end; make every batch of a validation or test evaluation take this many seconds longer (a
# large model's generation).
FAULT_NAN_STEPS, FAULT_KILL_AT_STEP = "MINDMIRROR_FAULT_NAN_STEPS", "MINDMIRROR_FAULT_KILL_AT_STEP"
FAULT_SLOW_SAVE_S, FAULT_SLOW_EVAL_S = "MINDMIRROR_FAULT_SLOW_SAVE_S", "MINDMIRROR_FAULT_SLOW_EVAL_S"


class NonFiniteLossError(RuntimeError):
    """Too many non-finite steps in a row; the last good state is saved."""


class Preempted(Exception):
    """A stop signal arrived and the state is saved; the command line exits with :data:`EXIT_PREEMPTED`."""

    exit_code = EXIT_PREEMPTED


@dataclass
class TrainState:
    """Where a run stands; saved in every checkpoint (``trainer_state.json``) and restored on resume."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    step_in_epoch: int = 0  # steps done of this epoch's plan
    samples: int = 0  # questions trained on
    best_valid_accuracy: float = -1.0
    best_step: int = -1
    nonfinite_steps: int = 0  # skipped steps in all
    last_eval_step: int = -1
    last_loss: float | None = None  # of the latest log window
    evaluation_pending: bool = False  # a stop signal cut this step's evaluation short: a resumed run repeats it

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, saved: dict) -> None:
        """Take the known fields of ``saved`` (a checkpoint also records its layout; older ones lack fields)."""
        for f in dataclasses.fields(self):
            if f.name in saved:
                setattr(self, f.name, saved[f.name])


# ---------------------------------------------------------------------------------------------
# the run


def train(cfg: TrainConfig) -> dict:
    """Train, evaluate and export as ``cfg`` says; returns the summary written to ``summary.json``."""
    t_start = time.time()
    preemption = Preemption()
    run = setup(cfg)
    with Trainer(run, preemption) as trainer:
        trainer.start()
        bar = tqdm(total=run.total_steps, initial=trainer.state.step, disable=not run.is_main, desc="training",
                   dynamic_ncols=True)
        while trainer.state.step < run.total_steps:
            for rows in trainer.epoch_rows():  # the steps left of this epoch's plan, up to the run's last
                batch = trainer.collate_step(rows)  # while the device still runs the previous step
                if trainer.stop_agreed():  # a signal reached some rank by the end of the last step (off the device)
                    bar.close()
                    trainer.save_and_stop()
                trainer.train_step(batch)
                bar.update(1)
                trainer.maybe_log(bar)
                trainer.maybe_evaluate()
                trainer.maybe_save()
                trainer.vote_on_stop()
            if trainer.state.step < run.total_steps:  # an epoch's end: the next epoch starts, after a validation
                trainer.next_epoch()
                trainer.maybe_evaluate(force=True)
        bar.close()
        return trainer.finish(t_start)


class Trainer:
    """The state of one run while it trains, and the steps of the loop in :func:`train`."""

    def __init__(self, run: Run, preemption: Preemption | None = None):
        self.run, self.cfg, self.accelerator = run, run.cfg, run.accelerator
        self.preemption = preemption
        self.state = TrainState()
        self.window = LogWindow(run.accelerator.device)
        self.metrics = MetricsLog(run.accelerator)  # metrics.jsonl opens in start() (a refused run changes no file)
        self.nonfinite_in_row = 0
        self.saved_step = -1
        self.last = {"lr": 0.0, "grad_norm": 0.0}  # of the latest step, for the log line (the norm: read there)
        self.pending = []  # (step, device flag: was it finite?) of the steps skipped or not on the device, unread
        self.vote = runtime.StopVote(run.world, timedelta(minutes=run.cfg.collective_timeout))
        self.first_step = None  # seconds from process start to the first step done, and the peak memory then
        self.t_steps = time.time()  # when training started (reset by start())
        self.peak_flops = peak_flops(str(run.accelerator.device),
                                              "bf16" if run.precision == "bf16" else "fp32")  # None on CPU
        self.fault_steps = {int(s) for s in os.environ.get(FAULT_NAN_STEPS, "").split(",") if s.strip()}
        self.kill_at = int(os.environ.get(FAULT_KILL_AT_STEP, "0"))
        self.slow_eval_s = float(os.environ.get(FAULT_SLOW_EVAL_S, "0"))

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.vote.close()
        self.metrics.close()

    # ---- start ----
    def start(self) -> None:
        """Resume from the checkpoint all ranks agree on (in this layout or another; an error if none loads),
        or start afresh; only then write the run's config, skipped-record list and log file."""
        run = self.run
        if self.cfg.resume:
            order = [name for group in param_groups(run.accelerator.unwrap_model(run.objective), self.cfg)
                     for name, _ in group]
            self.state.load_state_dict(checkpoint.resume(run.accelerator, run.out, run.layout, run.objective,
                                                         run.optimizer, run.scheduler, order))
        logs.write_to(run.out / runfiles.LOG)
        if run.is_main:  # a refused run changes no file
            write_atomic(run.out / runfiles.CONFIG, json.dumps(run.requested, indent=2))
            with open(run.out / runfiles.SKIPPED, "w") as f:
                f.writelines(json.dumps(asdict(s)) + "\n" for s in run.report.skipped)
            self.metrics.open(run.out / runfiles.METRICS)
        run.objective.train()
        if self.state.evaluation_pending:  # stopped during the evaluation of the step it saved: evaluate again
            self.maybe_evaluate(force=True)
        self.t_steps = time.time()

    def epoch_rows(self) -> list[list[int]]:
        """The row indices of each optimizer step left of this epoch's plan, from where the state stands, up to
        the run's last step."""
        state, run = self.state, self.run
        plan = step_batches(run.lengths, run.global_batch, self.cfg.seed, state.epoch, self.cfg.group_by_length)
        return plan[state.step_in_epoch:][:run.total_steps - state.step]

    def next_epoch(self) -> None:
        self.state.epoch += 1
        self.state.step_in_epoch = 0

    # ---- one step ----
    def collate_step(self, rows: list[int]) -> StepBatch:
        """This rank's share of a step, collated on the host (:func:`mindmirror.core.step.collate_step`)."""
        if self.state.step + 1 == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return collate_step(self.run, rows)

    def vote_on_stop(self) -> None:
        """At the end of a step: start the ranks' vote on whether a stop signal arrived (:class:`runtime.StopVote`)."""
        self.vote.start(self.preemption is not None and self.preemption.requested)

    def stop_agreed(self) -> bool:
        """At the start of a step: whether a stop signal had reached any rank by the end of the last one (the
        vote then started; one process: the flag now)."""
        if self.run.world == 1:
            return self.preemption is not None and self.preemption.requested
        return self.vote.result()

    def train_step(self, batch: StepBatch) -> None:
        """Forward and backward of this rank's micro-batches, then one clip and optimizer step (skipped, and
        the schedule held, when the loss or gradient is not finite). Nothing here reads the device: see
        :func:`mindmirror.core.step.clip_and_step` for the one case that must."""
        run, state = self.run, self.state
        sums = forward_backward(run, batch, poison=state.step + 1 in self.fault_steps)
        lr = run.scheduler.get_last_lr()[0]  # the lr this step uses
        grad_norm, finite = clip_and_step(run)
        if isinstance(finite, bool):  # known now: hold the schedule at once
            if finite:
                run.scheduler.step()
                self.nonfinite_in_row = 0
            else:
                self.skipped(state.step + 1)
        else:  # decided on the device: the schedule goes on, and is held back where settle() finds a skip
            run.scheduler.step()
            self.pending.append((state.step + 1, finite))
        state.step += 1
        state.step_in_epoch += 1
        state.samples += run.global_batch
        self.last = {"lr": lr, "grad_norm": grad_norm}
        tokens = int(batch.counts.sum() + run.input_tokens[batch.rows].sum())
        self.window.add(sums, batch.counts, tokens, run.step_flops(batch.rows))
        if self.first_step is None:  # how long a run takes to start, and its memory then (the data benchmark)
            self.first_step = [time.time() - psutil.Process().create_time(), peak_memory_mb()]

    def settle(self) -> None:
        """Read the finiteness of the steps skipped or not on the device since the last call (one read) and
        account for the skipped ones as :meth:`skipped` does when it knows at once; the schedule, stepped for
        them meanwhile, is set back by one step each. Called at log lines, checkpoints and evaluations, so the
        steps between a skip and the next log line train at the lr of one step later."""
        pending, self.pending = self.pending, []
        if not pending:
            return
        device = self.accelerator.device
        finite = torch.stack([torch.as_tensor(f, device=device).reshape(()) for _, f in pending]).tolist()
        for (step, _), ok in zip(pending, finite, strict=True):
            if ok:
                self.nonfinite_in_row = 0
                continue
            hold_schedule(self.run.scheduler, 1)
            if step == self.state.step and self.nonfinite_in_row + 1 >= self.cfg.max_nonfinite_steps:
                self.state.step -= 1  # the latest step did nothing but count: save the state before it
                self.state.step_in_epoch -= 1
                self.state.samples -= self.run.global_batch
            self.skipped(step)

    def skipped(self, step: int) -> None:
        """Step ``step`` was skipped (non-finite loss or gradient); too many in a row save and stop."""
        state = self.state
        self.nonfinite_in_row += 1
        state.nonfinite_steps += 1
        self.metrics.write({"step": step, "split": "train", "nonfinite_skipped": state.nonfinite_steps})
        log.warning(f"step {step}: non-finite loss or gradient; step skipped "
                    f"({self.nonfinite_in_row} in a row, {state.nonfinite_steps} in all)")
        if self.nonfinite_in_row >= self.cfg.max_nonfinite_steps:
            self.save()
            raise NonFiniteLossError(
                f"{self.nonfinite_in_row} non-finite steps in a row at step {step}; the last good state "
                f"is saved in {self.run.out / runfiles.CHECKPOINTS}. Lower --lr or check the data.")

    # ---- after a step ----
    def maybe_log(self, bar) -> None:
        step = self.state.step
        if step % self.cfg.logging_steps and step != self.run.total_steps:
            return
        self.settle()
        record = self.window.record(self.run, step, self.last["lr"], float(self.last["grad_norm"]), self.peak_flops)
        record["epoch"] = self.state.epoch
        self.metrics.write(record)
        self.state.last_loss = record["loss"]
        bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}")

    def maybe_evaluate(self, force: bool = False) -> None:
        """Validation accuracy (every ``--eval_steps`` and at epoch ends); a better model is exported to best/."""
        run, state = self.run, self.state
        if not (force or (self.cfg.eval_steps and state.step % self.cfg.eval_steps == 0)):
            return
        if state.last_eval_step == state.step:
            return
        self.settle()
        state.evaluation_pending = True  # until it is done: a checkpoint saved on a stop during it says so
        t_eval = time.time()
        try:
            result, records = results.validate(run, self.between_eval_batches)
        except evaluate.EvaluationStopped as stopped:
            self.save_and_stop(f"during the evaluation of step {state.step} ({stopped}; the resumed run repeats it)")
        state.evaluation_pending = False
        state.last_eval_step = state.step
        accuracy = result["accuracy"]
        if run.is_main:  # the latest evaluation's outputs, for error analysis and export checks
            evaluate.write_records(run.out / runfiles.VALID_PREDICTIONS, records)
        self.metrics.write({"step": state.step, "split": "valid", "accuracy": accuracy, "rows": result["rows"],
                            "eval_s": time.time() - t_eval})
        if accuracy > state.best_valid_accuracy:
            state.best_valid_accuracy, state.best_step = accuracy, state.step
            checkpoint.export_model(self.accelerator, run.objective, run.tokenizer, run.out / runfiles.BEST,
                                    {"step": state.step, "valid_accuracy": accuracy})
        if run.is_main:
            line = f"step {state.step}: valid accuracy {accuracy:.3f} (best {state.best_valid_accuracy:.3f})"
            tqdm.write(line)  # above the progress bar
            log.info(line, extra=logs.FILE_ONLY)

    def between_eval_batches(self) -> bool:
        """Whether to stop an evaluation here, before its next batch: a stop signal reached any rank. Every rank
        calls it as often (one small sum over the ranks a batch, next to a batch's generation)."""
        stop = self.preemption is not None and self.preemption.requested
        if self.run.world > 1:
            flag = torch.tensor([float(stop)], device=self.accelerator.device)
            stop = bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)
        if self.slow_eval_s and not stop:  # the next batch takes this much longer
            time.sleep(self.slow_eval_s)
        return stop

    def maybe_save(self) -> None:
        if self.cfg.save_steps and self.state.step % self.cfg.save_steps == 0:
            self.save()

    def save(self) -> None:
        self.settle()  # a skip found here may itself save and stop
        if self.saved_step == self.state.step:
            return
        self.saved_step = self.state.step
        checkpoint.save_checkpoint(self.accelerator, self.run.out / runfiles.CHECKPOINTS, self.state.step,
                                   self.state.state_dict(), self.cfg.save_total_limit, self.run.layout)

    def save_and_stop(self, where: str = "") -> None:
        """A stop signal: save the state of the last finished step and raise :class:`Preempted`."""
        t_save = time.time()
        time.sleep(float(os.environ.get(FAULT_SLOW_SAVE_S, "0")))
        self.save()
        # The save time tells a user whether MINDMIRROR_SHUTDOWN_TIMEOUT (launch/multinode.sh) leaves enough room.
        # One shape whatever the moment (log readers and the Slurm test match its start); where it came last.
        log.warning(f"stop requested by a signal: saved step {self.state.step} in "
                    f"{self.run.out / runfiles.CHECKPOINTS} in {time.time() - t_save:.0f} s; exiting with code "
                    f"{EXIT_PREEMPTED} (rerun with --resume to continue){'; it came ' + where if where else ''}")
        self.vote.close()
        shut_down(self.accelerator)
        raise Preempted(f"preempted at step {self.state.step}")

    # ---- end ----
    def finish(self, t_start: float) -> dict:
        """Last evaluation and checkpoint, the final/ export, the test of best/, summary.json and the table."""
        run, state, accelerator = self.run, self.state, self.accelerator
        train_s = time.time() - self.t_steps
        peak_per_rank = self.gather([peak_memory_mb()])
        first_step = self.gather(self.first_step or [-1.0, -1.0])
        self.maybe_evaluate(force=True)
        self.save()
        checkpoint.export_model(accelerator, run.objective, run.tokenizer, run.out / runfiles.FINAL,
                                {"step": state.step})
        try:
            test, examples = results.evaluate_best_export(run, self.between_eval_batches)
        except evaluate.EvaluationStopped as stopped:  # the state is saved: a resumed run ends the run again
            self.save_and_stop(f"during the test of best/ ({stopped})")
        self.metrics.write(test)
        # Peaks right after the build and at the very end (final evaluation, exports and test included).
        build_and_end = self.gather([run.figures["mem_built"], peak_memory_mb()])
        cfg = self.cfg
        summary = {
            "final_step": state.step, "final_loss": state.last_loss,
            "best_valid_accuracy": state.best_valid_accuracy, "best_step": state.best_step,
            "test_accuracy": test["accuracy"], "train_samples_per_s": state.samples / max(train_s, 1e-9),
            "wall_s": time.time() - t_start, "world_size": run.world, "zero_stage": run.layout.zero_stage,
            "mixed_precision": run.precision, "peak_mem_mb_per_rank": [r[0] for r in peak_per_rank],
            "peak_mem_mb_before_model": run.figures["mem_before_model"],
            "peak_mem_mb_built_per_rank": [r[0] for r in build_and_end],
            "peak_mem_mb_end_per_rank": [r[1] for r in build_and_end],
            "first_step_s_per_rank": [r[0] for r in first_step],
            "peak_mem_mb_first_step_per_rank": [r[1] for r in first_step],
            "data": {"load_s": run.figures["data_s"], "from_cache": run.report.cached},
            "nonfinite_steps": state.nonfinite_steps, "parameters": run.parameters, "model": cfg.from_pretrained,
            "param_dtype": run.figures["param_dtype"],  # the master weights AdamW updates
            "dataset": cfg.dataset, "model_type": cfg.model_type,
            "rows": {split: len(t) for split, t in run.tables.items()},
            "skipped_records": run.report.counts(), "batch_size": cfg.batch_size,
            "experiment": cfg.experiment or f"{cfg.model_type} b{cfg.num_train_branches}", "run": cfg.run,
            "num_train_branches": cfg.num_train_branches, "alpha": run.alpha, "label_type": cfg.label_type,
            "init_from": str(Path(cfg.init_from).resolve()) if cfg.init_from else "",
        }
        # What each stage of a chain of runs cost (this one last), for mindmirror-report's totals.
        summary["stages"] = runfiles.earlier_stages(cfg.init_from) + [runfiles.stage_cost(summary)]
        if run.is_main:
            write_atomic(run.out / runfiles.SUMMARY, json.dumps(summary, indent=2))  # last: the run has finished
            logs.print_examples(examples)
            runfiles.print_table(logs.result_rows(summary, run.out))
        self.vote.close()
        shut_down(accelerator)
        return summary

    def gather(self, values: list[float]) -> list[list[float]]:
        """``values`` of every rank, in rank order."""
        return self.accelerator.gather(torch.tensor([values], device=self.accelerator.device,
                                                    dtype=torch.float64)).tolist()
