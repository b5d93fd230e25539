"""Teacher data: tree-of-thought CoTs and self-evaluations from any OpenAI-compatible LLM.

``mindmirror-teacher`` (:mod:`mindmirror.teacher.cli`) reads a dataset's questions
(:mod:`~mindmirror.teacher.layout`), renders the few-shot prompts of ``prompts/``
(:mod:`~mindmirror.teacher.prompts`), draws CoTs and self-evaluations through a retrying, hedging
asynchronous client (:mod:`~mindmirror.teacher.client`, :mod:`~mindmirror.teacher.generate`) and a
durable response store (:mod:`~mindmirror.teacher.store`), keeps only usable replies in the paper's
text form (:mod:`~mindmirror.teacher.replies`), and writes the files the trainer reads with a data
card (:mod:`~mindmirror.teacher.report`). See docs/teacher.md.
"""
