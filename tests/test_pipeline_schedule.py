"""The streaming pipeline's pure scheduling rules (infra/pipeline/schedule.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from infra.pipeline.schedule import Ready, attribute, busy_by_stage, choose, cut, final_prefix


def test_the_deepest_ready_stage_goes_first_then_its_lowest_shard_then_the_files_order():
    ready = [Ready("topics", 0, 0, 3), Ready("answers", 2, 2, 7), Ready("questions", 1, 1, 0)]
    assert choose(ready).stage == "answers"
    assert choose([Ready("a", 1, 0, 5), Ready("b", 1, 1, 2)]).stage == "b"  # same depth: lower shard
    assert choose([Ready("a", 1, 1, 2), Ready("b", 1, 0, 2)]).stage == "b"  # same shard: file order
    assert choose([]) is None


def test_a_shard_is_final_only_when_every_earlier_shard_of_its_stage_is_settled():
    assert final_prefix(0, 5, {1, 2}) == 0  # shard 0 not in: nothing final, dedup could still change 1 and 2
    assert final_prefix(0, 5, {0, 1, 3}) == 2
    assert final_prefix(2, 5, {0, 1, 2, 3, 4}) == 5
    assert final_prefix(0, 2, {0, 1, 2, 3}) == 2  # never past the shards known so far


def test_a_parent_shards_rows_are_cut_into_child_shards_numbered_after_the_earlier_ones():
    assert cut(0, 4, 7) == []
    assert cut(3, 4, 0) == [(0, 0, 3)]
    assert cut(9, 4, 2) == [(2, 0, 4), (3, 4, 8), (4, 8, 9)]
    with pytest.raises(ValueError):
        cut(3, 0, 0)


@given(st.lists(st.integers(0, 50), max_size=20), st.integers(1, 10))
def test_child_shards_cover_every_parent_row_once_in_order(rows_per_parent, size):
    base, covered = 0, []
    for rows in rows_per_parent:
        shards = cut(rows, size, base)
        assert [i for i, _, _ in shards] == list(range(base, base + len(shards)))
        covered += [(rows, r) for _, a, b in shards for r in range(a, b)]
        assert all(b - a <= size for _, a, b in shards)
        base += len(shards)
    assert covered == [(rows, r) for rows in rows_per_parent for r in range(rows)]


def test_busy_time_is_split_among_the_shards_in_flight_and_the_allocation_by_its_share():
    # a: 0-10 alone but for 5-10 beside b; b: 5-20 (10-20 alone); a gap 20-30 counts for no one
    busy = busy_by_stage([("a", 0, 10), ("b", 5, 20), ("a", 30, 40)])
    assert busy == pytest.approx({"a": 5 + 2.5 + 10, "b": 2.5 + 10})
    shares = attribute(busy, 3.0)
    assert sum(shares.values()) == pytest.approx(3.0) and shares["a"] == pytest.approx(3.0 * 17.5 / 30)
    assert attribute({"a": 0.0}, 5.0) == {"a": 0.0}


class _Done:
    """A finished task's future, as Pool reads one (PrefectFuture: .wrapped_future, .result())."""

    def __init__(self, value):
        import concurrent.futures

        self.wrapped_future = concurrent.futures.Future()
        self.wrapped_future.set_result(value)

    def result(self):
        return self.wrapped_future.result()


class _Backend:
    name, job_ids, released = "local", [], 0

    def release(self):
        self.released += 1

    def running_at(self):
        return None

    def status(self):
        return "fake"

    def url(self):
        return "http://fake"

    def scheduled_end(self):
        return None


def test_the_pool_keeps_its_server_while_a_feed_waits_and_ends_when_the_feed_does():
    """A streaming feed says WAIT while a parent's shard is in flight: the pool neither ends nor
    releases its replica then; the child shard made from the parent's result is served too."""
    import time
    from types import SimpleNamespace

    from flows.replicas import WAIT, Pool

    reported, sent = [], []
    backend = _Backend()

    def feed():
        yield "parent"
        while not reported:  # the child exists only once the parent's result is in
            yield WAIT
        yield "child"

    def submit(client, work, backend_):
        assert backend.released == 0  # never released while work is still to come
        sent.append(work)
        now = time.time()
        return _Done(SimpleNamespace(part=SimpleNamespace(records=1, shard=len(sent) - 1), started_at=now,
                                     finished_at=now, judged_only=False))

    pool = Pool(make_backend=lambda launch, i: backend, start=lambda b: _Done(object()), submit=submit,
                release=lambda b: b.release(), shards=feed(), replicas=1, max_in_flight=2, restarts_allowed=0,
                on_result=reported.append)
    results = pool.run()
    assert sent == ["parent", "child"] and len(results) == len(reported) == 2 and backend.released == 1
