"""S3 (or any S3-compatible store): the client, URIs, and publishing a run's output; the input
is streamed by `infra.storage.s3_input`.

Every S3 call goes through one boto3 client built by `make_s3_client`, with the standard retry
mode (5xx, SlowDown, dropped connections are retried with backoff) and bounded timeouts.

Publishing is atomic and checksummed: a part is one PUT, or one completed multipart upload,
so a reader sees the whole object or nothing. The caller's sha256 is checked against the local
file before the upload, sent so that S3 verifies the bytes it receives (SHA-256 of the object,
or of each part for a multipart upload), stored as object metadata `sha256`, and checked once
more against what a HEAD reports after the upload. A lost reply is harmless: the HEAD finds
the object, and a repeated upload of the same bytes to the same key is the same object.

Errors: what the user must fix (no bucket, no object, access denied, bad URI, no credentials)
raises `ConfigError`; what may pass or needs a person to look (unreachable endpoint, an upload
that keeps failing) raises `StorageError`. Messages name the bucket and key, never a secret.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError as BotoConnectionError,
    IncompleteReadError,
    NoCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
)
from s3transfer.utils import ChunksizeAdjuster
from urllib3.exceptions import HTTPError as Urllib3Error

from infra.errors import ConfigError, StorageError
from infra.storage.keys import validate_key_component

if TYPE_CHECKING:
    from infra.settings import Settings

log = logging.getLogger(__name__)

MIB = 1 << 20
MAX_POOL_CONNECTIONS = 16
PUBLISH_ATTEMPTS = 3  # whole uploads, each already retried request by request by botocore
MAX_KEY_BYTES = 1024

BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
IP_ADDRESS = re.compile(r"^\d+\.\d+\.\d+\.\d+$")
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")

# botocore reports these codes for a HEAD (no body) or in the XML error of other calls.
NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
NO_BUCKET = {"NoSuchBucket"}
CONDITION_LOST = {"PreconditionFailed", "ConditionalRequestConflict"}
DENIED = {"403", "AccessDenied", "AllAccessDisabled", "AccountProblem"}
BAD_CREDENTIALS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "TokenRefreshRequired"}

# Errors while reading a response body: botocore does not retry these, the reader reopens.
STREAM_ERRORS = (IncompleteReadError, ReadTimeoutError, ResponseStreamingError, BotoConnectionError,
                 Urllib3Error, ConnectionError, TimeoutError)


# ---------------------------------------------------------------- client and URIs


def make_s3_client(settings: "Settings") -> Any:
    """A boto3 S3 client. Credentials come from boto3's chain (environment, profile, instance
    role) unless both NSDG_S3__ACCESS_KEY_ID and NSDG_S3__SECRET_ACCESS_KEY are set."""
    s3 = settings.s3
    if s3.endpoint_url is not None and not re.match(r"^https?://[^/\s]+", s3.endpoint_url):
        raise ConfigError(f"S3 endpoint_url {s3.endpoint_url!r} is not an http(s) URL. Fix NSDG_S3__ENDPOINT_URL.")
    config = Config(
        s3={"addressing_style": s3.addressing_style},
        retries={"mode": "standard", "max_attempts": s3.max_attempts},
        connect_timeout=s3.connect_timeout_s,
        read_timeout=s3.read_timeout_s,
        max_pool_connections=MAX_POOL_CONNECTIONS,
        tcp_keepalive=True,
    )
    # A session of its own: boto3's default session is not safe to share between threads.
    return boto3.session.Session().client(
        "s3", endpoint_url=s3.endpoint_url, region_name=s3.region, config=config, **_credentials(settings)
    )


def _credentials(settings: "Settings") -> dict[str, str]:
    s3 = settings.s3
    if s3.access_key_id is None and s3.secret_access_key is None:
        if s3.session_token is not None:
            raise ConfigError("NSDG_S3__SESSION_TOKEN is set without NSDG_S3__ACCESS_KEY_ID and NSDG_S3__SECRET_ACCESS_KEY: set all three, or none.")
        return {}
    if s3.access_key_id is None or s3.secret_access_key is None:
        raise ConfigError("Set both NSDG_S3__ACCESS_KEY_ID and NSDG_S3__SECRET_ACCESS_KEY, or neither (then boto3's credential chain is used).")
    creds = {
        "aws_access_key_id": s3.access_key_id.get_secret_value(),
        "aws_secret_access_key": s3.secret_access_key.get_secret_value(),
    }
    if s3.session_token is not None:
        creds["aws_session_token"] = s3.session_token.get_secret_value()
    return creds


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


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int | None:
    return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def _cause(exc: BaseException) -> str:
    """The error's class and botocore's text. botocore's messages carry the operation, code and
    server message; they never carry credentials."""
    return f"{type(exc).__name__}: {exc}"


def _where(settings: "Settings") -> str:
    return f" at {settings.s3.endpoint_url}" if settings.s3.endpoint_url else ""


def _credentials_error(exc: BaseException, what: str) -> ConfigError:
    return ConfigError(
        f"S3 rejected the credentials while {what} ({_cause(exc)}). Check AWS_ACCESS_KEY_ID/AWS_PROFILE or "
        "NSDG_S3__ACCESS_KEY_ID/NSDG_S3__SECRET_ACCESS_KEY (and the session token, if temporary), and the region."
    )


def _no_credentials(what: str) -> ConfigError:
    return ConfigError(
        f"No AWS credentials found while {what}. Set NSDG_S3__ACCESS_KEY_ID and NSDG_S3__SECRET_ACCESS_KEY, "
        "or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run with an instance role."
    )


def _bucket_exists(client: Any, bucket: str) -> bool:
    """A HEAD on a missing key and on a missing bucket both answer a bare 404; ask the bucket."""
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as exc:
        return _code(exc) not in NOT_FOUND | NO_BUCKET
    return True



# ---------------------------------------------------------------- output


def _b64(hex_digest: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_digest)).decode()


def expected_checksum(path: Path, sha256: str, part_size: int, multipart: bool) -> str:
    """What S3 will report as the object's ChecksumSHA256: the SHA-256 of the object for one
    PUT, or for a multipart upload the SHA-256 of the parts' SHA-256s with a '-N' suffix. One
    pass over the file also proves it still holds the bytes the caller hashed."""
    whole, parts, n = hashlib.sha256(), hashlib.sha256(), 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(part_size), b""):
            whole.update(chunk)
            parts.update(hashlib.sha256(chunk).digest())
            n += 1
    if whole.hexdigest() != sha256:
        raise StorageError(f"{path} no longer matches its sha256 {sha256} (now {whole.hexdigest()}): the staged file changed before upload.")
    if not multipart:
        return _b64(sha256)
    return f"{base64.b64encode(parts.digest()).decode()}-{max(n, 1)}"


class S3OutputStore:
    """One run's output under s3://bucket/prefix/run_id/. Names are single key components
    (validated); objects whose names start with '.' (the preflight marker) are not listed."""

    LIST_PAGE_SIZE = 1000  # S3's own maximum; tests lower it to page through a few objects

    def __init__(self, client: Any, bucket: str, prefix: str, run_id: str, settings: "Settings"):
        self._client = client
        self.bucket = validate_bucket(bucket)
        self.run_id = validate_key_component(run_id, "run_id")
        self._prefix = validate_key(prefix, f"s3://{bucket}/{prefix}") if prefix else ""
        self._run_prefix = f"{prefix}/{run_id}/" if prefix else f"{run_id}/"
        self._settings = settings
        self.location = f"s3://{bucket}/{self._run_prefix.rstrip('/')}"
        threshold = settings.s3.multipart_threshold_mb * MIB
        # One part size for the upload and for the checksum we expect back.
        self._transfer = TransferConfig(multipart_threshold=threshold, multipart_chunksize=threshold,
                                        max_concurrency=4, preferred_transfer_client="classic")

    @classmethod
    def from_uri(cls, output_uri: str, run_id: str, settings: "Settings", client: Any = None) -> "S3OutputStore":
        bucket, prefix = parse_s3_uri(output_uri.removesuffix("/"))  # s3://bucket/prefix/ is fine too
        return cls(client or make_s3_client(settings), bucket, prefix, run_id, settings)

    def __reduce__(self) -> tuple:
        # A boto3 client does not pickle: rebuild the store, and a client, on the other side.
        return (S3OutputStore.from_uri, (f"s3://{self.bucket}/{self._prefix}", self.run_id, self._settings))

    def key(self, name: str) -> str:
        return self._run_prefix + validate_key_component(name, "object name")

    def uri(self, name: str) -> str:
        return f"s3://{self.bucket}/{self.key(name)}"

    def staging_dir(self) -> Path:
        """Local directory where a part is written before `publish_file` uploads it."""
        path = self._settings.work_path("staging", self.bucket, self.run_id)
        path.mkdir(parents=True, exist_ok=True)
        return path

    # -- checks

    def preflight(self) -> None:
        """Prove the bucket exists and takes writes: PUT, then DELETE, a marker object."""
        key = f"{self._run_prefix}.preflight-{uuid.uuid4().hex}"
        try:
            self._client.put_object(Bucket=self.bucket, Key=key, Body=b"")
        except ClientError as exc:
            raise self._write_error(exc, key, "checking the output location") from exc
        except NoCredentialsError as exc:
            raise _no_credentials(f"writing s3://{self.bucket}/{key}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"Cannot reach S3{_where(self._settings)} to write s3://{self.bucket}/{key}: {_cause(exc)}. Check the endpoint and network.") from exc
        try:
            self._client.delete_object(Bucket=self.bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            # Writes work, which is what the run needs; the marker is hidden from listings.
            log.warning("could not delete preflight marker s3://%s/%s (%s)", self.bucket, key, _cause(exc))

    def _write_error(self, exc: ClientError, key: str, what: str) -> Exception:
        code, where = _code(exc), f"s3://{self.bucket}/{key}"
        if code in NO_BUCKET or (code in NOT_FOUND and not _bucket_exists(self._client, self.bucket)):
            return ConfigError(f"Output bucket {self.bucket!r} does not exist{_where(self._settings)} (while {what}, key {key!r}). Create it, or fix the bucket in output_uri.")
        if code in DENIED:
            return ConfigError(
                f"Access denied writing {where} (bucket {self.bucket!r}, key {key!r}) while {what}: the credentials in use lack "
                "s3:PutObject there, or a bucket policy denies it. Grant write access to the output prefix, or pick another output_uri."
            )
        if code in BAD_CREDENTIALS:
            return _credentials_error(exc, f"writing {where}")
        return StorageError(f"Writing {where} failed while {what}: {_cause(exc)}.")

    # -- writes

    def publish_file(self, name: str, path: Path, sha256: str) -> None:
        """Upload a staged part under `name`, then confirm by HEAD that S3 holds it whole."""
        key, path = self.key(name), Path(path)
        size = path.stat().st_size
        multipart = size >= self._transfer.multipart_threshold  # the same test s3transfer makes
        part_size = ChunksizeAdjuster().adjust_chunksize(self._transfer.multipart_chunksize, size)
        checksum = expected_checksum(path, sha256, part_size, multipart)
        extra: dict[str, Any] = {"Metadata": {"sha256": sha256}, "ChecksumAlgorithm": "SHA256"}
        if not multipart:
            extra["ChecksumSHA256"] = checksum  # S3 refuses the PUT unless the bytes match it
        last: BaseException | None = None
        if multipart:
            self.abort_incomplete_uploads(key)  # one a killed attempt left open
        for attempt in range(1, PUBLISH_ATTEMPTS + 1):
            try:
                self._client.upload_file(str(path), self.bucket, key, ExtraArgs=extra, Config=self._transfer)
            except ClientError as exc:
                if _code(exc) in NO_BUCKET | DENIED | BAD_CREDENTIALS:
                    raise self._write_error(exc, key, f"publishing {name}") from exc
                last = exc
            except NoCredentialsError as exc:
                raise _no_credentials(f"writing s3://{self.bucket}/{key}") from exc
            except S3UploadFailedError as exc:  # boto3 wraps the ClientError of a failed upload
                cause = exc.__cause__ or exc.__context__
                if isinstance(cause, ClientError) and _code(cause) in NO_BUCKET | DENIED | BAD_CREDENTIALS:
                    raise self._write_error(cause, key, f"publishing {name}") from exc
                last = exc
            except (BotoCoreError, *STREAM_ERRORS) as exc:
                last = exc
            # Even after an error the object may have landed (the reply was lost): look.
            seen = self._landed(key, size, sha256, checksum)
            if multipart:
                # An upload left open keeps its parts billed and out of every listing: s3transfer's
                # abort of a failed one can fail too, and a CreateMultipartUpload whose reply was
                # lost is retried by botocore, leaving the first upload behind even on success.
                self.abort_incomplete_uploads(key)
            if seen is None:
                log.debug("published %s (%d bytes, sha256 %s)", self.uri(name), size, sha256)
                return
            last = last or StorageError(seen)
            log.warning("publishing %s: attempt %d of %d failed: %s", self.uri(name), attempt, PUBLISH_ATTEMPTS, _cause(last))
        raise StorageError(
            f"Publishing {name} to s3://{self.bucket}/{key} failed {PUBLISH_ATTEMPTS} times; last error: {_cause(last)}. "  # type: ignore[arg-type]
            "The run can be resumed: published parts are kept."
        ) from last

    def abort_incomplete_uploads(self, key: str | None = None) -> list[str]:
        """Abort this run's multipart uploads that were started and never completed (a killed
        flow, a failed attempt): all under the run's prefix, or those of one key. Best effort:
        what cannot be listed or aborted now is logged and left to the next plan, or to the
        bucket's AbortIncompleteMultipartUpload lifecycle rule. Returns the keys aborted."""
        aborted: list[str] = []
        try:
            pages = self._client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=key or self._run_prefix)
            uploads = [u for page in pages for u in page.get("Uploads", [])
                       if (u["Key"] == key if key else "/" not in u["Key"][len(self._run_prefix):])]
        except (ClientError, BotoCoreError) as exc:
            log.warning("could not list incomplete uploads under s3://%s/%s (%s); they stay until a later plan or the bucket's lifecycle rule aborts them",
                        self.bucket, key or self._run_prefix, _cause(exc))
            return aborted
        for upload in uploads:
            try:
                self._client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
            except (ClientError, BotoCoreError) as exc:
                log.warning("could not abort the incomplete upload of s3://%s/%s (%s)", self.bucket, upload["Key"], _cause(exc))
                continue
            log.info("aborted an incomplete multipart upload of s3://%s/%s (started %s)",
                     self.bucket, upload["Key"], upload.get("Initiated"))
            aborted.append(upload["Key"])
        return aborted

    def _landed(self, key: str, size: int, sha256: str, checksum: str) -> str | None:
        """None when the object is there with the expected size and checksum; else what was seen."""
        try:
            head = self._client.head_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED")
        except ClientError as exc:
            return "object not found after upload" if _code(exc) in NOT_FOUND else f"HEAD failed: {_cause(exc)}"
        except BotoCoreError as exc:
            return f"HEAD failed: {_cause(exc)}"
        if head.get("ContentLength") != size:
            return f"object has {head.get('ContentLength')} bytes, expected {size}"
        if head.get("Metadata", {}).get("sha256") != sha256:
            return f"object's sha256 metadata is {head.get('Metadata', {}).get('sha256')!r}, expected {sha256}"
        seen = head.get("ChecksumSHA256")
        if seen is None:
            # Some S3-compatible stores keep no checksums; size and S3's check on upload remain.
            log.debug("s3://%s/%s: store reports no ChecksumSHA256", self.bucket, key)
        elif seen.split("-")[0] != checksum.split("-")[0]:
            return f"object's ChecksumSHA256 is {seen}, expected {checksum}"
        return None

    def write_bytes(self, name: str, data: bytes) -> None:
        """One PUT: the object appears whole or not at all."""
        key = self.key(name)
        sha256 = hashlib.sha256(data).hexdigest()
        try:
            self._client.put_object(Bucket=self.bucket, Key=key, Body=data, Metadata={"sha256": sha256},
                                    ChecksumAlgorithm="SHA256", ChecksumSHA256=_b64(sha256))
        except ClientError as exc:
            raise self._write_error(exc, key, f"writing {name}") from exc
        except NoCredentialsError as exc:
            raise _no_credentials(f"writing s3://{self.bucket}/{key}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"Writing s3://{self.bucket}/{key} failed: {_cause(exc)}. Check the endpoint and network.") from exc

    # -- reads

    def read_bytes(self, name: str) -> bytes | None:
        """The object's bytes, or None when it does not exist."""
        found = self.read_versioned(name)
        return found[0] if found else None

    def list_names(self) -> list[str]:
        """Names of the objects directly under the run's prefix, sorted."""
        names: list[str] = []
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._run_prefix, Delimiter="/",
                PaginationConfig={"PageSize": self.LIST_PAGE_SIZE})
            for page in pages:
                names.extend(obj["Key"][len(self._run_prefix):] for obj in page.get("Contents", []))
        except ClientError as exc:
            raise self._read_error(exc, self._run_prefix) from exc
        except NoCredentialsError as exc:
            raise _no_credentials(f"listing {self.location}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"Listing {self.location} failed: {_cause(exc)}. Check the endpoint and network.") from exc
        return sorted(n for n in names if n and not n.startswith("."))

    def sha256(self, name: str) -> str | None:
        """The object's sha256 from one HEAD, or None when it does not exist. Every object this store
        writes carries its sha256 as metadata, which S3 checked against the bytes on upload (the
        SHA-256 checksum); an object written by anything else has none, and so matches no state."""
        key = self.key(name)
        head = self._read(key, lambda: self._client.head_object(Bucket=self.bucket, Key=key))
        return None if head is None else head.get("Metadata", {}).get("sha256")

    def _read(self, key: str, call):
        """`call()`, a read of the object at `key`: None when it does not exist, S3's errors as ours."""
        try:
            return call()
        except ClientError as exc:
            if _code(exc) in NOT_FOUND:
                return None
            raise self._read_error(exc, key) from exc
        except NoCredentialsError as exc:
            raise _no_credentials(f"reading s3://{self.bucket}/{key}") from exc
        except (BotoCoreError, *STREAM_ERRORS) as exc:
            raise StorageError(f"Reading s3://{self.bucket}/{key} failed: {_cause(exc)}. Check the endpoint and network.") from exc

    def delete(self, name: str) -> None:
        """Remove the object; S3 answers a missing one as removed."""
        key = self.key(name)
        try:
            self._client.delete_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _code(exc) in DENIED:
                raise ConfigError(
                    f"Access denied deleting s3://{self.bucket}/{key}: the credentials in use lack s3:DeleteObject there, "
                    "which a rerun needs to remove a state before it rewrites what the state describes. Grant it on the "
                    "output prefix.") from exc
            if _code(exc) not in NOT_FOUND:
                raise self._write_error(exc, key, f"deleting {name}") from exc
        except NoCredentialsError as exc:
            raise _no_credentials(f"deleting s3://{self.bucket}/{key}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"Deleting s3://{self.bucket}/{key} failed: {_cause(exc)}. Check the endpoint and network.") from exc

    # -- conditional writes, for infra/run/lease.py: the version is the ETag; S3 compares and writes
    # in one step (PUT If-None-Match: *, PUT/DELETE If-Match: <etag>).

    def _conditional(self, call, name: str, what: str, **kwargs) -> dict | None:
        """`call(Bucket, Key, **kwargs)`; None when S3 says the condition did not hold (412), a
        concurrent conditional write won (409) or the object is gone (404)."""
        key = self.key(name)
        try:
            return call(Bucket=self.bucket, Key=key, **kwargs)
        except ClientError as exc:
            if _code(exc) in CONDITION_LOST or _status(exc) in (409, 412) or _code(exc) in NOT_FOUND:
                return None
            raise self._write_error(exc, key, what) from exc
        except NoCredentialsError as exc:
            raise _no_credentials(f"{what} s3://{self.bucket}/{key}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"{what} s3://{self.bucket}/{key} failed: {_cause(exc)}. Check the endpoint and network.") from exc

    def create_exclusive(self, name: str, data: bytes) -> str | None:
        """PUT only if no object has the key; returns its ETag, or None when one exists."""
        reply = self._conditional(self._client.put_object, name, f"creating {name}", Body=data, IfNoneMatch="*")
        return reply["ETag"] if reply else None

    def read_versioned(self, name: str) -> tuple[bytes, str] | None:
        """The object's bytes and ETag, or None when it does not exist."""
        key = self.key(name)

        def get() -> tuple[bytes, str]:
            reply = self._client.get_object(Bucket=self.bucket, Key=key)
            return reply["Body"].read(), reply["ETag"]

        return self._read(key, get)

    def replace_if_version(self, name: str, data: bytes, version: str) -> str | None:
        reply = self._conditional(self._client.put_object, name, f"replacing {name}", Body=data, IfMatch=version)
        return reply["ETag"] if reply else None

    def delete_if_version(self, name: str, version: str) -> bool:
        return self._conditional(self._client.delete_object, name, f"deleting {name}", IfMatch=version) is not None

    def _read_error(self, exc: ClientError, key: str) -> Exception:
        code, where = _code(exc), f"s3://{self.bucket}/{key}"
        if code in NO_BUCKET:
            return ConfigError(f"Output bucket {self.bucket!r} does not exist{_where(self._settings)} (reading {where}). Create it, or fix the bucket in output_uri.")
        if code in DENIED:
            return ConfigError(
                f"Access denied reading {where} (bucket {self.bucket!r}): resuming a run needs s3:GetObject and "
                "s3:ListBucket on the output prefix. Grant them, or pick another output_uri."
            )
        if code in BAD_CREDENTIALS:
            return _credentials_error(exc, f"reading {where}")
        return StorageError(f"Reading {where} failed: {_cause(exc)}.")
