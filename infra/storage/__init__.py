"""Where prompts come from and results go: a local path (or file://) or s3://bucket/key.

Output lives under `{output_uri}/{run_id}/`. Every write is atomic: a reader sees a whole
object or none (temp file + rename locally, `infra.storage.local`; one PUT or a completed
multipart upload on S3, `infra.storage.s3_output`), and `manifest.json` is written last, so its
presence means the run is complete. URIs and names are checked by `infra.storage.uris` (pure);
boto3 is imported only when an s3:// location is used.
"""

from __future__ import annotations

import gzip
import io
import os
from contextlib import ExitStack
from pathlib import Path
from typing import BinaryIO, Protocol

from infra.storage.input_pin import InputPin
from infra.storage.local import LocalOutputStore
from infra.storage.local_input import LocalInput, check_local_input
from infra.storage.s3_settings import S3Settings
from infra.storage.uris import is_s3, local_path, validate_key_component


class OutputStore(Protocol):
    """One run's output location. Names are single key components (`validate_key_component`)."""

    location: str

    def preflight(self) -> None: ...
    def publish_file(self, name: str, path: Path, sha256: str) -> None: ...
    def write_bytes(self, name: str, data: bytes) -> None: ...
    def read_bytes(self, name: str) -> bytes | None: ...
    def list_names(self) -> list[str]: ...
    def sha256(self, name: str) -> str | None: ...
    def delete(self, name: str) -> None: ...
    def uri(self, name: str) -> str: ...
    def staging_dir(self) -> Path: ...
    def abort_incomplete_uploads(self) -> list[str]: ...
    def move_in(self, source: "OutputStore", name: str) -> bool:
        """`source`'s object `name` (a store of the same kind) moved here under the same name, never
        read whole by this process; False when the source has none."""

    # Conditional writes, for infra/run/lease.py: the store compares a version and writes in one
    # step. A version is opaque to the caller (the content's sha256 locally, the ETag on S3).
    def create_exclusive(self, name: str, data: bytes) -> str | None:
        """Create `name` unless it exists; its version, or None when it already exists."""
    def read_versioned(self, name: str) -> tuple[bytes, str] | None:
        """The object's bytes and version, or None when it does not exist."""
    def replace_if_version(self, name: str, data: bytes, version: str) -> str | None:
        """Replace `name` only if it still holds `version`; the new version, or None."""
    def delete_if_version(self, name: str, version: str) -> bool:
        """Delete `name` only if it still holds `version`; whether it did."""


def open_output_store(output_uri: str, run_id: str, s3: S3Settings, staging: Path) -> OutputStore:
    """The store of `{output_uri}/{run_id}`. `staging`: the local directory under which an S3
    store writes its parts before they are uploaded (settings.work_path("staging"))."""
    validate_key_component(run_id, "run_id")
    if is_s3(output_uri):
        from infra.storage.s3_output import S3OutputStore  # boto3 is imported only when S3 is used

        return S3OutputStore.from_uri(output_uri, run_id, s3, staging)
    return LocalOutputStore(local_path(output_uri) / run_id)


def check_input(input_uri: str, s3: S3Settings) -> None:
    """Fail before any allocation when the input cannot be read."""
    if is_s3(input_uri):
        from infra.storage.s3_input import check_s3_input  # boto3 is imported only when S3 is used

        check_s3_input(input_uri, s3)
        return
    check_local_input(input_uri)


READER_BUFFER = 256 * 1024


class InputSource:
    """`with open_input(uri, settings.s3, pin) as stream:` a binary stream over the input, gunzipped
    when the name ends in .gz. `pin` is what the opened input is (what the plan records);
    given a pin, the input must still be that one (else InputChanged), and `verify()` checks it
    again (local files: S3 reads are pinned by the GET itself)."""

    def __init__(self, input_uri: str, s3: S3Settings, pin: InputPin | None = None):
        self.uri, self._s3, self._expected = input_uri, s3, pin
        self._raw = None
        self._stack = ExitStack()

    @property
    def pin(self) -> InputPin:
        return self._raw.pin

    def verify(self) -> None:
        self._raw.verify()

    def __enter__(self) -> BinaryIO:
        if is_s3(self.uri):
            from infra.storage.s3_input import open_s3_raw  # boto3 is imported only when S3 is used

            self._raw = open_s3_raw(self.uri, self._s3, pin=self._expected)
        else:
            self._raw = LocalInput(self.uri, self._expected)
        stream = self._stack.enter_context(io.BufferedReader(self._raw, buffer_size=READER_BUFFER))
        if self.uri.endswith(".gz"):
            gz = self._stack.enter_context(gzip.GzipFile(fileobj=stream))
            stream = self._stack.enter_context(io.BufferedReader(gz))  # type: ignore[arg-type]
        return stream  # type: ignore[return-value]

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


def open_input(input_uri: str, s3: S3Settings, pin: InputPin | None = None) -> InputSource:
    return InputSource(input_uri, s3, pin)


def look_at_input(input_uri: str, s3: S3Settings) -> InputPin:
    """The input's pin as it is now, read from its metadata alone (a stat, or an S3 HEAD)."""
    if is_s3(input_uri):
        from infra.storage.s3_input import head_pin  # boto3 is imported only when S3 is used

        return head_pin(input_uri, s3)
    return InputPin.of_file(input_uri, os.stat(local_path(input_uri)))
