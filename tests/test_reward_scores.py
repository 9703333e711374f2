"""The reward stage's pure parts: the conversation in the reward model's format, the context check,
replies read as attributes, the weighted scalar, keep_if."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from infra.prompting.tokens import ByteEstimate
from infra.reward.conversation import Conversation, Unscorable, build
from infra.reward.scores import MODEL_CARD_WEIGHTS, RewardParams, read_scores, reward_filter


def test_a_multi_turn_conversation_in_the_steerlm_format_with_the_rows_own_system_turn():
    row = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "u1"},
                        {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"},
                        {"role": "assistant", "content": "a2"}]}
    got = build(row, system_prompt="ignored", counter=ByteEstimate(), context_length=4096)
    assert isinstance(got, Conversation)
    assert got.text == ("<extra_id_0>System\nS\n<extra_id_1>User\nu1\n<extra_id_1>Assistant\na1\n"
                        "<extra_id_1>User\nu2\n<extra_id_1>Assistant\na2\n<extra_id_2>")
    assert got.tokens == len(got.text.encode()) and [m["role"] for m in got.messages] == ["user", "assistant"] * 2


def test_the_context_keeps_one_token_for_bos_or_eos_and_a_row_without_a_reply_is_named():
    row = {"prompt": "p", "completion": "c"}
    text = "<extra_id_0>System\n\n<extra_id_1>User\np\n<extra_id_1>Assistant\nc\n<extra_id_2>"
    n = len(text.encode())
    assert isinstance(build(row, system_prompt="", counter=ByteEstimate(), context_length=n + 1), Conversation)
    over = build(row, system_prompt="", counter=ByteEstimate(), context_length=n)
    assert over == Unscorable("reward_overlong", n, n - 1)
    for bad, why in [({"prompt": "p"}, "neither messages nor text prompt and completion"),
                     ({"messages": [{"role": "user", "content": "q"}]}, "the last turn is not the assistant's"),
                     ({"messages": [{"role": "tool", "content": "q"}]}, "messages[0] is not")]:
        got = build(bad, system_prompt="", counter=ByteEstimate(), context_length=4096)
        assert got.reason == "reward_no_conversation" and why in got.value


def test_replies_read_as_named_attributes_and_the_model_cards_scalar():
    p = RewardParams(weights=MODEL_CARD_WEIGHTS)
    nine = {"rewards": [9.0, 9.0, 9.0, 9.0, 3.0, 2.0, 4.0, 1.0, 0.5]}
    got = read_scores(nine, p)
    assert got == {"helpfulness": 3.0, "correctness": 2.0, "coherence": 4.0, "complexity": 1.0, "verbosity": 0.5,
                   "reward": pytest.approx(0.3 * 3 + 0.74 * 2 + 0.46 * 4 + 0.47 * 1 - 0.33 * 0.5)}
    assert read_scores({"rewards": [3.0, 2.0, 4.0, 1.0, 0.5]}, p)["coherence"] == 4.0  # exactly the five
    assert "3 values" in read_scores({"rewards": [1.0, 2.0, 3.0]}, p)
    named = {"attributes": {"helpfulness": 1, "correctness": 2, "coherence": 3, "complexity": 4, "verbosity": 5}}
    assert read_scores(named, RewardParams())["verbosity"] == 5.0
    assert read_scores({"attributes": {"helpfulness": 1}}, RewardParams()).startswith(
        "the reply has no correctness, coherence, complexity, verbosity")


def test_keep_if_bounds_and_the_reasons_of_rows_never_scored():
    check = reward_filter(RewardParams(weights=MODEL_CARD_WEIGHTS, keep_if={"helpfulness": 3, "verbosity": {"max": 1},
                                                                            "reward": {"min": 0}}))
    row = {"reward": {"rewards": [0, 0, 0, 0, 3.5, 3, 3, 3, 0.5]}}
    assert check(row) is None and row["reward"]["helpfulness"] == 3.5
    assert check({"reward": {"rewards": [0, 0, 0, 0, 2.5, 3, 3, 3, 0.5]}}).as_dict() == \
        {"filter": "reward_min_helpfulness", "value": 2.5, "limit": 3}
    assert check({"reward": {"rewards": [0, 0, 0, 0, 3.5, 3, 3, 3, 1.5]}}).filter == "reward_max_verbosity"
    assert check({"reward": {"error": "reward_overlong", "value": 5000, "limit": 4095}}).as_dict() == \
        {"filter": "reward_overlong", "value": 5000, "limit": 4095}
    assert check({"reward": {"error": "HTTP 400: bad"}}).filter == "reward_failed"
    assert check({"reward": {"rewards": [1.0]}}).filter == "reward_unreadable"
    with pytest.raises(ValidationError, match="not one of attributes"):
        RewardParams(keep_if={"helpfulnes": 3})
    with pytest.raises(ValidationError, match="not `reward`"):
        RewardParams(attributes=["reward"])
