"""A write lock held by a stopped or hung process ends the wait with a clear error, never hangs."""

from __future__ import annotations

import fcntl

import pytest

from infra.errors import StorageError
from infra.system.locks import flock_within


def test_a_lock_held_past_the_wait_is_a_storage_error_naming_the_object(tmp_path):
    path = tmp_path / ".run.lease.lock"
    with open(path, "ab") as holder, open(path, "ab") as waiter:  # two open files: two flock owners
        fcntl.flock(holder, fcntl.LOCK_EX)
        with pytest.raises(StorageError, match=r"run\.lease: another process has held its write lock for 0 s"):
            flock_within(waiter, "out/run.lease", wait_s=0.2)
        fcntl.flock(holder, fcntl.LOCK_UN)
        flock_within(waiter, "out/run.lease", wait_s=0.2)  # free again: taken at once
