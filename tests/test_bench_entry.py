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
    for name, heading in HEADINGS.items():
        assert heading in text, f"{name}: {heading!r} missing from results.md"
    # The ratio rows come from figures of this run: the recipe ceiling row names the plain run beside it.
    plain = raw["recipes"]["plain"]["rows_per_s"]
    assert f"plain, same bench run: {plain:,.0f} rows/s" in text
    # nemo-generate's ceiling: interleaved rounds, its row the median round's, each round named.
    nemo = raw["engines"]["ceiling"]["nemo-generate"]
    assert len(nemo["rounds"]) == 2 and nemo["ratio"] in [r["ratio"] for r in nemo["rounds"]]
    assert "(the median of 2 interleaved rounds: " in text
    summary = [row for row in text.split("## Results")[1].split("\n\n")[1].splitlines() if row.startswith("| ")]
    assert len(summary) >= 8 and all(row.count(" | ") == 4 for row in summary[2:])  # figure, ours, baseline, target, verdict
