"""Evaluation: how a student's answers are scored. ``evaluate`` runs rank-sharded greedy generation over a split
(the trainer's validation and test, and ``mindmirror-eval``), with sampled votes; ``selfeval`` is test-time
self-evaluation (the student's verdicts on its own CoTs, the weighted vote); ``metrics`` the safe arithmetic and
whether an answer is correct; ``eval_cli`` the ``mindmirror-eval`` command, which loads a checkpoint or an
export of a finished run. ``evaluate``, ``selfeval`` and ``metrics`` import only the shared top-level modules
and ``data``, so the core may import them; ``eval_cli`` also reads saved weights through the core."""
