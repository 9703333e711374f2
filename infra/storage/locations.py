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

from collections.abc import Sequence
from pathlib import Path

from infra.errors import ConfigError
from infra.storage.uris import ambiguous, is_s3, local_path, s3_prefix

SETTING = "NSDG_ALLOWED_URIS"  # its entries are checked by infra.storage.uris.validate_allowed_entry


def _resolved_local(uri: str) -> Path:
    try:
        return local_path(uri).resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # a symlink loop, an embedded NUL
        raise ConfigError(f"Location {uri!r} cannot be resolved ({exc}). Give a plain local path.") from None


def _inside_s3(bucket: str, key: str, entry: str) -> bool:
    allowed_bucket, prefix = s3_prefix(entry)
    return bucket == allowed_bucket and (not prefix or key == prefix or key.startswith(prefix + "/"))


def check_allowed(uri: str, allowed: Sequence[str], *, what: str) -> None:
    """Refuse `uri` (the parameter `what`) unless it lies inside one of `allowed` (settings.allowed_uris;
    empty: anywhere)."""
    if not allowed:
        return
    problem = ambiguous(uri) if isinstance(uri, str) else "is not a string"
    if problem:
        raise ConfigError(f"{what} {uri!r} {problem}; it is refused while {SETTING} is set.")
    if is_s3(uri):
        bucket, key = s3_prefix(uri)
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


def check_run_locations(input_uri: str, output_uri: str, run_id: str, allowed: Sequence[str],
                        extra: dict[str, str] | None = None) -> None:
    """Every location a generate run touches, checked before anything is read; `extra`: more
    locations it reads, by parameter name (a recipe's template and examples files)."""
    check_allowed(input_uri, allowed, what="input_uri")
    check_allowed(output_uri, allowed, what="output_uri")
    check_allowed(run_location(output_uri, run_id), allowed, what="output_uri's run directory")
    for what, uri in (extra or {}).items():
        check_allowed(uri, allowed, what=what)
