"""The GIL switch interval while shards are generated (infra/generation.py responsive_threads): a shard
thread whose request slot frees sends its next request without waiting out Python's default 5 ms
behind another shard's reply parsing. Speed is `make bench`'s (benchmarks/engines.py); here, that the
interval is lowered exactly while a pool generates and set back after, also when pools overlap."""

import json
import sys
import threading

import pytest

from infra.generation import SHARD_SWITCH_INTERVAL_S, responsive_threads


@pytest.fixture
def default_interval():
    before = sys.getswitchinterval()
    sys.setswitchinterval(0.005)
    yield 0.005
    sys.setswitchinterval(before)


def test_lowered_while_generating_and_set_back_when_the_last_of_overlapping_pools_ends(default_interval):
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, float] = {}

    def first():
        with responsive_threads():
            first_in.set()
            second_in.wait(10)
            seen["first"] = sys.getswitchinterval()
        first_out.set()

    t = threading.Thread(target=first)
    t.start()
    first_in.wait(10)
    with responsive_threads():
        second_in.set()
        first_out.wait(10)
        seen["second, after the first ended"] = sys.getswitchinterval()
    t.join(10)
    lowered = pytest.approx(SHARD_SWITCH_INTERVAL_S, abs=2e-6)
    assert seen == {"first": lowered, "second, after the first ended": lowered}
    assert sys.getswitchinterval() == pytest.approx(default_interval, abs=2e-6)


def test_a_shorter_interval_the_process_chose_is_kept(default_interval):
    sys.setswitchinterval(0.0002)
    with responsive_threads():
        assert sys.getswitchinterval() == pytest.approx(0.0002, abs=2e-6)
    assert sys.getswitchinterval() == pytest.approx(0.0002, abs=2e-6)


def test_none_leaves_the_interpreters_interval(default_interval):
    with responsive_threads(None):
        assert sys.getswitchinterval() == pytest.approx(default_interval, abs=2e-6)


@pytest.mark.integration
def test_nemo_generate_flows_shards_run_under_it_and_the_flow_sets_it_back(prefect_harness, workdir, monkeypatch,
                                                                           default_interval):
    import tasks.steps
    from flows.generate import generate

    seen, real = [], tasks.steps.run_shard
    monkeypatch.setattr(tasks.steps, "run_shard", lambda *a, **k: seen.append(sys.getswitchinterval()) or real(*a, **k))
    monkeypatch.setenv("NSDG_LOCAL__ENGINE", "simulated")
    (workdir / "in.jsonl").write_text("".join(json.dumps({"prompt": f"prompt {i}"}) + "\n" for i in range(6)))
    generate(input_uri=str(workdir / "in.jsonl"), output_uri="out", run_id="gil", shard_size=2, batch_size=2)
    assert seen == pytest.approx([SHARD_SWITCH_INTERVAL_S] * 3, abs=2e-6)
    assert sys.getswitchinterval() == pytest.approx(default_interval, abs=2e-6)


@pytest.mark.parametrize("api, lowered", [("nemo-generate", True), ("openai-completions", False)])
def test_only_nemo_generates_pools_lower_it(api, lowered, monkeypatch):
    """Measured for nemo-generate's shard threads; the openai client's request threads keep the interpreter's."""
    from flows.generate import shard_switch_interval
    from infra.settings import load_settings

    monkeypatch.setenv("NSDG_SERVER__API", api)
    settings = load_settings()
    assert shard_switch_interval(settings, settings.profile("local")) == (SHARD_SWITCH_INTERVAL_S if lowered else None)
