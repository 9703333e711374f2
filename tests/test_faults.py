"""The fault suite (benchmarks/faults.py) as tests: every fault, 0 lost, 0 duplicated, 0 leaked. BENCH_ONLY
rows take minutes: `make faults` runs them, a dedicated test covers each."""

import pytest

from benchmarks.faults import BENCH_ONLY, CASES, SLURM_CASES

pytestmark = [pytest.mark.faults, pytest.mark.integration]


@pytest.mark.parametrize("name", [n for n in CASES if n not in SLURM_CASES | BENCH_ONLY])
def test_fault(name, prefect_harness, workdir, monkeypatch):
    # The API outage's run ends waiting for UI updates the dead API never takes: 2 s, not the 15 s
    # default, say it as well (the case passes it to its CLI child). No other case's API is away.
    monkeypatch.setenv("NSDG_ARTIFACTS_FLUSH_S", "2")
    row = CASES[name](workdir)
    assert (row.lost, row.duplicated, row.leaked) == (0, 0, 0), row
    assert row.injected >= 1 and row.detected >= 1, row


@pytest.mark.slurm
@pytest.mark.parametrize("name", sorted(SLURM_CASES - BENCH_ONLY))
def test_slurm_fault(name, prefect_harness, slurm_cluster, workdir):
    row = CASES[name](workdir)
    assert (row.lost, row.duplicated, row.leaked) == (0, 0, 0), row
    assert row.injected == 1 and row.detected >= 1, row
