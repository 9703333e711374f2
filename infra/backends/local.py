"""The `local` backend: the server as a child process group on this machine. Each launch has its
directory `{work}/servers/{run_id}/replica-N/` (log, port file, process-group identity), so a
crash hook in another process finds and stops a run's servers from the run id alone."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from infra.backends.unscheduled import NoScheduledEnd
from infra.errors import ConfigError
from infra.settings import Settings
from infra.system.logs import log_tail
from infra.system.process import group_identity, start_process_group, stop_process_group, stop_process_group_by_identity

log = logging.getLogger(__name__)


def servers_dir(settings: Settings, run_id: str) -> Path:
    """Where the run's local servers keep their files, one `replica-N/` each."""
    return settings.work_path("servers", run_id)


class LocalBackend(NoScheduledEnd):
    """The NeMo-compatible server as a child process group on this machine."""

    name = "local"

    def __init__(self, settings: Settings, run_id: str, *, replica: int = 0, extra_args: list[str] | None = None):
        self.settings = settings
        self.dir = servers_dir(settings, run_id).joinpath(f"replica-{replica}").resolve()
        self.log_path = self.dir / "server.log"
        self.port_file = self.dir / "port"
        self.extra_args = extra_args or []
        self.proc = None
        self.job_ids: list[str] = []

    def argv(self) -> list[str]:
        local = self.settings.local
        engine = ["--engine", "simulated"] if local.engine == "simulated" else ["--model-dir", str(Path(local.model_dir).resolve())]
        return [sys.executable, "-m", "infra.local_server", "serve-local", *engine,
                "--host", local.host, "--port", "0", "--port-file", str(self.port_file),
                "--exit-with-parent", str(os.getpid()),
                "--served-model-name", self.settings.model.name,
                *local.extra_args, *self.extra_args]

    def start(self) -> None:
        local = self.settings.local
        if local.engine == "transformers" and not Path(local.model_dir).is_dir():
            raise ConfigError(
                f"Local model directory {local.model_dir!r} does not exist. Build one with "
                f"`nemotron-sdg make-tiny-model {local.model_dir}` or set NSDG_LOCAL__MODEL_DIR."
            )
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port_file.unlink(missing_ok=True)
        self.proc = start_process_group(self.argv(), log_path=self.log_path)
        self._started_at = time.time()
        (self.dir / "pgid").write_text(group_identity(self.proc))
        log.info("started local server (pid %d), log %s", self.proc.pid, self.log_path)

    def url(self) -> str | None:
        try:
            port = int(self.port_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return f"http://{self.settings.local.host}:{port}"

    def dead_reason(self) -> str | None:
        if self.proc is None or self.proc.poll() is None:
            return None
        return f"local server exited with code {self.proc.returncode}; log tail ({self.log_path}):\n{log_tail(self.log_path) or '(no log yet)'}"

    def release(self) -> None:
        if self.proc is not None:
            code = stop_process_group(self.proc, grace=10.0)
            log.info("local server stopped (exit code %s)", code)
        else:
            release_local_by_run(self.dir)

    def ready_timeout(self) -> float:
        return self.settings.local.ready_timeout_s

    def status(self) -> str:
        if self.proc is None:
            return "local server not started"
        return f"local server pid {self.proc.pid} " + ("running" if self.proc.poll() is None else f"exited {self.proc.returncode}")


def release_local_by_run(server_dir: Path) -> None:
    """Stop the local servers (every replica) found from the run's directory alone: crash hooks
    run in another process."""
    for pgid_file in sorted(server_dir.glob("**/pgid")):
        try:
            stop_process_group_by_identity(pgid_file.read_text(), grace=10.0)
        except (FileNotFoundError, ValueError):
            continue


def release_local_of_run(settings: Settings, run_id: str) -> bool:
    """Stop the local servers of run `run_id`, if it has any on this machine; True when it had."""
    server_dir = servers_dir(settings, run_id)
    if not server_dir.is_dir():
        return False
    release_local_by_run(server_dir)
    return True
