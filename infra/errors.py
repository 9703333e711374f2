"""Errors raised by nemotron-sdg.

Every message names the object, what was seen, and what to do next.

    SdgError
    ├── ConfigError            bad settings, parameters or input; raised before any GPU is asked for
    │   ├── InputError         the prompt dataset cannot be used (file, line numbers, problem)
    │   │   └── InputChanged   the input changed between the plan and the generation pass
    │   └── RunLeaseHeld       another flow run holds this run id's lease (infra/run/lease.py)
    ├── CommandError           an external command failed or timed out (argv, exit code, stderr tail)
    ├── DeadlineExceeded       a wait ran out of time (what was awaited, last thing seen)
    ├── SlurmJobError          a Slurm job ended or never started (job id, state, exit code, log tail)
    ├── ServerError            the NeMo server could not be used
    │   ├── ServerNotReady     the server did not become ready (process exit, log tail)
    │   ├── RequestRejected    the server refused a request: never retried
    │   │   ├── ValidationRejected   HTTP 200 whose body is not an object with `sentences`
    │   │   ├── BadRequest           HTTP 400 (e.g. more than 128 sentences)
    │   │   ├── ServerFailure        HTTP 500 (missing key or an exception inside generation)
    │   │   └── ReplyMismatch        a reply sentence does not echo its own prompt (reordered, duplicated)
    │   ├── TransientServerError     connection refused/reset, timeout, other 5xx: may be retried
    │   ├── ServerThrottled          429/503 past one request's tries and deadline: busy, not lost; never a lost replica
    │   └── ServerLost               the server's process or job is gone: retrying the request is useless
    │       └── ServerHung           no reply within the read timeout: a hung NeMo server never answers
    ├── CircuitOpen            too many records failed in a window: stop before burning GPU hours
    ├── StorageError           reading input or publishing output failed (bucket/key/path, cause)
    ├── LocationChanged        the run directory is no longer the one checked at the start (a symlink swapped in)
    └── LeaseLost              another run took this run's lease: this one writes nothing more (infra/run/lease.py)
"""

from __future__ import annotations


# What str.splitlines() breaks on: a user's key or value quoted in a one-line message is escaped there.
_LINE_BREAKS = {ord(c): repr(c)[1:-1] for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"}


def one_line(text: str) -> str:
    """`text` with its line breaks escaped (\\n ...), so a message quoting user text stays one line."""
    return text.translate(_LINE_BREAKS)


class SdgError(Exception):
    """Base of every error nemotron-sdg raises on purpose."""


class ConfigError(SdgError, ValueError):
    """A setting, flow parameter or request field is invalid."""


class InputError(ConfigError):
    """The prompt dataset has lines that cannot be used."""


class InputChanged(InputError):
    """The input is no longer what the plan read (rewritten, appended to, replaced)."""


class RunLeaseHeld(ConfigError):
    """Another flow run is running this run id: one run at a time per output location."""


class CommandError(SdgError):
    """An external command exited non-zero or ran past its timeout."""

    def __init__(self, message: str, *, argv: list[str], returncode: int | None, stderr: str = ""):
        super().__init__(message)
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr


class DeadlineExceeded(SdgError, TimeoutError):
    """A wait ran past its deadline."""


class SlurmJobError(SdgError):
    """A Slurm job ended before it should have, or never started."""

    def __init__(self, message: str, *, job_id: str | None = None, state: str | None = None):
        super().__init__(message)
        self.job_id = job_id
        self.state = state


class ServerError(SdgError):
    """The NeMo server could not be used."""


class ServerNotReady(ServerError):
    """The server did not become ready."""


class RequestRejected(ServerError):
    """The server refused the request. Sending it again gives the same answer: never retry."""

    def __init__(self, message: str, *, status: int | None = None, body: object = None):
        super().__init__(message)
        self.status = status
        self.body = body


class ValidationRejected(RequestRejected):
    """HTTP 200 with a JSON string body: NeMo's way of reporting a validation error."""


class BadRequest(RequestRejected):
    """HTTP 400 from the server."""


class ServerFailure(RequestRejected):
    """HTTP 500 from the server: a missing key or an exception inside generation."""


class ReplyMismatch(RequestRejected):
    """A reply sentence echoes no prompt, or another prompt of its batch better than its own: the
    server (or a proxy) reordered or duplicated the batch's sentences. Bisection isolates it."""


class TransientServerError(ServerError):
    """Connection refused or reset, a timeout, or a 5xx other than 500: worth another try."""


class ServerThrottled(ServerError):
    """The server kept answering 429/503 (busy) past one request's tries and wait deadline. Not
    transient to the shard (the client has already waited) and not a lost server (it answers)."""


class ServerLost(ServerError):
    """The server's process or Slurm job ended while requests were in flight."""


class ServerHung(ServerLost):
    """A request outlived its read timeout. NeMo never recovers from a hang: restart the job."""


class CircuitOpen(SdgError):
    """More than the allowed share of recent records failed."""


class StorageError(SdgError):
    """Reading input or publishing output failed."""


class LocationChanged(SdgError):
    """The run's output directory was replaced (by a symlink, or moved) after it was checked: no
    write follows it. Never retried: the next attempt would find the same swap."""


class LeaseLost(SdgError):
    """Another run took this run's lease (it stopped renewing past the TTL): this run stops
    writing and fails, so it never overwrites the new holder's output. Never retried."""
