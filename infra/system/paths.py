"""Pure path logic shared by the reaper and the test fixtures: no I/O beyond resolving a path."""

from __future__ import annotations

from pathlib import Path


def is_under(path: str | None, root: Path) -> bool:
    """Whether `path` (resolved: symlinks and `..` followed) lies under `root`; False for no path,
    or one that cannot be resolved."""
    if not path:  # Path("") would resolve to the current directory
        return False
    try:
        return Path(path).resolve().is_relative_to(root)
    except (OSError, ValueError):
        return False
