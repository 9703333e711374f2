"""S3 (or any S3-compatible store): the one client factory.

Every S3 call goes through one boto3 client built by `make_s3_client`, with the standard retry
mode (5xx, SlowDown, dropped connections are retried with backoff) and bounded timeouts. What
its errors mean, for the output (`infra.storage.s3_output`) and the input
(`infra.storage.s3_input`) alike, is `infra.storage.s3_errors`.
"""

from __future__ import annotations

import re
from typing import Any

import boto3
from botocore.config import Config

from infra.errors import ConfigError
from infra.storage.s3_settings import S3Settings

MAX_POOL_CONNECTIONS = 16


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
