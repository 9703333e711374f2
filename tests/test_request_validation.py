import pytest
from pydantic import ValidationError

from infra.errors import ConfigError
from infra.engines.nemo import validate_batch
from infra.prompting.tokens import check_fits_context, estimate_tokens
from infra.prompting.sampling import SamplingParams

OK = SamplingParams(tokens_to_generate=16)


def test_request_fields_are_explicit_and_typed():
    f = SamplingParams(greedy=True, temperature=0, top_k=5, random_seed=7).request_fields()
    assert f["greedy"] is True and f["temperature"] == 1.0  # the server rejects 0 even when greedy
    assert isinstance(f["top_k"], int) and f["random_seed"] == 7
    assert f["compute_logprob"] is False and f["all_probs"] is False and f["repetition_penalty"] == 1.0
    assert "random_seed" not in SamplingParams().request_fields()


@pytest.mark.parametrize("kwargs, fragment", [
    ({"temperature": 0}, "temperature must be > 0"),
    ({"temperature": -1}, "temperature must be > 0"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": -0.1}, "top_p"),
    ({"random_seed": 2**24}, "random_seed"),
    ({"tokens_to_generate": 0}, "tokens_to_generate"),
    ({"top_k": 2.5}, "top_k"),
    ({"tokens_to_generate": "5"}, "tokens_to_generate"),
    ({"min_tokens_to_generate": 10, "tokens_to_generate": 5}, "min_tokens_to_generate"),
])
def test_sampling_rules(kwargs, fragment):
    with pytest.raises(ValidationError) as exc:
        SamplingParams(**kwargs)
    assert fragment in str(exc.value)


def test_greedy_allows_temperature_zero():
    assert SamplingParams(greedy=True, temperature=0).greedy


@pytest.mark.parametrize("prompts, fragment", [
    ([], "1–128"),
    (["x"] * 129, "1–128"),
    (["ok", ""], "non-empty"),
    (["ok", "   "], "non-empty"),
    (["ok", 3], "non-empty string"),
    ("a string", "list of strings"),
])
def test_batch_rules(prompts, fragment):
    with pytest.raises(ConfigError, match=fragment):
        validate_batch(prompts, OK, 4096)


def test_context_length_enforced_client_side():
    validate_batch(["x" * 4080], OK, 4096)
    with pytest.raises(ConfigError, match="context length"):
        validate_batch(["x" * 4081], OK, 4096)
    with pytest.raises(ConfigError, match="context length"):
        validate_batch(["hi"], SamplingParams(tokens_to_generate=4096), 4096)
    assert check_fits_context("héllo", OK, 4096) is None
    assert estimate_tokens("héllo") == 6  # bytes: an upper bound on tokens


def test_the_openai_client_applies_the_same_context_rule_before_sending():
    from infra.engines.openai import OpenAIClient

    c = OpenAIClient("http://127.0.0.1:9", model="m", context_length=4096)  # nothing listens: a send would be transient
    with pytest.raises(ConfigError, match="context length"):
        c.complete("x" * 4081, OK)
    with pytest.raises(ConfigError, match="context length"):
        c.complete("héllo", SamplingParams(tokens_to_generate=4092, add_BOS=True))  # 6 bytes + BOS + 4092 > 4096
