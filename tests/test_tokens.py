import io
import json
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
import sentencepiece as spm
from transformers import AutoTokenizer

from infra.prompting.dataset import BadLine, Record
from infra.errors import ConfigError
from infra.local_server.real_model import find_gguf
from infra.planning import RecordCheck, RunConfig, make_plan
from infra.prompting.sampling import SamplingParams
from infra.settings import Settings
from infra.storage.local import LocalOutputStore
from infra.prompting.tokens import ByteEstimate, token_counter

SENTENCE = "the quick brown fox jumps over the lazy dog and keeps running through the field "


def test_byte_estimate_counts_bytes_and_truncates_on_char_boundaries():
    est = ByteEstimate()
    assert est.count("héllo") == 6
    assert est.keep_last("aé", 2) == "é" and est.keep_last("aé", 1) == ""
    assert "not an upper bound" in est.description


def test_tokenizer_file_counts_real_tokens(tiny_model_dir):
    tok = token_counter(str(tiny_model_dir))
    text = "the quick brown fox jumps over the lazy dog " * 20
    n = tok.count(text)
    assert 0 < n < ByteEstimate().count(text)
    kept = tok.keep_last(text, 10)
    assert text.endswith(kept) and tok.count(kept) <= 11


MIXED = "Hi 日本語 🎉👍🏽 café, naïve straße; the quick brown fox 🦊 jumps. "


@pytest.mark.parametrize("which", ["tiny", "sentencepiece"])
def test_keep_first_cuts_exactly_and_never_inside_a_character(which, tiny_model_dir, nemo_dir):
    """A generation cut to tokens_to_generate (infra/engines/nemo.py): at most N tokens of the run's
    tokenizer, no U+FFFD from half a multi-byte character, and nothing lost that whole tokens hold."""
    tok = token_counter(str(tiny_model_dir) if which == "tiny" else str(nemo_dir))
    text = MIXED * 3
    total = tok.count(text)
    for n in range(total + 2):
        kept = tok.keep_first(text, n)
        assert text.startswith(kept) and "\ufffd" not in kept
        assert tok.count(kept) <= n
        if n < total:  # the cut is the longest prefix that fits: one more character does not
            assert tok.count(text[:len(kept) + 1]) > n, (n, kept)
    assert tok.keep_first(text, total) == text and tok.keep_first(text, 0) == ""
    if which == "tiny":  # decoding the first N ids would end in U+FFFD where a character is split
        ids = tok._tok.encode(text, add_special_tokens=False).ids
        assert any(tok._tok.decode(ids[:n]).endswith("\ufffd") for n in range(total))


def test_byte_estimate_keep_first_cuts_on_characters():
    assert ByteEstimate().keep_first("aé", 2) == "a" and ByteEstimate().keep_first("aé", 3) == "aé"


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="NSDG_MODEL__TOKENIZER"):
        token_counter(str(tmp_path / "nope"))


def test_local_profile_uses_the_local_models_tokenizer(tiny_model_dir):
    s = Settings(local={"model_dir": str(tiny_model_dir)})
    assert s.tokenizer_path(s.profile("local")).endswith("tokenizer.json")
    assert s.tokenizer_path(s.profile("h100x16")) is None  # /models/… is not readable here
    assert Settings(local={"engine": "simulated"}).tokenizer_path(s.profile("local")) is None


