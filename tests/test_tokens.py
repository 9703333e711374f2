import pytest

from infra.errors import ConfigError
from infra.settings import Settings
from infra.tokens import ByteEstimate, token_counter


def test_byte_estimate_is_an_upper_bound_and_truncates_on_char_boundaries():
    est = ByteEstimate()
    assert est.count("héllo") == 6
    assert est.keep_last("aé", 2) == "é" and est.keep_last("aé", 1) == ""


def test_tokenizer_file_counts_real_tokens(tiny_model_dir):
    tok = token_counter(str(tiny_model_dir))
    text = "the quick brown fox jumps over the lazy dog " * 20
    n = tok.count(text)
    assert 0 < n < ByteEstimate().count(text)
    kept = tok.keep_last(text, 10)
    assert text.endswith(kept) and tok.count(kept) <= 11


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="NSDG_MODEL__TOKENIZER"):
        token_counter(str(tmp_path / "nope"))


def test_local_profile_uses_the_local_models_tokenizer(tiny_model_dir):
    s = Settings(local={"model_dir": str(tiny_model_dir)})
    assert s.tokenizer_path(s.profile("local")).endswith("tokenizer.json")
    assert s.tokenizer_path(s.profile("h100x16")) is None
    assert Settings(local={"engine": "simulated"}).tokenizer_path(s.profile("local")) is None
