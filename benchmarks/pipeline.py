"""A 3-stage pipeline on one allocation vs the same three stages as three chained runs (issue 24), with a
simulated 340B, side by side in one run:

- pipeline: `run --pipeline` (the real flow, in process): one allocation, one model load, the stages
  streamed (flows/pipeline_stream.py);
- chained:  three one-stage pipelines, each reading the previous one's `rows.jsonl`: what a user does
  without pipelines, an allocation (a queue wait and a load) per stage.

The model of a 340B on h100x16 (16 GPUs), time scaled 1 s here = 1 min there:
- load: `LOAD_S` (the local simulated server sleeps that long before it binds: `--load-delay`), held
  and paid for, like a real model load (tens of minutes for 340B on 16 GPUs);
- queue wait: `QUEUE_S` per allocation, *not* simulated by a process: a pending job holds no GPU, so it
  adds only to wall time (`wall + QUEUE_S x allocations`);
- generation: `LATENCY_S` per request of `BATCH` prompts (`--extra-latency`).
GPU-hours = 16 x seconds held / 3600 (in scaled units). Held but not generating = held - busy (loads,
idle at stage boundaries, release). Busy fraction across the stage boundaries = the union of every
shard's time in flight / the time from the first shard's start to the last one's end (over the three
runs for the chained ones: their loads between stages count as not busy).

    python -m benchmarks.pipeline --out benchmarks/results.md --append
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import in_process_api, section_main
from benchmarks.faults import environment, local_env
from infra.backends.rollover import busy_s

LOAD_S, QUEUE_S, LATENCY_S, GPUS = 10.0, 10.0, 0.2, 16
RECORDS, BATCH, SHARD = 48, 4, 8
STAGES = """\
  - name: words
    {source}
    recipe: {{prompt_template: "Topic: {{{{ topic }}}}\\nWords:"}}
    split: {{parser: regex, pattern: '(\\S+)', into: word, max_items: 2}}
  - name: facts
    {from_words}
    recipe: {{prompt_template: "About {{{{ word }}}} ({{{{ topic }}}}):"}}
  - name: notes
    {from_facts}
    recipe: {{prompt_template: "Note on {{{{ word }}}}: {{{{ completion }}}}\\n"}}
"""
HEAD = """\
input: {input}
servers:
  main: {{profile: local}}
defaults:
  prompt_format: raw
  sampling: {{temperature: 0.8, random_seed: 5, tokens_to_generate: 8}}
  batch_size: {batch}
