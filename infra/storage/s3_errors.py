"""What S3's errors mean: the one mapper from a botocore/boto3 failure to the product's one-line error.

What the user must fix (no bucket, no object, access denied, no or rejected credentials) is a
`ConfigError`; what may pass or needs a person to look (an unreachable endpoint, a broken
stream, a server error) a `StorageError`. Every message names the bucket and key, what the run
was doing and the next step; never a secret (botocore's texts carry none).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError as BotoConnectionError,
    IncompleteReadError,
    NoCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
)
from urllib3.exceptions import HTTPError as Urllib3Error

from infra.errors import ConfigError, StorageError
from infra.storage.s3_settings import S3Settings

T = TypeVar("T")

# botocore reports these codes for a HEAD (no body) or in the XML error of other calls.
NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
NO_BUCKET = {"NoSuchBucket"}
CONDITION_LOST = {"PreconditionFailed", "ConditionalRequestConflict"}
DENIED = {"403", "AccessDenied", "AllAccessDisabled", "AccountProblem"}
BAD_CREDENTIALS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "TokenRefreshRequired"}
# Codes no retry of the same call can mend: a person must act.
FINAL = NO_BUCKET | DENIED | BAD_CREDENTIALS

# Errors while reading a response body: botocore does not retry these, the reader reopens.
STREAM_ERRORS = (IncompleteReadError, ReadTimeoutError, ResponseStreamingError, BotoConnectionError,
                 Urllib3Error, ConnectionError, TimeoutError)

# What a denied call lacks, by side and action: the permission to grant is the next step.
_DENIED_HELP = {
    ("output", "writing"): "the credentials in use lack s3:PutObject there, or a bucket policy denies it. "
                           "Grant write access to the output prefix, or pick another output_uri.",
    ("output", "reading"): "resuming a run needs s3:GetObject and s3:ListBucket on the output prefix. "
                           "Grant them, or pick another output_uri.",
    ("output", "deleting"): "the credentials in use lack s3:DeleteObject there, which a rerun needs to remove a state "
                            "before it rewrites what the state describes. Grant it on the output prefix.",
    ("input", "reading"): "the credentials in use lack s3:GetObject on it (or the key does not exist and they lack "
                          "s3:ListBucket, for which S3 also answers 403). Grant read access in the bucket or IAM policy, "
                          "or use other credentials.",
}
_DENIED_HELP[("output", "listing")] = _DENIED_HELP[("output", "reading")]
_NO_BUCKET_FIX = {"output": "Create it, or fix the bucket in output_uri.",
                  "input": "Check the bucket name in input_uri, and the endpoint/region."}


@dataclass(frozen=True)
class S3Place:
    """Where a call went and why, for its message. `side`: "input" or "output"; `action`:
    "reading", "writing", "deleting" or "listing"; `during`: what the run was doing, if the action
    alone does not say it ("publishing part-00003.jsonl")."""
    side: str
    action: str
    bucket: str
    key: str
    during: str = ""

    @property
    def where(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def doing(self) -> str:
        """"reading input s3://b/k" or "writing s3://b/k while publishing x"."""
        side = "input " if self.side == "input" else ""
        return f"{self.action} {side}{self.where}" + (f" while {self.during}" if self.during else "")


def error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def http_status(exc: ClientError) -> int | None:
    return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def error_text(exc: BaseException) -> str:
    """The error's class and botocore's text. botocore's messages carry the operation, code and
    server message; they never carry credentials."""
    return f"{type(exc).__name__}: {exc}"


def at_endpoint(s3: S3Settings) -> str:
    """The endpoint for a message (" at http://..."); empty for AWS's own."""
    return f" at {s3.endpoint_url}" if s3.endpoint_url else ""


def bucket_exists(client: Any, bucket: str) -> bool:
    """A HEAD on a missing key and on a missing bucket both answer a bare 404; ask the bucket."""
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as exc:
        return error_code(exc) not in NOT_FOUND | NO_BUCKET
    return True


def s3_error(exc: BaseException, place: S3Place, s3: S3Settings, client: Any = None) -> Exception:
    """The product's error for `exc`, raised by a call at `place`. `client`, when given, tells a
    missing bucket from a missing key (both a bare 404 to a HEAD)."""
    doing = place.doing()
    if isinstance(exc, NoCredentialsError):
        return ConfigError(
            f"No AWS credentials found while {doing}. Set NSDG_S3__ACCESS_KEY_ID and NSDG_S3__SECRET_ACCESS_KEY, "
            "or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run with an instance role.")
    if not isinstance(exc, ClientError):  # the endpoint did not answer, or its answer broke off
        return StorageError(f"{doing[0].upper()}{doing[1:]} failed: {error_text(exc)}. "
                            f"Check the endpoint{at_endpoint(s3)} and the network.")
    code = error_code(exc)
    missing_bucket = code in NO_BUCKET or (
        code in NOT_FOUND and client is not None and not bucket_exists(client, place.bucket))
    if missing_bucket:
        return ConfigError(f"{place.side.capitalize()} bucket {place.bucket!r} does not exist{at_endpoint(s3)} "
                           f"({doing}). {_NO_BUCKET_FIX[place.side]}")
    if code in NOT_FOUND and place.side == "input":
        return ConfigError(f"Input object {place.where} not found: bucket {place.bucket!r} exists but has no key "
                           f"{place.key!r}. Check the key in input_uri.")
    if code in DENIED:
        help_ = _DENIED_HELP.get((place.side, place.action), _DENIED_HELP[("output", "writing")])
        return ConfigError(f"Access denied {doing} (bucket {place.bucket!r}, key {place.key!r}): {help_}")
    if code in BAD_CREDENTIALS:
        return ConfigError(
            f"S3 rejected the credentials while {doing} ({error_text(exc)}). Check AWS_ACCESS_KEY_ID/AWS_PROFILE or "
            "NSDG_S3__ACCESS_KEY_ID/NSDG_S3__SECRET_ACCESS_KEY (and the session token, if temporary), and the region.")
    # No special case: still the next step (botocore's own retries of throttling and 5xx are spent by now).
    return StorageError(f"{doing[0].upper()}{doing[1:]} failed: {error_text(exc)}. S3{at_endpoint(s3)} answered an "
                        f"error its retries (NSDG_S3__MAX_ATTEMPTS, now {s3.max_attempts}) did not mend: rerun with the "
                        "same run_id once it passes (what is published is kept); if it persists, check that object "
                        "and the bucket's settings with its operator.")


def s3_call(call: Callable[[], T], place: S3Place, s3: S3Settings, client: Any = None, *,
            absent: frozenset[str] | set[str] = frozenset(), absent_status: tuple[int, ...] = ()) -> T | None:
    """`call()`, S3's errors as the product's (`s3_error`). None when S3 answers a code in
    `absent` or a status in `absent_status` (the object is not there, a condition did not hold)."""
    try:
        return call()
    except ClientError as exc:
        if error_code(exc) in absent or http_status(exc) in absent_status:
            return None
        raise s3_error(exc, place, s3, client) from exc
    except (BotoCoreError, *STREAM_ERRORS) as exc:
        raise s3_error(exc, place, s3, client) from exc
