"""What every benchmark shares: a local Prefect API, the NeMo-compatible server as a
subprocess with a stats file, the flow in a child process, stats arithmetic, input files.

Nothing here reads the developer's ~/.prefect: `prefect_api()` starts `prefect server start`
with PREFECT_HOME in a temp dir (SQLite, analytics off), and every flow child gets that URL.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import requests

from tests.ports import free_port

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
# Every process a benchmark starts, as (tag, env settings, argv), for results.md.
COMMANDS: list[tuple[str, dict[str, str], list[str]]] = []


def note_command(tag: str, argv: list[str], env: dict[str, str] | None = None) -> None:
    COMMANDS.append((tag, dict(env or {}), list(argv)))


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def base_env(**extra: str) -> dict[str, str]:
    """The environment for children: no NSDG_ settings of the developer, infra logs quiet."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NSDG_")}
    env.update(
        PYTHONPATH=str(REPO),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_LOGGING_LEVEL="WARNING",
        PREFECT_LOGGING_EXTRA_LOGGERS="",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    env.update(extra)
    return env


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM to the child's own process group, a grace period, then SIGKILL."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=grace)


def wait_for(check, timeout: float, what: str, interval: float = 0.05):
    end = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > end:
            raise TimeoutError(f"gave up waiting for {what} after {timeout:.0f} s")
        time.sleep(interval)


# --------------------------------------------------------------------------- Prefect API


@dataclass(frozen=True)
class PrefectAPI:
    url: str
    home: Path

    def env(self) -> dict[str, str]:
        return {"PREFECT_API_URL": self.url, "PREFECT_HOME": str(self.home)}


@contextlib.contextmanager
def prefect_api(workdir: Path) -> Iterator[PrefectAPI]:
    """`prefect server start` on a free port, PREFECT_HOME under `workdir`; stopped on exit."""
    home = workdir / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = base_env(PREFECT_HOME=str(home), PREFECT_SERVER_API_HOST="127.0.0.1", PREFECT_SERVER_API_PORT=str(port),
                   PREFECT_UI_ENABLED="false", PREFECT_API_URL=f"http://127.0.0.1:{port}/api")
    log = open(workdir / "prefect-server.log", "wb")
    proc = subprocess.Popen([PY, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"

    def healthy() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited {proc.returncode}; see {workdir / 'prefect-server.log'}")
        try:
            return requests.get(url + "/health", timeout=1).ok
        except requests.RequestException:
            return False

    try:
        wait_for(healthy, 120, "the Prefect API", interval=0.3)
        yield PrefectAPI(url, home)
    finally:
        from flows.api_server import send_pending

        send_pending()  # what flows run in this process still hold; the last section's were sent at exit, too late
        stop(proc)
        log.close()


# --------------------------------------------------------------------------- the local server


@dataclass(frozen=True)
class Cost:
    """The simulated engine's cost model (infra/local_server/simulated_model.py SimCost), as CLI flags."""

    prefill_s_per_token: float = 0.0
    decode_step_s: float = 0.0
    decode_batch_slope: float = 0.0
    finish_fraction: float = 0.0

    def args(self) -> list[str]:
        return ["--sim-prefill-s-per-token", repr(self.prefill_s_per_token),
                "--sim-decode-step-s", repr(self.decode_step_s),
                "--sim-decode-batch-slope", repr(self.decode_batch_slope),
                "--sim-finish-fraction", repr(self.finish_fraction)]

    def seconds(self, batch: int, longest_prompt: int, steps: int) -> float:
        return (self.prefill_s_per_token * longest_prompt * batch
                + steps * self.decode_step_s * (1.0 + self.decode_batch_slope * batch))


def stock_server_has_nodelay() -> bool:
    from infra.local_server.handler import GenerateHandler

    return bool(getattr(GenerateHandler, "disable_nagle_algorithm", False))


def server_launcher(stock: bool = False) -> list[str]:
    """How benchmarks start the local server: the stock module when it already sets
    TCP_NODELAY (or when `stock` is asked for), else benchmarks/server_nodelay.py."""
    if stock or stock_server_has_nodelay():
        return [PY, "-m", "infra.local_server"]
    return [PY, str(REPO / "benchmarks" / "server_nodelay.py")]


def server_argv(port_file: Path, stats_file: Path, cost: Cost, *, port: int = 0, host: str = "127.0.0.1",
                extra: Sequence[str] = (), stock: bool = False) -> list[str]:
    return [*server_launcher(stock), "serve-local", "--engine", "simulated", "--host", host,
            "--port", str(port), "--port-file", str(port_file), "--stats-file", str(stats_file),
            "--log-level", "WARNING", *cost.args(), *extra]


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    stats_file: Path
    port_file: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stats(self) -> list[dict]:
        return read_stats(self.stats_file)


@contextlib.contextmanager
def local_server(workdir: Path, name: str, cost: Cost = Cost(), extra: Sequence[str] = (),
                 wait: bool = True, stock: bool = False) -> Iterator[Server]:
    """The NeMo-compatible server (simulated engine) with a stats file, in its own process group."""
    d = workdir / name
    d.mkdir(parents=True, exist_ok=True)
    port_file, stats_file = d / "port", d / "stats.jsonl"
    port_file.unlink(missing_ok=True)
    stats_file.unlink(missing_ok=True)
    log = open(d / "server.log", "wb")
    note_command(f"server {name}", server_argv(port_file, stats_file, cost, extra=extra, stock=stock))
    proc = subprocess.Popen(server_argv(port_file, stats_file, cost, extra=extra, stock=stock), env=base_env(),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        port = 0
        if wait:
            port = int(wait_for(lambda: port_file.exists() and port_file.read_text().strip(), 60, f"server {name}"))
        yield Server(proc, port, stats_file, port_file)
    finally:
        stop(proc)
        log.close()


def read_stats(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def is_probe(line: dict) -> bool:
    """wait_until_ready's 1-token PUT of "Hello": one row, one prompt token."""
    return line["batch"] == 1 and line["prompt_tokens"] == 1 and line["generated_tokens"] <= 1


@dataclass(frozen=True)
class BusyWindow:
    requests: int
    rows: int
    busy_s: float
    wall_s: float
    largest_gap_s: float

    @property
    def fraction(self) -> float:
        return self.busy_s / self.wall_s if self.wall_s > 0 else float("nan")

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.wall_s if self.wall_s > 0 else float("nan")


def busy_window(stats: list[dict], *, drop_probe: bool = True) -> BusyWindow:
    """Busy time (sum of end - start) over the wall time from the first request's start to the
    last reply's end, as the server's --stats-file reports them."""
    lines = sorted((s for s in stats if not (drop_probe and is_probe(s))), key=lambda s: s["start"])
    if not lines:
        return BusyWindow(0, 0, 0.0, 0.0, 0.0)
    busy = sum(s["end"] - s["start"] for s in lines)
    wall = max(s["end"] for s in lines) - lines[0]["start"]
    gaps = [b["start"] - a["end"] for a, b in zip(lines, lines[1:])]
    return BusyWindow(len(lines), sum(s["batch"] for s in lines), busy, wall, max(gaps, default=0.0))


# --------------------------------------------------------------------------- inputs


def write_prompts(path: Path, n: int, *, prompt=lambda i: f"Prompt number {i}: write one sentence about data.",
                  ids: bool = True) -> Path:
    """JSONL with ids r0..r{n-1} (or no id field: the flow derives ids), written in chunks."""
    with open(path, "w", encoding="utf-8") as f:
        chunk = []
        for i in range(n):
            chunk.append(json.dumps({"id": f"r{i}", "prompt": prompt(i)} if ids else {"prompt": prompt(i)}))
            if len(chunk) == 10_000:
                f.write("\n".join(chunk) + "\n")
                chunk = []
        if chunk:
            f.write("\n".join(chunk) + "\n")
    return path


# --------------------------------------------------------------------------- the flow in a child


@dataclass(frozen=True)
class FlowRun:
    ok: bool
    seconds: float  # wall time of generate() in the child, not counting its imports
    result: dict
    maxrss_mb: float  # the child's own peak RSS (getrusage RUSAGE_SELF), Prefect + our code
    error: str | None
    stderr_tail: str
    t_return: float  # time.time() when generate() returned or raised, in the child
    extra: dict


def run_flow(workdir: Path, api: PrefectAPI, params: dict, *, settings_env: dict[str, str], timeout: float = 900,
             tag: str = "flow", rss_sample_s: float = 0.0, flow: str = "generate") -> FlowRun:
    """Run flows.generate.generate(**params) (or flows.pipeline.pipeline) in a fresh Python process
    (benchmarks.flow_child)."""
    out = workdir / f"{tag}.result.json"
    out.unlink(missing_ok=True)
    env = base_env(**api.env(), **settings_env)
    argv = [PY, "-m", "benchmarks.flow_child", "--params", json.dumps(params), "--out", str(out), "--flow", flow]
    if rss_sample_s:
        argv += ["--rss-sample-s", str(rss_sample_s)]
    note_command(tag, argv, settings_env)
    with open(workdir / f"{tag}.stderr", "wb") as err:
        proc = subprocess.run(argv, env=env, cwd=workdir, stdout=subprocess.DEVNULL, stderr=err, timeout=timeout)
    stderr = (workdir / f"{tag}.stderr").read_text(errors="replace")
    if not out.exists():
        raise RuntimeError(f"flow child {tag} exited {proc.returncode} without a result:\n{stderr[-3000:]}")
    data = json.loads(out.read_text())
    return FlowRun(data["ok"], data["seconds"], data.get("result") or {}, data["maxrss_mb"], data.get("error"),
                   stderr[-2000:], data["t_return"], data.get("extra", {}))


def machine() -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    import platform

    import prefect

    return {"nproc": str(os.cpu_count()), "memory": mem, "cpu": cpu, "python": platform.python_version(),
            "prefect": prefect.__version__, "commit": commit + (" (working tree has uncommitted changes)" if dirty else ""),
            "kernel": platform.release()}


def cpu_probe(repeats: int = 5) -> float:
    """Seconds a fixed pure-Python workload takes here (the median of `repeats`): 20,000 JSON lines of
    the size of a prompt row dumped, parsed, their words counted into a dict, the lines hashed. It is
    the kind of work the flow's process does per record, with nothing else in it, so it moves with the
    machine and not with the code: this machine kind has run the same code 1.5x slower from one run to
    the next, hours apart (stop 41), and the absolute figures (records/s, seconds) moved with it. Taken
    at the start and the end of a run, it says how fast the machine was while the figures were measured."""
    import hashlib

    rows = [{"id": f"r{i}", "prompt": "Write one question a reader could ask about topic " * 6 + str(i), "n": i}
            for i in range(20_000)]

    def once() -> float:
        t = time.perf_counter()
        lines = [json.dumps(r) for r in rows]
        words: dict[str, int] = {}
        for row in map(json.loads, lines):
            for w in row["prompt"].split():
                words[w] = words.get(w, 0) + 1
        hashlib.sha256("\n".join(lines).encode()).hexdigest()
        return time.perf_counter() - t

    return statistics.median(once() for _ in range(repeats))


def tempdir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))


def section_main(module: str, doc: str | None, section: Callable[[], str | None], argv: list[str] | None = None) -> int:
    """The command line of a benchmark that writes one section of results.md (`--out`, `--append`).
    `section` measures and returns the markdown, or None when there is nothing to write."""
    import argparse

    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="markdown file to write (or append to)")
    parser.add_argument("--append", action="store_true", help="append the section instead of replacing the file")
    args = parser.parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    text = section()
    if text is None:
        return 0
    print(text)
    if args.out:
        with open(args.out, "a" if args.append else "w") as f:
            f.write(text)
    return 0


@contextlib.contextmanager
def in_process_api(api_url: str | None) -> Iterator[None]:
    """Flows run in this process talk to `api_url` (the bench's own API), or to a harness of their own."""
    if api_url is None:
        from prefect.testing.utilities import prefect_test_harness

        with prefect_test_harness(server_startup_timeout=90):
            yield
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        yield


def run_alone(prefix: str, section: Callable[[Path, "PrefectAPI", Callable[[str], None]], dict]) -> int:
    """One bench section by itself (`python -m benchmarks.<section>`): its own work dir and Prefect API,
    timestamped log lines, its JSON printed at the end."""
    import shutil

    workdir, started = tempdir(prefix), time.monotonic()
    with prefect_api(workdir) as api:
        res = section(workdir, api, lambda m: print(f"[{time.monotonic() - started:7.1f} s] {m}", flush=True))
    print(json.dumps(res, indent=1))
    shutil.rmtree(workdir, ignore_errors=True)
    return 0
