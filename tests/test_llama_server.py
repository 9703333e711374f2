"""The OpenAI client and the flow against llama.cpp's llama-server (tests/fixtures_llama.py): a real
continuous-batching server no one here wrote, on this machine's CPU."""

from __future__ import annotations

import json
import platform
import re
import shutil
import subprocess

import pytest

from infra.backends.attach import AttachBackend
from infra.backends.ready import wait_until_ready
from infra.engines.openai import OpenAIClient
from infra.errors import BadRequest
from infra.prompting.sampling import SamplingParams
from infra.settings import Profile, load_settings
from tests.fixtures_llama import SERVED_NAME, llama_server_binary

pytestmark = pytest.mark.integration
# SmolLM2's chat markers: the Instruct model answers a question only inside them.
QUESTION = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


def test_greedy_completion_stops_on_the_end_string_and_counts_tokens(llama_server):
    c = OpenAIClient(llama_server, model=SERVED_NAME, read_timeout=120)
    sampling = SamplingParams(tokens_to_generate=24, greedy=True, end_strings=["."])
    raw = c.complete_raw(QUESTION, sampling)
    [gen] = c.complete(QUESTION, sampling)
    assert "Paris" in gen.completion.text and "." not in gen.completion.text
    assert gen.completion.finish_reason == "end_string" and raw["choices"][0]["finish_reason"] == "stop"
    assert gen.generated_tokens == raw["usage"]["completion_tokens"] > 0
    [capped] = c.complete(QUESTION, SamplingParams(tokens_to_generate=2, greedy=True, end_strings=[]))
    assert capped.completion.finish_reason == "length" and capped.generated_tokens == 2


def test_context_overflow_is_a_rejected_record_with_llama_servers_message(llama_server):
    c = OpenAIClient(llama_server, model=SERVED_NAME, read_timeout=120)
    with pytest.raises(BadRequest) as exc:
        c.complete("word " * 700, SamplingParams(tokens_to_generate=8))  # 512 tokens per slot
    assert exc.value.status == 400 and "exceeds the available context size" in exc.value.body


def test_flow_over_llama_server_publishes_every_record_once(prefect_harness, workdir, monkeypatch, llama_server):
    from flows.generate import generate

    monkeypatch.setenv("NSDG_SERVER__URL", llama_server)
    monkeypatch.setenv("NSDG_EXTRA_PROFILES", json.dumps({"llama": {"backend": "attach", "engine": "vllm"}}))
    settings = load_settings()
    client = wait_until_ready(AttachBackend(settings), settings, timeout=30, profile=Profile(backend="attach", engine="vllm"))
    assert isinstance(client, OpenAIClient)  # /health, /v1/models (our name), then a 1-token completion
    src = workdir / "in.jsonl"
    src.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Count to {i + 2}:"}) + "\n" for i in range(6)))
    generate(input_uri=str(src), output_uri=str(workdir / "out"), run_id="llama", profile="llama", prompt_format="raw",
             sampling=SamplingParams(tokens_to_generate=6, temperature=0.8, end_strings=["\n"], random_seed=1),
             recipe={"samples_per_prompt": 2}, shard_size=4)
    run = workdir / "out" / "llama"
    manifest = json.loads((run / "manifest.json").read_text())
    rows = [json.loads(x) for p in manifest["parts"] for x in (run / p["name"]).read_text().splitlines()]
    assert [(r["id"], r["sample"]) for r in rows] == [(f"q{i}", s) for i in range(6) for s in (0, 1)]
    assert all("\n" not in r["completion"] and r["generation"]["finish_reason"] in ("end_string", "length") for r in rows)
    # Usage is split over a request's n choices; llama-server counts one choice's (vLLM sums them all):
    # a total below what the choices must have made is recounted (tests/test_openai_client.py).
    assert all(0 <= r["generation"]["generated_tokens"] <= 6 for r in rows)
    assert sum(r["generation"]["generated_tokens"] for r in rows) > 0


@pytest.mark.skipif(platform.machine() != "x86_64" or shutil.which("objdump") is None,
                    reason="the instruction check reads x86-64 disassembly with binutils' objdump")
def test_the_cached_build_uses_no_instruction_beyond_its_portable_baseline():
    """Issue 22: a -march=native build on a Xeon with AMX crashed with a general protection fault on
    another CPU of this machine kind. The x86-64-v3 build must not touch AVX-512 (zmm, opmask) or AMX
    (tmm) registers."""
    binary = llama_server_binary()
    assert binary.parent.name.endswith("-x86-64-v3"), binary
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(binary)], capture_output=True, text=True,
                             timeout=300, check=True).stdout
    beyond = [line for line in listing.splitlines() if re.search(r"%(zmm|tmm)\d+|%k[1-7]\b", line)]
    assert not beyond, beyond[:5]
