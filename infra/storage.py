"""Where prompts come from and results go: a local path (or file://) or s3://bucket/key.

Output lives under `{output_uri}/{run_id}/`. Every write is atomic: a reader sees a whole
object or none (temp file + rename locally; one PUT or a completed multipart upload on S3), and
`manifest.json` is written last, so its presence means the run is complete.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gzip
import hashlib
import io
import os
import tempfile
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Iterator, Protocol
from urllib.parse import urlparse

from infra.errors import ConfigError, InputChanged, StorageError
from infra.input_pin import InputPin
from infra.keys import validate_key_component

if TYPE_CHECKING:
    from infra.settings import Settings

# A local output that fails with these is the user's to fix (a path, permissions, a read-only or full
# disk): one line and exit 2. Anything else (EIO ...) may pass and stays a StorageError.
USER_FIXABLE = {errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOTDIR, errno.EEXIST, errno.EROFS, errno.ENOSPC,
                errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP}


def preflight_error(root: Path, exc: OSError) -> Exception:
    seen = f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
    error = ConfigError if exc.errno in USER_FIXABLE else StorageError
    return error(f"Output directory {root} is not writable ({seen}). Pick another output_uri or fix its permissions.")


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
    def abort_incomplete_uploads(self) -> list[str]: ...


class LocalOutputStore:
    def __init__(self, root: Path):
        self.root = root
        self.location = str(root)

    def uri(self, name: str) -> str:
        return str(self.root / name)

    def preflight(self) -> None:
        """Prove the run directory can be made and written; a refusal leaves no folder behind."""
        made: list[Path] = []
        try:
            for folder in [*reversed(self.root.parents), self.root]:  # outermost first
                if not folder.is_dir():
                    folder.mkdir()
                    made.append(folder)
            with tempfile.NamedTemporaryFile(dir=self.root, prefix=".preflight-"):
                pass
        except OSError as exc:
            for folder in reversed(made):
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise preflight_error(self.root, exc) from None

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

    def abort_incomplete_uploads(self) -> list[str]:
        return []  # a local part is renamed into place: there is no upload to leave open

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
        from infra.s3_input import check_s3_input

        check_s3_input(input_uri, settings)
        return
    path = local_path(input_uri)
    if not path.is_file():
        raise ConfigError(f"Input {input_uri!r} not found ({path.resolve()} is not a file). Check input_uri.")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"Input {path} is not readable. Fix its permissions.")


READER_BUFFER = 256 * 1024


class _LocalInput(io.RawIOBase):
    """A local input file as a raw stream, checked against its pin after every read: a rewrite
    in place or an append is seen before any byte read after it is used."""

    def __init__(self, uri: str, pin: InputPin | None):
        super().__init__()
        self._file = open(local_path(uri), "rb", buffering=0)
        self._uri = uri
        self.pin = InputPin.of_file(uri, os.fstat(self._file.fileno()))
        self._expected = pin or self.pin
        try:
            self.verify()
        except InputChanged:
            self._file.close()
            raise

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self._file.readinto(buffer)
        self.verify()
        return n

    def verify(self) -> None:
        self._expected.check(InputPin.of_file(self._uri, os.fstat(self._file.fileno())))

    def close(self) -> None:
        self._file.close()
        super().close()


class InputSource:
    """`with open_input(uri, settings, pin) as stream:` a binary stream over the input, gunzipped
    when the name ends in .gz. `pin` is what the opened input is (what the plan records);
    given a pin, the input must still be that one (else InputChanged), and `verify()` checks it
    again (local files: S3 reads are pinned by the GET itself)."""

    def __init__(self, input_uri: str, settings: "Settings", pin: InputPin | None = None):
        self.uri, self._settings, self._expected = input_uri, settings, pin
        self._raw = None
        self._stack = ExitStack()

    @property
    def pin(self) -> InputPin:
        return self._raw.pin

    def verify(self) -> None:
        self._raw.verify()

    def __enter__(self) -> BinaryIO:
        if is_s3(self.uri):
            from infra.s3_input import open_s3_raw  # boto3 is imported only when S3 is used

            self._raw = open_s3_raw(self.uri, self._settings, pin=self._expected)
        else:
            self._raw = _LocalInput(self.uri, self._expected)
        stream = self._stack.enter_context(io.BufferedReader(self._raw, buffer_size=READER_BUFFER))
        if self.uri.endswith(".gz"):
            gz = self._stack.enter_context(gzip.GzipFile(fileobj=stream))
            stream = self._stack.enter_context(io.BufferedReader(gz))  # type: ignore[arg-type]
        return stream  # type: ignore[return-value]

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


def open_input(input_uri: str, settings: "Settings", pin: InputPin | None = None) -> InputSource:
    return InputSource(input_uri, settings, pin)
