"""The training core: what ``mindmirror-train`` runs, from a ``TrainConfig`` to ``summary.json``. ``build`` sets
a run up (accelerator, data, model, optimizer), ``loop`` trains it one ``step`` at a time on the ``objective``
with batches from ``collate``; ``optim`` holds AdamW's groups and the schedule, ``runtime`` the process
(Accelerate, DeepSpeed sizes, signals, shutdown), ``tracking`` the log lines (FLOP/s and MFU counted by
``flops``) and ``results`` validation and the test of ``best/``; ``checkpoint``, ``elastic`` and ``weights``
write and read the run's state in any layout. The core imports the shared top-level modules (config, model,
runfiles, logs), ``data`` and the evaluation package; never the tools, ``cli`` or ``teacher``."""
