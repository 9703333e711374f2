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

from botocore.exceptions import BotoCoreError, ClientError, IncompleteReadError, NoCredentialsError

from infra.errors import ConfigError, StorageError
from infra.storage.input_pin import InputPin, input_changed
from infra.storage.s3_client import (BAD_CREDENTIALS, DENIED, NO_BUCKET, NOT_FOUND, STREAM_ERRORS, at_endpoint,
                                     bucket_exists, credentials_error, error_code, error_text, make_s3_client,
                                     no_credentials)
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
    try:
        return call(client, bucket, key)
    except ClientError as exc:
        raise _input_error(client, exc, bucket, key, s3) from exc
    except NoCredentialsError as exc:
        raise no_credentials(f"reading s3://{bucket}/{key}") from exc
    except BotoCoreError as exc:
        raise StorageError(f"Cannot reach S3{at_endpoint(s3)} to read s3://{bucket}/{key}: {error_text(exc)}. Check the endpoint and network.") from exc


def _input_location(uri: str) -> tuple[str, str]:
    bucket, key = parse_s3_uri(uri)
    if not key:
        raise ConfigError(f"Input {uri!r} names a bucket but no object. Use s3://{bucket}/path/to/prompts.jsonl.")
    return bucket, key


def _input_error(client: Any, exc: ClientError, bucket: str, key: str, s3: S3Settings) -> Exception:
    code, where = error_code(exc), f"s3://{bucket}/{key}"
    if code in NO_BUCKET or (code in NOT_FOUND and not bucket_exists(client, bucket)):
        return ConfigError(f"Input bucket {bucket!r} does not exist{at_endpoint(s3)} (reading {where}). Check the bucket name in input_uri, and the endpoint/region.")
    if code in NOT_FOUND:
        return ConfigError(f"Input object {where} not found: bucket {bucket!r} exists but has no key {key!r}. Check the key in input_uri.")
    if code in DENIED:
        return ConfigError(
            f"Access denied reading input {where} (bucket {bucket!r}, key {key!r}): the credentials in use lack "
            "s3:GetObject on it (or the key does not exist and they lack s3:ListBucket, for which S3 also answers 403). "
            "Grant read access in the bucket or IAM policy, or use other credentials."
        )
    if code in BAD_CREDENTIALS:
        return credentials_error(exc, f"reading {where}")
    return StorageError(f"Reading input {where} failed: {error_text(exc)}.")


class S3ObjectReader(io.RawIOBase):
    """The object's body as a raw stream. A connection that breaks mid-body is reopened with a
    ranged GET from the current offset. Every GET is pinned: to `pin` when one is given (the
    plan's), else to what the first GET found; by VersionId when the bucket keeps versions (the
    pinned version is read even after an overwrite), else by IfMatch on the ETag (a changed
    object is refused: InputChanged)."""

    def __init__(self, client: Any, bucket: str, key: str, attempts: int, pin: InputPin | None = None):
        super().__init__()
        self._client, self._bucket, self._key, self._attempts = client, bucket, key, attempts
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
        try:
            self._open()
        except ClientError as exc:
            raise StorageError(f"Reopening s3://{self._bucket}/{self._key} at byte {self._pos} failed: {error_text(exc)}.") from exc
        except BotoCoreError as exc:
            raise StorageError(f"Reopening s3://{self._bucket}/{self._key} at byte {self._pos} failed: {error_text(exc)}. Check the network to the S3 endpoint.") from exc

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
    return _reading(uri, s3, client, lambda c, bucket, key: S3ObjectReader(c, bucket, key, s3.max_attempts, pin))
