"""Token counts for the context-length check: the model's own tokenizer when one is reachable
(a `tokenizer.json`, as Hugging Face checkpoints and the local tiny model ship), otherwise a
conservative estimate: UTF-8 bytes, since every token of a byte-fallback BPE or SentencePiece
vocabulary covers at least one byte. The estimate never lets a too-long prompt through, but
can refuse one that would have fit: point NSDG_MODEL__TOKENIZER at the tokenizer to avoid that.

The counter decides which prompts fit, how `truncate_left` cuts them, and so which records exist
and where shards begin: its `identity` (the kind, and for a tokenizer the sha256 of its file, not
its path) is part of the run's config hash, so a run is never resumed under another counter.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from infra.errors import ConfigError
from infra.nemo_client import estimate_tokens
from infra.storage import sha256_file

log = logging.getLogger(__name__)


class TokenCounter(Protocol):
    description: str  # for messages: what counted, where
    identity: str  # for the config hash: what decides the counts

    def count(self, text: str) -> int: ...
    def keep_last(self, text: str, tokens: int) -> str: ...


@dataclass(frozen=True)
class ByteEstimate:
    description: str = "UTF-8 byte count (an upper bound on tokens)"
    identity: str = "utf-8 byte estimate"

    def count(self, text: str) -> int:
        return estimate_tokens(text)

    def keep_last(self, text: str, tokens: int) -> str:
        return text.encode("utf-8")[-tokens:].decode("utf-8", errors="ignore") if tokens > 0 else ""


class TokenizerFile:
    def __init__(self, path: Path):
        from tokenizers import Tokenizer  # in the `local` extra; a missing module falls back

        self._tok = Tokenizer.from_file(str(path))
        self.description = f"tokenizer {path}"
        self.identity = f"tokenizer.json sha256:{sha256_file(path)[:16]}"

    def count(self, text: str) -> int:
        return len(self._tok.encode(text, add_special_tokens=False).ids)

    def keep_last(self, text: str, tokens: int) -> str:
        if tokens <= 0:
            return ""
        enc = self._tok.encode(text, add_special_tokens=False)
        if len(enc.ids) <= tokens:
            return text
        return text[enc.offsets[-tokens][0]:]


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
