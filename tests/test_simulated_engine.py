"""The simulated engine's tokenizer memo (infra/local_server/simulated_model.py): each sample pass
re-sends a shard's prompts, so a prompt is split once; the memo is bounded and changes no id."""

from __future__ import annotations

from infra.local_server import simulated_model
from infra.local_server.simulated_model import SimulatedEngine


def test_a_prompt_sent_again_is_split_once_and_gets_the_same_ids(monkeypatch):
    engine, fresh = SimulatedEngine(), SimulatedEngine()
    text = "Topic: one\nQuestion: why? <|endoftext|> and then, again"
    first = engine.tokenize(text)
    first.append(99)  # a caller's list is its own: the memo keeps its copy
    splits = []
    monkeypatch.setattr(engine, "_tokenize", lambda t: splits.append(t) or fresh.tokenize(t))
    assert engine.tokenize(text) == fresh.tokenize(text) == first[:-1]
    assert splits == []


def test_the_memo_holds_at_most_its_character_budget(monkeypatch):
    monkeypatch.setattr(simulated_model, "_RECENT_CHARS", 100)
    engine, fresh = SimulatedEngine(), SimulatedEngine()
    texts = [f"prompt number {i} " * 3 for i in range(40)] + ["x" * 101]
    for text in texts + texts[::-1]:
        assert engine.tokenize(text) == fresh.tokenize(text)
        assert engine._recent_chars == sum(map(len, engine._recent)) <= 100
    assert "x" * 101 not in engine._recent  # longer than the whole budget: never kept



def test_a_text_over_the_budget_evicts_nothing(monkeypatch):
    """A text the memo cannot keep (longer than its whole budget) must not empty it on its way: the
    eviction ran before the check, so one long prompt made every shard's prompts be split again."""
    monkeypatch.setattr(simulated_model, "_RECENT_CHARS", 100)
    engine = SimulatedEngine()
    kept = [f"prompt {i}" for i in range(5)]
    for text in kept:
        engine.tokenize(text)
    engine.tokenize("x" * 101)
    assert list(engine._recent) == kept
    assert engine._recent_chars == sum(map(len, kept))
