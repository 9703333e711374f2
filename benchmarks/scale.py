"""The orchestrator alone: peak memory at 10 k / 100 k / 1 M records, records/s with a
zero-cost engine, and the cost of rerunning a finished run.

Every run is the real `generate` flow in a fresh child process (benchmarks.flow_child),
`attach` profile, against the NeMo-compatible server with the simulated engine at zero cost
(no sleep; it still builds every reply: 16 pseudo-tokens per row, token ids and offsets).
Defaults: batch_size 128 (the flow's), max_in_flight 2; shard_size 4000 everywhere (250 shards, so 250
generate-shard task runs, at 1 M records).

- Inputs carry an `id` field (r0, r1, ...), so the flow checks them for duplicates; the
  largest size is run again without the field (ids derived from line numbers, no check).
- Peak RSS: the child's `getrusage(RUSAGE_SELF).ru_maxrss` at the end of the run: the peak
  resident set of the process that ran the flow (Python, Prefect's client, task runner and
  threads, our code, the records it held). Not included: the NeMo server and the Prefect API
  server, which are other processes. Nothing is subtracted, not even the ~100 MB that
  importing Prefect costs before the first record is read.
- Records/s: records ÷ the wall time of the whole `generate()` call (plan, readiness,
  generation, release, manifest; not the interpreter's start-up and imports).
- Rerun: the same run id and input after the run finished: `generate()` wall time, and the
  allocations made (Slurm jobs submitted, watched in squeue; the flow's slurm profile).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from benchmarks.common import Cost, PrefectAPI, local_server, median, run_flow, write_prompts

SHARD = 4000
TOKENS = 16


def flow_params(src: Path, out: Path, run_id: str) -> dict:
    return {"input_uri": str(src), "output_uri": str(out), "run_id": run_id, "profile": "attach",
            "sampling": {"tokens_to_generate": TOKENS, "greedy": True}, "shard_size": SHARD}


def one(workdir: Path, api: PrefectAPI, srv, src: Path, n: int, tag: str, log) -> dict:
    env = {"NSDG_SERVER__URL": srv.url, "NSDG_WORK_DIR": str(workdir / ".nsdg")}
    run = run_flow(workdir, api, flow_params(src, workdir / "out", tag), settings_env=env, tag=tag, rss_sample_s=0.5,
                   timeout=1200)
    if not run.ok:
        raise RuntimeError(f"{tag} failed: {run.error}")
    manifest = json.loads(Path(run.result["manifest"]).read_text())
    r = {"records": n, "seconds": run.seconds, "records_per_s": n / run.seconds, "maxrss_mb": run.maxrss_mb,
         "generation_records_per_s": manifest["throughput"].get("records_per_s"),
         "timings_s": manifest["timings_s"], "shards": len(manifest["parts"]),
         "rss_last_mb": run.extra["rss_samples"][-1][1] if run.extra.get("rss_samples") else None}
    log(f"scale {tag}: {n} records in {run.seconds:.1f} s = {r['records_per_s']:.0f} rec/s "
        f"(generation phase {r['generation_records_per_s']} rec/s), peak RSS {run.maxrss_mb:.0f} MB, {r['shards']} shards")
    return r


SET_PROBE = """
import psutil
p = psutil.Process(); before = p.memory_info().rss
from infra.storage.scratch import IdSet
seen = IdSet()
for i in range(1_000_000):
    seen.add(f"r{i}")
print((p.memory_info().rss - before) / 2**20)
"""


def id_set_mb_per_million() -> float:
    """What RecordCheck's duplicate-id set (infra.storage.scratch.IdSet: digests in a scratch SQLite file, an
    8 MB page cache in memory) adds to RSS for a million records."""
    import subprocess

    from benchmarks.common import PY

    return float(subprocess.run([PY, "-c", SET_PROBE], capture_output=True, text=True, check=True).stdout)


def run(workdir: Path, api: PrefectAPI, log, sizes=(10_000, 100_000, 1_000_000), repeats: int = 3) -> dict:

    out: dict = {"sizes": {}, "shard_size": SHARD, "tokens_to_generate": TOKENS,
                 "id_set_mb_per_million": id_set_mb_per_million()}
    inputs = {n: write_prompts(workdir / f"scale-{n}.jsonl", n) for n in sizes}
    with local_server(workdir, "scale-server", Cost()) as srv:
        for n in sizes:
            out["sizes"][n] = one(workdir, api, srv, inputs[n], n, f"scale-{n}", log)
            if n >= 1_000_000:
                shutil.rmtree(workdir / "out" / f"scale-{n}", ignore_errors=True)  # 300+ MB of parts
        big = max(sizes)
        if big >= 1_000_000:
            # The same records without an `id` field: the flow derives ids and keeps no id set.
            src = write_prompts(workdir / f"scale-{big}-noid.jsonl", big, ids=False)
            inputs[big].unlink(missing_ok=True)
            out["no_id"] = one(workdir, api, srv, src, big, f"scale-{big}-noid", log)
            shutil.rmtree(workdir / "out" / f"scale-{big}-noid", ignore_errors=True)
            src.unlink(missing_ok=True)
        mid = 100_000 if 100_000 in sizes else sizes[0]
        runs = [out["sizes"][mid]] + [one(workdir, api, srv, inputs[mid], mid, f"scale-{mid}-{c}", log)
                                      for c in "bcdefg"[:repeats - 1]]
        out["ceiling_records"] = mid
        out["ceiling_runs"] = [x["records_per_s"] for x in runs]
        out["ceiling_median"] = median(out["ceiling_runs"])
        out["ceiling_generation_median"] = median([x["generation_records_per_s"] for x in runs])

        # Rerun of the finished run with the same parameters and profile (a run's served model is part of
        # its config, so another profile is refused): it must send the server nothing and allocate nothing.
        tag = f"scale-{mid}"
        params = flow_params(inputs[mid], workdir / "out", tag)
        env = {"NSDG_SERVER__URL": srv.url, "NSDG_WORK_DIR": str(workdir / ".nsdg")}
        before = len(srv.stats())
        t = time.monotonic()
        rerun = run_flow(workdir, api, params, settings_env=env, tag=f"{tag}-rerun")
        child_wall = time.monotonic() - t
        if not rerun.ok:
            raise RuntimeError(f"rerun failed: {rerun.error}")
        manifest = json.loads(Path(rerun.result["manifest"]).read_text())
        requests = len(srv.stats()) - before
        out["rerun"] = {"records": mid, "seconds": rerun.seconds, "child_process_s": child_wall, "requests": requests,
                        "allocations": len(manifest.get("slurm_job_ids", [])), "profile": "attach"}
        log(f"rerun of finished {mid}-record run: {rerun.seconds:.2f} s in generate() ({child_wall:.1f} s with "
            f"interpreter start-up), {requests} requests to the server")
    return out
