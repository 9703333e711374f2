"""The pipeline orchestrator's peak memory at a 1 → 10 → 10 fan-out (issue 24's target: flat, ≤ 300 MB for
100 k input records, 10 M rows at the end).

Each size is the real `pipeline` flow in a fresh child process (benchmarks.flow_child --flow pipeline),
`attach` profile, against the NeMo-compatible server with the simulated engine at zero cost (no sleep;
it still builds every reply). Two stages, each splitting its reply into up to 10 words (`split:
{parser: regex, max_items: 10}`; the simulated replies have about 20 words): n topics → about 10 n
subtopics → about 100 n questions in the last stage's rows.jsonl. The second stage dedups exactly (its
tables open across its shards). Peak RSS is the child's VmHWM (its own high-water mark) at the end:
Python, Prefect's client and task runner, our code, the rows it held; not the server or the Prefect
API, which are other processes. The run's exports (sft.jsonl / .parquet of the last stage's kept rows)
are part of the flow and counted.

What it holds (measured, issue 28): while shards are generated, the records of the shards in flight and
the child shards made ready by the parent shards that finished (the pool runs 3 shard tasks: up to
3 × 10 child shards of SHARD rows wait, deepest stage first; each waits as its rows' bytes,
flows/pipeline_stream.py `Waiting`); that plateaus once the input has a few parent shards and is lower
below (1 k: two parent shards, the queue never fills). At the end, the exports import pyarrow (a fixed
~40 MB, not per row). So "flat" compares sizes of at least FLAT_FROM_SHARDS parent shards; a smaller
size is shown, not compared.

    python -m benchmarks.run --only pipeline_rss                    (`make bench`: 1 k, 2 k, 5 k; 500 in shards of 10)
    python -m benchmarks.run --suite scale --only pipeline_rss      (`make bench-scale`: 10 k and 100 k)
"""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

from benchmarks.common import Cost, PrefectAPI, local_server, run_flow

FAN_OUT, TOKENS, SHARD, BATCH = 10, 24, 500, 128
PIPELINE = """\
input: {input}
servers:
  main: {{profile: attach}}
defaults:
  prompt_format: raw
  sampling: {{greedy: true, tokens_to_generate: {tokens}}}
  batch_size: {batch}
stages:
  - name: subtopics
    recipe: {{prompt_template: "Topic: {{{{ topic }}}}\\nSubtopics:"}}
    split: {{parser: regex, pattern: '(\\w+)', into: subtopic, max_items: {fan}}}
  - name: questions
    from: subtopics
    recipe: {{prompt_template: "Questions about {{{{ subtopic }}}} in {{{{ topic }}}}:"}}
    split: {{parser: regex, pattern: '(\\w+)', into: question, max_items: {fan}}}
    filters: {{dedup_exact: true}}
"""


def write_inputs(workdir: Path, n: int) -> Path:
    src = workdir / f"pipeline-rss-{n}.jsonl"
    with open(src, "w", encoding="utf-8") as f:
        for start in range(0, n, 10_000):
            f.write("".join(json.dumps({"id": f"t{i}", "topic": f"topic number {i}"}) + "\n"
                            for i in range(start, min(n, start + 10_000))))
    path = workdir / f"pipeline-rss-{n}.yaml"
    path.write_text(PIPELINE.format(input=src, tokens=TOKENS, batch=BATCH, fan=FAN_OUT))
    return path


def one(workdir: Path, api: PrefectAPI, srv, n: int, log, shard: int = SHARD) -> dict:
    tag = f"pipeline-rss-{n}" + (f"-shard{shard}" if shard != SHARD else "")
    path = write_inputs(workdir, n)
    env = {"NSDG_SERVER__URL": srv.url, "NSDG_WORK_DIR": str(workdir / ".nsdg")}
    params = {"pipeline": str(path), "run_id": tag, "output_uri": str(workdir / "out"), "shard_size": shard}
    run = run_flow(workdir, api, params, settings_env=env, tag=tag, rss_sample_s=0.5, timeout=3600, flow="pipeline")
    if not run.ok:
        raise RuntimeError(f"{tag} failed: {run.error}")
    manifest = json.loads(Path(run.result["manifest"]).read_text())
    stages = {s["stage"]: {k: s[k] for k in ("records_in", "rows_out", "kept", "rows")} for s in manifest["stages"]}
    shard_tasks = sum(len(json.loads((workdir / "out" / tag / "stages" / s / "manifest.json").read_text())["parts"])
                      for s in stages)
    r = {"records": n, "shard_size": shard, "shard_tasks": shard_tasks, "seconds": run.seconds, "maxrss_mb": run.maxrss_mb, "stages": stages,
         "final_rows": manifest["stages"][-1]["rows"], "generated": sum(s["rows_out"] for s in stages.values()),
         "rss_last_mb": run.extra["rss_samples"][-1][1] if run.extra.get("rss_samples") else None,
         "rss_median_mb": statistics.median(x[1] for x in run.extra["rss_samples"]) if run.extra.get("rss_samples") else None}
    log(f"pipeline rss {n} (shards of {shard}, {shard_tasks} shard tasks): {r['generated']} rows generated, "
        f"{r['final_rows']} rows at the end, {run.seconds:.1f} s, "
        f"peak RSS {run.maxrss_mb:.0f} MB")
    shutil.rmtree(workdir / "out" / tag, ignore_errors=True)
    return r


