"""Token counts for the context-length check: the model's own tokenizer when one is reachable
(a `tokenizer.json`, as Hugging Face checkpoints and the local tiny model ship), otherwise a
conservative estimate: UTF-8 bytes, since every token of a byte-fallback BPE or SentencePiece
vocabulary covers at least one byte. The estimate never lets a too-long prompt through, but
can refuse one that would have fit: point NSDG_MODEL__TOKENIZER at the tokenizer to avoid that.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from infra.errors import ConfigError
from infra.nemo_client import estimate_tokens

log = logging.getLogger(__name__)


class TokenCounter(Protocol):
    description: str

    def count(self, text: str) -> int: ...
    def keep_last(self, text: str, tokens: int) -> str: ...
    def round_trip(self, text: str) -> str:
        """What the server echoes for `text`: decode(encode(text)), special tokens dropped."""
        ...


@dataclass(frozen=True)
class ByteEstimate:
    description: str = "UTF-8 byte count (an upper bound on tokens)"

    def count(self, text: str) -> int:
        return estimate_tokens(text)

    def keep_last(self, text: str, tokens: int) -> str:
        return text.encode("utf-8")[-tokens:].decode("utf-8", errors="ignore") if tokens > 0 else ""

    def round_trip(self, text: str) -> str:
        return text  # no tokenizer to ask: expect the prompt back as it was sent


class TokenizerFile:
    def __init__(self, path: Path):
        from tokenizers import Tokenizer  # in the `local` extra; a missing module falls back

        self._tok = Tokenizer.from_file(str(path))
        self.description = f"tokenizer {path}"

    def count(self, text: str) -> int:
        return len(self._tok.encode(text, add_special_tokens=False).ids)

    def keep_last(self, text: str, tokens: int) -> str:
        if tokens <= 0:
            return ""
        enc = self._tok.encode(text, add_special_tokens=False)
        if len(enc.ids) <= tokens:
            return text
        return text[enc.offsets[-tokens][0]:]

    def round_trip(self, text: str) -> str:
        # A chat template's markup (<|im_start|> …) is special tokens, which the echo drops.
        return self._tok.decode(self._tok.encode(text, add_special_tokens=False).ids, skip_special_tokens=True)


@functools.lru_cache(maxsize=8)
def token_counter(tokenizer: str | None) -> TokenCounter:
    """The counter for a tokenizer path (a tokenizer.json or a directory holding one)."""
    if not tokenizer:
        return ByteEstimate()
    path = Path(tokenizer).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(f"Tokenizer {path} not found: set NSDG_MODEL__TOKENIZER to a tokenizer.json (or its directory), or unset it to use the byte estimate.")
    try:
        return TokenizerFile(path)
    except ImportError:
        log.warning("the `tokenizers` package is not installed; counting prompt tokens as UTF-8 bytes")
        return ByteEstimate()
