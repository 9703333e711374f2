"""Token counts for the context-length check, with the model's own tokenizer.

NSDG_MODEL__TOKENIZER (or, unset, the model directory when this host can read it) may name:
- a `tokenizer.json` (Hugging Face checkpoints, the local models), read with `tokenizers`;
- a SentencePiece `.model` (Nemotron-4-340B's NeMo checkpoint), read with `sentencepiece`, the way
  NeMo 24.05's server encodes: `encode_as_ids(text)`, no BOS unless the request asks for one;
- a GGUF file (its embedded tokenizer, through transformers);
- a directory: an HF model directory (its `tokenizer.json`), or an extracted `.nemo` directory, whose
  `model_config.yaml` names the tokenizer as `nemo:<hash>_<name>.model` (the name differs between
  Base and Instruct, so it is read, never assumed; infra/prompting/tokenizer_files.py).

Without one, the count is an estimate, UTF-8 bytes. It is no bound either way: it over-counts English
3–4× (valid long prompts are refused or cut), and SentencePiece's NFKC normalization can turn one
3-byte character into dozens of tokens, which the estimate lets through.

The counter decides which prompts fit, how `truncate_left` cuts them, and so which records exist
and where shards begin: its `identity` (the kind, and for a tokenizer the sha256 of its file, not
its path) is part of the run's config hash, so a run is never resumed under another counter.

The plan and the generation pass count in batches (`count_within`: `encode_batch`, or sentencepiece's
multi-threaded list encode; both release the GIL). With a SentencePiece model that does not normalize
(`identity`, as the Nemotron notes infer for nemotron_2_256k), a prompt is at most its UTF-8 bytes
(+1 dummy prefix) in tokens, so one whose bytes already fit is accepted without encoding it; the
others are counted word by word from a cache where the model's pieces never span a space
(`WordCounts`, infra/prompting/word_counts.py: exact, proven from the vocabulary), else encoded whole. Word by word, a text is
read only until its counted part plus the rest's bytes fit, or to its end when it does not fit.
"""

from __future__ import annotations

import bisect
import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from infra.errors import ConfigError
from infra.prompting.word_counts import WordCounts, threads, utf8_len
from infra.prompting.sampling import SamplingParams
from infra.storage.local import sha256_file
from infra.prompting.tokenizer_files import TokenizerSource, locate_tokenizer, normalizer_spec, splits_at_spaces

log = logging.getLogger(__name__)


def estimate_tokens(text: str) -> int:
    """A conservative token count when no tokenizer is at hand: every token of a byte-fallback
    BPE/SentencePiece vocabulary covers at least one UTF-8 byte, so bytes >= tokens."""
    return len(text.encode("utf-8"))


def check_fits_context(
    prompt: str, sampling: SamplingParams, context_length: int, count_tokens: Callable[[str], int] = estimate_tokens
) -> str | None:
    """None when prompt + generation fits the context, else the reason. The one rule the plan, the
    judge and both API clients apply (NeMo's server never checks; an OpenAI server refuses only
    after a round trip, with a message of its own)."""
    n = count_tokens(prompt) + (1 if sampling.add_BOS else 0)  # NeMo prepends BOS to the ids
    if n + sampling.tokens_to_generate > context_length:
        return (
            f"prompt has {n} tokens + tokens_to_generate {sampling.tokens_to_generate} "
            f"> context length {context_length}"
        )
    return None


class TokenCounter(Protocol):
    description: str  # for messages: what counted, where
    identity: str  # for the config hash: what decides the counts
    exact: bool  # the model's own tokens (a tokenizer), not an estimate

    def count(self, text: str) -> int: ...
    def count_within(self, texts: Sequence[str], cap: int) -> list[int]:
        """For each text, a token count that is exact whenever it exceeds `cap` (at or below `cap` it
        may be a proven upper bound instead): what a fits-the-context check needs, in one batch."""
        ...
    def keep_last(self, text: str, tokens: int) -> str: ...
    def keep_first(self, text: str, tokens: int) -> str:
        """The longest prefix of `text`, cut at a character, whose own count is at most `tokens`
        (a generation cut to tokens_to_generate: never half a multi-byte character)."""
        ...
    def round_trip(self, text: str) -> str:
        """What the server echoes for `text`: decode(encode(text)), special tokens dropped."""
        ...


