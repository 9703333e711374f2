"""Readiness: seconds from the server's port opening to the first generation request.

The port opens when the server binds after `--load-delay` (its model load); it writes the
port file right after binding, so the port file's mtime is the port-open time. The first
generation request's arrival is the first line of the server's stats file (its start time).

- ours: `infra.backends.ready.wait_until_ready` on a `LocalBackend` (the code the flow's
  wait-until-ready task runs), default `server.ready_poll_s`. Its first generation request is
  its 1-token readiness probe. (The Slurm benchmark measures the same through the whole flow.)
- seed: nemo_inference.sh run as written: `depends_on` (curl -X PUT every 10 s until curl
  exits 0), then `sleep 5`, then call_server.py's PUT /generate. Started together with the
  server, as the seed starts both at once. Its expected delay is 5 s + U(0, 10 s) = 10 s
  mean (5–15 s); three trials with different load times sample that range.
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

from benchmarks.common import PY, Cost, base_env, median, note_command, read_stats, server_argv, stop, wait_for

SEED_LOOP = r"""
HOST=127.0.0.1; PORT=$1; PY=$2
depends_on () {
    HOST=$1
    PORT=$2
    STATUS=$(curl -X PUT http://$HOST:$PORT >/dev/null 2>/dev/null; echo $?)
    while [ $STATUS -ne 0 ]
    do
         echo "waiting for server ($HOST:$PORT) to be up"
         sleep 10
         STATUS=$(curl -X PUT http://$HOST:$PORT >/dev/null 2>/dev/null; echo $?)
    done
    echo "server ($HOST:$PORT) is up running"
}
depends_on "$HOST" "$PORT"
echo "start get json"
sleep 5
"$PY" -c '
import json, sys, requests
headers = {"Content-Type": "application/json"}
data = {"sentences": ["Write a poem on NVIDIA in the style of Shakespeare"], "tokens_to_generate": 8,
        "temperature": 1.0, "add_BOS": False, "top_k": 0, "top_p": 1.0, "greedy": True, "all_probs": False,
        "repetition_penalty": 1.0, "min_tokens_to_generate": 1, "end_strings": ["<|endoftext|>"]}
requests.put(f"http://127.0.0.1:{sys.argv[1]}/generate", data=json.dumps(data), headers=headers)
' "$PORT"
"""


def ours_once(workdir: Path, rep: int, load_delay: float) -> dict:
    from infra.backends.local import LocalBackend
    from infra.backends.ready import wait_until_ready
    from infra.settings import load_settings

    d = workdir / f"ready-ours-{rep}"
    d.mkdir(parents=True, exist_ok=True)
    stats = d / "stats.jsonl"
    settings = load_settings(work_dir=str(d / ".nsdg"), local={"engine": "simulated"})
    backend = LocalBackend(settings, f"ready-{rep}", extra_args=["--load-delay", str(load_delay), "--stats-file", str(stats)])
    note_command(f"ready-ours-{rep} (LocalBackend, then wait_until_ready)", backend.argv())
    try:
        t0 = time.time()
        backend.start()
        wait_until_ready(backend, settings, timeout=60)
        t_ready = time.time()
        t_port = backend.port_file.stat().st_mtime
        first = read_stats(stats)[0]["start"]
    finally:
        backend.release()
    return {"port_to_first_request_s": first - t_port, "port_to_ready_return_s": t_ready - t_port,
            "start_to_port_s": t_port - t0, "poll_s": settings.server.ready_poll_s}


def seed_once(workdir: Path, rep: int, load_delay: float, port: int) -> dict:
    d = workdir / f"ready-seed-{rep}"
    d.mkdir(parents=True, exist_ok=True)
    port_file, stats = d / "port", d / "stats.jsonl"
    argv = server_argv(port_file, stats, Cost(), port=port, extra=["--load-delay", str(load_delay)])
    log = open(d / "server.log", "wb")
    note_command(f"ready-seed-{rep} server", argv)
    note_command(f"ready-seed-{rep} seed loop (SEED_LOOP in benchmarks/readiness.py)", ["bash", "-c", "$SEED_LOOP", "seed", str(port), PY])
    server = subprocess.Popen(argv, env=base_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    seed = subprocess.Popen(["bash", "-c", SEED_LOOP, "seed", str(port), PY], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, env=base_env())
    try:
        seed.wait(timeout=60)
        wait_for(lambda: read_stats(stats), 10, "the seed's first request")
        t_port = port_file.stat().st_mtime
        first = read_stats(stats)[0]["start"]
    finally:
        stop(seed)
        stop(server)
        log.close()
    return {"port_to_first_request_s": first - t_port, "load_delay_s": load_delay}


def run(workdir: Path, log, repeats: int = 5) -> dict:
    from benchmarks.common import free_port

    ours = []
    for rep in range(repeats):
        r = ours_once(workdir, rep, load_delay=1.0 + 0.37 * rep)  # vary the phase against the poll
        ours.append(r)
        log(f"readiness ours #{rep}: port→first request {r['port_to_first_request_s']:.3f} s, "
            f"port→wait_until_ready returned {r['port_to_ready_return_s']:.3f} s")
    # Three seed trials at once (they mostly sleep): load times spread over the 10 s poll.
    seeds: list[dict] = [None] * 3  # type: ignore[list-item]

    def trial(i: int, delay: float) -> None:
        seeds[i] = seed_once(workdir, i, delay, free_port())

    threads = [threading.Thread(target=trial, args=(i, delay)) for i, delay in enumerate((1.0, 4.3, 7.6))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    seeds = [s for s in seeds if s]
    for i, s in enumerate(seeds):
        log(f"readiness seed #{i} (load {s['load_delay_s']} s): port→first request {s['port_to_first_request_s']:.2f} s")
    return {
        "ours": ours, "seed": seeds,
        "ours_median_s": median([r["port_to_first_request_s"] for r in ours]),
        "ours_max_s": max(r["port_to_first_request_s"] for r in ours),
        "ours_ready_return_median_s": median([r["port_to_ready_return_s"] for r in ours]),
        "seed_median_s": median([s["port_to_first_request_s"] for s in seeds]),
        "seed_values_s": [s["port_to_first_request_s"] for s in seeds],
        "poll_s": ours[0]["poll_s"],
    }
