"""Multipart uploads that were started and never completed are aborted: after a failed attempt,
and, for a run killed mid-upload, by the next plan. Against moto's S3 server over HTTP."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections import Counter

import pytest

from infra.planning import make_plan
from infra.settings import Settings
from infra.storage import open_output_store
from tests.fixtures_s3 import FaultProxy
from tests.test_planning import cfg, write

pytestmark = pytest.mark.s3

MIB = 1 << 20


def open_uploads(client, bucket: str) -> list[str]:
    return sorted(u["Key"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", []))


def variant(settings: Settings, **s3) -> Settings:
    return Settings(s3={**settings.s3.model_dump(), **s3}, work_dir=settings.work_dir)


def half_upload(client, bucket: str, key: str) -> None:
    """What a flow killed between two UploadPart requests leaves behind."""
    upload = client.create_multipart_upload(Bucket=bucket, Key=key, ChecksumAlgorithm="SHA256")
    client.upload_part(Bucket=bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=os.urandom(5 * MIB),
                       ChecksumAlgorithm="SHA256")


def test_the_plan_aborts_this_runs_incomplete_uploads_only(s3_settings, s3_bucket, s3_client, workdir, caplog):
    half_upload(s3_client, s3_bucket, "runs/r1/part-00000.jsonl")
    half_upload(s3_client, s3_bucket, "runs/r10/part-00000.jsonl")  # another run, whose name starts alike
    half_upload(s3_client, s3_bucket, "runs/r1/nested/object")      # not one of the run's own names
    store = open_output_store(f"s3://{s3_bucket}/runs", "r1", s3_settings.s3, s3_settings.work_path("staging"))
    src = write(workdir / "in.jsonl", {"prompt": "a"}, {"prompt": "b"})
    with caplog.at_level(logging.INFO, logger="infra.storage.s3_output"):
        make_plan(cfg(src), s3_settings, store)
    assert open_uploads(s3_client, s3_bucket) == ["runs/r1/nested/object", "runs/r10/part-00000.jsonl"]
    assert f"aborted an incomplete multipart upload of s3://{s3_bucket}/runs/r1/part-00000.jsonl" in caplog.text


@pytest.mark.faults
def test_a_failed_attempt_leaves_no_upload_open(s3_settings, s3_bucket, s3_client):
    """The first CompleteMultipartUpload fails and so does s3transfer's own abort of that upload:
    publish_file aborts it before the next attempt, which publishes the part."""
    first: list[str] = []
    seen: Counter[str] = Counter()

    def fail(method: str, target: str) -> bool:
        upload = m.group(1) if (m := re.search(r"uploadId=([^&\s]+)", target)) else None
        first.extend([upload] if upload and not first else [])
        if method == "GET" and (target.endswith("?uploads") or "?uploads&" in target) and seen["complete"]:
            seen["list"] += 1  # ListMultipartUploads after the failed attempt: publish_file's
        if method == "POST" and upload and upload == first[0]:  # CompleteMultipartUpload: every try of the first upload
            seen["complete"] += 1
            return True
        if method == "DELETE" and upload:  # AbortMultipartUpload: every try until publish_file lists
            seen["abort"] += 1
            return not seen["list"]
        return False

    data = os.urandom(11 * MIB)
    with FaultProxy(s3_settings.s3.endpoint_url, fault_rate=1.0, kinds=("500",), only=fail) as proxy:
        settings = variant(s3_settings, endpoint_url=proxy.url, multipart_threshold_mb=5, max_attempts=1)
        store = open_output_store(f"s3://{s3_bucket}", "run-mp", settings.s3, settings.work_path("staging"))
        path = store.staging_dir() / ".part-00000.jsonl.tmp"
        path.write_bytes(data)
        store.publish_file("part-00000.jsonl", path, hashlib.sha256(data).hexdigest())
    assert open_uploads(s3_client, s3_bucket) == []
    assert proxy.faults["500"] > seen["abort"] - 1 >= 1 and seen["list"], (seen, proxy.faults)  # s3transfer's aborts failed
    assert s3_client.get_object(Bucket=s3_bucket, Key="run-mp/part-00000.jsonl")["Body"].read() == data


@pytest.mark.faults
def test_a_lost_create_reply_leaves_no_upload_open(s3_settings, s3_bucket, s3_client):
    """S3 creates the upload but the reply is lost: botocore asks again and completes the second
    one; the first would stay open, billed, though the part is published."""
    creates: Counter[str] = Counter()

    def first_create(method: str, target: str) -> bool:
        if method == "POST" and target.endswith("?uploads"):
            creates["n"] += 1
            return creates["n"] == 1
        return False

    data = os.urandom(6 * MIB)
    with FaultProxy(s3_settings.s3.endpoint_url, fault_rate=1.0, kinds=("drop_after",), only=first_create) as proxy:
        settings = variant(s3_settings, endpoint_url=proxy.url, multipart_threshold_mb=5)
        store = open_output_store(f"s3://{s3_bucket}", "run-create", settings.s3, settings.work_path("staging"))
        path = store.staging_dir() / ".part-00000.jsonl.tmp"
        path.write_bytes(data)
        store.publish_file("part-00000.jsonl", path, hashlib.sha256(data).hexdigest())
    assert proxy.faults["drop_after"] == 1 and creates["n"] >= 2
    assert open_uploads(s3_client, s3_bucket) == []
    assert s3_client.get_object(Bucket=s3_bucket, Key="run-create/part-00000.jsonl")["Body"].read() == data
