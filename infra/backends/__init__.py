"""Where the server runs: `local` (a child process group on this machine), `slurm` (a batch
job; see infra/slurm), or `attach` (a server someone else runs: no allocation, no teardown).

Every backend answers the same four questions: start it, where is it (`url`), is it still
alive (`dead_reason`), and release it (idempotent, safe from any exit path). A backend with a
scheduled end (a Slurm job's time limit) also says when it ends (`ends_at`) and whether it ended
by that schedule (`scheduled_end`): the pool then plans a successor instead of counting a failure.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Protocol

from infra.deadline import Deadline, poll_until
from infra.engines import served_model
from infra.engines import readiness
from infra.engines.nemo import NemoClient
from infra.engines.openai import OpenAIClient
from infra.engines.throttle import Backoff
from infra.errors import ConfigError, ServerNotReady
from infra.system.process import group_identity, start_process_group, stop_process_group, stop_process_group_by_identity
from infra.settings import Profile, Settings
from infra.slurm.client import log_tail
from infra.prompting.tokens import ByteEstimate, TokenCounter

log = logging.getLogger(__name__)
# The 1-token readiness probe's read timeout: a server that takes longer is probed again, and a
# probe on a hung server (an attached one re-checked after a loss) never holds the run's end long.
PROBE_TIMEOUT_S = 60.0


class Backend(Protocol):
    name: str
    job_ids: list[str]

    def start(self) -> None: ...
    def url(self) -> str | None: ...
    def dead_reason(self) -> str | None: ...
    def release(self) -> None: ...
    def ready_timeout(self) -> float: ...
    def status(self) -> str: ...
    def running_at(self) -> float | None: ...  # when it got its resources (epoch s): the queue wait ends
    def ends_at(self) -> float | None: ...  # when its allocation ends (epoch s); None: no end
    def scheduled_end(self) -> str | None: ...  # why it ended by schedule (time limit, preemption), if it did


class _NoScheduledEnd:
    """Local processes and attached servers run until released."""

    _started_at: float | None = None

    def running_at(self) -> float | None:
        return self._started_at

    def ends_at(self) -> float | None:
        return None

    def scheduled_end(self) -> str | None:
        return None


class LocalBackend(_NoScheduledEnd):
    """The NeMo-compatible server as a child process group on this machine."""

    name = "local"

    def __init__(self, settings: Settings, run_id: str, *, replica: int = 0, extra_args: list[str] | None = None):
        self.settings = settings
        self.dir = settings.work_path("servers", run_id, f"replica-{replica}").resolve()
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


class AttachBackend(_NoScheduledEnd):
    """A server someone else runs: nothing to allocate, nothing to stop. `replica` picks its URL.

    A replacement for a lost attached replica attaches to the same URL again and waits (under
    the readiness deadline) until it answers: its owner may restart it, and there is no other."""

    name = "attach"

    def __init__(self, settings: Settings, replica: int = 0):
        urls = attach_urls(settings)
        if not urls:
            raise ConfigError("The attach profile needs the server's URL: set NSDG_SERVER__URL=http://host:port "
                              "or NSDG_SERVER__URLS='[\"http://a:1424\", \"http://b:1424\"]'")
        if replica >= len(urls):
            raise ConfigError(f"replica {replica} has no URL: NSDG_SERVER__URLS lists {len(urls)}; ask for at most that many replicas")
        self._url = urls[replica]
        self.settings = settings
        self.job_ids: list[str] = []
        self._released = False

    def start(self) -> None:
        self._started_at = time.time()

    def url(self) -> str | None:
        return self._url

    def dead_reason(self) -> str | None:
        # Released = the run no longer uses it: a readiness wait still polling it ends.
        return f"the run detached from {self._url}" if self._released else None

    def release(self) -> None:
        self._released = True

    def ready_timeout(self) -> float:
        return self.settings.server.ready_timeout_s

    def status(self) -> str:
        return f"attached to {self._url}"


def attach_urls(settings: Settings) -> list[str]:
    return list(settings.server.urls) or ([settings.server.url] if settings.server.url else [])


def make_backend(settings: Settings, profile: Profile, *, run_id: str, flow_run_id: str | None = None,
                 replica: int = 0, url_index: int | None = None) -> Backend:
    """`replica` is the launch number (a replacement gets a new port and directory); `url_index`
    the replica it stands for, which picks an attached server's URL (default: `replica`)."""
    if profile.backend == "local":
        return LocalBackend(settings, run_id, replica=replica)
    if profile.backend == "attach":
        return AttachBackend(settings, replica if url_index is None else url_index)
    from infra.slurm.backend import SlurmBackend

    return SlurmBackend(settings, profile, run_id=run_id, flow_run_id=flow_run_id, replica=replica)


