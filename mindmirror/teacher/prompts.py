"""The teacher's few-shot prompts: one YAML file per dataset family, shipped in ``prompts/``.

A prompt file holds two templates and an optional system message::

    system: You are a careful teacher.      # optional
    sample: "... Problem: {question}\\nAnswer:"
    value: "... Problem: {question}\\nGiven answer: {answer}\\nEvaluation:"

``sample`` asks for one chain of thought (the request's ``n`` gives several), ``value`` for one
self-evaluation of the chain of thought ``{answer}``. ``{question}`` is the question as the trainer
reads it; for ANLI ``{premise}`` and ``{hypothesis}`` are its two halves. Placeholders are replaced
literally (other braces in the text are left alone), so few-shot examples may hold any text.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import yaml

PROMPT_DIR = Path(__file__).resolve().parent / "prompts"
ANLI_SEPARATOR = "</s>"  # the trainer's input is premise + eos + hypothesis (formats.gt_example)
_FIELDS = {"system", "sample", "value"}


class PromptError(ValueError):
    """A prompt file cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class Prompts:
    """The templates of one prompt file (see the module docstring)."""

    source: str
    sample: str
    value: str
    system: str | None = None

    @property
    def sha256(self) -> str:
        """Fingerprint of the templates, recorded in the data card."""
        text = "\0".join([self.system or "", self.sample, self.value])
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def sample_messages(self, question: str, family: str) -> list[dict]:
        """Chat messages of the "sample" call for ``question``."""
        return self._messages(self.sample, _fields(question, family))

    def value_messages(self, question: str, family: str, cot: str) -> list[dict]:
        """Chat messages of the "value" call that judges ``cot``, an answer to ``question``."""
        return self._messages(self.value, _fields(question, family) | {"answer": cot})

    def _messages(self, template: str, fields: dict[str, str]) -> list[dict]:
        text = template
        for name, value in fields.items():
            text = text.replace("{" + name + "}", value)
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + [{"role": "user", "content": text}]


def _fields(question: str, family: str) -> dict[str, str]:
    fields = {"question": question}
    if family == "anli1":
        premise, sep, hypothesis = question.partition(ANLI_SEPARATOR)
        if not sep:
            raise PromptError(f"ANLI question without {ANLI_SEPARATOR!r} between premise and hypothesis: "
                              f"{question[:80]!r}")
        fields |= {"premise": premise.strip(), "hypothesis": hypothesis.strip()}
    return fields


def load_prompts(family: str, prompt_file: str | Path | None = None) -> Prompts:
    """The shipped prompts of ``family``, or those of ``prompt_file`` when given."""
    path = Path(prompt_file) if prompt_file else PROMPT_DIR / f"{family}.yaml"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise PromptError(f"{path}: cannot be read ({e.strerror or e})") from e
    except yaml.YAMLError as e:
        raise PromptError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise PromptError(f"{path}: expected a mapping with 'sample' and 'value' templates")
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise PromptError(f"{path}: unknown keys {unknown}; a prompt file holds {sorted(_FIELDS)}")
    for name in ("sample", "value"):
        if not isinstance(data.get(name), str) or not data[name].strip():
            raise PromptError(f"{path}: '{name}' must be a non-empty text template")
    if data.get("system") is not None and not isinstance(data["system"], str):
        raise PromptError(f"{path}: 'system' must be a text")
    question_fields = ("{premise}", "{hypothesis}", "{question}") if family == "anli1" else ("{question}",)
    for name in ("sample", "value"):
        if not any(f in data[name] for f in question_fields):
            raise PromptError(f"{path}: the '{name}' template never names the question "
                              f"({' or '.join(question_fields)})")
    if "{answer}" not in data["value"]:
        raise PromptError(f"{path}: the 'value' template must hold {{answer}}, the chain of thought it judges")
    source = str(path) if prompt_file else f"{path.name} (shipped)"
    return Prompts(source, data["sample"].rstrip("\n"), data["value"].rstrip("\n"), data.get("system") or None)