@dataclass(frozen=True)
class ByteEstimate:
    description: str = ("UTF-8 byte estimate (no tokenizer: over-counts English 3-4x, and is not an upper bound "
                        "where the tokenizer's normalization expands text)")
    identity: str = "utf-8 byte estimate"
    exact: bool = False

    def count(self, text: str) -> int:
        return estimate_tokens(text)

    def count_within(self, texts: Sequence[str], cap: int) -> list[int]:
        return [estimate_tokens(t) for t in texts]

    def keep_last(self, text: str, tokens: int) -> str:
        return text.encode("utf-8")[-tokens:].decode("utf-8", errors="ignore") if tokens > 0 else ""

    def keep_first(self, text: str, tokens: int) -> str:
        return text.encode("utf-8")[:tokens].decode("utf-8", errors="ignore") if tokens > 0 else ""

    def round_trip(self, text: str) -> str:
        return text  # no tokenizer to ask: expect the prompt back as it was sent


class TokenizerFile:
    """A `tokenizers.Tokenizer` (from a tokenizer.json, or a GGUF's embedded tokenizer)."""

    exact = True

    def __init__(self, tok, description: str, identity: str):
        self._tok, self.description, self.identity = tok, description, identity

    @classmethod
    def from_file(cls, path: Path) -> "TokenizerFile":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)), f"tokenizer {path}", f"tokenizer.json sha256:{sha256_file(path)[:16]}")

    @classmethod
    def from_gguf(cls, path: Path) -> "TokenizerFile":
        from transformers import AutoTokenizer  # reads the GGUF's vocabulary with the `gguf` package

        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
        return cls(tok.backend_tokenizer, f"GGUF tokenizer {path}", f"gguf sha256:{sha256_file(path)[:16]}")

    def count(self, text: str) -> int:
        return len(self._tok.encode(text, add_special_tokens=False).ids)

    def count_within(self, texts: Sequence[str], cap: int) -> list[int]:
        return [len(e.ids) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def keep_last(self, text: str, tokens: int) -> str:
        if tokens <= 0:
            return ""
        enc = self._tok.encode(text, add_special_tokens=False)
        if len(enc.ids) <= tokens:
            return text
        return text[enc.offsets[-tokens][0]:]

    def keep_first(self, text: str, tokens: int) -> str:
        if tokens <= 0:
            return ""
        enc = self._tok.encode(text, add_special_tokens=False)
        if len(enc.ids) <= tokens:
            return text
        # Up to where token `tokens` starts: a byte-level token holding part of a character has
        # that whole character's offsets, so the character goes with it (decoding the first
        # `tokens` ids would end in U+FFFD instead).
        return _fitting_prefix(text, enc.offsets[tokens][0], tokens, self.count)

    def round_trip(self, text: str) -> str:
        # A chat template's markup (<|im_start|> …) is special tokens, which the echo drops.
        return self._tok.decode(self._tok.encode(text, add_special_tokens=False).ids, skip_special_tokens=True)


class SentencePieceFile:
    """A SentencePiece `.model`, used as NeMo's SentencePieceTokenizer (non-legacy) uses it."""

    exact = True

    def __init__(self, path: Path):
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor(model_file=str(path))
        self.description = f"SentencePiece {path}"
        self.identity = f"sentencepiece sha256:{sha256_file(path)[:16]}"
        # Without normalization no piece is shorter than one character, and a byte-fallback
        # character costs at most its bytes: tokens <= UTF-8 bytes (+1 for the dummy prefix).
        # NFKC and custom rules expand text (U+FDFA: 3 bytes, 34 tokens), so no bound there; nor
        # where "▁" is no piece (a space, 1 byte, would cost its 3 bytes' fallback tokens).
        spec = normalizer_spec(self._sp.serialized_model_proto())
        plain = (spec.name == "identity" and not spec.precompiled_charsmap
                 and self._sp.piece_to_id("\u2581") != self._sp.unk_id())
        self._byte_slack = (1 if spec.add_dummy_prefix else 0) if plain else None
        self._words = WordCounts(self._sp) if plain and splits_at_spaces(self._sp) else None

    def count(self, text: str) -> int:
        return len(self._sp.encode(text))

    def count_within(self, texts: Sequence[str], cap: int) -> list[int]:
        """Encodes only what the byte bound cannot settle, in one multi-threaded batch; word by word,
        only as much of each text as it takes to show that it fits (or all of it, when it does not)."""
        return self.count_within_begun(texts, cap)()

    def count_within_begun(self, texts: Sequence[str], cap: int) -> Callable[[], list[int]]:
        """`count_within` begun now (word by word, by the worker processes, where they run) and
        finished by the call returned: the caller may read its next batch meanwhile."""
        bounds = [utf8_len(t) + self._byte_slack for t in texts] if self._byte_slack is not None else None
        todo = [i for i in range(len(texts)) if bounds is None or bounds[i] > cap]
        counts = bounds or [0] * len(texts)
        if self._words is not None:
            todo_counts = self._words.counts_begun([texts[i] for i in todo], cap)
        else:
            todo_counts = lambda: map(len, self._sp.encode([texts[i] for i in todo], num_threads=threads()))  # noqa: E731

        def result() -> list[int]:
            for i, n in zip(todo, todo_counts()):
                counts[i] = n
            return counts
        return result

    def keep_last(self, text: str, tokens: int) -> str:
        """The longest suffix of `text` (cut at a character) whose own count fits. Normalization
        means a piece's text need not be the input's, so search on the input itself."""
        if tokens <= 0:
            return ""
        if self.count(text) <= tokens:
            return text
        # Counts of suffixes shrink as the cut moves right; find the first cut that fits.
        cut = bisect.bisect_left(range(len(text) + 1), True, key=lambda i: self.count(text[i:]) <= tokens)
        return text[cut:]

    def keep_first(self, text: str, tokens: int) -> str:
        """As keep_last, from the other end: the first cut whose prefix no longer fits, less one."""
        if tokens <= 0:
            return ""
        if self.count(text) <= tokens:
            return text
        cut = bisect.bisect_left(range(len(text) + 1), True, key=lambda i: self.count(text[:i]) > tokens)
        return _fitting_prefix(text, cut - 1, tokens, self.count)

    def round_trip(self, text: str) -> str:
        return self._sp.decode(self._sp.encode(text))

    def close(self) -> None:
        """Stops the counting workers, if any were started (later batches are counted here)."""
        if self._words is not None:
            self._words.close()


def count_within_begun(counter: TokenCounter, texts: Sequence[str], cap: int) -> Callable[[], list[int]]:
    """`counter.count_within(texts, cap)`, begun now where the counter can count in the background
    (SentencePiece's worker processes), else when the call returned is made."""
    begin = getattr(counter, "count_within_begun", None)
    return begin(texts, cap) if begin is not None else (lambda: counter.count_within(texts, cap))


def _fitting_prefix(text: str, cut: int, tokens: int, count) -> str:
    """text[:cut], shortened until its own count fits: re-encoding a prefix may merge its last
    pieces otherwise than the whole text's encoding did, so the cut is checked, not assumed."""
    while cut > 0 and count(text[:cut]) > tokens:
        cut -= 1
    return text[:max(cut, 0)]


def _load(source: TokenizerSource) -> TokenCounter:
    if source.kind == "sentencepiece":
        return SentencePieceFile(source.path)
    if source.kind == "gguf":
        return TokenizerFile.from_gguf(source.path)
    return TokenizerFile.from_file(source.path)


@functools.lru_cache(maxsize=8)
def token_counter(tokenizer: str | None) -> TokenCounter:
    """The counter for a tokenizer path (see the module docstring for what it may name)."""
    if not tokenizer:
        return ByteEstimate()
    source = locate_tokenizer(Path(tokenizer).expanduser())
    try:
        counter = _load(source)
    except ImportError as exc:
        raise ConfigError(
            f"Cannot read the {source.kind} tokenizer {source.path}: {exc}. Install the project "
            "(pip install -e '.[local]'), or unset NSDG_MODEL__TOKENIZER to count with the byte estimate."
        ) from exc
    log.info("counting prompt tokens with %s", counter.description)
    return counter
