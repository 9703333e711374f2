"""The local server's process: load the engine, then bind and serve until SIGTERM/SIGINT.

- The socket is bound only after the engine has loaded, so the port refuses connections
  until then; then ` * Running on http://HOST:PORT` goes to stderr (Werkzeug's banner), and
  the port goes to `ServeConfig.port_file` if one is set.
- Under Slurm only rank 0 serves; other ranks idle until SIGTERM/SIGINT (NeMo's non-zero
  ranks wait in a broadcast). SIGTERM/SIGINT -> clean shutdown, exit 0.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from infra.local_server.handler import LocalHTTPServer
from infra.local_server.nemo_generation import Engine
from infra.local_server.openai_api import CompletionsService
from infra.local_server.service import FaultPlan, GenerateService

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 1424
    port_file: Path | None = None
    stats_file: Path | None = None
    load_delay_s: float = 0.0
    extra_latency_s: float = 0.0
    faults: FaultPlan = field(default_factory=FaultPlan)
    openai: bool = True  # also serve /v1/completions, /v1/models, /health
    served_model: str = "nemotron-4-340b-base"
    model_root: str | None = None  # what is loaded (/v1/models `root`): the model directory, or "simulated"
    max_model_len: int = 4096
    openai_error_shape: str = "nested"
    sim_slots: int = 256


class _Interrupted(BaseException):
    """SIGTERM/SIGINT while loading: unwinds the load, then the process exits 0."""


class _StopSignal:
    """SIGTERM/SIGINT set a flag; while `interruptible`, they also abort what is running.

    The handler touches no lock: it runs in the main thread, which may itself hold the very
    lock an Event would need at that moment. The main thread polls the flag instead.
    """

    POLL_S = 0.1

    def __init__(self) -> None:
        self.requested = False
        self._interrupt = False
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.requested = True
        if self._interrupt:
            raise _Interrupted()

    def wait(self) -> None:
        while not self.requested:
            time.sleep(self.POLL_S)
        log.info("stop requested (SIGTERM/SIGINT); shutting down")

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        self._interrupt = True
        try:
            if self.requested:
                raise _Interrupted()
            yield
        finally:
            self._interrupt = False


def serve(config: ServeConfig, load_engine: Callable[[], Engine], *, rank: str | None = None) -> int:
    """Run the server until SIGTERM/SIGINT. Returns the process exit code."""
    stop = _StopSignal()
    if rank not in (None, "", "0"):
        log.info("rank %s does not serve HTTP (only rank 0 does); idling until SIGTERM", rank)
        stop.wait()
        return 0
    try:
        with stop.interruptible():
            engine = _load(config, load_engine, stop)
    except _Interrupted:
        log.info("stopped before the engine had loaded")
        return 0
    except Exception as exc:
        log.error("could not load the engine: %s", exc, exc_info=not isinstance(exc, ValueError))
        return 1
    service = GenerateService(
        engine, faults=config.faults, extra_latency_s=config.extra_latency_s, stats_file=config.stats_file
    )
    completions = CompletionsService(engine, served_model=config.served_model, max_model_len=config.max_model_len,
                                     error_shape=config.openai_error_shape, slots=config.sim_slots,
                                     lock=service._lock, model_root=config.model_root) if config.openai else None
    try:
        httpd = LocalHTTPServer((config.host, config.port), service, completions)
    except OSError as exc:
        log.error("could not listen on %s:%d: %s", config.host, config.port, exc)
        return 1
    return _run_until_stopped(httpd, config, stop)


def _load(config: ServeConfig, load_engine: Callable[[], Engine], stop: _StopSignal) -> Engine:
    if config.load_delay_s:
        log.info("simulating model load: %.1f s before binding", config.load_delay_s)
        time.sleep(config.load_delay_s)  # a signal raises _Interrupted out of the sleep
    started = time.monotonic()
    engine = load_engine()
    log.info("engine %s ready after %.1f s", engine.name, time.monotonic() - started)
    return engine


def _run_until_stopped(httpd: LocalHTTPServer, config: ServeConfig, stop: _StopSignal) -> int:
    host, port = httpd.server_address[:2]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="http", daemon=True)
    thread.start()
    if config.port_file is not None:
        write_atomically(config.port_file, f"{port}\n")
    if host in ("0.0.0.0", ""):
        print(" * Running on all addresses (0.0.0.0)", file=sys.stderr, flush=True)
    print(f" * Running on http://{host}:{port}", file=sys.stderr, flush=True)
    stop.wait()
    httpd.shutdown()
    httpd.server_close()
    log.info("server on port %d stopped", port)
    return 0


def write_atomically(path: Path, text: str) -> None:
    """Readers see either no file or the whole text (temp file in the same folder + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
