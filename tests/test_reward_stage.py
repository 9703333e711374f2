"""The reward stage against a real PyTriton/Triton server with NeMo-Aligner's contract
(tests/reward_standin.py): every row scored once, over-long rows never sent, thresholds applied
with no server, a server lost mid-stage replaced with nothing lost."""

from __future__ import annotations

import json

import pytest

from infra.errors import TransientServerError
from infra.prompting.tokens import ByteEstimate
from infra.recipes.params import FilterParams
from infra.reward.client import reward_client
from infra.reward.conversation import format_conversation
from infra.reward.scores import MODEL_CARD_WEIGHTS, HELPSTEER2, RewardParams
from infra.reward.stage import RewardScorer, run_reward_stage
from infra.storage.local import LocalOutputStore
from tests.reward_standin import rewards_of

pytestmark = pytest.mark.integration

CONTEXT = 200  # bytes (the byte estimate counts one token per byte): small enough for one row to pass it


def rows() -> list[dict]:
    out = [{"id": f"r{i}", "sample": 0, "prompt": f"question {i}?", "completion": f"answer {i} [helpfulness={i % 4}.5]"}
           for i in range(7)]
    out[2]["completion"] = "x" * 300  # over the context: never sent
    out[4] = {"id": "r4", "sample": 1, "messages": [{"role": "system", "content": "Be brief."},
                                                     {"role": "user", "content": "hi"},
                                                     {"role": "assistant", "content": "hello [helpfulness=3.9]"}]}
    out[5] = {"id": "r5", "sample": 0, "prompt": "no reply here"}  # nothing to score
    return out


def sent_texts(rs: list[dict], system: str = "") -> list[str]:
    texts = []
    for r in rs:
        turns = r.get("messages") or [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r.get("completion")}]
        if turns[-1]["content"] is None:
            continue
        text = format_conversation(turns, system)
        if len(text.encode()) <= CONTEXT - 1:
            texts.append(text)
    return texts


def run(store, params: RewardParams, connect, replace=None, restarts: int = 0) -> dict:
    scorer = RewardScorer(params, ByteEstimate(), {"engine": "nemo-aligner", "model": "reward_model"})
    return run_reward_stage(store, scorer, rows(), shard_size=3, filters=FilterParams(), connect=connect,
                            replace=replace or (lambda c, e: pytest.fail(f"no replacement expected: {e}")),
                            restarts_allowed=restarts, generation_hash="g1")


def filtered(store) -> list[dict]:
    return [json.loads(line) for line in (store.root / "filtered.jsonl").read_text().splitlines()]


def kept(store) -> list[dict]:
    return [json.loads(line) for p in sorted(store.root.glob("kept-*.jsonl")) for line in p.read_text().splitlines()]


def test_every_row_scored_once_overlong_refused_and_thresholds_rescored_without_a_server(reward_server, tmp_path):
    store = LocalOutputStore(tmp_path / "out" / "rm")
    params = RewardParams(context_length=CONTEXT, weights=MODEL_CARD_WEIGHTS, keep_if={"helpfulness": 2.0}, batch_size=2)
    out = run(store, params, lambda: reward_client("nemo-aligner", reward_server.url))
    assert sorted(reward_server.scored()) == sorted(sent_texts(rows()))  # each sendable row exactly once
    assert out["parts_scored"] == 3 and out["records_written"] == 7
    reasons = {(f["id"], f["filter"]): f for f in filtered(store)}
    assert reasons[("r2", "reward_overlong")]["value"] > CONTEXT - 1 and reasons[("r2", "reward_overlong")]["limit"] == CONTEXT - 1
    assert ("r5", "reward_no_conversation") in reasons
    low = {i for i, f in reasons if f == "reward_min_helpfulness"}
    assert low == {"r0", "r1"} and reasons[("r0", "reward_min_helpfulness")]["value"] == 0.5
    got = {r["id"]: r for r in kept(store)}
    assert set(got) == {"r3", "r4", "r6"}
    text = sent_texts([rows()[4]])[0]
    assert text.startswith("<extra_id_0>System\nBe brief.\n<extra_id_1>User\nhi\n") and text.endswith("<extra_id_2>")
    expect = dict(zip(HELPSTEER2, rewards_of(text)[4:9]))
    assert got["r4"]["reward"] == {**{k: pytest.approx(v, abs=1e-5) for k, v in expect.items()},
                                   "reward": pytest.approx(sum(MODEL_CARD_WEIGHTS[k] * v for k, v in expect.items()), abs=1e-4)}

    # A new threshold: curated again, no server (connect would fail the test), nothing rescored.
    def no_server():
        raise AssertionError("a new threshold must not need the reward server")
    again = run(store, params.model_copy(update={"keep_if": {"helpfulness": 3.6}}), no_server)
    assert again["parts_scored"] == 0 and again["parts_reused"] == 3
    assert {r["id"] for r in kept(store)} == {"r4"}
    assert len(reward_server.scored()) == len(sent_texts(rows()))


def test_a_server_lost_mid_stage_is_replaced_and_nothing_is_lost(reward_server, tmp_path):
    store = LocalOutputStore(tmp_path / "out" / "rm")
    calls = {"n": 0}

    class Dying:
        """The real client; the server is killed before the second part's first request."""
        def __init__(self):
            self.inner = reward_client("nemo-aligner", reward_server.url)

        def score(self, texts, messages):
            calls["n"] += 1
            if calls["n"] == 2:
                reward_server.stop()
            return self.inner.score(texts, messages)

        def close(self):
            self.inner.close()

    def replace(client, exc):
        assert isinstance(exc, TransientServerError)
        client.close()
        reward_server.start()  # the replacement: a new server process on the same address
        return reward_client("nemo-aligner", reward_server.url)

    out = run(store, RewardParams(context_length=CONTEXT, batch_size=8), Dying, replace, restarts=1)
    assert out["server_restarts"] == 1 and out["parts_scored"] == 3 and reward_server.starts == 2
    assert sorted(reward_server.scored()) == sorted(sent_texts(rows()))  # none lost, none twice
    assert out["records_kept"] == 5  # 7 less the over-long and the unscorable row: no threshold
