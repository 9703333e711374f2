"""The one command runner: argv lists only (never a shell string), a timeout on every call,
and an error that carries the exit code and the tail of stderr."""

from __future__ import annotations

import logging
import shlex
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

from infra.errors import CommandError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CommandResult:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str


def tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def run_command(
    argv: list[str],
    *,
    timeout: float,
    check: bool = True,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
) -> CommandResult:
    """Run `argv` and return its output. Raises CommandError on a non-zero exit (when `check`),
    a timeout, or a missing executable."""
    shown = shlex.join(argv)
    log.debug("running %s", shown)
    try:
        proc = subprocess.run(
            argv,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            # Its own session: a Ctrl-C at the terminal goes to the whole foreground process group,
            # and a squeue or scancel of the CLI's teardown must not die of it (exit -2) while the
            # CLI, which decides when to stop, is still releasing the allocation.
            start_new_session=True,
        )
    except FileNotFoundError as exc:
        raise CommandError(
            f"Command not found: {argv[0]!r} (running `{shown}`). Install it or put it on PATH.",
            argv=argv,
            returncode=None,
        ) from exc
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        raise CommandError(
            f"`{shown}` did not finish within {timeout:.0f} s; stderr tail:\n{tail(stderr)}\n"
            "Check that the service it talks to is up (for Slurm: `scontrol ping`).",
            argv=argv,
            returncode=None,
            stderr=stderr,
        ) from exc
    result = CommandResult(argv, proc.returncode, proc.stdout, proc.stderr)
    if check and proc.returncode != 0:
        raise CommandError(
            f"`{shown}` exited with code {proc.returncode}; stderr tail:\n{tail(proc.stderr)}",
            argv=argv,
            returncode=proc.returncode,
            stderr=proc.stderr,
        )
    return result
