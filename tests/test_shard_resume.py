"""Resume within a shard (issue 28, cost 1): a kill -9 in the middle of a shard costs the requests in
flight, not the shard. Through the CLI against the simulated server, as the other kill -9 tests:
the resumed part equals an uninterrupted seeded run's byte for byte, and the server's own request
log (each seeded request names its seed) shows that only the requests the spill lacked were asked
again. The spill's torn last line is ignored, and a spill written under another config is never
read."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from benchmarks.faults import _wait, local_env, local_servers
from infra.prompting.samples import request_seed
from infra.run.layout import spill_name

pytestmark = pytest.mark.integration

SEED, RECORDS, SAMPLES, BATCH = 7, 24, 2, 4  # one shard: 6 batches x 2 samples = 12 requests
SEEDED = re.compile(r"request \d+: (\d+) sentences, \d+ tokens generated, seed (\d+)")
FLAGS = ["--random-seed", str(SEED), "--temperature", "0.8", "--tokens-to-generate", "8", "--samples-per-prompt",
         str(SAMPLES), "--shard-size", str(RECORDS), "--batch-size", str(BATCH), "--prompt-format", "raw"]


def batch_of(position: int) -> tuple[int, int]:
    """(batch, sample) of a result position: prompts of one length keep their order, so batch b
    holds records 4b..4b+3 (infra/prompting/batching.py)."""
    return position // SAMPLES // BATCH, position % SAMPLES


def seeds(log_text: str) -> list[int]:
    """The seeds of the seeded requests a server answered (the readiness probe has none)."""
    return [int(m[2]) for m in SEEDED.finditer(log_text)]


def server_log(work) -> str:
    return "".join(p.read_text() for p in sorted((work / "servers").glob("*/replica-*/server.log")))


def spill_lines(path) -> tuple[dict, list[dict]]:
    header, *lines = path.read_text().splitlines()
    return json.loads(header), [json.loads(x) for x in lines]


def run_cli(workdir, env: dict, out, run_id: str = "r") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", "run", "--run-id", run_id, "--output-uri", str(out),
                           "--input-uri", str(workdir / "in.jsonl"), *FLAGS], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=300)


def env_for(workdir, prefect_server, work: str) -> dict:
    # 0.3 s a request: the shard's 12 requests take long enough to kill it between two of them.
    return {**os.environ, **local_env(workdir / "x", "--extra-latency", "0.3"), "NSDG_WORK_DIR": str(workdir / work),
            **prefect_server.client_env(), "PREFECT_HOME": str(workdir / "prefect")}


def test_kill_9_mid_shard_asks_again_only_the_unfinished_requests_and_the_part_is_byte_identical(
        prefect_server, workdir):
    (workdir / "in.jsonl").write_text("".join(json.dumps({"id": f"q{i:02d}", "prompt": f"Tell me about item {i:02d}."})
                                              + "\n" for i in range(RECORDS)))
    env, run_dir = env_for(workdir, prefect_server, "work"), workdir / "out" / "r"
    spill = run_dir / spill_name("part-00000.jsonl")
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--run-id", "r", "--output-uri",
                             str(workdir / "out"), "--input-uri", str(workdir / "in.jsonl"), *FLAGS], cwd=workdir,
                            env=env, stdout=subprocess.DEVNULL, stderr=open(workdir / "killed.log", "wb"),
                            start_new_session=True)
    try:
        _wait(lambda: spill.exists() and spill.read_text().count("\n") >= 5, 180, "4 requests of the shard in its spill")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the flow; no hook runs
        proc.wait(timeout=30)
    _wait(lambda: local_servers(workdir) == 0, 15, "the orphaned local server to stop")
    assert not (run_dir / "part-00000.jsonl").exists(), "the kill must land inside the shard"
    header, kept = spill_lines(spill)
    kept_batches = {batch_of(p) for line in kept for p, _ in line["results"]}
    assert 4 <= len(kept_batches) < 12 and len(kept) == len(kept_batches)  # one line per request
    asked_before = seeds(server_log(workdir / "work"))

    # A torn last line: whole JSON, but its newline never reached the disk. It names a request the
    # spill lacks; were it believed, its made-up completion would be in the part.
    missing = next((b, s) for b in range(RECORDS // BATCH) for s in range(SAMPLES) if (b, s) not in kept_batches)
    position = missing[0] * BATCH * SAMPLES + missing[1]
    fake = dict(kept[0]["results"][0][1], completion=dict(kept[0]["results"][0][1]["completion"], text="TORN"))
    with open(spill, "a") as f:
        f.write(json.dumps({"results": [[position, fake]]}))

    log_offset = len(server_log(workdir / "work"))
    resumed = run_cli(workdir, env, workdir / "out")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    asked_again = seeds(server_log(workdir / "work")[log_offset:])

    every = {(b, s): request_seed(SEED, 0, b, s) for b in range(RECORDS // BATCH) for s in range(SAMPLES)}
    assert sorted(asked_again) == sorted(every[k] for k in every if k not in kept_batches), (kept_batches, asked_again)
    assert every[missing] in asked_again
    assert len(set(asked_again) & set(asked_before)) <= 1  # at most the one request in flight at the kill
    assert not spill.exists()  # the part is published: its spill is gone

    # An uninterrupted run elsewhere, with a spill planted that another config wrote (its rows made
    # up): refused, every request asked, and the part is the resumed one byte for byte.
    whole_dir = workdir / "whole" / "r"
    whole_dir.mkdir(parents=True)
    foreign = [json.dumps(dict(header, config_hash="0" * 16, part=str(whole_dir / "part-00000.jsonl")))]
    foreign += [json.dumps({"results": [[p, dict(r, completion=dict(r["completion"], text="FOREIGN"))]
                                        for p, r in line["results"]]}) for line in kept]
    (whole_dir / spill_name("part-00000.jsonl")).write_text("\n".join(foreign) + "\n")
    whole_env = env_for(workdir, prefect_server, "work-whole")
    whole = run_cli(workdir, whole_env, workdir / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert sorted(seeds(server_log(workdir / "work-whole"))) == sorted(every.values())
    part = (run_dir / "part-00000.jsonl").read_bytes()
    assert part == (whole_dir / "part-00000.jsonl").read_bytes()
    rows = [json.loads(line) for line in part.splitlines()]
    assert len(rows) == len({(r["id"], r["sample"]) for r in rows}) == RECORDS * SAMPLES
    assert not any(r["completion"] in ("TORN", "FOREIGN") for r in rows)
    state = json.loads((run_dir / "part-00000.jsonl.state.json").read_text())
    assert state["records"] == RECORDS * SAMPLES and state["sha256"] == json.loads(
        (whole_dir / "part-00000.jsonl.state.json").read_text())["sha256"]
    # The part names the killed invocation whose kept rows it holds, and how many, beside the one that finished it.
    killed = kept[0]["by"]
    assert killed["invocation"] and killed["invocation"] != state["invocation"] and killed["replica"] == 0
    assert state["kept_from"] == [{**killed, "job_ids": [], "results": sum(len(x["results"]) for x in kept)}]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["parts"][0]["kept_from"] == state["kept_from"]
    assert json.loads((whole_dir / "part-00000.jsonl.state.json").read_text())["kept_from"] == []  # the foreign spill: refused
