"""S3 (or any S3-compatible store): the one client factory, and what its errors mean.

Every S3 call goes through one boto3 client built by `make_s3_client`, with the standard retry
mode (5xx, SlowDown, dropped connections are retried with backoff) and bounded timeouts. The
output (`infra.storage.s3_output`) and the input (`infra.storage.s3_input`) share the error-code
tables and the message helpers below.

Errors: what the user must fix (no bucket, no object, access denied, bad URI, no credentials)
raises `ConfigError`; what may pass or needs a person to look (unreachable endpoint, an upload
that keeps failing) raises `StorageError`. Messages name the bucket and key, never a secret.
"""

from __future__ import annotations

import re
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import (
    ClientError,
    ConnectionError as BotoConnectionError,
    IncompleteReadError,
    ReadTimeoutError,
    ResponseStreamingError,
)
from urllib3.exceptions import HTTPError as Urllib3Error

from infra.errors import ConfigError
from infra.storage.s3_settings import S3Settings

MAX_POOL_CONNECTIONS = 16

# botocore reports these codes for a HEAD (no body) or in the XML error of other calls.
NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
NO_BUCKET = {"NoSuchBucket"}
CONDITION_LOST = {"PreconditionFailed", "ConditionalRequestConflict"}
DENIED = {"403", "AccessDenied", "AllAccessDisabled", "AccountProblem"}
BAD_CREDENTIALS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "TokenRefreshRequired"}

# Errors while reading a response body: botocore does not retry these, the reader reopens.
STREAM_ERRORS = (IncompleteReadError, ReadTimeoutError, ResponseStreamingError, BotoConnectionError,
                 Urllib3Error, ConnectionError, TimeoutError)


def make_s3_client(s3: S3Settings) -> Any:
    """A boto3 S3 client. Credentials come from boto3's chain (environment, profile, instance
    role) unless both NSDG_S3__ACCESS_KEY_ID and NSDG_S3__SECRET_ACCESS_KEY are set."""
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
        "s3", endpoint_url=s3.endpoint_url, region_name=s3.region, config=config, **_credentials(s3)
    )


def _credentials(s3: S3Settings) -> dict[str, str]:
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


# ---------------------------------------------------------------- errors


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


def credentials_error(exc: BaseException, what: str) -> ConfigError:
    return ConfigError(
        f"S3 rejected the credentials while {what} ({error_text(exc)}). Check AWS_ACCESS_KEY_ID/AWS_PROFILE or "
        "NSDG_S3__ACCESS_KEY_ID/NSDG_S3__SECRET_ACCESS_KEY (and the session token, if temporary), and the region."
    )


def no_credentials(what: str) -> ConfigError:
    return ConfigError(
        f"No AWS credentials found while {what}. Set NSDG_S3__ACCESS_KEY_ID and NSDG_S3__SECRET_ACCESS_KEY, "
        "or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run with an instance role."
    )


def bucket_exists(client: Any, bucket: str) -> bool:
    """A HEAD on a missing key and on a missing bucket both answer a bare 404; ask the bucket."""
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as exc:
        return error_code(exc) not in NOT_FOUND | NO_BUCKET
    return True
