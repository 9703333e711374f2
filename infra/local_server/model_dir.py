"""A local model directory, built once and atomically: in a temp dir next to the target, then
renamed into place. A directory that already holds a model is left alone, so `make run` and the
test fixtures can ask for one every time and pay for the build only once."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from infra.errors import ConfigError

log = logging.getLogger(__name__)

MARKERS = ("config.json", "tokenizer.json")  # what AutoModel/AutoTokenizer.from_pretrained read first


def has_model_files(model_dir: str | os.PathLike[str]) -> bool:
    path = Path(model_dir)
    return all((path / name).is_file() for name in MARKERS)


def build_model_dir(model_dir: str | os.PathLike[str], build: Callable[[Path], None], *, what: str) -> Path:
    """Run `build(staging)` and move the result to `model_dir`, unless a model is there already."""
    target = Path(model_dir)
    if has_model_files(target):
        log.info("a model is already in %s; leaving it as it is", target)
        return target
    if target.exists() and any(target.iterdir()):
        raise ConfigError(
            f"{target} exists, is not empty and holds no model (no {' / '.join(MARKERS)}). "
            f"Choose an empty or missing directory for the {what}."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(staging)
        # mkdtemp makes the folder private; a model on a shared filesystem must be readable.
        staging.chmod(0o755)
        for item in staging.iterdir():
            item.chmod(0o644)
        _move_into_place(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("%s written to %s", what, target)
    return target


def _move_into_place(staging: Path, target: Path) -> None:
    if target.exists():
        # An empty directory (checked above) is in the way; rename() cannot replace it on every OS.
        try:
            target.rmdir()
        except OSError:
            pass
    try:
        os.rename(staging, target)
    except OSError:
        # Another process won the race; its model is as good as ours.
        if not has_model_files(target):
            raise
