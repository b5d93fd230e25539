"""mindmirror.runfiles: the one reader of a run's summary.json and the Markdown tables the tools write.
(The key-value table and the stage costs are in test_helpers_table.py.)"""

from __future__ import annotations

import json

import pytest

from mindmirror.runfiles import SummaryError, finished_summary, markdown_row, markdown_table, read_summary


def test_read_summary(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"final_step": 3, "test_accuracy": 0.5}))
    assert read_summary(tmp_path) == {"final_step": 3, "test_accuracy": 0.5}
    assert read_summary(str(tmp_path)) == finished_summary(tmp_path) == {"final_step": 3, "test_accuracy": 0.5}


@pytest.mark.parametrize("make, why", [
    (lambda run: None, "not found (a run writes it last, when it finishes)"),
    (lambda run: (run / "summary.json").write_text("{not json"), "unreadable (Expecting property name"),
    (lambda run: (run / "summary.json").write_bytes(b"\xff\xfe"), "unreadable ('utf-8' codec can't decode"),
    (lambda run: (run / "summary.json").mkdir(), "unreadable ([Errno 21] Is a directory"),
    (lambda run: (run / "summary.json").write_text("[1, 2]"), "holds a list, not a run's summary (a JSON object)"),
])
def test_a_missing_or_broken_summary_is_one_error_naming_the_file(tmp_path, make, why):
    make(tmp_path)
    with pytest.raises(SummaryError) as caught:
        read_summary(tmp_path)
    assert str(caught.value).startswith(f"{tmp_path / 'summary.json'}: {why}")
    assert isinstance(caught.value, ValueError) and caught.value.__cause__ is None
    assert finished_summary(tmp_path) is None


@pytest.mark.parametrize("cells, expected", [
    (["a", "b"], "| a | b |"),
    (["", "train", "test"], "| | train | test |"),  # an empty corner cell
    ([1, 2.5, None, "x y"], "| 1 | 2.5 | None | x y |"),
    ([], "|"),
])
def test_markdown_row(cells, expected):
    assert markdown_row(cells) == expected
    assert markdown_row(iter(cells)) == expected  # any iterable


def test_markdown_table():
    assert markdown_table(["run", "samples/s"], [["baseline", "1.00"], ("mindmirror", 2)]) == (
        "| run | samples/s |\n"
        "|---|---|\n"
        "| baseline | 1.00 |\n"
        "| mindmirror | 2 |")
    assert markdown_table(("a", "b", "c"), []) == "| a | b | c |\n|---|---|---|"  # the head alone (streamed rows)
    assert markdown_table(["setting", "value"], {"lr": 0.1, "stop": {}}.items()) == (
        "| setting | value |\n|---|---|\n| lr | 0.1 |\n| stop | {} |")
