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


def free_ray_port(server_port: int, server_span: int = 1) -> int:
    """slurm.ray_port P for a vllm job on this host: the ports Ray binds at fixed numbers (P..P+8,
    infra/slurm/launch.py) are free, and Ray's whole block, workers' range included, stays clear of
    the server's ports (the spec refuses an overlap). The workers' range is not reserved: the Ray
    stand-ins bind nothing, and handing out 1100 ports a test would soon exhaust the range."""
    from infra.slurm.launch import RAY_HEAD_PORTS, RAY_NODE_PORTS, RAY_PORT_SPAN

    for _ in range(50):
        base = free_port(span=1 + len(RAY_NODE_PORTS) + len(RAY_HEAD_PORTS))
        if base + RAY_PORT_SPAN <= server_port or base >= server_port + server_span:
            return base
    raise RuntimeError(f"no Ray port clear of the server's {server_port}..{server_port + server_span - 1}")
