"""Recipes through the real flow and the local server: N samples per record with unique
(id, sample) keys, identical samples from two seeded runs, and exact resume after kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter

import pytest

from benchmarks.faults import _wait, local_env, local_servers
from flows.generate import generate
from infra.recipes import RecipeParams
from infra.prompting.sampling import SamplingParams

pytestmark = pytest.mark.integration

TEMPLATE = "{% for ex in examples %}Topic: {{ ex.topic }}\nFact: {{ ex.fact }}{{ separator }}{% endfor %}Topic: {{ topic }}\nFact:"


def write_inputs(workdir, n: int):
    src, ex = workdir / "topics.jsonl", workdir / "examples.jsonl"
    src.write_text("".join(json.dumps({"id": f"t{i:03d}", "topic": f"topic {i}", "level": i % 3}) + "\n" for i in range(n)))
    ex.write_text("".join(json.dumps({"topic": f"ex {i}", "fact": f"fact {i}."}) + "\n" for i in range(5)))
    return src, ex


def rows(run_dir) -> list[dict]:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    return [json.loads(line) for p in manifest["parts"] for line in (run_dir / p["name"]).read_text().splitlines()]


def recipe_params(ex, samples: int = 3) -> RecipeParams:
    return RecipeParams(prompt_template=TEMPLATE, examples_uri=str(ex), examples_per_prompt=2,
                        example_separator="\n\n", samples_per_prompt=samples)


def test_seeded_samples_are_n_per_record_unique_and_identical_across_runs(prefect_harness, workdir, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("NSDG_LOCAL__MODEL_DIR", str(tiny_model_dir))
    src, ex = write_inputs(workdir, 7)
    sampling = SamplingParams(tokens_to_generate=6, temperature=1.0, top_k=50, top_p=1.0, random_seed=1234)
    runs = {}
    for run_id in ("a", "b"):
        generate(input_uri=str(src), output_uri=str(workdir / "out"), run_id=run_id, sampling=sampling, batch_size=4,
                 shard_size=3, prompt_format="raw", recipe=recipe_params(ex))
        runs[run_id] = rows(workdir / "out" / run_id)
    out = runs["a"]
    assert len(out) == 7 * 3 and len({(r["id"], r["sample"]) for r in out}) == 21
    assert Counter(r["id"] for r in out) == {f"t{i:03d}": 3 for i in range(7)}
    for r in out:
        assert r["topic"] and r["level"] in (0, 1, 2)  # the record's fields kept
        assert r["prompt"].endswith(f"Topic: {r['topic']}\nFact:") and r["prompt"].count("Fact: fact") == 2
    manifest = json.loads((workdir / "out" / "a" / "manifest.json").read_text())
    assert manifest["records_in"] == 7 and manifest["records_written"] == 21
    assert "\n\n" in manifest["config"]["sampling"]["end_strings"]  # the separator stops generation
    # Seeded: the second run gets every sample the first got; the samples of one record differ.
    key = lambda r: (r["id"], r["sample"])  # noqa: E731
    assert {key(r): r["completion"] for r in out} == {key(r): r["completion"] for r in runs["b"]}
    per_record = {}
    for r in out:
        per_record.setdefault(r["id"], set()).add(r["completion"])
    assert sum(len(v) > 1 for v in per_record.values()) >= 5, per_record


def cli_env(workdir, prefect_server) -> dict:
    """A CLI run's environment: the simulated engine slowed a little, the session's Prefect server
    (one start for every CLI run, not a temporary server per run)."""
    return {**os.environ, **local_env(workdir, "--extra-latency", "0.1"), **prefect_server.client_env(),
            "PREFECT_HOME": str(workdir / "prefect")}


def start_cli_run(workdir, env: dict, run_id: str, flags: list[str]) -> subprocess.Popen:
    """`nemotron-sdg run` in its own session, so kill -9 of its group takes the flow (the Prefect
    server outlives it, as an operator's server outlives a killed run)."""
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--run-id", run_id, *flags], cwd=workdir, env=env,
                            stdout=subprocess.DEVNULL, stderr=open(workdir / f"{run_id}.log", "wb"), start_new_session=True)


def test_kill_9_mid_run_then_rerun_gives_every_sample_once_with_the_same_completions(prefect_harness, prefect_server,
                                                                                        workdir):
    src, ex = write_inputs(workdir, 40)
    flags = ["--prompt-template", TEMPLATE, "--examples-uri", str(ex), "--examples-per-prompt", "2",
             "--samples-per-prompt", "3", "--random-seed", "99", "--temperature", "0.8", "--tokens-to-generate", "8",
             "--shard-size", "5", "--batch-size", "4", "--output-uri", str(workdir / "out"), "--input-uri", str(src)]
    env, killed_dir = cli_env(workdir, prefect_server), workdir / "out" / "killed"
    proc = start_cli_run(workdir, env, "killed", flags)
    try:
        _wait(lambda: any(killed_dir.glob("part-*.state.json")), 180, "the first part of the run to be killed")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the flow; no hook runs
        proc.wait(timeout=30)
    kept = len(list(killed_dir.glob("part-*.state.json")))
    assert 0 < kept < 8, f"{kept} of 8 parts published before the kill: the kill must land mid-run"
    _wait(lambda: local_servers(workdir) == 0, 15, "the orphaned local server to stop")
    for run_id in ("killed", "whole"):  # the rerun resumes; "whole" runs uninterrupted for comparison
        done = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--run-id", run_id, *flags], cwd=workdir, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    resumed, whole = rows(killed_dir), rows(workdir / "out" / "whole")
    keys = [(r["id"], r["sample"]) for r in resumed]
    assert len(keys) == len(set(keys)) == 40 * 3
    assert {(r["id"], r["sample"]): r["completion"] for r in resumed} == {(r["id"], r["sample"]): r["completion"] for r in whole}
