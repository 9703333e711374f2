"""Prefect's temporary API server for `nemotron-sdg run` without PREFECT_API_URL, in a session of
its own.

Left to itself, Prefect starts that server (uvicorn, a child process) on first use, in the CLI's
process group: a terminal's Ctrl-C (SIGINT to the foreground group) or `timeout`'s SIGTERM stopped it
together with the CLI, which then spent minutes retrying the dead API to record the run as Crashed,
printing tracebacks (issue 27). Started here first, in a session of its own, it hears only what the
CLI sends it: the CLI stops it after the run, and it stops itself when the CLI is gone without doing
so (kill -9; infra/system/with_parent.py).

Prefect keeps one such server per requested port, and its clients ask for "any free port" (None):
the server registered here under that key is the one every Prefect client of this process uses.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import prefect
from prefect.events.worker import EventsWorker
from prefect.logging.handlers import APILogWorker
from prefect.server.api.server import SubprocessASGIServer
from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

from infra.system import with_parent


class OwnSessionServer(SubprocessASGIServer):
    """Prefect's SubprocessASGIServer with its start command in a session of its own, watching us."""

    def _run_uvicorn_command(self) -> subprocess.Popen:
        # Prefect 3.9's command and environment (SubprocessASGIServer._run_uvicorn_command); only the
        # session and the parent watch are ours. tests/test_interrupt.py fails if this stops working.
        argv = with_parent.command(
            os.getpid(), "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
            "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
            "--log-level", "error", "--lifespan", "on")
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
               **get_current_settings().to_environment_variables(exclude_unset=True)}
        return subprocess.Popen(argv, env=env, start_new_session=True)


# The temporary server this process started, the only one stop_temporary_server() stops: another
# SubprocessASGIServer in the process (prefect_test_harness's, in the tests) is not ours to stop.
# Process-wide like Prefect's own registry of these servers (SubprocessASGIServer._instances), which
# start_temporary_server() reuses: there is one temporary server per process.
_ours: list[SubprocessASGIServer] = []


def start_temporary_server() -> None:
    """Start the temporary server now, unless runs go to a Prefect server of their own. Idempotent."""
    if PREFECT_API_URL.value() or not get_current_settings().server.ephemeral.enabled:
        return  # a server of their own; or none allowed, which Prefect reports itself
    server = SubprocessASGIServer._instances.get(None)
    if server is None:
        server = OwnSessionServer()
    server.start()
    if server not in _ours:
        _ours.append(server)


def stop_temporary_server() -> None:
    """Send what the log and event workers still hold, then stop the temporary server this process
    started (none: nothing to do). Prefect would stop it at exit, logging after our last line, and
    not at all after kill -9."""
    if not _ours:
        return
    send_pending()
    while _ours:
        _ours.pop().stop()


def send_pending(timeout: float = 10) -> None:
    """Send what this process's Prefect log and event workers still hold: before their server stops,
    or they would find no server (and print so at exit)."""
    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=timeout)


@contextmanager
def chosen_server(local: bool) -> Iterator[None]:
    """Where a CLI run is recorded. With PREFECT_API_URL set (the environment, or a clone's .env
    holding the team's server), every run, a typo's included, lands in the team's run list: the run
    says so in one line, and `--local-prefect` (local) records it on a temporary server of its own
    instead, as if PREFECT_API_URL were unset (issue 27)."""
    url = PREFECT_API_URL.value()
    if not url:
        yield
        return
    if not local:
        print(f"note: this run is recorded on the Prefect server at {url} (PREFECT_API_URL, from the environment or "
              f".env); --local-prefect keeps this run on a temporary local server", file=sys.stderr, flush=True)
        yield
        return
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        yield
