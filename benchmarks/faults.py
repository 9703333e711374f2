"""The fault suite: every fault we can name, injected into a real run against the real local
stand-ins (the NeMo-compatible server with its fault switches, the local Slurm cluster, moto's S3
server behind a fault proxy), then the output checked record by record.

The cases live by domain: benchmarks/faults_serving.py (server, flow, Slurm job, S3 outage, bad
input), faults_identity.py (tokenizer, input, multipart uploads), faults_releases.py (releases, the
Prefect API, attached replicas), faults_state.py (states, leases, queues, rollover); what they run
on is benchmarks/fault_harness.py.

`make faults` prints the table; tests/test_faults.py (marker `faults`) runs the same cases and
asserts 0 lost, 0 duplicated, 0 leaked for every row.

    python -m benchmarks.faults [--only NAME ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from benchmarks import faults_identity, faults_releases, faults_serving, faults_state
from benchmarks.fault_harness import Row, _wait, environment, local_env, local_servers, table

# What the tests and the other benchmarks take from the suite (defined in the harness).
__all__ = ["BENCH_ONLY", "CASES", "SLURM_CASES", "Row", "_wait", "environment", "local_env", "local_servers", "main"]

CASES: dict[str, Callable[[Path], Row]] = {**faults_serving.CASES, **faults_identity.CASES,
                                            **faults_releases.CASES, **faults_state.CASES}
SLURM_CASES = faults_serving.SLURM_CASES | faults_releases.SLURM_CASES | faults_state.SLURM_CASES
BENCH_ONLY = faults_state.BENCH_ONLY


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.faults", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=sorted(CASES), help="run only these cases")
    args = parser.parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    rows = []
    with prefect_test_harness(server_startup_timeout=90), tempfile.TemporaryDirectory(prefix="nsdg-faults-") as tmp:
        for name in args.only or list(CASES):
            case_dir = Path(tmp) / name
            case_dir.mkdir()
            print(f"running {name} …", file=sys.stderr, flush=True)
            try:
                rows.append(CASES[name](case_dir))
            except Exception as exc:  # a case that cannot finish is a failed row, not a crash of the suite
                rows.append(Row(name, lost=-1, note=f"FAILED: {type(exc).__name__}: {str(exc)[:200]}"))
    print(table(rows))
    bad = [r for r in rows if (r.lost, r.duplicated, r.leaked) != (0, 0, 0)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
