"""Every benchmark of a suite in one go; writes results.md and results.json from what this one run
measured (nothing merged by hand, every ratio from figures taken side by side in the run).

    python -m benchmarks.run                       (`make bench`: benchmarks/results.md, about 25 min)
    python -m benchmarks.run --suite scale         (`make bench-scale`: benchmarks/results-scale.md, 1 M runs)
    python -m benchmarks.run --suite quick --out /tmp/q.md     (tiny sizes, a minute: the test's run)
    python -m benchmarks.run --out /tmp/r.md --only busy,readiness

What each suite runs and at which sizes: benchmarks/suites.py. Needs the local Slurm cluster for the
Slurm figures (`make slurm-up`); without it those sections say "not run". Starts its own Prefect API
(`prefect server start`, PREFECT_HOME in a temp dir, SQLite, analytics off) and never touches
~/.prefect. Timings are never asserted here or in tests: this writes them down.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path

from benchmarks import batching, curation, engines, recipes, replicas, rollover
from benchmarks import pipeline as pipeline_bench
from benchmarks import pipeline_rss
from benchmarks import slurm as slurm_bench
from benchmarks import tokens as tokens_bench
from benchmarks.common import COMMANDS, cpu_probe, machine, prefect_api, stock_server_has_nodelay, tempdir
from benchmarks.suites import OUT, SUITES, sections


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=sorted(SUITES), default="bench", help="which sections, at which sizes")
    ap.add_argument("--out", type=Path, help="where to write the results (default: the suite's file in benchmarks/)")
    ap.add_argument("--only", help="comma-separated subset of the suite's sections")
    ap.add_argument("--keep", action="store_true", help="keep the temp work dir (logs, stats files, outputs)")
    args = ap.parse_args(argv)
    suite = list(SUITES[args.suite])
    only = [x.strip() for x in args.only.split(",") if x.strip()] if args.only else suite
    unknown = set(only) - set(suite)
    if unknown:
        ap.error(f"unknown section(s) {sorted(unknown)} for suite {args.suite}; choose from {', '.join(suite)}")
    out_md = args.out or OUT[args.suite]

    # SIGTERM unwinds like Ctrl-C, so every server and flow child started so far is stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    workdir = tempdir("nsdg-bench-")
    started = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - started:7.1f} s] {msg}", flush=True)

    res: dict = {"suite": args.suite, "sections": suite, "only": only, "machine": machine(),
                 "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                 "argv": [sys.executable, "-m", "benchmarks.run", *(argv if argv is not None else sys.argv[1:])],
                 "workdir": str(workdir), "stock_nodelay": stock_server_has_nodelay(), "sections_s": {}, "not_run": {}}
    have_slurm = slurm_bench.slurm_up()
    res["slurm_up"] = have_slurm
    res["cpu_probe_s"] = {"start": cpu_probe()}  # how fast the machine is now (and again at the end)
    log(f"suite {args.suite}, work dir {workdir}; Slurm {'up' if have_slurm else 'NOT reachable: Slurm figures skipped'}")
    try:
        with prefect_api(workdir) as api:
            log(f"Prefect API at {api.url}")
            todo = sections(args.suite, workdir, api, log, res, have_slurm)
            for name in only:
                fn = todo[name]
                if fn is None:
                    res["not_run"][name] = "the local Slurm cluster does not answer (make slurm-up)"
                    continue
                t = time.monotonic()
                log(f"--- {name}")
                res[name] = fn()
                res["sections_s"][name] = time.monotonic() - t
    finally:
        res["total_s"] = time.monotonic() - started
        res["cpu_probe_s"]["end"] = cpu_probe()
        res["loadavg"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
        res["commands"] = [(tag, env, argv) for tag, env, argv in COMMANDS]
        (workdir / "results.json").write_text(json.dumps(res, indent=1, default=str))
        log(f"raw results: {workdir / 'results.json'}")
    for name in suite:
        if name not in only:
            res["not_run"][name] = "left out by --only"
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str))
    out_md.write_text(render(res))
    log(f"wrote {out_md} and {out_md.with_suffix('.json').name} ({res['total_s'] / 60:.1f} min in all)")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


# --------------------------------------------------------------------------- results.md


def _f(x, digits=2, unit="") -> str:
    if x is None:
        return "not run"
    if isinstance(x, float):
        return f"{x:,.{digits}f}{unit}"
    return f"{x}{unit}"


def _met(ok: bool | None) -> str:
    return "—" if ok is None else ("met" if ok else "**missed**")


def render(r: dict) -> str:
    m = r["machine"]
    L: list[str] = []
    make = {"bench": "make bench", "scale": "make bench-scale"}.get(r["suite"], f"the {r['suite']} suite")
    title = {"bench": "the GPUs never wait on the orchestrator", "scale": "the large runs"}.get(r["suite"], "quick check")
    L += [f"# Benchmarks: {title}", "",
          f"Written whole by `{make}` (`python {' '.join(shlex.quote(a) for a in r['argv'][1:])}`) from the numbers it "
          "measured in this one run; nothing here is edited by hand, and every ratio compares figures measured side "
          f"by side in it. Raw numbers: `{'results' if r['suite'] == 'bench' else 'results-' + r['suite']}.json` "
          "beside this file.", "",
          "## Machine", "",
          f"- date: {r['date']}", f"- git commit: {m['commit']}",
          f"- CPU: {m['cpu']}, nproc {m['nproc']}; memory {m['memory']}; kernel {m['kernel']}",
          f"- Python {m['python']}, Prefect {m['prefect']}",
          f"- total wall time of the benchmark: {r['total_s'] / 60:.1f} min "
          f"({', '.join(f'{k} {v:.0f} s' for k, v in r['sections_s'].items())})",
          f"- Slurm: {'the local 2-node cluster (infra/cluster)' if r.get('slurm_up') else 'not reachable; Slurm rows not run'}",
          f"- load average at the end (1, 5, 15 min): {r.get('loadavg', 'unknown')}",
          _probe_line(r.get("cpu_probe_s") or {})]
    L += [f"- section not run: {name} ({why})" for name, why in r.get("not_run", {}).items()] + [""]
    L += _summary(r)
    L += _details(r)
    L += _commands(r)
    return "\n".join(L) + "\n"


def _probe_line(p: dict) -> str:
    at = ", ".join(f"{p[k]:.3f} s at the {k}" for k in ("start", "end") if k in p) or "not taken"
    return ("- CPU probe (`benchmarks.common.cpu_probe`: a fixed pure-Python workload, 20,000 JSON lines dumped, parsed, "
            f"their words counted, hashed; lower is faster): {at}. A record of the machine, not a correction: the same "
            "code has run 1.5x slower here from one run to the next, and the flows' figures (processes sharing the 2 "
            "cores) have not followed the probe; compare absolute figures (records/s, seconds) only of runs measured "
            "side by side")


def _summary(r: dict) -> list[str]:
    rows = []
    b = r.get("busy", {})
    for case, target in (("short", 0.97), ("long", 0.99)):
        c = b.get(case)
        if c:
            rows.append((f"server busy fraction, {case} batches (≈{c['batch_latency_s']:.2f} s per batch of 32)",
                         _f(c["ours_busy_median"], 4), _f(c["seed_busy_median"], 4) + " (seed-style)",
                         f"≥ {target}", _met(c["ours_busy_median"] >= target)))
    for case in ("short", "long"):
        c = b.get(case)
        if c:
            rows.append((f"records/s, {case} batches", _f(c["ours_rps_median"], 1), _f(c["seed_rps_median"], 2) + " (seed-style)",
                         "ours ÷ seed", f"×{c['ratio_median']:.1f}"))
    if r.get("batching"):
        rows += batching.summary_rows(r["batching"])
    rd = r.get("readiness")
    if rd:
        rows.append(("port open → first generation request (local backend)", f"{rd['ours_median_s']:.2f} s (max {rd['ours_max_s']:.2f})",
                     f"{rd['seed_median_s']:.1f} s (seed loop, run)", "≤ 1 s", _met(rd["ours_max_s"] <= 1.0)))
    s = r.get("slurm")
    if s:
        rows.append(("Slurm: port open → first generation request (whole flow)", _f(s["port_to_probe_s"], 2, " s"),
                     "≈10 s (seed loop)", "≤ 1 s", _met(s["port_to_probe_s"] is not None and s["port_to_probe_s"] <= 1)))
        for key, name in (("scancel_to_raise_s", "Slurm: scancel from outside → flow stops"),
                          ("crash_to_raise_s", "Slurm: server process exits → flow stops")):
            rows.append((name, _f(s[key], 2, " s"), "not noticed: the seed has no orchestrator", "≤ 5 s",
                         _met(s[key] is not None and s[key] <= 5)))
        rows.append(("Slurm: last reply → job gone from squeue", _f(s["last_reply_to_gone_s"], 2, " s"),
                     "seed: `kill -9` + `pkill python` on the first node only; the other node's ranks wait in NCCL (5 h timeout) or until --time", "≤ 5 s",
                     _met(s["last_reply_to_gone_s"] is not None and s["last_reply_to_gone_s"] <= 5)))
    sc = r.get("scale")
    if sc:
        sizes = sc["sizes"]
        rss = ", ".join(f"{int(n) // 1000:,} k: {v['maxrss_mb']:.0f} MB" for n, v in sizes.items())
        big = sizes.get(1_000_000) or sizes.get("1000000")
        mid = sizes.get(100_000) or sizes.get("100000")
        if big and mid:
            growth = big["maxrss_mb"] - mid["maxrss_mb"]
            verdict = (f"≤ 300 MB: {_met(big['maxrss_mb'] <= 300)}; flat: "
                       f"{_met(growth <= 0.1 * mid['maxrss_mb'])} (+{growth:.0f} MB from 100 k to 1 M)")
        else:
            verdict = "1 M not run"
        rows.append(("orchestrator peak RSS (flow process), input with its own ids", rss, "—", "flat, ≤ 300 MB at 1 M", verdict))
        noid = sc.get("no_id")
        if noid and mid:
            growth = noid["maxrss_mb"] - mid["maxrss_mb"]
            rows.append(("… 1 M records without an id field (ids derived)", f"{noid['maxrss_mb']:.0f} MB", "—",
                         "flat, ≤ 300 MB at 1 M", f"≤ 300 MB: {_met(noid['maxrss_mb'] <= 300)}; flat: "
                         f"{_met(growth <= 0.1 * mid['maxrss_mb'])} ({growth:+.0f} MB vs 100 k with ids)"))
        rows.append((f"orchestrator ceiling, zero-cost engine (whole flow, {int(sc.get('ceiling_records', 100_000)):,} records)", f"{sc['ceiling_median']:,.0f} rec/s",
                     "—", "≥ 5,000 rec/s", _met(sc["ceiling_median"] >= 5000)))
        if big:
            rows.append(("… the same at 1 M records", f"{big['records_per_s']:,.0f} rec/s", "—", "≥ 5,000 rec/s",
                         _met(big["records_per_s"] >= 5000)))
        rr = sc["rerun"]
        rows.append((f"rerun of a finished {rr['records']:,}-record run", f"{rr['seconds']:.2f} s, {rr['allocations']} allocations, {rr.get('requests', '—')} requests",
                     "seed: regenerates everything", "≤ 10 s, 0", _met(rr["seconds"] <= 10 and rr["allocations"] == 0)))
    rows += tokens_bench.summary_rows(r)
    rows += pipeline_rss.summary_rows(r)
    if r.get("recipes"):
        rows += recipes.summary_rows(r["recipes"], _met)
    if r.get("curation"):
        rows += curation.summary_rows(r["curation"], _met)
    if r.get("engines"):
        rows += engines.summary_rows(r["engines"], r.get("busy"), _met)
    L = ["## Results", "", "| figure | ours | baseline | target | |", "|---|---|---|---|---|"]
    L += [f"| {' | '.join(row)} |" for row in rows]
    L += ["", "Medians of the repeated runs listed under each section; ratios come from runs measured side by side.", ""]
    return L


def _details(r: dict) -> list[str]:
    L: list[str] = []
    n = r.get("nagle")
    launcher = ("the stock `python -m infra.local_server`" if r["stock_nodelay"] else
                "`benchmarks/server_nodelay.py`: the stock server with `GenerateHandler.disable_nagle_algorithm = True`, "
                "because the stock handler does not set it yet")
    L += ["## How each figure was measured", "",
          f"**The server.** Every figure drives the project's NeMo-compatible server (`infra/local_server`, "
          f"simulated engine, one generation at a time behind its FIFO lock, `--stats-file` appending each "
          f"generation's start and end). Launcher: {launcher}."]
    if n and n["stock_has_nodelay"]:
        L += [f"The stock handler sets TCP_NODELAY: a zero-cost batch of 32 takes {n['stock_ms']:.1f} ms per round "
              "trip (without it, Nagle's algorithm and the client's delayed ACK added ~40 ms to every reply)."]
    elif n:
        L += [f"Measured here: a zero-cost batch of 32 takes {n['stock_ms']:.1f} ms per round trip on the stock "
              f"server and {n['nodelay_ms']:.1f} ms with TCP_NODELAY: the stock handler writes headers and body in "
              "two `send()` calls, and Nagle's algorithm holds the body until the client's delayed ACK (~40 ms). "
              "That stall belongs to the stand-in, not to the orchestrator."]
    L += [""]
    b = r.get("busy")
    if b:
        L += ["### Server busy fraction and records/s (`benchmarks/busy.py`)", "",
              "Busy fraction = Σ(end − start) of the server's generations ÷ (last reply's end − first request's "
              "start), from its stats file; the flow's 1-token readiness probe is left out. **Ours**: the real "
              "`generate` flow in a child process, `attach` profile pointed at the server (allocation is the only "
              "step `attach` skips), batch_size 32 (pinned for the seed comparison; the flow's default is now 128), "
              "`server.max_in_flight` 2, a small shard_size so the run crosses "
              "several shard boundaries (the worst case for gaps). **Seed-style**: call_server.py's loop, one prompt "
              "per `requests.put(..., data=json.dumps(data))`, no session, sequential, the same sampling values. "
              "Cost model: PLANNING_340B_TP8_PP2's shape (prefill 2e-4 s/token, decode step 0.05 s, batch slope "
              "0.004), tokens_to_generate 88, ×0.1 for short and ×1 for long.", "",
              "| case | batch latency (ours, 32 rows) | request latency (seed, 1 row) | ours busy (each run) | seed busy (each run) | ours rec/s | seed rec/s | ratio (each run) | ours: records, shard_size, largest gap |",
              "|---|---|---|---|---|---|---|---|---|"]
        for case, c in b.items():
            L.append(f"| {case} | {c['batch_latency_s']:.3f} s | {c['seed_request_latency_s']:.3f} s | "
                     f"{', '.join(f'{x:.4f}' for x in c['ours_busy'])} | {', '.join(f'{x:.4f}' for x in c['seed_busy'])} | "
                     f"{c['ours_rps_median']:.1f} | {c['seed_rps_median']:.2f} | {', '.join(f'×{x:.1f}' for x in c['ratio_per_run'])} | "
                     f"{c['ours_records']}, {c['ours_shard_size']}, {c['ours_largest_gap_ms']:.0f} ms |")
        L += [""]
    if r.get("batching"):
        L += batching.markdown(r["batching"])
    rd = r.get("readiness")
    if rd:
        L += ["### Readiness (`benchmarks/readiness.py`)", "",
              "Port open = mtime of the port file the server writes right after binding (after `--load-delay`). "
              "First request = the first line of its stats file. **Ours**: `wait_until_ready` on a `LocalBackend` "
              f"(the code the flow's wait-until-ready task runs; poll every {rd['poll_s']} s), load delays 1.0–2.5 s "
              "to vary the phase; its first generation request is its 1-token probe. **Seed**: nemo_inference.sh's "
              "`depends_on` loop run as written (curl -X PUT every 10 s until curl exits 0, then `sleep 5`, then "
              "call_server.py's PUT), started with the server; expected 5 s + U(0, 10 s) = 10 s mean, 5–15 s. "
              "Three trials with load times 1.0, 4.3, 7.6 s.", "",
              f"- ours, port → first request: {', '.join(format(x['port_to_first_request_s'], '.3f') for x in rd['ours'])} s "
              f"(median {rd['ours_median_s']:.3f}); port → `wait_until_ready` returned: median {rd['ours_ready_return_median_s']:.3f} s",
              f"- seed, port → first request: {', '.join(f'{x:.2f}' for x in rd['seed_values_s'])} s (median {rd['seed_median_s']:.2f})", ""]
    s = r.get("slurm")
    if s:
        L += ["### On the local Slurm cluster (`benchmarks/slurm.py`)", "",
              "The seed's job shape (2 nodes × 8 tasks = 16 ranks), runtime `none`, the server command replaced by "
              "the NeMo-compatible server (rank 0 serves, 15 ranks idle), `--load-delay 3`, ≈0.5 s batches, "
              "640 records in shards of 128, `max_server_restarts` 0. A thread polls `squeue` every 0.1 s. "
              "*scancel*: `scancel JOBID` from outside once 3 batches are done (server `--extra-latency 0.5`). "
              "*crash*: the server exits on its 5th request (`--fault-crash-after 4`); its exit time comes from "
              "the fault marker file it writes just before `os._exit(1)`. Death → flow stops = the flow child's "
              "`generate()` raising ServerLost (so it includes the release and Prefect's state updates).", "",
              "| run | port → probe | port → first batch | last reply → job gone | last reply → flow returned | death → flow raised | jobs left | other nsdg jobs on the cluster |",
              "|---|---|---|---|---|---|---|---|"]
        for scenario, runs in s["runs"].items():
            for i, x in enumerate(runs):
                L.append(f"| {scenario} #{i} | {_f(x.get('port_to_probe_s'), 2, ' s')} | {_f(x.get('port_to_first_batch_s'), 2, ' s')} | "
                         f"{_f(x.get('last_reply_to_gone_s'), 2, ' s') if scenario == 'ok' else '—'} | "
                         f"{_f(x.get('last_reply_to_flow_end_s'), 2, ' s') if scenario == 'ok' else '—'} | "
                         f"{_f(x.get('death_to_flow_raise_s'), 2, ' s') if scenario != 'ok' else '—'} | "
                         f"{len(x['jobs_left_in_squeue'])} | {', '.join(x.get('other_nsdg_jobs_seen', [])) or 'none'} |")
        L += [""]
    sc = r.get("scale")
    if sc:
        L += ["### Orchestrator scale (`benchmarks/scale.py`)", "",
              f"The real flow in a fresh child process, `attach` profile, zero-cost simulated engine (it still builds "
              f"every reply: {sc['tokens_to_generate']} pseudo-tokens per row with token ids and offsets), the flow's "
              "default batch_size (128), "
              f"max_in_flight 2, shard_size {sc['shard_size']} (250 shard task runs at 1 M). Peak RSS = the child's "
              "`getrusage(RUSAGE_SELF).ru_maxrss` at the end: the process that ran the flow (Python, Prefect's client, "
              "task runner and threads, our code and the records it held), without the NeMo server and the Prefect "
              "API server, which are other processes; nothing subtracted (importing Prefect alone is ~100 MB). "
              "Records/s = records ÷ the wall time of the whole `generate()` call (plan, readiness, generation, "
              "release, manifest), not counting interpreter start-up.", "",
              "| records | generate() wall | records/s (whole flow) | records/s (generation phase, manifest) | peak RSS | shards |",
              "|---|---|---|---|---|---|"]
        for n, v in sc["sizes"].items():
            L.append(f"| {int(n):,} | {v['seconds']:.1f} s | {v['records_per_s']:,.0f} | {v['generation_records_per_s']:,.0f} | "
                     f"{v['maxrss_mb']:.0f} MB | {v['shards']} |")
        if sc.get("no_id"):
            v = sc["no_id"]
            L.append(f"| {v['records']:,} without `id` | {v['seconds']:.1f} s | {v['records_per_s']:,.0f} | "
                     f"{v['generation_records_per_s']:,.0f} | {v['maxrss_mb']:.0f} MB | {v['shards']} |")
        L += ["", f"Ceiling runs at {int(sc.get('ceiling_records', 100_000)):,} records (whole flow): {', '.join(f'{x:,.0f}' for x in sc['ceiling_runs'])} rec/s, "
              f"median {sc['ceiling_median']:,.0f}; generation phase median {sc['ceiling_generation_median']:,.0f} rec/s.", ""]
        rr = sc["rerun"]
        L += [f"Rerun of the finished {rr['records']:,}-record run (same run_id and input, profile `{rr['profile']}`): "
              f"{rr['seconds']:.2f} s in `generate()` ({rr['child_process_s']:.1f} s including interpreter start-up "
              f"and imports); requests to the server: {rr.get('requests', '—')}, allocations: {rr['allocations']} (the "
              "same profile as the run: a run's served model is part of its config, so a rerun on another profile "
              "is refused).", ""]
    L += tokens_bench.markdown(r)
    if r.get("recipes"):
        L += recipes.detail_lines(r["recipes"])
    if r.get("curation"):
        L += curation.detail_lines(r["curation"])
    if r.get("replicas"):
        L += replicas.markdown(r["replicas"]["rows"]).splitlines()
    if r.get("engines"):
        L += engines.markdown(r["engines"], busy=r.get("busy")).splitlines()
    if r.get("rollover"):
        L += rollover.markdown(r["rollover"]["rows"]).splitlines()
    if r.get("pipeline"):
        L += pipeline_bench.markdown(r["pipeline"]["rows"]).splitlines()
    L += pipeline_rss.markdown(r)
    L += _findings(r)
    return L


def _findings(r: dict) -> list[str]:
    L = ["## Findings", ""]
    if r.get("batching"):
        L += batching.findings(r["batching"])
    sc = r.get("scale")
    if sc and sc["ceiling_median"] < 6000:
        L += [f"- **Orchestrator ceiling {'below' if sc['ceiling_median'] < 5000 else 'only just above'} 5,000 rec/s** "
              f"(median {sc['ceiling_median']:,.0f}; runs {', '.join(f'{x:,.0f}' for x in sc['ceiling_runs'])}): on 2 "
              "cores the flow process, the server and the Prefect API server share the CPU. Profile the flow process "
              "(cProfile) before tuning: Prefect's walk of task parameters and requests' per-request work were the "
              "biggest items last time (shards are now passed quoted, and the client's session ignores the environment)."]
    sizes = sc["sizes"] if sc else {}
    big, mid = sizes.get(1_000_000), sizes.get(100_000)
    if big and mid and big["maxrss_mb"] - mid["maxrss_mb"] > 0.1 * mid["maxrss_mb"]:
        growth = big["maxrss_mb"] - mid["maxrss_mb"]
        per_m = sc.get("id_set_mb_per_million")
        L += [f"- **Peak RSS not flat**: {mid['maxrss_mb']:.0f} MB at 100 k, {big['maxrss_mb']:.0f} MB at 1 M "
              f"(+{growth:.0f} MB); the psutil samples grow steadily through generation, with steps where a hash "
              "table doubles. The duplicate-id check (`RecordCheck.seen` in infra/planning.py: an `IdSet`, one "
              "64-bit digest per record whose input gives an id in a scratch SQLite file with an 8 MB page cache, "
              "built in the plan only) costs "
              + (f"{per_m:.0f} MB per million records (measured in this run: a set of 1 M such ints), so "
                 f"≈ {per_m * 0.9:.0f} MB of the +{growth:.0f} MB; the remaining ≈ {growth - per_m * 0.9:.0f} MB "
                 "is not attributed." if per_m else "memory linear in the record count.")
              + (f" Without an id field the same 1 M records peak at {sc['no_id']['maxrss_mb']:.0f} MB."
                 if sc.get("no_id") else "")]
    b = r.get("busy", {})
    for case, target in (("short", 0.97), ("long", 0.99)):
        c = b.get(case)
        if c and c["ours_busy_median"] < target:
            L += [f"- **Busy fraction, {case}: {c['ours_busy_median']:.4f} < {target}.** Largest gap "
                  f"{c['ours_largest_gap_ms']:.0f} ms. At a shard boundary only one request is in flight until the "
                  "flow has collected the finished shard, updated the progress artifact (a synchronous Prefect API "
                  "call, 0.1–0.9 s on SQLite under load) and submitted the next shard task."]
    if not r["stock_nodelay"]:
        L += ["- The stock local server stalls ~40 ms on every reply (Nagle + delayed ACK, measured above); the "
              "figures here used `benchmarks/server_nodelay.py`, which only sets `disable_nagle_algorithm = True`."]
    L += tokens_bench.findings(r)
    L += recipes.findings(r)
    if len(L) == 2:
        L += ["- Every target above is met."]
    return L + [""]


def _commands(r: dict) -> list[str]:
    L = ["## Commands", "", "```", " ".join(shlex.quote(a) for a in r["argv"]), "```", "",
         "Each process the benchmark started (one per kind; temp paths are this run's; settings that reach "
         "`load_settings()` are shown as environment variables; every flow child also gets `PREFECT_API_URL` of the "
         "benchmark's own `prefect server start` and `PREFECT_HOME` in the work dir):", "", "```"]
    seen = set()
    for tag, env, argv in r.get("commands", []):
        kind = re.sub(r"-\d(?=$| )", "", tag)  # one command per kind, not per repeat
        if kind in seen:
            continue
        seen.add(kind)
        env_s = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        L.append(f"# {tag}")
        L.append((env_s + " " if env_s else "") + " ".join(shlex.quote(a) for a in argv))
    L += ["```", "", "The seed's readiness loop (`SEED_LOOP` in `benchmarks/readiness.py`) is nemo_inference.sh's "
          "`depends_on` + `sleep 5` + call_server.py's PUT, verbatim apart from the host and port.", ""]
    return L


if __name__ == "__main__":
    raise SystemExit(main())
