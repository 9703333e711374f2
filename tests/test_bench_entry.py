"""`make bench` is one run of benchmarks.run that writes results.md and results.json whole. This runs the
same entry point with the quick suite (tiny sizes, no Slurm, no real model) in a subprocess and checks that
both files hold every section of the suite, from this one run. No timing is asserted: figures are the
benchmark's business, not the test's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.integration

HEADINGS = {  # section → the heading its markdown writes
    "busy": "### Server busy fraction", "batching": "### Length-aware batching", "scale": "### Orchestrator scale",
    "recipes": "### Recipes at scale", "curation": "### Judge and filters at scale", "engines": "## Engines:",
}


def test_the_quick_suite_writes_both_files_whole(tmp_path):
    out = tmp_path / "results.md"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NSDG_", "PREFECT_API"))}
    done = subprocess.run([sys.executable, "-m", "benchmarks.run", "--suite", "quick", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    raw = json.loads(out.with_suffix(".json").read_text())
    assert raw["suite"] == "quick" and raw["date"] and raw["machine"]["commit"]
    for name in raw["sections"]:  # each section measured in this run, or said why not
        assert name in raw or name in raw["not_run"], name
    assert set(raw["sections_s"]) | set(raw["not_run"]) == set(raw["sections"])
    text = out.read_text()
    assert text.startswith("# Benchmarks") and "## Machine" in text and f"- date: {raw['date']}" in text
    assert f"- git commit: {raw['machine']['commit']}" in text
    probe = raw["cpu_probe_s"]  # how fast the machine ran, at both ends of this run
    assert 0 < probe["start"] < 60 and 0 < probe["end"] < 60
    assert f"{probe['start']:.3f} s at the start, {probe['end']:.3f} s at the end" in text
    for name, heading in HEADINGS.items():
        assert heading in text, f"{name}: {heading!r} missing from results.md"
    # The ratio rows come from figures of this run: the recipe ceiling row names the plain run beside it.
    plain = raw["recipes"]["plain"]["rows_per_s"]
    assert f"plain, same bench run: {plain:,.0f} rows/s" in text
    # nemo-generate's ceiling: rounds, its row the median round's, each round named, each flow read
    # against the mean of the bare loops just before and after it (the next round's "before" is this one's "after").
    nemo = raw["engines"]["ceiling"]["nemo-generate"]
    assert len(nemo["rounds"]) == 2 and nemo["ratio"] in [r["ratio"] for r in nemo["rounds"]]
    first, second = nemo["rounds"]
    assert first["bare_around"][1] == second["bare_around"][0]
    assert all(r["bare_records_per_s"] == sum(r["bare_around"]) / 2 for r in nemo["rounds"])
    assert "(the median of 2 rounds: " in text
    summary = [row for row in text.split("## Results")[1].split("\n\n")[1].splitlines() if row.startswith("| ")]
    assert len(summary) >= 8 and all(row.count(" | ") == 4 for row in summary[2:])  # figure, ours, baseline, target, verdict
    assert any(row.startswith("| orchestrator ceiling on nemo-generate") and f"{nemo['ratio']:.2f}" in row for row in summary)


def test_a_nemo_ceiling_below_the_line_is_read_against_the_gpu_rate_of_the_same_run():
    """engines.findings: a ratio under 0.8 comes with the flow's rate against the busy section's
    short-batch rate (both of this run); at or above the line, no such note."""
    from benchmarks import engines

    nemo = {"ratio": 0.7, "flow_generation_records_per_s": 5000.0, "records": 50_000}
    busy = {"short": {"ours_rps_median": 62.5, "batch_latency_s": 0.51, "ours_busy_median": 0.996}}
    note = [x for x in engines.findings({"ceiling": {"nemo-generate": nemo}}, busy) if "means for a GPU" in x]
    assert len(note) == 1 and "×80 that rate" in note[0] and "feed 80 such replicas" in note[0]
    assert not [x for x in engines.findings({"ceiling": {"nemo-generate": {**nemo, "ratio": 0.8}}}, busy)
                if "means for a GPU" in x]


def test_the_summary_reads_the_nemo_ceiling_against_the_bare_loop_and_the_gpu_rate_of_the_same_run():
    """engines.summary_rows: the 0.8 line against the bare loop stays (missed below it), and beside it
    the flow's rate over the busy section's short-batch rate, against the ×20 proposed in its place."""
    from benchmarks import engines
    from benchmarks.run import _met

    nemo = {"ratio": 0.74, "flow_generation_records_per_s": 3100.0, "bare_records_per_s": 4190.0, "records": 50_000,
            "rounds": [{"ratio": 0.7}, {"ratio": 0.74}, {"ratio": 0.76}]}
    busy = {"short": {"ours_rps_median": 62.0, "ours_busy_median": 0.996}}
    rows = engines.summary_rows({"ceiling": {"nemo-generate": nemo}}, busy, _met)
    assert len(rows) == 2 and all(len(r) == 5 for r in rows)
    assert rows[0][1].startswith("0.74 (3,100 rec/s, median of 3 rounds: 0.70, 0.74, 0.76)") and rows[0][4] == "**missed**"
    assert rows[1][1] == "×50" and rows[1][3].startswith("≥ ×20") and rows[1][4] == "met"
    slow = {**nemo, "flow_generation_records_per_s": 62.0 * 19}
    assert engines.summary_rows({"ceiling": {"nemo-generate": slow}}, busy, _met)[1][4] == "**missed**"
    assert len(engines.summary_rows({"ceiling": {"nemo-generate": nemo}}, None, _met)) == 1  # no busy section: no GPU row
