"""mindmirror-databench in a small mode: two ranks, two sizes, cold and warm cache (figures printed, no timing
assertions)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_databench_small_mode_reports_every_rank_cold_and_warm(tmp_path, capsys):
    from mindmirror.tools.databench import run

    results = run(["--rows", "1000,2000", "--nproc", "2", "--workdir", str(tmp_path),
                   "--output", str(tmp_path / "figures.json")])
    assert [(r["target_rows"], r["cache"]) for r in results] == [(1000, "cold"), (1000, "warm"), (2000, "cold"),
                                                                 (2000, "warm")]
    for r in results:
        assert r["rows"] >= r["target_rows"]
        assert r["from_cache"] == (r["cache"] == "warm")  # the warm run mapped the tables the cold one wrote
        assert len(r["first_step_s"]) == len(r["peak_rss_mb"]) == 2
        assert all(s > 0 for s in r["first_step_s"]) and all(m > 0 for m in r["peak_rss_mb"])
    assert json.loads((tmp_path / "figures.json").read_text()) == results
    printed = capsys.readouterr().out
    assert "| training rows | cache |" in printed and "warm" in printed