def train_sentencepiece(lines, vocab_size=400) -> bytes:
    """A toy SentencePiece BPE with byte fallback and NFKC, trained offline (as Nemotron's is BPE
    with byte fallback; NFKC is SentencePiece's default normalization)."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size,
                                   model_type="bpe", byte_fallback=True, normalization_rule_name="nfkc",
                                   unk_id=0, pad_id=1, bos_id=2, eos_id=3, minloglevel=2)
    return buf.getvalue()


@pytest.fixture(scope="module")
def nemo_dir(tmp_path_factory):
    """Laid out like an extracted .nemo checkpoint: model_config.yaml naming `nemo:<hex>_<name>.model`,
    beside a second .model file (a different one here, so picking the wrong file shows)."""
    folder = tmp_path_factory.mktemp("Nemotron-4-340B-Base")
    used = "29e0db5f7dd14bcf9f32727ff482502b_tok.model"
    other = "d6b0ba93e9734b138f5fc61f5652efbd_other.model"
    (folder / used).write_bytes(train_sentencepiece([SENTENCE] * 50 + ["data pipelines publish every record once"] * 50))
    (folder / other).write_bytes(train_sentencepiece(["zzz yyy xxx"] * 100, vocab_size=270))
    (folder / "model_config.yaml").write_text(
        "precision: bf16\ntokenizer:\n  library: sentencepiece\n  type: null\n"
        f"  model: nemo:{used}\n  sentencepiece_legacy: false\n  tokenizer_model: nemo:{other}\n")
    (folder / "model_weights").mkdir()
    return folder


def test_the_nemo_directorys_tokenizer_is_found_from_the_model_path_alone(nemo_dir):
    settings = Settings(model={"path": str(nemo_dir)})
    path = settings.tokenizer_path(settings.profile("h100x16"))
    counter = token_counter(path)
    assert counter.description.endswith("_tok.model") and "SentencePiece" in counter.description
    sp = spm.SentencePieceProcessor(model_file=str(nemo_dir / "29e0db5f7dd14bcf9f32727ff482502b_tok.model"))
    assert counter.count(SENTENCE) == len(sp.encode(SENTENCE))


def test_exact_counts_accept_long_english_and_reject_what_nfkc_expands(workdir, nemo_dir):
    settings = Settings(model={"path": str(nemo_dir), "context_length": 64})
    tokenizer = settings.tokenizer_path(settings.profile("h100x16"))
    english = SENTENCE * 3  # 240 bytes, 45 tokens: the byte estimate refuses it
    expands = "\ufdfa" * 3  # 9 bytes; NFKC makes each one 18 characters, 34 tokens with byte fallback
    src = workdir / "in.jsonl"
    src.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in (english, expands)))
    cfg = RunConfig(input_uri=str(src), output_uri="out", run_id="r1", profile="h100x16",
                    sampling=SamplingParams(tokens_to_generate=8), batch_size=4, shard_size=2,
                    prompt_field="prompt", id_field="id", on_bad_input="skip", counter=token_counter(tokenizer))
    store = LocalOutputStore(workdir / "out" / "r1")
    plan = make_plan(cfg, settings, store)
    assert (plan.records_in, plan.rejected) == (1, 1)
    [reject] = [json.loads(line) for line in (workdir / "out" / "r1" / "input-rejects.jsonl").read_text().splitlines()]
    assert reject["line"] == 2 and "context length 64" in reject["reason"] and "SentencePiece" in reject["reason"]
    by_bytes = make_plan(RunConfig(**{**cfg.__dict__, "counter": ByteEstimate(), "run_id": "r2"}), settings,
                         LocalOutputStore(workdir / "out" / "r2"))
    assert (by_bytes.records_in, by_bytes.rejected) == (1, 1)  # the estimate gets both wrong


def test_truncate_left_keeps_exactly_the_last_tokens_that_fit(nemo_dir):
    settings = Settings(model={"path": str(nemo_dir), "context_length": 64})
    tokenizer = settings.tokenizer_path(settings.profile("h100x16"))
    cfg = RunConfig(input_uri="in.jsonl", output_uri="out", run_id="r1", profile="h100x16",
                    sampling=SamplingParams(tokens_to_generate=8), batch_size=4, shard_size=2, prompt_field="prompt",
                    id_field="id", on_bad_input="fail", overlong_prompts="truncate_left", counter=token_counter(tokenizer))
    counter = token_counter(tokenizer)
    text = "one record " + SENTENCE * 6
    kept = RecordCheck(cfg, settings)(Record("a", text, 1))
    assert isinstance(kept, Record) and text.endswith(kept.prompt)
    assert counter.count(kept.prompt) <= 56 < counter.count(text[len(text) - len(kept.prompt) - 1:])


def test_bos_counts_one_token(nemo_dir):
    settings = Settings(model={"path": str(nemo_dir), "context_length": 16})
    tokenizer = settings.tokenizer_path(settings.profile("h100x16"))
    counter = token_counter(tokenizer)
    prompt = next(SENTENCE[:i] for i in range(len(SENTENCE)) if counter.count(SENTENCE[:i]) == 8)
    base = dict(input_uri="in.jsonl", output_uri="out", run_id="r1", profile="h100x16", batch_size=4, shard_size=2,
                prompt_field="prompt", id_field="id", on_bad_input="fail", counter=counter)
    fits = RecordCheck(RunConfig(**base, sampling=SamplingParams(tokens_to_generate=8)), settings)(Record("a", prompt, 1))
    with_bos = RecordCheck(RunConfig(**base, sampling=SamplingParams(tokens_to_generate=8, add_BOS=True)), settings)(Record("a", prompt, 1))
    assert isinstance(fits, Record) and isinstance(with_bos, BadLine) and "9 tokens" in with_bos.reason


def varied_strings(n=300, seed=7, more=()):
    rng = random.Random(seed)
    pieces = ["hello", " world", "\n", "  ", "\t", "Ünïcödé", "日本語", "🙂", "def f(x):\n    return x", "123456",
              "<|im_start|>", "naïve café", "…", "（）", "\u00a0", "ﷺ", "x" * 40, "The capital of Australia", *more]
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 12))) for _ in range(n)]


# Whitespace runs, a literal "▁", a combining accent, code and numbers, long words: where counting word by word could err.
TRICKY = ("   ", " \n ", "\u2581", " \u2581 ", "e\u0301", "  \t  ", "", "A1b2", " 3.14159", "x" * 70, "    if x:\n        y = 1")


def test_gguf_and_tokenizer_json_counters_agree_with_transformers(local_model_dir):
    reference = AutoTokenizer.from_pretrained(local_model_dir)
    from_json = token_counter(str(local_model_dir / "tokenizer.json"))
    from_gguf = token_counter(str(find_gguf()))
    assert from_gguf.description.startswith("GGUF tokenizer")
    for text in varied_strings():
        expected = len(reference.encode(text, add_special_tokens=False))
        assert from_json.count(text) == expected == from_gguf.count(text), text


@pytest.fixture(scope="module")
def identity_model(tmp_path_factory):
    """A SentencePiece BPE that does not normalize, as the Nemotron notes infer for nemotron_2_256k."""
    path = tmp_path_factory.mktemp("identity") / "tok.model"
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter([SENTENCE] * 100), model_writer=buf, vocab_size=400,
                                   model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
                                   unk_id=0, pad_id=1, bos_id=2, eos_id=3, minloglevel=2)
    path.write_bytes(buf.getvalue())
    return path


def test_count_within_is_exact_above_the_cap_and_never_under_counts(identity_model, nemo_dir, tiny_model_dir):
    texts = varied_strings() + [SENTENCE * 4, "\ufdfa" * 3, ""]
    nfkc = token_counter(str(nemo_dir))
    for counter in (token_counter(str(identity_model)), nfkc, token_counter(str(tiny_model_dir)), ByteEstimate()):
        exact = [counter.count(t) for t in texts]
        for cap in (-1, 8, 40, 10**6):
            got = counter.count_within(texts, cap)
            assert all(g == e if g > cap else e <= g <= max(cap, e) for g, e in zip(got, exact)), (counter.description, cap)
    bounded = token_counter(str(identity_model)).count_within([SENTENCE * 4], 10**6)
    assert bounded == [len((SENTENCE * 4).encode()) + 1]  # settled by bytes + dummy prefix, not encoded
    # NFKC expands U+FDFA past its bytes, so there every count is the encoder's own.
    assert nfkc.count_within(texts, 10**6) == [nfkc.count(t) for t in texts]


def test_the_plan_counts_in_chunks_and_keeps_the_input_order(workdir, identity_model):
    from infra.planning import COUNT_CHUNK

    settings = Settings(model={"context_length": 64})
    n = 2 * COUNT_CHUNK + 50
    overlong = {5, COUNT_CHUNK, COUNT_CHUNK + 1, n}  # at chunk edges too
    lines = []
    for i in range(1, n + 1):
        prompt = SENTENCE * 8 if i in overlong else f"record {i} " + SENTENCE[:20]
        lines.append("{not json" if i == 7 else json.dumps({"id": f"r{i}", "prompt": prompt}))
    (workdir / "in.jsonl").write_text("\n".join(lines) + "\n")
    cfg = RunConfig(input_uri=str(workdir / "in.jsonl"), output_uri="out", run_id="r1", profile="h100x16",
                    sampling=SamplingParams(tokens_to_generate=8), batch_size=4, shard_size=500,
                    prompt_field="prompt", id_field="id", on_bad_input="skip", counter=token_counter(str(identity_model)))
    plan = make_plan(cfg, settings, LocalOutputStore(workdir / "out" / "r1"))
    rejects = [json.loads(x) for x in (workdir / "out" / "r1" / "input-rejects.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rejects] == sorted(overlong | {7})
    assert (plan.records_in, plan.rejected) == (n - 5, 5)
    assert all("SentencePiece" in r["reason"] for r in rejects if r["line"] != 7)


def nemotron_like(tmp_path, name, **options) -> Path:
    """A SentencePiece BPE with the settings the Nemotron notes infer for nemotron_2_256k: identity
    normalization, no dummy prefix, whitespace kept, byte fallback, digits split."""
    buf = io.BytesIO()
    lines = varied_strings(3000, seed=1, more=TRICKY) + [SENTENCE.replace(" ", "    ", 3) * 3] * 200
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=800, model_type="bpe",
                                   byte_fallback=True, split_digits=True, normalization_rule_name="identity",
                                   add_dummy_prefix=False, remove_extra_whitespaces=False, unk_id=0, pad_id=1, bos_id=2,
                                   eos_id=3, minloglevel=2, **options)
    (path := tmp_path / f"{name}.model").write_bytes(buf.getvalue())
    return path


@pytest.mark.parametrize("options, word_by_word", [
    ({}, True),
    ({"allow_whitespace_only_pieces": True}, True),  # "▁▁▁▁" pieces: runs of spaces stay with the next word
    ({"split_by_whitespace": False}, False),  # pieces span words ("s▁the"): whole texts are encoded
])
def test_word_by_word_counts_equal_sentencepieces_own_on_10k_varied_strings(tmp_path, options, word_by_word):
    path = nemotron_like(tmp_path, "m", **options)
    sp = spm.SentencePieceProcessor(model_file=str(path))
    counter = token_counter(str(path))
    assert (counter._words is not None) == word_by_word
    texts = varied_strings(10_000, seed=2, more=TRICKY)
    expected = [len(ids) for ids in sp.encode(texts)]
    got = []
    for start in range(0, len(texts), 500):  # the word cache filled by earlier batches, as in a plan
        got += counter.count_within(texts[start:start + 500], -1)
    assert got == expected


class CallCounting:
    """A real counter, its calls noted: how the generation pass asks for counts."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if callable(attr):
            return lambda *a, **k: (self.calls.append(name), attr(*a, **k))[1]
        return attr


