"""Run the `generate` flow (or `--flow pipeline`) once in this process and write what happened as JSON.

    python -m benchmarks.flow_child --params '{"input_uri": ...}' --out result.json

The process is started fresh by benchmarks.common.run_flow, so `maxrss_mb` (VmHWM, the high-water
mark of this process's own memory, at the end) is the peak resident set of the process that ran the flow: Python,
Prefect's client and task runner, our code and the records it held. It excludes the NeMo server
and the Prefect API server, which are other processes. Nothing is subtracted.
"""

from __future__ import annotations

import argparse
import json
import resource
import threading
import time
import traceback
from pathlib import Path


def peak_rss_mb() -> float:
    """This process's own peak RSS: VmHWM, the high-water mark of its own address space. Not getrusage's
    ru_maxrss: Linux keeps that across exec, so a child forked from a large process (the `make bench`
    driver, late in its run) reported the driver's size (446 MB for a flow whose RSS was 240-260 MB)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--rss-sample-s", type=float, default=0.0, help="also sample RSS with psutil every N s")
    ap.add_argument("--flow", choices=("generate", "pipeline"), default="generate", help="the flow to run")
    args = ap.parse_args()
    params = json.loads(args.params)

    if args.flow == "pipeline":  # imported before the clock starts
        from flows.pipeline import pipeline as flow
    else:
        from flows.generate import generate as flow

    samples: list[tuple[float, float]] = []
    done = threading.Event()
    if args.rss_sample_s:
        import psutil

        me = psutil.Process()

        def sample() -> None:
            while not done.wait(args.rss_sample_s):
                samples.append((time.time(), me.memory_info().rss / 2**20))

        threading.Thread(target=sample, daemon=True).start()

    started = time.monotonic()
    ok, result, error = True, None, None
    try:
        result = flow(**params)
    except BaseException as exc:  # reported, not raised: the parent decides what it means
        ok, error = False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-3000:]}"
    t_return = time.time()
    seconds = time.monotonic() - started
    done.set()
    maxrss_mb = peak_rss_mb()
    out = {"ok": ok, "seconds": seconds, "result": result, "error": error, "maxrss_mb": maxrss_mb,
           "t_return": t_return, "extra": {"rss_samples": samples[-400:]}}
    with open(args.out, "w") as f:
        json.dump(out, f, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
