"""kill -9 of a streaming pipeline run (`run --pipeline` through the CLI, the local simulated server)
inside a stage, with several stages in flight, or between the stages' ends, then a rerun with the same
run_id: exactly the rows (ids, samples, completions, and the rows each stage passed on) of an
uninterrupted seeded run, and no server left behind."""

from __future__ import annotations

import json
import os
import signal

import pytest

from benchmarks.faults import _wait, local_servers
from tests.test_pipeline_flow import STAGES, jsonl, run_cli
from tests.test_pipeline_stream import setup
from tests.test_recipe_flow import start_cli_run

pytestmark = pytest.mark.integration


def rows(run_dir) -> dict[str, list]:
    """Every stage's generated rows (id, sample, completion) in part order, and the rows it passed on."""
    out = {}
    for stage in STAGES:
        d = run_dir / "stages" / stage
        parts = json.loads((d / "manifest.json").read_text())["parts"]
        out[stage] = [(r["id"], r["sample"], r["completion"]) for p in parts for r in jsonl(d / p["name"])]
        out[f"{stage} rows"] = [(r["id"], r["completion"]) for r in jsonl(d / "rows.jsonl")]
    return out


@pytest.fixture(scope="module")
def uninterrupted(prefect_server, tmp_path_factory) -> dict[str, list]:
    """The rows of one uninterrupted run, which every kill point's resumed run must give."""
    workdir = tmp_path_factory.mktemp("one-go")
    env, flags = setup(workdir, prefect_server)
    done = run_cli(workdir, env, *flags, "--run-id", "one-go")
    assert done.returncode == 0, done.stderr[-4000:]
    return rows(workdir / "out" / "one-go")


@pytest.mark.parametrize("point", ["inside facts", "inside notes", "between the stages' ends"])
def test_kill_9_then_a_rerun_gives_exactly_the_rows_of_an_uninterrupted_run(prefect_server, workdir, point,
                                                                           uninterrupted):
    env, flags = setup(workdir, prefect_server)
    killed = workdir / "out" / "killed" / "stages"
    reached = {"inside facts": lambda: len(list((killed / "facts").glob("part-*.state.json"))) >= 1,
               "inside notes": lambda: len(list((killed / "notes").glob("part-*.state.json"))) >= 2,
               "between the stages' ends": lambda: (killed / "words" / "manifest.json").exists()}[point]
    proc = start_cli_run(workdir, env, "killed", flags)
    try:
        _wait(reached, 180, f"the pipeline to reach {point}")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert not (workdir / "out" / "killed" / "manifest.json").exists()
    done = run_cli(workdir, env, *flags, "--run-id", "killed")
    assert done.returncode == 0, done.stderr[-4000:]
    got = rows(workdir / "out" / "killed")
    assert got == uninterrupted and all(got.values())
    _wait(lambda: local_servers(workdir) == 0, 30, "the killed run's server to exit with its parent")
