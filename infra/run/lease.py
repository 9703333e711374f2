"""One run at a time per run id: a lease object in the run's output location.

`run.lease` names the flow run that holds it, with an expiry; a heartbeat thread renews it every
third of its time to live. It is created atomically (link(2) locally, with O_EXCL's
all-or-nothing; `PUT If-None-Match: *` on S3) and every later change is a compare-and-swap on the
version the holder last saw (an flock'd compare-and-replace locally; `If-Match: <ETag>` on S3),
so of two runs that start together exactly one holds it, and a second run is refused at plan
time, before any allocation, with the holder's name. A holder that stops renewing (hung, its
host gone) loses the lease once it expires: the next run takes it over, by the same
compare-and-swap, so two late-comers cannot both take it. A holder whose process is gone from
this host (kill -9, OOM) loses it at once, as does the same flow run (a `prefect flow-run
retry`), which takes its own lease back.

A holder that lost its lease (stopped or starved past the TTL, then taken over) writes nothing
more: the flow writes through `fenced()`, a view of the store whose every write first checks the
lease (`check_held`: the stored record is still this acquisition's, or, when the heartbeat is
late, a compare-and-swap renewal proves it), and fails with LeaseLost naming the new holder.

Expiry is judged on the holder's clock (`expires_at`, epoch seconds): the login node that runs
the worker runs every holder, so the clocks agree.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from infra.errors import LeaseLost, RunLeaseHeld, SdgError
from infra.run.layout import LEASE_NAME
from infra.storage import OutputStore
from infra.system.periodic import Periodic

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class LeaseRecord:
    holder: str  # the flow run id (or a CLI run's own id)
    holder_name: str  # what a person recognises: the flow run's name
    host: str
    pid: int
    token: str  # this acquisition: a holder never renews a lease it has lost and got back
    acquired_at: float
    renewed_at: float
    expires_at: float

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "LeaseRecord | None":
        try:
            return cls(**json.loads(data))
        except (ValueError, TypeError):
            return None  # not ours or damaged: treated as expired, and replaced by compare-and-swap

    def describe(self) -> str:
        return f"flow run {self.holder_name!r} ({self.holder}) on {self.host}, pid {self.pid}"


def _holder_gone(record: LeaseRecord) -> bool:
    """The holder ran on this host and its process is gone (kill -9, OOM): no need to wait for the
    expiry. A reused pid only makes us wait, the safe way round."""
    if record.host != socket.gethostname():
        return False
    try:
        os.kill(record.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


class RunLease:
    """The lease a run holds on its output location while it runs. `acquire()` it before the plan;
    `release()` it at the end (a killed holder's lease expires instead)."""

    def __init__(self, store: OutputStore, holder: str, holder_name: str, ttl_s: float):
        self.store = store
        self.holder, self.holder_name, self.ttl_s = holder, holder_name, ttl_s
        self.record: LeaseRecord | None = None
        self._version: str | None = None
        self._renewal: Periodic | None = None
        self._lock = threading.Lock()
        self.lost = False

    @property
    def uri(self) -> str:
        return self.store.uri(LEASE_NAME)

    def _new_record(self, token: str, acquired_at: float | None = None) -> LeaseRecord:
        now = time.time()
        return LeaseRecord(self.holder, self.holder_name, socket.gethostname(), os.getpid(), token,
                           acquired_at or now, now, now + self.ttl_s)

    def acquire(self, *, heartbeat: bool = True) -> "RunLease":
        """Take the lease, or raise RunLeaseHeld naming its live holder."""
        record = self._new_record(uuid.uuid4().hex)
        version = self.store.create_exclusive(LEASE_NAME, record.to_json())
        if version is None:
            version = self._take_over(record)
        self.record, self._version = record, version
        log.info("run lease %s taken by %s, expires %.0f s after each renewal", self.uri, record.describe(), self.ttl_s)
        if heartbeat:
            # Every third of the TTL; a storage hiccup is tried again at the next beat, before the expiry.
            self._renewal = Periodic(f"lease-{self.holder[:8]}", self.renew, self.ttl_s / 3,
                                     what=f"run lease {self.uri} not renewed", transient=(SdgError,), logger=log).start()
        return self

    def _take_over(self, record: LeaseRecord) -> str:
        """The lease exists: take it if it expired or is this flow run's own; else refuse."""
        current = self.store.read_versioned(LEASE_NAME)
        if current is None:  # released between our create and our read: create again
            version = self.store.create_exclusive(LEASE_NAME, record.to_json())
            if version is not None:
                return version
            current = self.store.read_versioned(LEASE_NAME)
        if current is not None:
            data, seen_version = current
            other = LeaseRecord.from_json(data)
            now = time.time()
            if other is None or other.expires_at <= now or other.holder == self.holder or _holder_gone(other):
                version = self.store.replace_if_version(LEASE_NAME, record.to_json(), seen_version)
                if version is not None:
                    if other is not None and other.holder != self.holder:
                        log.warning("run lease %s: %s stopped renewing %.0f s ago; taken over", self.uri,
                                    other.describe(), now - other.renewed_at)
                    return version
                current = self.store.read_versioned(LEASE_NAME)  # someone else was faster: say who
                other = LeaseRecord.from_json(current[0]) if current else other
            if other is not None:
                raise RunLeaseHeld(
                    f"Run {self.store.location} is already running: {other.describe()} holds its lease "
                    f"({self.uri}, renewed {max(0.0, now - other.renewed_at):.0f} s ago, expires in "
                    f"{max(0.0, other.expires_at - now):.0f} s). Wait for that run to end or cancel it; a holder "
                    "that stopped (killed, crashed) loses the lease when it expires, and a rerun then goes ahead. "
                    "Or start a separate run under another run_id.")
        raise RunLeaseHeld(f"Run {self.store.location}: its lease {self.uri} changed while it was being taken. "
                           "Another run started at the same moment; rerun to see which one holds it.")

    def renew(self) -> bool:
        """Push the expiry forward; False (and `lost`) when another run took the lease meanwhile."""
        with self._lock:
            return self._renew_locked()

    def _renew_locked(self) -> bool:
        if self.record is None or self._version is None or self.lost:
            return False
        record = self._new_record(self.record.token, self.record.acquired_at)
        version = self.store.replace_if_version(LEASE_NAME, record.to_json(), self._version)
        if version is None:
            self._lose()
            return False
        self.record, self._version = record, version
        return True

    def _lose(self) -> None:
        self.lost = True
        log.error("run lease %s was taken by another run (this one renewed too late): this run writes nothing more "
                  "and fails", self.uri)

    def check_held(self) -> None:
        """Raise LeaseLost unless this run still holds its lease: the fence before every write.
        A stopped process wakes up before its heartbeat notices anything, so this does not trust
        `lost` alone: a heartbeat that is late (half the TTL) is renewed here, by the same
        compare-and-swap; otherwise the stored record must still be this acquisition's."""
        with self._lock:
            if not self.lost and self._version is not None:
                if time.time() - self.record.renewed_at >= self.ttl_s / 2:
                    if self._renew_locked():
                        return
                else:
                    current = self.store.read_versioned(LEASE_NAME)
                    if current is not None and current[1] == self._version:
                        return
                    self._lose()
        raise LeaseLost(self._loss_message())

    def _loss_message(self) -> str:
        if not self.lost:
            return f"Run {self.store.location}: this run no longer holds its lease {self.uri} (released); it writes nothing more."
        try:
            current = self.store.read_versioned(LEASE_NAME)
        except SdgError:
            current = None
        other = LeaseRecord.from_json(current[0]) if current else None
        if other is not None and other.token != self.record.token:
            holder = f"{other.describe()}, which holds it now"
        else:
            holder = "another run, which has finished or released it since"
        late = time.time() - self.record.renewed_at
        return (f"Run {self.store.location}: its lease {self.uri} was taken over by {holder}: this run "
                f"(flow run {self.holder_name!r}) last renewed it {late:.0f} s ago, past its {self.ttl_s:.0f} s TTL "
                "(the process was stopped, suspended or starved). It stopped writing so as not to overwrite that run's "
                "output, and failed; its servers are released. Let that run finish and use its manifest; rerun with the "
                "same run_id only once no run holds the lease.")

    def fenced(self) -> "FencedStore":
        """The run's store, every write checked against this lease (see FencedStore)."""
        return FencedStore(self.store, self)

    def stop_renewing(self, deadline_s: float = 30.0) -> None:
        """No renewal after this (a renewal under way is waited for at most `deadline_s`): the lease
        then expires unless released."""
        if self._renewal is not None:
            self._renewal.stop(deadline_s)

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours. Idempotent."""
        self.stop_renewing()
        with self._lock:
            if self._version is not None and not self.lost:
                try:
                    self.store.delete_if_version(LEASE_NAME, self._version)
                except SdgError as exc:
                    log.warning("run lease %s not deleted (it expires in %.0f s): %s", self.uri, self.ttl_s, exc)
            self._version = None


class FencedStore:
    """An OutputStore whose every write first checks the run's lease (`RunLease.check_held`):
    a run that lost its lease publishes no part, state, judgement, verdict, kept file or manifest
    after the loss is known. Only the reads below pass unchecked; every other method is taken to
    write (a method a store gains later is fenced by default)."""

    READS = frozenset({"uri", "read_bytes", "read_versioned", "list_names", "sha256"})

    def __init__(self, store: OutputStore, lease: RunLease):
        self._store, self._lease = store, lease
        self.location = store.location

    @property
    def lease(self) -> RunLease:
        """The lease it checks: a store opened beside this one (the run's `data/`) is fenced by it too."""
        return self._lease

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        value = getattr(self._store, attr)
        if attr in self.READS or not callable(value):
            return value

        def fenced(*args, **kwargs):
            self._lease.check_held()
            return value(*args, **kwargs)

        return fenced


# Leases this process holds, by holder: the flow's completion and failure hooks release them.
# Process-wide on purpose: Prefect calls those hooks with (flow, flow_run, state) only, so the
# flow-run id is all they have to find the lease by.
_held: dict[str, RunLease] = {}
_held_lock = threading.Lock()


def hold_run_lease(store: OutputStore, holder: str, holder_name: str, ttl_s: float) -> RunLease:
    lease = RunLease(store, holder, holder_name, ttl_s).acquire()
    with _held_lock:
        previous = _held.pop(holder, None)
        _held[holder] = lease
    if previous is not None:
        previous.stop_renewing(0)  # the same flow run again: the new lease replaced it
    return lease


def release_held(holder: str) -> None:
    with _held_lock:
        lease = _held.pop(holder, None)
    if lease is not None:
        lease.release()
