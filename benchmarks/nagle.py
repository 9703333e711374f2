"""Reply latency of the stock local server vs the same server with TCP_NODELAY.

A zero-cost batch of 32 prompts (16 tokens each), 60 requests one after another on one
keep-alive connection (NemoClient): the median round trip shows the ~40 ms that Nagle's
algorithm plus the client's delayed ACK add to every reply of the stock handler, which writes
headers and body in two send() calls. Diagnostic for the stand-in server only.
"""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks.common import Cost, local_server, median, stock_server_has_nodelay


def round_trips(workdir: Path, stock: bool, n: int = 60) -> float:
    from infra.backends.ready import make_client
    from infra.prompting.sampling import SamplingParams
    from infra.settings import load_settings

    with local_server(workdir, f"nagle-{'stock' if stock else 'nodelay'}", Cost(), stock=stock) as srv:
        client = make_client(load_settings(), srv.url)
        sampling = SamplingParams(tokens_to_generate=16, greedy=True)
        prompts = [f"Prompt number {i}: write one sentence about data." for i in range(32)]
        client.generate(prompts, sampling)  # connect
        times = []
        for _ in range(n):
            t = time.perf_counter()
            client.generate(prompts, sampling)
            times.append(time.perf_counter() - t)
    return median(times)


def run(workdir: Path, log) -> dict:
    stock = round_trips(workdir, stock=True)
    nodelay = round_trips(workdir, stock=False)
    log(f"nagle: zero-cost batch-32 round trip {stock * 1000:.1f} ms stock, {nodelay * 1000:.1f} ms with TCP_NODELAY")
    return {"stock_ms": stock * 1000, "nodelay_ms": nodelay * 1000, "stock_has_nodelay": stock_server_has_nodelay()}
