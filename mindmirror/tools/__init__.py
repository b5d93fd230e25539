"""The tools around the trainer, each with its own command or script: ``bench`` (``mindmirror-bench``, with
``stepclock``'s per-step time split) and ``databench`` time the trainer and its data path, ``scaling`` runs the
scaling study on ``estimate``'s parameter and memory model, ``recipes`` and ``report`` run the paper's recipes
and tabulate their results, ``gpu_check`` is the prepared device check (``launch/gpu_check.sh``), and
``launching`` starts the trainer as a process for them. Tools sit on top: they may import everything else of
mindmirror (the core, the evaluation, ``cli``, ``data``), and nothing outside this package imports a tool."""
