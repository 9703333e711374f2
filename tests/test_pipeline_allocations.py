"""A pipeline run's allocation summed over its invocations (infra/pipeline/allocations.py), in a real
local run directory: the split by server (`servers`) adds up over a first invocation that swapped in a
reward server and a rerun that did not, instead of the rerun's manifest losing it."""

from __future__ import annotations

from infra.pipeline.allocations import InvocationLedger
from infra.storage.local import LocalOutputStore


def _close(store, invocation: str, allocation: dict) -> dict:
    """The invocation's end as the pipeline flow closes it: its figures noted, the run's summed."""
    stages = {"answers": {"busy_s": 1.0, "held_s": 2.0, "gpu_hours": allocation["gpu_hours"]}}
    return InvocationLedger(store, invocation).close(allocation, stages)


def test_the_split_by_server_is_summed_over_invocations_and_adds_up(tmp_path):
    store = LocalOutputStore(tmp_path / "run")
    first = _close(store, "inv-1", {"gpu_hours": 1.5, "held_s": 60.0, "busy_s": 50.0,
                                    "servers": {"generator_gpu_hours": 1.0, "reward_gpu_hours": 0.5, "reward_held_s": 20.0}})
    assert first["servers"] == {"generator_gpu_hours": 1.0, "reward_gpu_hours": 0.5, "reward_held_s": 20.0}
    # A rerun that generated a little more and scored nothing: no reward server swapped in.
    again = _close(store, "inv-2", {"gpu_hours": 0.25, "held_s": 10.0, "busy_s": 9.0})
    assert again["gpu_hours"] == 1.75 and again["held_s"] == 70.0
    assert again["servers"] == {"generator_gpu_hours": 1.25, "reward_gpu_hours": 0.5, "reward_held_s": 20.0}
    assert again["servers"]["generator_gpu_hours"] + again["servers"]["reward_gpu_hours"] == again["gpu_hours"]
    # The same invocation noted again (its last beat, then its end) replaces its entry: counted once.
    assert _close(store, "inv-2", {"gpu_hours": 0.25, "held_s": 10.0, "busy_s": 9.0})["servers"] == again["servers"]


def test_a_run_that_never_swapped_in_a_reward_server_has_no_split(tmp_path):
    store = LocalOutputStore(tmp_path / "run")
    _close(store, "inv-1", {"gpu_hours": 1.0, "held_s": 60.0, "busy_s": 50.0})
    assert "servers" not in _close(store, "inv-2", {"gpu_hours": 0.5, "held_s": 30.0, "busy_s": 20.0})