def test_the_generation_pass_counts_in_chunks_as_the_plan_does(workdir, identity_model):
    from infra.planning import COUNT_CHUNK, usable_records

    settings = Settings(model={"context_length": 64})
    n = 2 * COUNT_CHUNK + 50
    lines = [json.dumps({"id": f"r{i}", "prompt": SENTENCE * 8 if i % 500 == 5 else f"record {i} " + SENTENCE[:20]})
             for i in range(1, n + 1)]
    (workdir / "in.jsonl").write_text("\n".join(lines) + "\n")
    counter = CallCounting(token_counter(str(identity_model)))
    cfg = RunConfig(input_uri=str(workdir / "in.jsonl"), output_uri="out", run_id="r1", profile="h100x16",
                    sampling=SamplingParams(tokens_to_generate=8), batch_size=4, shard_size=500,
                    prompt_field="prompt", id_field="id", on_bad_input="skip", counter=counter)
    plan = make_plan(cfg, settings, LocalOutputStore(workdir / "out" / "r1"))
    counter.calls.clear()
    with open(workdir / "in.jsonl", "rb") as stream:
        ids = [r.id for r in usable_records(stream, cfg, settings, plan.format, plan.duplicate_lines)]
    assert ids == [f"r{i}" for i in range(1, n + 1) if i % 500 != 5] and len(ids) == plan.records_in
    assert counter.calls == ["count_within"] * 3  # one call per chunk, none per prompt


