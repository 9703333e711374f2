"""Where prompts come from and results go: a local path (or file://) or s3://bucket/key.

Output lives under `{output_uri}/{run_id}/`. Every write is atomic: a reader sees a whole
object or none (temp file + rename locally; one PUT or a completed multipart upload on S3), and
`manifest.json` is written last, so its presence means the run is complete.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import io
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Iterator, Protocol
from urllib.parse import urlparse

from infra.errors import ConfigError, StorageError

if TYPE_CHECKING:
    from infra.settings import Settings

# Run ids and object names: letters, digits, '.', '_', '-'; no leading dot, no '..'.
KEY_COMPONENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def validate_key_component(value: str, what: str) -> str:
    if not isinstance(value, str) or not KEY_COMPONENT.match(value) or ".." in value:
        raise ConfigError(
            f"{what} {value!r} is not allowed: use 1–128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, with no '..'"
        )
    return value


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def local_path(uri: str) -> Path:
    if uri.startswith("file://"):
        parsed = urlparse(uri)
        return Path(parsed.netloc + parsed.path) if parsed.netloc else Path(parsed.path)
    if "://" in uri:
        raise ConfigError(f"Unsupported URI scheme in {uri!r}: use a local path, file:// or s3://")
    return Path(uri).expanduser()


class OutputStore(Protocol):
    """One run's output location."""

    location: str

    def preflight(self) -> None: ...
    def publish_file(self, name: str, path: Path, sha256: str) -> None: ...
    def write_bytes(self, name: str, data: bytes) -> None: ...
    def read_bytes(self, name: str) -> bytes | None: ...
    def list_names(self) -> list[str]: ...
    def uri(self, name: str) -> str: ...
    def staging_dir(self) -> Path: ...


class LocalOutputStore:
    def __init__(self, root: Path):
        self.root = root
        self.location = str(root)

    def uri(self, name: str) -> str:
        return str(self.root / name)

    def preflight(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.root, prefix=".preflight-"):
                pass
        except OSError as exc:
            raise StorageError(f"Output directory {self.root} is not writable: {exc}. Pick another output_uri or fix its permissions.") from exc

    def publish_file(self, name: str, path: Path, sha256: str) -> None:
        target = self.root / validate_key_component(name, "object name")
        if Path(path).parent.resolve() == self.root.resolve():
            os.replace(path, target)  # same filesystem: the rename is the atomic step
        else:
            self.write_bytes(name, Path(path).read_bytes())

    def _temp_copy(self, name: str, data: bytes) -> str:
        """`data` in a synced temp file next to `name`, ready to be renamed or linked into place."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return tmp

    def write_bytes(self, name: str, data: bytes) -> None:
        target = self.root / validate_key_component(name, "object name")
        tmp = self._temp_copy(name, data)
        try:
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def read_bytes(self, name: str) -> bytes | None:
        try:
            return (self.root / validate_key_component(name, "object name")).read_bytes()
        except FileNotFoundError:
            return None

    def list_names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_file() and not p.name.startswith("."))

    def staging_dir(self) -> Path:
        """Parts are written here and renamed into place, so a half-written part never shows."""
        self.root.mkdir(parents=True, exist_ok=True)
        return self.root

    # -- conditional writes, for infra/lease.py. A version is the content's sha256; replace and
    # delete hold an flock on a sidecar file, so a compare and its write are one step.

    def create_exclusive(self, name: str, data: bytes) -> str | None:
        """Create `name` with `data` unless it exists (O_EXCL semantics, through link(2), so the
        object appears whole); returns its version, or None when it already exists."""
        target = self.root / validate_key_component(name, "object name")
        tmp = self._temp_copy(name, data)
        try:
            os.link(tmp, target)
        except FileExistsError:
            return None
        finally:
            Path(tmp).unlink(missing_ok=True)
        return hashlib.sha256(data).hexdigest()

    def read_versioned(self, name: str) -> tuple[bytes, str] | None:
        data = self.read_bytes(name)
        return None if data is None else (data, hashlib.sha256(data).hexdigest())

    @contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        with open(self.root / f".{validate_key_component(name, 'object name')}.lock", "ab") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def replace_if_version(self, name: str, data: bytes, version: str) -> str | None:
        """Replace `name` only if it still holds `version`; returns the new version, or None."""
        with self._locked(name):
            current = self.read_versioned(name)
            if current is None or current[1] != version:
                return None
            self.write_bytes(name, data)
        return hashlib.sha256(data).hexdigest()

    def delete_if_version(self, name: str, version: str) -> bool:
        with self._locked(name):
            current = self.read_versioned(name)
            if current is None or current[1] != version:
                return False
            (self.root / name).unlink()
        return True


def open_output_store(output_uri: str, run_id: str, settings: "Settings") -> OutputStore:
    validate_key_component(run_id, "run_id")
    if is_s3(output_uri):
        from infra.s3 import S3OutputStore  # boto3 is imported only when S3 is used

        return S3OutputStore.from_uri(output_uri, run_id, settings)
    return LocalOutputStore(local_path(output_uri) / run_id)


def check_input(input_uri: str, settings: "Settings") -> None:
    """Fail before any allocation when the input cannot be read."""
    if is_s3(input_uri):
        from infra.s3 import check_s3_input

        check_s3_input(input_uri, settings)
        return
    path = local_path(input_uri)
    if not path.is_file():
        raise ConfigError(f"Input {input_uri!r} not found ({path.resolve()} is not a file). Check input_uri.")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"Input {path} is not readable. Fix its permissions.")


@contextmanager
def open_input(input_uri: str, settings: "Settings") -> Iterator[BinaryIO]:
    """A binary stream over the input, gunzipped when the name ends in .gz."""
    if is_s3(input_uri):
        from infra.s3 import open_s3_input

        raw_cm = open_s3_input(input_uri, settings)
    else:
        raw_cm = open(local_path(input_uri), "rb")
    with raw_cm as raw:
        if input_uri.endswith(".gz"):
            with gzip.GzipFile(fileobj=raw) as gz:
                yield io.BufferedReader(gz)  # type: ignore[arg-type]
        else:
            yield raw
