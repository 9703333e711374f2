"""Locations as text: which kind a URI is, its local path or S3 bucket and key, and the names that
become storage keys or paths (run ids, object names). Pure: no I/O, no boto3, so that settings
validation, both stores and the allowed-locations check use one definition without importing
each other.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from pathlib import Path
from urllib.parse import urlparse

from infra.errors import ConfigError

# Run ids and object names: letters, digits, '.', '_', '-'; no leading dot, no '..'.
KEY_COMPONENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

MAX_KEY_BYTES = 1024
BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
IP_ADDRESS = re.compile(r"^\d+\.\d+\.\d+\.\d+$")
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")

_PERCENT_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
# Slash look-alikes that NFKC leaves alone.
_SLASH_LOOKALIKES = "\u2215\u2044\u29f8\u2571\u29f5\u2216\ufe68"


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def local_path(uri: str) -> Path:
    if uri.startswith("file://"):
        parsed = urlparse(uri)
        return Path(parsed.netloc + parsed.path) if parsed.netloc else Path(parsed.path)
    if "://" in uri:
        raise ConfigError(f"Unsupported URI scheme in {uri!r}: use a local path, file:// or s3://")
    return Path(uri).expanduser()


def validate_key_component(value: str, what: str) -> str:
    if not isinstance(value, str) or not KEY_COMPONENT.match(value) or ".." in value:
        raise ConfigError(
            f"{what} {value!r} is not allowed: use 1–128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, with no '..'"
        )
    return value


# ---------------------------------------------------------------- S3 URIs


def validate_bucket(bucket: str) -> str:
    if not BUCKET_NAME.match(bucket) or ".." in bucket or IP_ADDRESS.match(bucket):
        raise ConfigError(
            f"S3 bucket name {bucket!r} is not valid: use 3-63 lowercase letters, digits, '.' or '-', "
            "starting and ending with a letter or digit, no '..', not an IP address."
        )
    return bucket


def validate_key(key: str, uri: str) -> str:
    """A key made of non-empty '/'-separated components, none of them '.' or '..'."""
    problem = None
    if key.startswith("/"):
        problem = "starts with '/'"
    elif any(part == "" for part in key.split("/")):
        problem = "has an empty path component ('//' or a trailing '/')"
    elif any(part in (".", "..") for part in key.split("/")):
        problem = "has a '.' or '..' path component"
    elif CONTROL_CHARS.search(key):
        problem = "contains a control character"
    elif len(key.encode()) > MAX_KEY_BYTES:
        problem = f"is longer than {MAX_KEY_BYTES} bytes"
    if problem:
        raise ConfigError(f"S3 key {key!r} in {uri!r} {problem}. Use s3://bucket/path/to/object with plain path components.")
    return key


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/key` → (bucket, key). The key may be empty (`s3://bucket`), never malformed."""
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise ConfigError(f"{uri!r} is not an S3 URI: use s3://bucket/key.")
    bucket, _, key = uri[len("s3://"):].partition("/")
    validate_bucket(bucket)
    if key or uri[len("s3://"):].endswith("/"):
        validate_key(key, uri)
    return bucket, key


_NOT_IN_DIR_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def prefix_dir_name(prefix: str) -> str:
    """One local directory name for an S3 prefix (a validated key: any characters, up to 1,024
    bytes): its readable part, cut to 48 characters, then its sha256, so two prefixes never share
    a name and no name is too long, hidden, '..' or a path. It starts with '_', which no run id
    does, so it never meets a run's own directory beside it."""
    readable = _NOT_IN_DIR_NAME.sub("_", prefix)[:48]
    return f"_{readable}.{hashlib.sha256(prefix.encode()).hexdigest()[:16]}"


def s3_prefix(uri: str) -> tuple[str, str]:
    """An S3 location as a (bucket, prefix): a trailing '/' only says "prefix", s3://b/pre/ is s3://b/pre."""
    return parse_s3_uri(uri if uri.endswith("://") else uri.rstrip("/"))


# ---------------------------------------------------------------- allowed locations (infra/storage/locations.py)


def ambiguous(uri: str) -> str | None:
    """Why `uri` is refused before it is even resolved, or None: whatever later decodes or
    normalizes it would no longer be the location that was checked."""
    if CONTROL_CHARS.search(uri):
        return "contains a control character"
    if _PERCENT_ESCAPE.search(uri):
        return "contains a percent-escape (%XX): give the path as plain text"
    if (unicodedata.normalize("NFKC", uri) != uri or any(c in _SLASH_LOOKALIKES for c in uri)
            or any(unicodedata.category(c) in ("Cf", "Zl", "Zp") for c in uri)):
        return ("contains a look-alike Unicode character (one NFKC normalization changes, an invisible one, "
                "or one that imitates '/')")
    return None


def validate_allowed_entry(entry: str) -> str:
    """One entry of NSDG_ALLOWED_URIS: an absolute local directory (or file://) or s3://bucket[/prefix]."""
    if not isinstance(entry, str) or not entry.strip():
        raise ValueError("entries must be non-empty strings")
    problem = ambiguous(entry)
    if problem:
        raise ValueError(f"{entry!r} {problem}")
    if is_s3(entry):
        try:
            s3_prefix(entry)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
    elif not local_path(entry).is_absolute():
        raise ValueError(f"{entry!r} is not an absolute path (or file:// or s3:// URI)")
    return entry
