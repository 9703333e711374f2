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


def test_a_resumed_pipeline_reports_the_allocation_of_every_invocation(prefect_server, workdir):
    """The killed invocation held the server too: the manifest's allocation and each stage's share sum
    both invocations (the run's record, allocations.json), and list them."""
    env, flags = setup(workdir, prefect_server)
    run_dir = workdir / "out" / "twice"

    def noted() -> list[dict]:
        path = run_dir / "allocations.json"
        return json.loads(path.read_text())["invocations"] if path.exists() else []

    # Killed once its record shows time held and notes (the third stage) has a shard out.
    reached = lambda: any(e["held_s"] > 0 for e in noted()) and list((run_dir / "stages" / "notes").glob("part-*.state.json"))  # noqa: E731
    proc = start_cli_run(workdir, env, "twice", flags)
    try:
        _wait(reached, 180, "the first invocation to note time held with notes under way")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    [killed] = noted()
    done = run_cli(workdir, env, *flags, "--run-id", "twice")
    assert done.returncode == 0, done.stderr[-4000:]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    alloc, stages = manifest["allocation"], manifest["stages"]
    first, second = alloc["invocations"]
    assert first["invocation"] == killed["invocation"] and first["held_s"] == killed["held_s"] > 0  # its last note
    assert second["held_s"] > 0 and second["invocation"] != first["invocation"]
    assert alloc["held_s"] == pytest.approx(first["held_s"] + second["held_s"], abs=0.01)
    assert alloc["busy_s"] == pytest.approx(first["busy_s"] + second["busy_s"], abs=0.01)
    # Each stage's share sums both invocations' shares, and the shares add up to the whole.
    record = {e["invocation"]: e for e in noted()}
    for s in stages:
        assert s["held_s"] == pytest.approx(sum(e["stages"][s["stage"]]["held_s"] for e in record.values()), abs=0.01)
    assert sum(s["held_s"] for s in stages) == pytest.approx(alloc["held_s"], abs=0.05)
    assert {r["invocation"] for r in alloc["replicas"]} == {first["invocation"], second["invocation"]}
    _wait(lambda: local_servers(workdir) == 0, 30, "the servers to exit")