def run(workdir: Path, api: PrefectAPI, log, sizes=(1_000, 5_000), many_shards: tuple[int, int] | None = None) -> dict:
    """Each of `sizes` at shards of SHARD; `many_shards` (records, shard size): the smallest size's rows again
    in many small shards, so what grows with the number of shards shows apart from what grows with rows."""
    with local_server(workdir, "pipeline-rss-server", Cost()) as srv:
        out = {"sizes": {n: one(workdir, api, srv, n, log) for n in sizes}, "shard_size": SHARD, "fan_out": FAN_OUT}
        if many_shards:
            out["many_shards"] = one(workdir, api, srv, *many_shards[:1], log, shard=many_shards[1])
        return out


TARGET_MB, FLAT_MB = 300, 25  # flat: the largest size within this of the smallest compared
FLAT_FROM_SHARDS = 4  # sizes with fewer parent shards have not filled the pool's child queue: shown, not compared


def compared(sizes: list[dict]) -> list[dict]:
    """The sizes "flat" compares (sorted by records): those of at least FLAT_FROM_SHARDS parent shards,
    or all of them when fewer than two are (the quick suite's tiny inputs)."""
    past = [x for x in sizes if x["records"] >= FLAT_FROM_SHARDS * x.get("shard_size", SHARD)]
    return past if len(past) >= 2 else sizes


def summary_rows(res: dict) -> list[tuple[str, ...]]:
    """The summary table's row: (what, ours, baseline, target, met)."""
    if not (r := res.get("pipeline_rss")):
        return []
    sizes = sorted(r["sizes"].values(), key=lambda x: x["records"])
    lo, hi = compared(sizes)[0], sizes[-1]
    flat = hi["maxrss_mb"] - lo["maxrss_mb"] <= FLAT_MB
    return [("pipeline orchestrator peak RSS, 1 → 10 → 10 fan-out",
             ", ".join(f"{x['records']:,}: {x['maxrss_mb']:.0f} MB" for x in sizes), "—",
             f"flat, ≤ {TARGET_MB} MB at 100 k", f"≤ {TARGET_MB} MB: {_met(hi['maxrss_mb'] <= TARGET_MB)}; flat: "
             f"{_met(flat)} ({hi['maxrss_mb'] - lo['maxrss_mb']:+.0f} MB, {lo['records']:,} → {hi['records']:,})")]


def _mb(v: float | None) -> str:
    return "—" if v is None else f"{v:.0f} MB"


def _met(ok: bool) -> str:
    return "met" if ok else "**missed**"


def markdown(res: dict) -> list[str]:
    if not (r := res.get("pipeline_rss")):
        return []
    sizes = sorted(r["sizes"].values(), key=lambda x: x["records"])
    lo, hi = compared(sizes)[0], sizes[-1]
    flat = hi["maxrss_mb"] - lo["maxrss_mb"] <= FLAT_MB
    lines = ["", "### Pipeline orchestrator peak RSS, 1 → 10 → 10 fan-out (`benchmarks/pipeline_rss.py`)", "",
             f"The real pipeline flow in a fresh process, the simulated engine at zero cost; two stages each split a "
             f"reply into up to {r['fan_out']} rows; shards of {r['shard_size']}; the second stage dedups (exact). "
             "Peak RSS of the flow's process (VmHWM), exports included; median RSS: of its samples every 0.5 s "
             "(mostly the generation's plateau; the exports' pyarrow import comes at the end).", "",
             "| input records | shard size | shard tasks | rows generated | rows at the end (last stage's rows.jsonl) "
             "| wall | median RSS | peak RSS |", "|---|---|---|---|---|---|---|---|"]
    many = [r["many_shards"]] if r.get("many_shards") else []
    lines += [f"| {x['records']:,} | {x.get('shard_size', r['shard_size'])} | {x.get('shard_tasks', '—')} | "
              f"{x['generated']:,} | {x['final_rows']:,} | {x['seconds']:.0f} s | {_mb(x.get('rss_median_mb'))} | "
              f"{x['maxrss_mb']:.0f} MB |" for x in sizes + many]
    lines += ["", f"- {hi['records']:,} records: {hi['maxrss_mb']:.0f} MB vs {lo['maxrss_mb']:.0f} MB at "
              f"{lo['records']:,} (target ≤ {TARGET_MB} MB and flat, within {FLAT_MB} MB: "
              f"{_met(hi['maxrss_mb'] <= TARGET_MB and flat)})" + (
                  f"; flat compares sizes of at least {FLAT_FROM_SHARDS} parent shards (≥ "
                  f"{FLAT_FROM_SHARDS * r['shard_size']:,} records): below that the pool's queue of child shards never "
                  "fills" if lo is not sizes[0] else ""),
              *(f"- The same {m['records']:,} records in shards of {m['shard_size']} ({m.get('shard_tasks', '?')} shard "
                 f"tasks, against {same.get('shard_tasks', '?')}): {m['maxrss_mb']:.0f} MB, "
                 f"{m['maxrss_mb'] - same['maxrss_mb']:+.0f} MB: what grows with the number of shards alone"
                for m in many for same in [r["sizes"].get(m["records"]) or lo]),
              "- The target's size, 100 k records (10 M rows at the end), is in `make bench-scale`.",
              "", "Command: `python -m benchmarks.run --only pipeline_rss` (`make bench`), `--suite scale` for 100 k.", ""]
    return lines
