"""Reply sentences are paired with prompts by position: each must echo its own prompt (F6), and
the heuristic strip must not cut into a completion that repeats the prompt's tail (F10)."""

import json

import pytest
import requests

from infra.engines.completion import extract_completion, generation_start, pairing_error
from infra.prompting.dataset import Record, Shard
from infra.errors import ReplyMismatch
from infra.generation import ShardJob, run_shard
from infra.engines.nemo import NemoClient
from infra.prompting.sampling import SamplingParams
from infra.storage.local import LocalOutputStore
from tests.localserver import running_server

TOPICS = ["the tides", "a lighthouse", "sea salt", "a storm", "coral"]
# Templated prompts share their last 20 characters: the tail probe alone cannot tell them apart.
PROMPTS = [f"You are a careful writer. Topic: {t}. Please answer in one short sentence.\nAnswer:" for t in TOPICS]
SP = SamplingParams(tokens_to_generate=12, greedy=True)


def replies(prompts, gens=None):
    return [p + (g if gens else f" completion {i}") for i, (p, g) in enumerate(zip(prompts, gens or prompts))]


def completions(prompts, sentences):
    return [extract_completion(p, s, []) for p, s in zip(prompts, sentences)]


def test_tail_probe_does_not_match_a_repeat_inside_the_generation():
    prompt = "Answer\u00a0briefly.\nQ: What is the capital of Peru?\nA:"  # the NBSP is normalised away
    gen = " Lima\nQ: What is the capital of Peru?\nA: Lima"  # a base model repeating the pattern
    c = extract_completion(prompt, prompt.replace("\u00a0", " ") + gen, [])
    assert (c.text, c.prompt_match) == (gen, "heuristic")


def test_tail_probe_only_where_the_echo_can_end():
    prompt = "Say something about boats and the harbour at dusk"
    reply = "xyz" + " " * 100 + prompt[-20:] + " late"  # the tail far past where the echo could end
    assert generation_start(prompt, reply) == (0, "none")


def test_each_reply_echoing_its_own_prompt_passes():
    sentences = replies(PROMPTS)
    assert pairing_error(PROMPTS, sentences, completions(PROMPTS, sentences)) is None
    # A heuristic echo of its own prompt (a normalised character inside) is accepted, flagged.
    prompts = ["Caf\u0065\u0301 menu: list three dishes served here", "Another prompt about the harbour today"]
    sentences = ["Café menu: list three dishes served here\n1. soup", prompts[1] + " ok"]
    cs = completions(prompts, sentences)
    assert [c.prompt_match for c in cs] == ["heuristic", "exact"] and pairing_error(prompts, sentences, cs) is None


@pytest.mark.parametrize("order, first_bad", [([4, 3, 2, 1, 0], 0), ([0, 0, 2, 3, 4], 1)], ids=["reversed", "duplicated"])
def test_reordered_or_duplicated_replies_are_refused(order, first_bad):
    sentences = [replies(PROMPTS)[k] for k in order]
    why = pairing_error(PROMPTS, sentences, completions(PROMPTS, sentences))
    assert why.startswith(f"reply {first_bad} echoes prompt {order[first_bad]} of the batch")


def test_a_reply_that_echoes_nothing_is_refused():
    sentences = ["something else entirely", PROMPTS[1] + " fine"]
    assert "does not echo" in pairing_error(PROMPTS[:2], sentences, completions(PROMPTS[:2], sentences))


class Reordering(requests.Session):
    """A NeMo-compatible proxy that answers a batch in another order: the branch the real server
    never takes. Every other byte is the real server's reply."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode

    def send(self, request, **kw):  # every request goes out here (the client prepares, then sends)
        reply = super().send(request, **kw)
        if (request.method == "PUT" and request.url.endswith("/generate") and reply.status_code == 200
                and len(json.loads(request.body)["sentences"]) > 1):
            body = reply.json()
            for key in ("sentences", "offsets", "tokens", "token_ids"):
                if key in body:
                    body[key] = body[key][::-1] if self.mode == "reverse" else [body[key][0], *body[key][:-1]]
            reply._content = json.dumps(body).encode()
        return reply


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["reverse", "duplicate"])
def test_a_shard_through_a_reordering_proxy_publishes_only_own_completions(tmp_path, mode):
    records = [Record(f"q{i}", p, i + 1) for i, p in enumerate(PROMPTS)]
    with running_server(tmp_path, "--engine", "simulated") as (url, _):
        own = {p: NemoClient(url).generate([p], SP)[0].completion.text for p in PROMPTS}
        with pytest.raises(ReplyMismatch):
            NemoClient(url, session=Reordering(mode)).generate(PROMPTS, SP)
        result = run_shard(NemoClient(url, session=Reordering(mode)), Shard(0, records),
                           ShardJob("r", "m", "h", SP, batch_size=5), LocalOutputStore(tmp_path / "out"))
    out = [json.loads(line) for line in (tmp_path / "out" / "part-00000.jsonl").read_text().splitlines()]
    # Bisection isolates the mangled batches down to single prompts, which the proxy passes.
    assert result.part.records == 5 and result.part.rejected == 0
    assert [o["id"] for o in out] == [f"q{i}" for i in range(5)]
    for o in out:  # alone, a prompt gets its own completion (a batch only changes its length)
        assert o["completion"] == own[o["prompt"]] and o["generation"]["prompt_match"] == "exact"
