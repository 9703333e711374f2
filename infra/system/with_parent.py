"""`python -m infra.system.with_parent PID MODULE [ARG ...]`: run `python -m MODULE ARG ...` in this
process, and stop it (SIGTERM to itself, which the module handles as its own stop) once process PID,
its starter, is gone.

For a child started in a session of its own (so a terminal's Ctrl-C reaches only its starter) whose
command line has no such switch of its own, as the local server's `--exit-with-parent` is: a starter
killed with no chance to stop it (kill -9) cannot leave it running."""

from __future__ import annotations

import runpy
import sys

from infra.system.process import exit_with_parent


def command(parent: int, module: str, *args: str) -> list[str]:
    """The argv that runs `python -m module args` watched this way."""
    return [sys.executable, "-m", "infra.system.with_parent", str(parent), module, *args]


def main(argv: list[str]) -> None:
    parent, module, *args = argv
    exit_with_parent(int(parent))
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
