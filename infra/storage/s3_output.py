"""A run's output on S3: `S3OutputStore`, under s3://bucket/prefix/run_id/.

Publishing is atomic and checksummed: a part is one PUT, or one completed multipart upload,
so a reader sees the whole object or nothing. The caller's sha256 is checked against the local
file before the upload, sent so that S3 verifies the bytes it receives (SHA-256 of the object,
or of each part for a multipart upload), stored as object metadata `sha256`, and checked once
more against what a HEAD reports after the upload. A lost reply is harmless: the HEAD finds
the object, and a repeated upload of the same bytes to the same key is the same object.

Errors are told apart by `infra.storage.s3_errors`: what the user must fix raises
`ConfigError`, what may pass `StorageError`.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import uuid
from pathlib import Path
from typing import Any

from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
from s3transfer.utils import ChunksizeAdjuster

from infra.errors import StorageError
from infra.storage.s3_client import make_s3_client
from infra.storage.s3_errors import (CONDITION_LOST, FINAL, NOT_FOUND, STREAM_ERRORS, S3Place, error_code, error_text,
                                     s3_call, s3_error)
from infra.storage.s3_settings import S3Settings
from infra.storage.uris import parse_s3_uri, prefix_dir_name, validate_bucket, validate_key, validate_key_component

log = logging.getLogger(__name__)

MIB = 1 << 20
PUBLISH_ATTEMPTS = 3  # whole uploads, each already retried request by request by botocore


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

    def __init__(self, client: Any, bucket: str, prefix: str, run_id: str, s3: S3Settings, staging: Path):
        """`staging`: the local directory under which parts wait for their upload (settings.work_path("staging"))."""
        self._client = client
        self.bucket = validate_bucket(bucket)
        self.run_id = validate_key_component(run_id, "run_id")
        self._prefix = validate_key(prefix, f"s3://{bucket}/{prefix}") if prefix else ""
        self._run_prefix = f"{prefix}/{run_id}/" if prefix else f"{run_id}/"
        self._s3, self._staging = s3, Path(staging)
        self.location = f"s3://{bucket}/{self._run_prefix.rstrip('/')}"
        threshold = s3.multipart_threshold_mb * MIB
        # One part size for the upload and for the checksum we expect back.
        self._transfer = TransferConfig(multipart_threshold=threshold, multipart_chunksize=threshold,
                                        max_concurrency=4, preferred_transfer_client="classic")

    @classmethod
    def from_uri(cls, output_uri: str, run_id: str, s3: S3Settings, staging: Path,
                 client: Any = None) -> "S3OutputStore":
        bucket, prefix = parse_s3_uri(output_uri.removesuffix("/"))  # s3://bucket/prefix/ is fine too
        return cls(client or make_s3_client(s3), bucket, prefix, run_id, s3, staging)

    def __reduce__(self) -> tuple:
        # A boto3 client does not pickle: rebuild the store, and a client, on the other side.
        return (S3OutputStore.from_uri, (f"s3://{self.bucket}/{self._prefix}", self.run_id, self._s3, self._staging))

    def key(self, name: str) -> str:
        return self._run_prefix + validate_key_component(name, "object name")

    def uri(self, name: str) -> str:
        return f"s3://{self.bucket}/{self.key(name)}"

    def staging_dir(self) -> Path:
        """Local directory where a part is written before `publish_file` uploads it, and its shard's
        spill kept: `{staging}/{bucket}/{run_id}`, or `{staging}/{bucket}/{prefix_dir_name(prefix)}/{run_id}`
        under a prefix, so runs of one id under two prefixes (every pipeline's `stages/answers`) never
        share a spill."""
        where = [prefix_dir_name(self._prefix)] if self._prefix else []
        path = self._staging.joinpath(self.bucket, *where, self.run_id)
        path.mkdir(parents=True, exist_ok=True)
        return path

    # -- checks

    def preflight(self) -> None:
        """Prove the bucket exists and takes writes: PUT, then DELETE, a marker object."""
        key = f"{self._run_prefix}.preflight-{uuid.uuid4().hex}"
        self._call(lambda: self._client.put_object(Bucket=self.bucket, Key=key, Body=b""),
                   self._place("writing", key, "checking the output location"))
        try:
            self._client.delete_object(Bucket=self.bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            # Writes work, which is what the run needs; the marker is hidden from listings.
            log.warning("could not delete preflight marker s3://%s/%s (%s)", self.bucket, key, error_text(exc))

    def _place(self, action: str, key: str, during: str = "") -> S3Place:
        return S3Place("output", action, self.bucket, key, during)

    def _call(self, call, place: S3Place, **absent):
        """`call()`, S3's errors as the product's (`infra.storage.s3_errors.s3_call`)."""
        return s3_call(call, place, self._s3, self._client, **absent)

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
            except (ClientError, S3UploadFailedError, BotoCoreError, *STREAM_ERRORS) as exc:
                # boto3 wraps the ClientError of a failed upload in S3UploadFailedError.
                cause = exc if isinstance(exc, BotoCoreError | ClientError) else exc.__cause__ or exc.__context__
                if isinstance(cause, NoCredentialsError) or (isinstance(cause, ClientError) and error_code(cause) in FINAL):
                    raise s3_error(cause, self._place("writing", key, f"publishing {name}"), self._s3, self._client) from exc
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
            log.warning("publishing %s: attempt %d of %d failed: %s", self.uri(name), attempt, PUBLISH_ATTEMPTS, error_text(last))
        raise StorageError(
            f"Publishing {name} to s3://{self.bucket}/{key} failed {PUBLISH_ATTEMPTS} times; last error: {error_text(last)}. "  # type: ignore[arg-type]
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
                        self.bucket, key or self._run_prefix, error_text(exc))
            return aborted
        for upload in uploads:
            try:
                self._client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
            except (ClientError, BotoCoreError) as exc:
                log.warning("could not abort the incomplete upload of s3://%s/%s (%s)", self.bucket, upload["Key"], error_text(exc))
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
            return "object not found after upload" if error_code(exc) in NOT_FOUND else f"HEAD failed: {error_text(exc)}"
        except BotoCoreError as exc:
            return f"HEAD failed: {error_text(exc)}"
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
        self._call(lambda: self._client.put_object(Bucket=self.bucket, Key=key, Body=data, Metadata={"sha256": sha256},
                                                   ChecksumAlgorithm="SHA256", ChecksumSHA256=_b64(sha256)),
                   self._place("writing", key))

    def move_in(self, source: "S3OutputStore", name: str) -> bool:
        """`source`'s object `name` (on this endpoint) copied here by S3 itself, never through this
        process: one CopyObject, or from the multipart threshold up a multipart copy (UploadPartCopy)
        in parts of that size; its metadata (the sha256) kept, its SHA-256 checksum computed again.
        Then deleted there. False when the source has none."""
        key, (bucket, src_key) = self.key(name), parse_s3_uri(source.uri(name))

        def copy() -> bool:
            self._client.copy({"Bucket": bucket, "Key": src_key}, self.bucket, key,
                              ExtraArgs={"ChecksumAlgorithm": "SHA256"}, Config=self._transfer)
            return True

        if not self._call(copy, self._place("writing", key, f"moving s3://{bucket}/{src_key} here"), absent=NOT_FOUND):
            return False
        source.delete(name)
        return True

    # -- reads

    def read_bytes(self, name: str) -> bytes | None:
        """The object's bytes, or None when it does not exist."""
        found = self.read_versioned(name)
        return found[0] if found else None

    def list_names(self) -> list[str]:
        """Names of the objects directly under the run's prefix, sorted."""
        def names() -> list[str]:
            found: list[str] = []
            for page in self._client.get_paginator("list_objects_v2").paginate(
                    Bucket=self.bucket, Prefix=self._run_prefix, Delimiter="/",
                    PaginationConfig={"PageSize": self.LIST_PAGE_SIZE}):
                found.extend(obj["Key"][len(self._run_prefix):] for obj in page.get("Contents", []))
            return found

        return sorted(n for n in self._call(names, self._place("listing", self._run_prefix)) or [] if n and not n.startswith("."))

    def sha256(self, name: str) -> str | None:
        """The object's sha256 from one HEAD, or None when it does not exist. Every object this store
        writes carries its sha256 as metadata, which S3 checked against the bytes on upload (the
        SHA-256 checksum); an object written by anything else has none, and so matches no state."""
        key = self.key(name)
        head = self._read(key, lambda: self._client.head_object(Bucket=self.bucket, Key=key))
        return None if head is None else head.get("Metadata", {}).get("sha256")

    def _read(self, key: str, call):
        """`call()`, a read of the object at `key`: None when it does not exist, S3's errors as ours."""
        return self._call(call, self._place("reading", key), absent=NOT_FOUND)

    def delete(self, name: str) -> None:
        """Remove the object; S3 answers a missing one as removed."""
        key = self.key(name)
        self._call(lambda: self._client.delete_object(Bucket=self.bucket, Key=key), self._place("deleting", key),
                   absent=NOT_FOUND)

    # -- conditional writes, for infra/run/lease.py: the version is the ETag; S3 compares and writes
    # in one step (PUT If-None-Match: *, PUT/DELETE If-Match: <etag>).

    def _conditional(self, call, name: str, action: str, **kwargs) -> dict | None:
        """`call(Bucket, Key, **kwargs)`; None when S3 says the condition did not hold (412), a
        concurrent conditional write won (409) or the object is gone (404)."""
        key = self.key(name)
        return self._call(lambda: call(Bucket=self.bucket, Key=key, **kwargs), self._place(action, key),
                          absent=CONDITION_LOST | NOT_FOUND, absent_status=(409, 412))

    def create_exclusive(self, name: str, data: bytes) -> str | None:
        """PUT only if no object has the key; returns its ETag, or None when one exists."""
        reply = self._conditional(self._client.put_object, name, "writing", Body=data, IfNoneMatch="*")
        return reply["ETag"] if reply else None

    def read_versioned(self, name: str) -> tuple[bytes, str] | None:
        """The object's bytes and ETag, or None when it does not exist."""
        key = self.key(name)

        def get() -> tuple[bytes, str]:
            reply = self._client.get_object(Bucket=self.bucket, Key=key)
            return reply["Body"].read(), reply["ETag"]

        return self._read(key, get)

    def replace_if_version(self, name: str, data: bytes, version: str) -> str | None:
        reply = self._conditional(self._client.put_object, name, "writing", Body=data, IfMatch=version)
        return reply["ETag"] if reply else None

    def delete_if_version(self, name: str, version: str) -> bool:
        return self._conditional(self._client.delete_object, name, "deleting", IfMatch=version) is not None
