"""The `nemo-openai` engine against NeMo >= 2.1's own POST /v1/completions: text_generation_server.py from
the nemo_toolkit 2.1.0 wheel, run unmodified on a local engine (tests/nemo_reference.py). Its quirks: one
prompt per request, `n` and `stop` ignored (`end_strings` read instead), the end string left in the text,
finish_reason always "", usage in whitespace-split words, no /health and no /v1/models."""

from __future__ import annotations

import pytest
import requests

from infra.backends.attach import AttachBackend
from infra.backends.ready import wait_until_ready
from infra.engines.openai import OpenAIClient
from infra.generation import ShardJob, generate_shard_results
from infra.prompting.dataset import Record, Shard
from infra.prompting.sampling import SamplingParams
from infra.settings import Profile, Settings
from tests.localserver import running_nemo_reference

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def nemo21(tmp_path_factory):
    with running_nemo_reference(tmp_path_factory.mktemp("nemo21"), "--nemo-version", "2.1.0", "--engine", "simulated",
                                "--sim-finish-fraction", "0.6") as (url, _):
        yield url


def test_nemo_21_has_no_health_route_and_ignores_n(nemo21):
    assert requests.get(nemo21 + "/health", timeout=10).status_code == 404  # what `probe` readiness is for
    reply = requests.post(nemo21 + "/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "n": 3}, timeout=10).json()
    assert len(reply["choices"]) == 1 and reply["choices"][0]["finish_reason"] == ""


def test_probe_readiness_and_samples_as_separate_requests_trimmed_and_counted_in_words(nemo21):
    settings = Settings(server={"url": nemo21})
    client = wait_until_ready(AttachBackend(settings), settings, timeout=30, profile=Profile(backend="attach", engine="nemo-openai"))
    assert isinstance(client, OpenAIClient) and client.nemo_openai
    sampling = SamplingParams(tokens_to_generate=10, end_strings=["."], random_seed=2)
    gens = client.samples("Tell me a thing", sampling, 3, [11, 12, 13])
    assert len(gens) == 3 and all(g.tokens_unit == "words" for g in gens)
    raw = client.complete_raw("Tell me a thing", sampling, seed=11)
    text = raw["choices"][0]["text"]
    assert gens[0].generated_tokens == raw["usage"]["completion_tokens"] == len(text.split())  # NeMo counts words
    assert gens[0].completion.text == text.split(".")[0]  # NeMo leaves the end string in; we trim, as on /generate
    assert gens[0].completion.finish_reason == ("end_string" if "." in text else "length")


def test_a_shard_over_nemo_21_records_word_counts(nemo21, tmp_path):
    client = OpenAIClient(nemo21, model="nemotron-4-340b-base", nemo_openai=True, max_in_flight=4)
    records = [Record(id=f"r{i}", prompt=f"Prompt {i} says", line=i + 1, fields={}) for i in range(5)]
    job = ShardJob("run", "m", "hash", SamplingParams(tokens_to_generate=6, end_strings=["."]), 8, samples=2)
    results = generate_shard_results(client, Shard(0, records), job)
    assert len(results) == 10 and all(r.tokens_unit == "words" and r.prompt == f"Prompt {i // 2} says"
                                      for i, r in enumerate(results))