def make_client(settings: Settings, url: str, counter: TokenCounter = ByteEstimate(), profile: Profile | None = None):
    """The client for the API `settings.api(profile)` speaks (no profile: the default engine's).
    `counter` must be the one the plan counted with (the run's, RunConfig.counter), or the client
    could refuse what the plan accepted."""
    s = settings.server
    profile = profile or Profile(backend="attach")
    if settings.api(profile) == "openai-completions":
        return OpenAIClient(url, model=settings.served_name(profile), connect_timeout=s.connect_timeout_s,
                            read_timeout=s.read_timeout_s, context_length=settings.model.context_length,
                            count_tokens=counter.count, max_in_flight=settings.in_flight(profile),
                            nemo_openai=profile.engine == "nemo-openai",
                            backoff=Backoff(tries=s.throttle_tries, wait_s=s.throttle_wait_s))
    return NemoClient(url, connect_timeout=s.connect_timeout_s, read_timeout=s.read_timeout_s,
                      context_length=settings.model.context_length, count_tokens=counter.count,
                      echo=counter.round_trip, keep_first=counter.keep_first if counter.exact else None)


def wait_until_ready(backend: Backend, settings: Settings, *, timeout: float | None = None,
                     counter: TokenCounter = ByteEstimate(), profile: Profile | None = None):
    """Poll the backend and the server in one loop under one deadline: a dead job/process ends
    the wait at once with its log tail; a listening server is judged ready the way its engine
    kind says (infra/engines/readiness.py), ending in one real 1-token generation."""
    deadline = Deadline(timeout if timeout is not None else backend.ready_timeout())
    kind = settings.engine(profile).readiness if profile is not None else "nemo-probe"
    if profile is not None and settings.server.api is not None and settings.server.api != settings.engine(profile).api:
        kind = "nemo-probe" if settings.server.api == "nemo-generate" else "probe"  # an override: the probe both APIs have
    seen = {"last": "nothing yet"}

    def check():
        if (reason := backend.dead_reason()) is not None:
            raise ServerNotReady(f"The {backend.name} server died before it was ready: {reason}")
        url = backend.url()
        if url is None:
            seen["last"] = "no server address yet"
            return None
        client = make_client(settings, url, counter, profile)
        not_yet = readiness.step(client, kind, max(1.0, deadline.cap(min(settings.server.read_timeout_s, PROBE_TIMEOUT_S))),
                                 f"This {backend.name} replica counts as never ready ({backend.status()}).")
        if not_yet is not None:
            seen["last"] = not_yet
            return None
        # What answers, as the server names it: the rows' model, checked against the run's (infra/engines/served_model.py).
        client.served = served_model.reported(client, max(1.0, deadline.cap(served_model.MODELS_TIMEOUT_S)))
        return client

    return poll_until(check, deadline=deadline, interval=settings.server.ready_poll_s,
                      what=f"the {backend.name} server to answer a 1-token generation",
                      describe_last=lambda: f"{seen['last']}; {backend.status()}")
