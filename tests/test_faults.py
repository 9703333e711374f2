"""The fault suite (benchmarks/faults.py) as tests: every fault, 0 lost, 0 duplicated, 0 leaked."""

import pytest

from benchmarks.faults import CASES, SLURM_CASES

pytestmark = [pytest.mark.faults, pytest.mark.integration]


@pytest.mark.parametrize("name", [n for n in CASES if n not in SLURM_CASES])
def test_fault(name, prefect_harness, workdir):
    row = CASES[name](workdir)
    assert (row.lost, row.duplicated, row.leaked) == (0, 0, 0), row
    assert row.injected >= 1 and row.detected >= 1, row


@pytest.mark.slurm
@pytest.mark.parametrize("name", sorted(SLURM_CASES))
def test_slurm_fault(name, prefect_harness, slurm_cluster, workdir):
    row = CASES[name](workdir)
    assert (row.lost, row.duplicated, row.leaked) == (0, 0, 0), row
    assert row.injected == 1 and row.detected >= 1, row
