"""Where a run may read and write: `NSDG_ALLOWED_URIS`, a JSON list of local directories and
`s3://bucket/prefix` prefixes. When it is set, every location a run touches (its input, its
output, and any template or examples location) must lie inside one of them, or the run stops
with a ConfigError before anything is read or any GPU is asked for. Unset (the local CLI's
default) means unrestricted.

    NSDG_ALLOWED_URIS='["/lustre/nsdg", "s3://team-bucket/nsdg"]'

Local paths are compared after `file://` is stripped, `~` expanded and the path resolved
(symlinks and `..`), exactly as the readers and writers open them. `s3://b/pre` allows
`s3://b/pre` and `s3://b/pre/...`, never `s3://b/prefix-other`. A location with a
percent-escape or a character that Unicode compatibility folding turns into something else
(a fullwidth solidus, a two-dot leader, ...) is refused outright: whatever later decodes or
normalizes it would no longer be the path that was checked.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING

from infra.errors import ConfigError
from infra.storage import is_s3, local_path

if TYPE_CHECKING:
    from infra.settings import Settings

SETTING = "NSDG_ALLOWED_URIS"
_PERCENT_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Slash look-alikes that NFKC leaves alone.
_SLASH_LOOKALIKES = "\u2215\u2044\u29f8\u2571\u29f5\u2216\ufe68"


def _ambiguous(uri: str) -> str | None:
    """Why `uri` is refused before it is even resolved, or None."""
    if _CONTROL.search(uri):
        return "contains a control character"
    if _PERCENT_ESCAPE.search(uri):
        return "contains a percent-escape (%XX): give the path as plain text"
    if (unicodedata.normalize("NFKC", uri) != uri or any(c in _SLASH_LOOKALIKES for c in uri)
            or any(unicodedata.category(c) in ("Cf", "Zl", "Zp") for c in uri)):
        return ("contains a look-alike Unicode character (one NFKC normalization changes, an invisible one, "
                "or one that imitates '/')")
    return None


def _resolved_local(uri: str) -> Path:
    try:
        return local_path(uri).resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # a symlink loop, an embedded NUL
        raise ConfigError(f"Location {uri!r} cannot be resolved ({exc}). Give a plain local path.") from None


def _s3_location(uri: str) -> tuple[str, str]:
    from infra.storage.s3 import parse_s3_uri  # boto3 only when S3 is used

    # A trailing '/' only says "prefix": s3://b/pre/ is s3://b/pre.
    return parse_s3_uri(uri if uri.endswith("://") else uri.rstrip("/"))


def validate_allowed_entry(entry: str) -> str:
    """One entry of NSDG_ALLOWED_URIS: an absolute local directory (or file://) or s3://bucket[/prefix]."""
    if not isinstance(entry, str) or not entry.strip():
        raise ValueError("entries must be non-empty strings")
    problem = _ambiguous(entry)
    if problem:
        raise ValueError(f"{entry!r} {problem}")
    if is_s3(entry):
        try:
            _s3_location(entry)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
    elif not local_path(entry).is_absolute():
        raise ValueError(f"{entry!r} is not an absolute path (or file:// or s3:// URI)")
    return entry


def _inside_s3(bucket: str, key: str, entry: str) -> bool:
    allowed_bucket, prefix = _s3_location(entry)
    return bucket == allowed_bucket and (not prefix or key == prefix or key.startswith(prefix + "/"))


def check_allowed(uri: str, settings: "Settings", *, what: str) -> None:
    """Refuse `uri` (the parameter `what`) unless it lies inside one of settings.allowed_uris."""
    allowed = settings.allowed_uris
    if not allowed:
        return
    problem = _ambiguous(uri) if isinstance(uri, str) else "is not a string"
    if problem:
        raise ConfigError(f"{what} {uri!r} {problem}; it is refused while {SETTING} is set.")
    if is_s3(uri):
        bucket, key = _s3_location(uri)
        if any(_inside_s3(bucket, key, entry) for entry in allowed if is_s3(entry)):
            return
        seen = f"s3://{bucket}/{key}"
    else:
        path = _resolved_local(uri)
        roots = [_resolved_local(entry) for entry in allowed if not is_s3(entry)]
        if any(path == root or root in path.parents for root in roots):
            return
        seen = str(path)
    raise ConfigError(
        f"{what} {uri!r} (resolved: {seen}) is outside the locations this installation allows "
        f"({SETTING}: {', '.join(allowed)}). Use a location inside one of them, or ask the operator to add one."
    )


def run_location(output_uri: str, run_id: str) -> str:
    """The run's own output location, `{output_uri}/{run_id}` (checked too: it may be a symlink)."""
    if is_s3(output_uri):
        return f"{output_uri.rstrip('/')}/{run_id}"
    return str(local_path(output_uri) / run_id)


def check_run_locations(input_uri: str, output_uri: str, run_id: str, settings: "Settings",
                        extra: dict[str, str] | None = None) -> None:
    """Every location a generate run touches, checked before anything is read; `extra`: more
    locations it reads, by parameter name (a recipe's template and examples files)."""
    check_allowed(input_uri, settings, what="input_uri")
    check_allowed(output_uri, settings, what="output_uri")
    check_allowed(run_location(output_uri, run_id), settings, what="output_uri's run directory")
    for what, uri in (extra or {}).items():
        check_allowed(uri, settings, what=what)