@pytest.fixture(scope="module")
def word_model(tmp_path_factory):
    """A Nemotron-like model (counted word by word) and its own SentencePiece processor."""
    path = nemotron_like(tmp_path_factory.mktemp("words"), "w")
    return token_counter(str(path)), spm.SentencePieceProcessor(model_file=str(path))


def within_contract(got: int, exact: int, cap: int) -> bool:
    """count_within's promise: exact above the cap; at or below it, an upper bound."""
    return got == exact if got > cap else exact <= got <= cap


def test_count_within_reads_a_fitting_text_only_in_part_and_stays_exact_against_whole_encodes(word_model):
    counter, sp = word_model
    assert counter._words is not None
    rng = random.Random(5)
    parts = varied_strings(3000, seed=3, more=TRICKY) + [SENTENCE, SENTENCE.replace(" ", "   "), "\u2581" + SENTENCE]
    texts = ["".join(rng.choice(parts) for _ in range(rng.randint(1, 60))) for _ in range(400)]
    texts += [SENTENCE * 40, (SENTENCE + "🙂日本語 ") * 30, SENTENCE.replace(" ", "  \u2581") * 20]
    exact = [len(ids) for ids in sp.encode(texts)]
    nbytes = [len(t.encode()) for t in texts]
    # Caps at the edges (a text that fits exactly, by one token, not by one), and far off.
    for cap_of in (lambda e, b: e, lambda e, b: e - 1, lambda e, b: e + 1, lambda e, b: e // 2,
                   lambda e, b: (e + b) // 2, lambda e, b: b - 1, lambda e, b: 40, lambda e, b: 10**6):
        caps = [cap_of(e, b) for e, b in zip(exact, nbytes)]
        if len(set(caps)) == 1:  # one cap: the texts in one batch
            got = counter.count_within(texts, caps[0])
        else:  # a cap per text: each text alone, the word cache warm from the others
            got = [counter.count_within([text], cap)[0] for text, cap in zip(texts, caps)]
        assert all(within_contract(g, e, cap) for g, e, cap in zip(got, exact, caps))
    # A long text that fits is settled from a part of it: its head counted, the rest bounded by
    # its bytes (before, every text whose bytes did not fit was counted whole).
    long = SENTENCE * 40
    got = counter.count_within([long], len(long) - 100)[0]
    assert counter.count(long) < got <= len(long) - 100


def test_word_by_word_encodes_a_texts_first_word_once_and_an_empty_head_never(word_model):
    """A text's first word (no space before it) is kept once counted, as the other words are: a
    second text beginning with it, or a head cut at a run of spaces (first word ''), encodes nothing more."""
    from infra.prompting.word_counts import WordCounts

    _, sp = word_model
    encoded = []

    class Spy:
        def encode(self, texts, **kw):
            encoded.extend([texts] if isinstance(texts, str) else texts)
            return sp.encode(texts, **kw)

    words = WordCounts(Spy())
    words._workers = False
    assert words.counts(["Hello world", " world"]) == [len(sp.encode("Hello world")), len(sp.encode(" world"))]
    encoded.clear()
    assert words.counts(["Hello world", " world"]) == [len(sp.encode("Hello world")), len(sp.encode(" world"))]
    assert encoded == []  # every word, first or not, known


def test_a_cut_for_counting_falls_only_where_a_run_of_spaces_starts():
    from infra.prompting.word_counts import _run_start_from

    text = "a   b c"
    assert [_run_start_from(text, at) for at in range(9)] == [1, 1, 5, 5, 5, 5, 7, 7, 7]


@given(st.text(alphabet=st.sampled_from(list("ab xyz.\n\t1é日🙂\u2581\u0301")), max_size=400),
       st.integers(min_value=-1, max_value=500))
@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
def test_count_within_word_by_word_keeps_its_promise_on_any_text(word_model, text, cap):
    counter, sp = word_model
    exact = len(sp.encode(text))
    assert within_contract(counter.count_within([text, text + " " + text], cap)[0], exact, cap)
    assert within_contract(counter.count_within([text + " " + text], cap)[0], len(sp.encode(text + " " + text)), cap)


def test_a_reward_row_whose_count_fits_is_not_refused_when_its_byte_bound_is_one_over(word_model):
    from infra.reward.conversation import Conversation, build

    counter, sp = word_model
    row = {"prompt": SENTENCE * 3, "completion": SENTENCE}
    text = build(row, system_prompt="", counter=counter, context_length=10**6).text
    n = len(text.encode())  # limit = n - 1 (one token kept for BOS/EOS): the bytes are one over it
    assert len(sp.encode(text)) < n - 1
    # count_within may answer a bound at or below its cap: the cap is the limit, never limit + 1.
    assert isinstance(build(row, system_prompt="", counter=counter, context_length=n), Conversation)


def test_no_byte_bound_where_a_space_is_no_piece(tmp_path):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto.FromString(nemotron_like(tmp_path, "m").read_bytes())
    next(p for p in proto.pieces if p.piece == "\u2581").piece = "\u2582"  # "▁" gone: a lone space is 3 fallback bytes
    (path := tmp_path / "no-space.model").write_bytes(proto.SerializeToString())
    counter, sp = token_counter(str(path)), spm.SentencePieceProcessor(model_file=str(path))
    texts = [" " * 10, "a . b", SENTENCE]
    exact = [len(ids) for ids in sp.encode(texts)]
    assert exact[0] == 30  # more tokens than bytes: the byte bound would let it through
    assert counter.count_within(texts, 100) == exact