stages:
"""


def stage_text(name: str, source: str) -> str:
    """One stage of STAGES, reading `source` (a `from:` or an `input:` line)."""
    blocks = STAGES.split("  - name: ")[1:]
    block = next(b for b in blocks if b.startswith(name))
    return "  - name: " + block.format(source=source, from_words=source, from_facts=source)


def write_files(tmp: Path) -> None:
    (tmp / "topics.jsonl").write_text("".join(json.dumps({"id": f"t{i}", "topic": f"topic {i}"}) + "\n"
                                              for i in range(RECORDS)))
    head = HEAD.format(input="topics.jsonl", batch=BATCH)
    whole = head + stage_text("words", "input: topics.jsonl").replace("    input: topics.jsonl\n", "") \
        + stage_text("facts", "from: words") + stage_text("notes", "from: facts")
    (tmp / "pipeline.yaml").write_text(whole)


def run_pipeline(tmp: Path, path: Path, run_id: str, replicas: int) -> dict:
    from flows.pipeline import pipeline

    env = local_env(tmp, "--load-delay", str(LOAD_S), "--extra-latency", str(LATENCY_S))
    with environment({**env, "NSDG_SERVER__READY_TIMEOUT_S": "300"}):
        t0 = time.time()
        result = pipeline(pipeline=str(path), run_id=run_id, output_uri=str(tmp / "out"), replicas=replicas,
                          shard_size=SHARD)
        wall = time.time() - t0
    manifest = json.loads(Path(result["manifest"]).read_text())
    spans = [(p["started_at"], p["finished_at"]) for s in manifest["stages"]
             for p in json.loads(Path(s["manifest"]).read_text())["parts"]]
    return {"wall_s": wall, "manifest": manifest, "spans": spans}


def figures(name: str, runs: list[dict], replicas: int) -> dict:
    held = sum(r["manifest"]["allocation"]["held_s"] for r in runs)
    busy = sum(rep["busy_s"] for r in runs for rep in r["manifest"]["allocation"]["replicas"])  # each replica's
    spans = [s for r in runs for s in r["spans"]]
    window = max(b for _, b in spans) - min(a for a, _ in spans)
    allocations = sum(r["manifest"]["server_launches"] for r in runs)
    wall = sum(r["wall_s"] for r in runs)
    return {"scenario": name, "replicas": replicas, "allocations": allocations, "loads": allocations,
            "wall_s": wall, # replicas queue side by side: one wait per round of allocations
            "wall_with_queue_s": wall + QUEUE_S * allocations / replicas,
            "gpu_h_held": GPUS * held / 3600, "gpu_h_not_generating": GPUS * max(0.0, held - busy) / 3600,
            "busy_fraction": busy_s(spans) / window if window > 0 else None,
            "rows": runs[-1]["manifest"]["stages"][-1]["rows_out"],
            "stages": {s["stage"]: {k: s[k] for k in ("records_in", "rows_out", "kept", "busy_s", "held_s")}
                       for r in runs for s in r["manifest"]["stages"]}}


def measure(api_url: str | None = None) -> list[dict]:
    """The figures' rows; the flows run in this process against `api_url` (the bench's own API), or a harness."""
    rows = []
    with in_process_api(api_url), tempfile.TemporaryDirectory(prefix="nsdg-pipeline-") as t:
        tmp = Path(t)
        write_files(tmp)
        rows.append(figures("pipeline", [run_pipeline(tmp, tmp / "pipeline.yaml", "one", 1)], 1))
        runs, source = [], "input: topics.jsonl"
        for name in ("words", "facts", "notes"):
            path = tmp / f"chain-{name}.yaml"
            path.write_text(HEAD.format(input="topics.jsonl", batch=BATCH) + stage_text(name, source))
            runs.append(run_pipeline(tmp, path, f"chain-{name}", 1))
            source = f"input: {tmp / 'out' / f'chain-{name}' / 'stages' / name / 'rows.jsonl'}"
        rows.append(figures("chained runs", runs, 1))
        rows.append(figures("pipeline", [run_pipeline(tmp, tmp / "pipeline.yaml", "four", 4)], 4))
    return rows


def markdown(rows: list[dict]) -> str:
    one, chained = rows[0], rows[1]
    ratio = one["gpu_h_not_generating"] / chained["gpu_h_not_generating"] if chained["gpu_h_not_generating"] else None
    lines = [
        "", "## A 3-stage pipeline on one allocation vs three chained runs (`benchmarks/pipeline.py`)", "",
        f"The real pipeline flow on the local simulated server, modelling a 340B on 16 GPUs with time scaled 1 s = "
        f"1 min: a {LOAD_S:.0f} s model load (`--load-delay`, held and paid for), a {QUEUE_S:.0f} s queue wait per "
        f"allocation (added to wall time only: a pending job holds no GPU), {LATENCY_S} s per request of {BATCH}. "
        f"{RECORDS} topics → words (split, up to 2 per reply) → facts → notes, shards of {SHARD}. Chained = three "
        "one-stage pipelines, each reading the previous one's rows.jsonl (an allocation and a load per stage). "
        "Not generating = held − busy (loads, idle at stage boundaries, release). Busy across the stage boundaries = "
        "the union of all shards' time in flight (sent, computing or queued at the server) / first shard's start → last "
        "shard's end. The saving scales with the loads avoided, not the work: this pipeline generates for seconds "
        "against a 10 s load; a longer one dilutes both columns.", "",
        "| scenario | replicas | allocations (loads) | wall | wall + queue waits | GPU-h held | GPU-h held, not "
        "generating | busy fraction across stage boundaries | rows |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['scenario']} | {r['replicas']} | {r['allocations']} | {r['wall_s']:.0f} s | "
                     f"{r['wall_with_queue_s']:.0f} s | {r['gpu_h_held']:.3f} | {r['gpu_h_not_generating']:.3f} | "
                     f"{r['busy_fraction']:.3f} | {r['rows']} |")
    met = lambda ok: "met" if ok else "**missed**"  # noqa: E731
    four = rows[2]
    lines += ["",
              f"- held-not-generating, pipeline ÷ chained: {ratio:.2f} (target ≤ 0.4: {met(ratio is not None and ratio <= 0.4)})",
              f"- wall time saved with the queue waits: {chained['wall_with_queue_s'] - one['wall_with_queue_s']:.0f} s "
              f"(target ≥ the two queue waits saved, {2 * QUEUE_S:.0f} s: "
              f"{met(chained['wall_with_queue_s'] - one['wall_with_queue_s'] >= 2 * QUEUE_S)})",
              f"- busy fraction across stage boundaries: {one['busy_fraction']:.3f} with 1 replica (target ≥ 0.95: "
              f"{met(one['busy_fraction'] >= 0.95)}), {four['busy_fraction']:.3f} with 4 (target ≥ 0.9: "
              f"{met(four['busy_fraction'] >= 0.9)})",
              "", "Command: `make bench` (its `pipeline` section), or alone `python -m benchmarks.pipeline --out FILE`.",
              ""]
    return "\n".join(lines)


def section() -> str:
    rows = measure()
    print(json.dumps(rows, indent=1, default=str), file=sys.stderr)
    return markdown(rows)


def main(argv: list[str] | None = None) -> int:
    return section_main("benchmarks.pipeline", __doc__, section, argv)


if __name__ == "__main__":
    sys.exit(main())
