"""Find the tokenizer file a path stands for: a file by its kind, an HF model directory by its
`tokenizer.json`, an extracted `.nemo` directory by its `model_config.yaml`.

NeMo saves every artifact as `<uuid hex>_<basename>` and writes `nemo:<that name>` into the config
(SaveRestoreConnector._handle_artifacts); restoring resolves `nemo:` against the extracted folder, or
falls back to the folder plus the basename (register_artifact). The GPT model reads only
`tokenizer.model` (`tokenizer_model` is a second copy it never uses). Base names the file
`…_nemotron_2_256k.model`, Instruct `…_megatron_2.model`: read it, never assume it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from infra.errors import ConfigError

Kind = Literal["tokenizer.json", "sentencepiece", "gguf"]
NEMO_CONFIG = "model_config.yaml"


@dataclass(frozen=True)
class TokenizerSource:
    kind: Kind
    path: Path


def _by_suffix(path: Path) -> TokenizerSource | None:
    suffix = path.suffix.lower()
    if suffix == ".json":
        return TokenizerSource("tokenizer.json", path)
    if suffix == ".model":
        return TokenizerSource("sentencepiece", path)
    if suffix == ".gguf":
        return TokenizerSource("gguf", path)
    return None


def locate_tokenizer(path: Path) -> TokenizerSource:
    if path.is_file():
        if (source := _by_suffix(path)) is None:
            raise ConfigError(f"Tokenizer {path}: not a tokenizer.json, SentencePiece .model or .gguf file. "
                              "Set NSDG_MODEL__TOKENIZER to one of those, or to the model's directory.")
        return source
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return TokenizerSource("tokenizer.json", path / "tokenizer.json")
        if (path / NEMO_CONFIG).is_file():
            return TokenizerSource("sentencepiece", nemo_tokenizer_model(path))
        models = sorted(path.glob("*.model"))
        if len(models) == 1:
            return TokenizerSource("sentencepiece", models[0])
        raise ConfigError(f"Tokenizer directory {path} holds no tokenizer.json, no {NEMO_CONFIG} and "
                          f"{'several' if models else 'no'} *.model files. Set NSDG_MODEL__TOKENIZER to the file.")
    raise ConfigError(f"Tokenizer {path} not found. Set NSDG_MODEL__TOKENIZER to a tokenizer.json, a SentencePiece "
                      ".model, a .gguf or a model directory, or unset it to count with the byte estimate.")


def nemo_tokenizer_model(folder: Path) -> Path:
    """The SentencePiece file an extracted `.nemo` directory's config names, resolved as NeMo does."""
    import yaml  # Prefect depends on PyYAML

    where = folder / NEMO_CONFIG
    try:
        cfg = yaml.safe_load(where.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"Cannot read {where}: {exc}. Set NSDG_MODEL__TOKENIZER to the tokenizer's .model file.") from exc
    cfg = cfg.get("model", cfg) if isinstance(cfg, dict) else {}  # NeMo unwraps a top-level `model:` too
    tok = cfg.get("tokenizer") if isinstance(cfg.get("tokenizer"), dict) else {}
    library, name = tok.get("library"), tok.get("model")
    if library not in (None, "sentencepiece"):
        raise ConfigError(f"{where} names a {library!r} tokenizer; only SentencePiece is read from a .nemo "
                          "directory. Set NSDG_MODEL__TOKENIZER to its tokenizer.json instead.")
    candidates = []
    if isinstance(name, str) and name:
        candidates = [folder / name[len("nemo:"):]] if name.startswith("nemo:") else [Path(name), folder / Path(name).name]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    models = sorted(folder.glob("*.model"))
    if len(models) == 1:  # config unreadable or silent: the one SentencePiece file there
        return models[0]
    names = ", ".join(m.name for m in models) or "none"
    raise ConfigError(f"{where}: tokenizer.model is {name!r}, which is not in {folder} (*.model files: {names}). "
                      "Set NSDG_MODEL__TOKENIZER to the right .model file.")


def splits_at_spaces(sp) -> bool:
    """Whether `WordCounts` (infra/prompting/word_counts.py) counts exactly with this model: BPE, spaces escaped and kept as they
    are (no dummy prefix, no whitespace removal, not a suffix), and no piece with "▁" after
    another character (a model that lets pieces span words encodes whole texts)."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto.FromString(sp.serialized_model_proto())
    spec, trainer = proto.normalizer_spec, proto.trainer_spec
    return (trainer.model_type == sentencepiece_model_pb2.TrainerSpec.BPE and spec.escape_whitespaces
            and not spec.add_dummy_prefix and not spec.remove_extra_whitespaces
            and not trainer.treat_whitespace_as_suffix
            and not any(_SPACE_AFTER_OTHER.search(p.piece) for p in proto.pieces))


_SPACE_AFTER_OTHER = re.compile("[^\u2581]\u2581")


def normalizer_spec(model: bytes):
    """The NormalizerSpec of a serialized SentencePiece ModelProto (sentencepiece's own protobuf
    module; it needs the `protobuf` package)."""
    from sentencepiece import sentencepiece_model_pb2

    return sentencepiece_model_pb2.ModelProto.FromString(model).normalizer_spec
