"""The S3 section of the settings (NSDG_S3__*): everything the S3 code reads. It lives here, below
`infra.settings`, so that the storage code takes this section alone and never imports the whole
settings (which import `infra.storage.uris` to check NSDG_ALLOWED_URIS).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr


class S3Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)  # as every section of infra.settings

    endpoint_url: str | None = None
    region: str | None = None
    addressing_style: Literal["auto", "virtual", "path"] = "auto"
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None
    multipart_threshold_mb: int = Field(64, ge=5, le=5120)
    max_attempts: int = Field(8, ge=1, le=20)
    connect_timeout_s: float = Field(10.0, gt=0, le=300)
    # A stalled connection is cut and retried, not waited on forever.
    read_timeout_s: float = Field(120.0, gt=0, le=3600)
