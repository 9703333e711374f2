"""Ports for the servers tests and benchmarks start.

A port the kernel hands out for `bind(("", 0))` comes from the ephemeral range, the same range
srun, slurmstepd and every outgoing connection draw from. A server told to bind it later can
find it taken (srun listens on ephemeral ports for its I/O streams), fail with "Address already
in use", and the test's readiness probe then talks HTTP to srun. So the ports handed out here
lie below the ephemeral range, are checked free on every address the servers bind, and are
never handed out twice in one process."""

from __future__ import annotations

import random
import socket
from pathlib import Path

_LOW = 20000
_handed_out: set[int] = set()


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    for host in ("0.0.0.0", "127.0.0.1"):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def free_port(span: int = 1) -> int:
    """A port P such that P … P+span-1 are free now, outside the ephemeral range (replica k of a
    run listens on the configured port + k)."""
    high = _ephemeral_start() - span
    for _ in range(200):
        base = random.randrange(_LOW, high)
        block = range(base, base + span)
        if _handed_out.isdisjoint(block) and all(_bindable(p) for p in block):
            _handed_out.update(block)
            return base
    raise RuntimeError(f"no {span} free consecutive ports in {_LOW}..{high}: is something holding them all?")
