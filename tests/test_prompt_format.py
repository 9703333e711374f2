"""Prompt formats: how a prompt is wrapped, what is counted, what the config hash records."""

import hashlib
import json

import pytest
from transformers import AutoTokenizer

from infra.errors import ConfigError
from infra.planning import RecordCheck, RunConfig
from infra.prompting.dataset import BadLine, Record
from infra.prompting.prompt_format import RAW, default_format, load_prompt_format
from infra.prompting.sampling import SamplingParams
from infra.settings import Settings


def run_config(**kw) -> RunConfig:
    base = dict(input_uri="in.jsonl", output_uri="out", run_id="r1", profile="local",
                sampling=SamplingParams(tokens_to_generate=8), batch_size=4, shard_size=2,
                prompt_field="prompt", id_field="id", on_bad_input="fail")
    return RunConfig(**{**base, **kw})


def test_raw_is_the_prompt_itself():
    assert load_prompt_format("raw", None) is RAW
    assert RAW.wrap("Q: 2+2?\nA:") == "Q: 2+2?\nA:"


def test_nemotron_instruct_wraps_one_user_turn_and_stops_at_the_turn_marker():
    fmt = load_prompt_format("nemotron-instruct", None)
    assert fmt.wrap("Hi") == "<extra_id_0>System\n\n<extra_id_1>User\nHi\n<extra_id_1>Assistant\n"
    assert fmt.end_strings == ("<extra_id_1>",)


def test_chat_renders_the_models_template_as_transformers_does(local_model_dir):
    fmt = load_prompt_format("chat", str(local_model_dir / "tokenizer.json"))
    reference = AutoTokenizer.from_pretrained(local_model_dir).apply_chat_template(
        [{"role": "user", "content": "What is the capital of Australia?"}], tokenize=False, add_generation_prompt=True)
    assert fmt.wrap("What is the capital of Australia?") == reference
    assert fmt.end_strings == ("<|im_end|>",)


def test_chat_template_runs_sandboxed(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "{{ ''.__class__.__mro__[1].__subclasses__() }}", "eos_token": "</s>"}))
    fmt = load_prompt_format("chat", str(tmp_path / "tokenizer.json"))
    with pytest.raises(Exception) as exc:  # jinja2's SecurityError: no attribute of Python internals
        fmt.wrap("hi")
    assert "unsafe" in str(exc.value) or "__class__" in str(exc.value)


def test_chat_without_a_template_is_a_config_error_that_says_what_to_do(tiny_model_dir):
    with pytest.raises(ConfigError) as exc:
        load_prompt_format("chat", str(tiny_model_dir / "tokenizer.json"))
    assert "chat template" in str(exc.value) and "prompt_format='raw'" in str(exc.value)


def test_default_format_local_chats_only_when_the_model_has_a_template(local_model_dir, tiny_model_dir):
    assert default_format(None, None, "local", str(local_model_dir / "tokenizer.json")) == "chat"
    assert default_format(None, None, "local", str(tiny_model_dir / "tokenizer.json")) == "raw"
    assert default_format(None, None, "slurm", str(local_model_dir / "tokenizer.json")) == "raw"
    assert default_format(None, "nemotron-instruct", "slurm", None) == "nemotron-instruct"
    assert default_format("raw", "chat", "local", str(local_model_dir / "tokenizer.json")) == "raw"


def test_the_format_is_in_the_config_hash():
    settings = Settings()
    raw = run_config().fingerprint("sha", "jsonl", settings)
    assert raw["prompt_format"]["name"] == "raw"
    instruct = run_config(prompt_format=load_prompt_format("nemotron-instruct", None)).fingerprint("sha", "jsonl", settings)
    assert instruct["prompt_format"]["name"] == "nemotron-instruct" and instruct != raw


def test_the_wrapped_prompt_is_what_must_fit_the_context():
    fmt = load_prompt_format("nemotron-instruct", None)
    overhead = len(fmt.wrap("").encode())  # bytes: the byte estimate counts the markup too
    settings = Settings(model={"context_length": 8 + overhead + 10})
    prompt_fits_alone_not_wrapped = "x" * (10 + 5)
    raw_check = RecordCheck(run_config(), settings)
    wrapped_check = RecordCheck(run_config(prompt_format=fmt), settings)
    rec = Record("a", prompt_fits_alone_not_wrapped, 1)
    assert isinstance(raw_check(rec), Record)
    bad = wrapped_check(rec)
    assert isinstance(bad, BadLine) and "context" in bad.reason
    truncating = RecordCheck(run_config(prompt_format=fmt, overlong_prompts="truncate_left"), settings)
    kept = truncating(rec)
    assert isinstance(kept, Record) and kept.prompt == "x" * 10  # exactly what fits beside the markup


def test_a_judges_system_prompt_goes_into_its_formats_system_turn(local_model_dir):
    """judge.system_prompt (--judge-system-prompt): nemotron-instruct's System turn, a chat template's
    system message (rendered as transformers does); part of the format's identity, so a changed
    system prompt re-judges; a format without one keeps its digest."""
    instruct = load_prompt_format("nemotron-instruct", None)
    judge = instruct.with_system("You grade answers from 1 to 5.")
    assert judge.wrap("Hi") == ("<extra_id_0>System\nYou grade answers from 1 to 5.\n<extra_id_1>User\nHi\n"
                                "<extra_id_1>Assistant\n")
    assert judge.identity() != instruct.identity() != judge.with_system("Be strict.").identity()
    unchanged = hashlib.sha256(json.dumps([instruct.template, [], list(instruct.end_strings)]).encode()).hexdigest()
    assert instruct.identity() == {"name": "nemotron-instruct", "sha256": unchanged[:16]}
    chat = load_prompt_format("chat", str(local_model_dir / "tokenizer.json")).with_system("You grade answers.")
    reference = AutoTokenizer.from_pretrained(local_model_dir).apply_chat_template(
        [{"role": "system", "content": "You grade answers."}, {"role": "user", "content": "Rate: 4"}],
        tokenize=False, add_generation_prompt=True)
    assert chat.wrap("Rate: 4") == reference and "You grade answers." in reference


def test_a_system_prompt_with_the_raw_format_is_refused_in_one_line():
    with pytest.raises(ConfigError) as exc:
        RAW.with_system("You grade answers.")
    message = str(exc.value)
    assert "judge.system_prompt is set but the prompt format is raw" in message and "--judge-format" in message
    assert "\n" not in message
