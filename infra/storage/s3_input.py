"""S3 input: stream the prompts from an object, read as they are consumed (memory stays flat in
the object's size), every GET pinned to the object the plan read (see `infra.storage.input_pin`).

A connection that breaks mid-body is reopened with a ranged GET from the current offset. What
the user must fix (no bucket, no object, access denied, no credentials) raises `ConfigError`;
a changed object `InputChanged`; what may pass (an unreachable endpoint) `StorageError`.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from typing import Any

from botocore.exceptions import ClientError, IncompleteReadError

from infra.errors import ConfigError, StorageError
from infra.storage.input_pin import InputPin, input_changed
from infra.storage.s3_client import make_s3_client
from infra.storage.s3_errors import STREAM_ERRORS, S3Place, error_code, error_text, s3_call
from infra.storage.s3_settings import S3Settings
from infra.storage.uris import parse_s3_uri

log = logging.getLogger(__name__)


def check_s3_input(uri: str, s3: S3Settings, client: Any = None) -> None:
    """HEAD the input object; fail with what to fix before any GPU is asked for."""
    _reading(uri, s3, client, lambda c, bucket, key: c.head_object(Bucket=bucket, Key=key))


def head_pin(uri: str, s3: S3Settings, client: Any = None) -> InputPin:
    """The object as a HEAD sees it, without reading it: the pin a GET of it now would take."""
    bucket, key = _input_location(uri)
    reply = _reading(uri, s3, client, lambda c, b, k: c.head_object(Bucket=b, Key=k))
    version = reply.get("VersionId")
    return InputPin(f"s3://{bucket}/{key}", reply.get("ContentLength"), etag=reply.get("ETag"),
                    version_id=version if version not in (None, "null") else None)


def _reading(uri: str, s3: S3Settings, client: Any, call: Callable[[Any, str, str], Any]) -> Any:
    """`call(client, bucket, key)`, its errors turned into what to fix."""
    bucket, key = _input_location(uri)
    client = client or make_s3_client(s3)
    return s3_call(lambda: call(client, bucket, key), S3Place("input", "reading", bucket, key), s3, client)


def _input_location(uri: str) -> tuple[str, str]:
    bucket, key = parse_s3_uri(uri)
    if not key:
        raise ConfigError(f"Input {uri!r} names a bucket but no object. Use s3://{bucket}/path/to/prompts.jsonl.")
    return bucket, key


class S3ObjectReader(io.RawIOBase):
    """The object's body as a raw stream. A connection that breaks mid-body is reopened with a
    ranged GET from the current offset. Every GET is pinned: to `pin` when one is given (the
    plan's), else to what the first GET found; by VersionId when the bucket keeps versions (the
    pinned version is read even after an overwrite), else by IfMatch on the ETag (a changed
    object is refused: InputChanged)."""

    def __init__(self, client: Any, bucket: str, key: str, s3: S3Settings, pin: InputPin | None = None):
        super().__init__()
        self._client, self._bucket, self._key, self._s3 = client, bucket, key, s3
        self._attempts = s3.max_attempts
        self._pos = 0
        self.pin = pin
        self._body: Any = None
        self.reopened = 0
        self._open()

    @property
    def _size(self) -> int | None:
        return self.pin.size if self.pin else None

    def _open(self) -> None:
        args: dict[str, Any] = {"Bucket": self._bucket, "Key": self._key}
        if self.pin is not None:
            if self.pin.version_id:
                args["VersionId"] = self.pin.version_id
            elif self.pin.etag:  # a store that reports no ETag cannot be pinned
                args["IfMatch"] = self.pin.etag
        if self._pos:
            args["Range"] = f"bytes={self._pos}-"
        try:
            reply = self._client.get_object(**args)
        except ClientError as exc:
            if error_code(exc) == "PreconditionFailed" and self.pin is not None:
                raise input_changed(self.pin, f"the object's ETag is no longer {self.pin.etag}") from exc
            raise
        if self.pin is None:
            version = reply.get("VersionId")
            self.pin = InputPin(f"s3://{self._bucket}/{self._key}", reply.get("ContentLength"), etag=reply.get("ETag"),
                                version_id=version if version not in (None, "null") else None)
        self._body = reply["Body"]

    def verify(self) -> None:
        """Nothing to do: every GET carries the pin."""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._size is not None and self._pos >= self._size:
            return 0
        for attempt in range(1, self._attempts + 1):
            try:
                data = self._body.read(len(buffer))
                if not data and self._size is not None and self._pos < self._size:
                    raise IncompleteReadError(actual_bytes=self._pos, expected_bytes=self._size)
            except STREAM_ERRORS as exc:
                if attempt == self._attempts:
                    raise StorageError(
                        f"Reading s3://{self._bucket}/{self._key} broke at byte {self._pos} {attempt} times in a row: {error_text(exc)}. "
                        "Check the network to the S3 endpoint."
                    ) from exc
                log.warning("s3://%s/%s: stream broke at byte %d (%s); reopening", self._bucket, self._key, self._pos, type(exc).__name__)
                self._reopen()
                continue
            buffer[: len(data)] = data
            self._pos += len(data)
            return len(data)
        return 0  # not reached: the last attempt returns or raises

    def _reopen(self) -> None:
        self._close_body()
        self.reopened += 1
        place = S3Place("input", "reading", self._bucket, self._key, f"reopening it at byte {self._pos}")
        s3_call(self._open, place, self._s3, self._client)

    def _close_body(self) -> None:
        if self._body is not None:
            try:
                self._body.close()
            except Exception:  # a broken connection may fail to close; it is dropped either way
                pass
            self._body = None

    def close(self) -> None:
        self._close_body()
        super().close()


def open_s3_raw(uri: str, s3: S3Settings, client: Any = None, pin: InputPin | None = None) -> S3ObjectReader:
    """The object as a raw stream, pinned (see `S3ObjectReader`); errors say what to fix.
    `infra.storage.open_input` buffers it, adds the pin and gzip decoding."""
    return _reading(uri, s3, client, lambda c, bucket, key: S3ObjectReader(c, bucket, key, s3, pin))
