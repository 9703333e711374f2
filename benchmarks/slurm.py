"""The flow on the local Slurm cluster: readiness, death noticed, allocation released.

The seed's job shape (2 nodes × 8 tasks, 16 ranks), container runtime `none`, and the server
command replaced by the project's NeMo-compatible server (rank 0 serves; the other 15 ranks
idle as NeMo's do), as tests/test_slurm_flow.py configures it. Rank 0 writes a port file and
a stats file, so the benchmark sees exactly when the port opened and when each generation ran.
An outside thread polls `squeue` every 0.1 s and notes when the job leaves it.

Three scenarios, each a real flow run in a child process:
- ok:      a normal run. Port open → readiness probe → first batch; last reply → job gone.
- scancel: `scancel JOBID` from outside once generation is under way; kill → flow raises.
- crash:   the server process exits mid-run (`--fault-crash-after`); exit → flow raises.
`max_server_restarts` is 0 so the flow stops at the loss instead of starting a new job.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import PY, REPO, Cost, PrefectAPI, free_port, is_probe, median, read_stats, run_flow, server_argv, wait_for, write_prompts

PROFILE = {"bench2x8": {"backend": "slurm", "nodes": 2, "gpus_per_node": 8, "tensor_parallel": 8, "pipeline_parallel": 2}}
JOB_PREFIX = "nsdg-"


def slurm_up() -> bool:
    try:
        out = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=15).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "UP" in out


def our_jobs(run_id: str | None = None) -> dict[str, str]:
    """{job id: name} of queued/running jobs named nsdg-*; with `run_id`, only that run's (the
    flow puts `run=<run id>` in the job's comment). Other people's jobs on the cluster are not ours."""
    from infra.slurm.client import SlurmClient

    return {job.job_id: job.name for job in SlurmClient().active_jobs()
            if job.name.startswith(JOB_PREFIX) and (run_id is None or f"run={run_id} " in (job.comment or "") + " ")}


@dataclass
class SqueueWatch:
    """Polls squeue every `interval` s in a thread: first and last time each job was listed,
    and the first poll that no longer listed it."""

    run_id: str | None = None
    interval: float = 0.1
    first_seen: dict[str, float] = field(default_factory=dict)
    gone_at: dict[str, float] = field(default_factory=dict)
    others: set[str] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)

    def _run(self) -> None:
        while not self._stop.is_set():
            every = our_jobs()
            t = time.time()
            now_jobs = our_jobs(self.run_id) if self.run_id else every
            self.others |= set(every) - set(now_jobs)
            for job in now_jobs:
                self.first_seen.setdefault(job, t)
                self.gone_at.pop(job, None)
            for job in self.first_seen:
                if job not in now_jobs:
                    self.gone_at.setdefault(job, t)
            self._stop.wait(self.interval)

    def __enter__(self) -> "SqueueWatch":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def settings_env(workdir: Path, tag: str, server_cmd: list[str], port: int) -> dict[str, str]:
    return {
        "NSDG_EXTRA_PROFILES": json.dumps(PROFILE),
        "NSDG_SLURM__CONTAINER_RUNTIME": "none",
        "NSDG_SLURM__JOB_ROOT": str(workdir / "jobs"),
        "NSDG_SLURM__TIME_LIMIT": "00:10:00",
        # The job inherits none of this process's PYTHONPATH: name this checkout for the ranks' Python.
        "NSDG_SLURM__ENV": json.dumps({"PYTHONPATH": str(REPO)}),
        "NSDG_SERVER__PORT": str(port),
        "NSDG_SERVER__READY_TIMEOUT_S": "120",
        "NSDG_SERVER__MAX_SERVER_RESTARTS": "0",
        "NSDG_SERVER__COMMAND": json.dumps(server_cmd),
        "NSDG_WORK_DIR": str(workdir / ".nsdg"),
    }


def fault_marker_supported() -> bool:
    out = subprocess.run([PY, "-m", "infra.local_server", "serve-local", "--help"], capture_output=True, text=True).stdout
    return "--fault-once-marker" in out


def crash_time_from_log(job_root: Path) -> float | None:
    """The server logs 'fault injection: crashing on request N' just before os._exit(1)."""
    import datetime

    for path in job_root.rglob("*"):
        if not path.is_file():
            continue
        for line in path.read_text(errors="replace").splitlines():
            if "fault injection: crashing" in line:
                stamp = line[:23]  # logging's asctime: 2025-01-01 12:00:00,123
                try:
                    return datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
                except ValueError:
                    return None
    return None


def one_run(workdir: Path, api: PrefectAPI, scenario: str, rep: int, cost: Cost, load_delay: float, log) -> dict:
    tag = f"slurm-{scenario}-{rep}"
    d = workdir / tag
    d.mkdir(parents=True, exist_ok=True)
    port = free_port(span=8)  # launch k (replicas, then restarts) listens on port + k
    port_file, stats_file, marker = d / "port", d / "stats.jsonl", d / "crash-marker"
    extra = ["--load-delay", str(load_delay)]
    if scenario == "crash":
        extra += ["--fault-crash-after", "4"]  # the probe + 3 batches, then the 5th request kills it
        if fault_marker_supported():
            extra += ["--fault-once-marker", str(marker)]
    if scenario == "scancel":
        extra += ["--extra-latency", "0.5"]
    cmd = server_argv(port_file, stats_file, cost, port=port, host="0.0.0.0", extra=extra)
    cmd = [c for c in cmd if c != "--log-level"]
    if "WARNING" in cmd:
        cmd.remove("WARNING")  # INFO keeps the fault line in the job's log
    src = write_prompts(d / "in.jsonl", 640)
    params = {"input_uri": str(src), "output_uri": str(d / "out"), "run_id": tag, "profile": "bench2x8",
              "sampling": {"tokens_to_generate": 88, "greedy": True}, "shard_size": 128,
              "batch_size": 32}  # ≈0.5 s batches, as measured since issue 7 (the flow default is now 128)
    killed = {}

    def killer() -> None:
        def generating():
            return len([s for s in read_stats(stats_file) if not is_probe(s)]) >= 3
        try:
            wait_for(generating, 150, "generation to start", interval=0.05)
        except TimeoutError:
            return
        jobs = our_jobs(tag)
        killed["t"] = time.time()
        for job in jobs:
            subprocess.run(["scancel", job], timeout=30)
        killed["jobs"] = list(jobs)

    with SqueueWatch(tag) as watch:
        k = threading.Thread(target=killer, daemon=True) if scenario == "scancel" else None
        if k:
            k.start()
        run = run_flow(workdir, api, params, settings_env=settings_env(d, tag, cmd, port), tag=tag, timeout=300)
        if k:
            k.join(timeout=10)
        time.sleep(0.5)  # let the watcher see the job go if it went at the very end
    stats = read_stats(stats_file)
    gen = [s for s in stats if not is_probe(s)]
    probe = [s for s in stats if is_probe(s)]
    t_port = port_file.stat().st_mtime if port_file.exists() else None
    others = sorted(watch.others - set(watch.first_seen))
    out: dict = {"scenario": scenario, "ok": run.ok, "error": (run.error or "").splitlines()[0][:300] if run.error else None,
                 "flow_s": run.seconds, "jobs": sorted(watch.first_seen)}
    if t_port and probe:
        out["port_to_probe_s"] = probe[0]["start"] - t_port
    if t_port and gen:
        out["port_to_first_batch_s"] = min(s["start"] for s in gen) - t_port
    if scenario == "ok" and gen and watch.gone_at:
        last_reply = max(s["end"] for s in gen)
        out["last_reply_to_gone_s"] = max(watch.gone_at.values()) - last_reply
        out["last_reply_to_flow_end_s"] = run.t_return - last_reply
    if scenario == "scancel" and "t" in killed:
        out["death_to_flow_raise_s"] = run.t_return - killed["t"]
    if scenario == "crash":
        t_crash = None
        if marker.exists():
            try:
                t_crash = float(marker.read_text().split(" at ")[1])
            except (IndexError, ValueError):
                t_crash = None
        t_crash = t_crash or crash_time_from_log(d / "jobs")
        if t_crash:
            out["death_to_flow_raise_s"] = run.t_return - t_crash
    if others:
        out["other_nsdg_jobs_seen"] = others  # someone else's run shares the cluster: timings may suffer
    leaked = [j for j in watch.first_seen if j not in watch.gone_at]
    out["jobs_left_in_squeue"] = leaked
    log(f"slurm {scenario} #{rep}: " + ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in out.items() if k != "error")
        + (f" error={out['error'][:120]}" if out.get("error") else ""))
    return out


def run(workdir: Path, api: PrefectAPI, log, repeats: int = 2) -> dict:
    cost = Cost(prefill_s_per_token=2e-5, decode_step_s=0.005, decode_batch_slope=0.004)  # ≈0.5 s per batch of 32
    runs: dict[str, list[dict]] = {"ok": [], "scancel": [], "crash": []}
    for rep in range(repeats):
        for scenario in runs:
            runs[scenario].append(one_run(workdir, api, scenario, rep, cost, load_delay=3.0, log=log))

    def med(scenario: str, key: str) -> float | None:
        vals = [r[key] for r in runs[scenario] if key in r]
        return median(vals) if vals else None

    return {
        "runs": runs,
        "port_to_probe_s": med("ok", "port_to_probe_s"),
        "port_to_first_batch_s": med("ok", "port_to_first_batch_s"),
        "last_reply_to_gone_s": med("ok", "last_reply_to_gone_s"),
        "last_reply_to_flow_end_s": med("ok", "last_reply_to_flow_end_s"),
        "scancel_to_raise_s": med("scancel", "death_to_flow_raise_s"),
        "crash_to_raise_s": med("crash", "death_to_flow_raise_s"),
        "repeats": repeats,
        "leaks": sum(len(r["jobs_left_in_squeue"]) for rs in runs.values() for r in rs),
    }
