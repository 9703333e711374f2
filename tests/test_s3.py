"""S3 input and output against moto's S3 server over real HTTP (fixtures in tests/fixtures_s3.py).

Each case talks to the server the way production talks to AWS: through `make_s3_client`, with
boto3's retries, and, for the fault cases, through a proxy that fails a share of the requests.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import logging
import os
import pickle
from pathlib import Path

import pytest

from infra.prompting.dataset import BadLine, Record, iter_input
from infra.errors import ConfigError, StorageError
from infra.storage.s3_client import make_s3_client
from infra.storage.s3_input import check_s3_input
from infra.storage.s3_output import S3OutputStore
from infra.settings import Settings
from infra.storage.uris import parse_s3_uri, prefix_dir_name, validate_key_component
from infra.storage import check_input, open_input, open_output_store
from tests.fixtures_s3 import FaultProxy

pytestmark = pytest.mark.s3

MIB = 1 << 20


def jsonl(n: int, width: int = 0) -> bytes:
    return b"".join(json.dumps({"id": f"r{i}", "prompt": f"prompt {i} " + "x" * width, "topic": i % 7}).encode() + b"\n"
                    for i in range(n))


def b64sha(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def stage(store: S3OutputStore, name: str, data: bytes) -> tuple[Path, str]:
    """Write a part where the flow writes it: in the store's staging directory."""
    path = store.staging_dir() / f".{name}.tmp"
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def fetch_verified(client, bucket: str, key: str) -> tuple[bytes, dict]:
    """The object's bytes, with botocore checking them against S3's stored checksum."""
    reply = client.get_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    return reply["Body"].read(), reply


def deny(client, bucket: str, *actions: str, keys: str = "*") -> None:
    """A bucket policy denying `actions` on `keys` to everyone: moto enforces it on object calls."""
    policy = {"Version": "2012-10-17", "Statement": [{
        "Effect": "Deny", "Principal": "*", "Action": list(actions), "Resource": f"arn:aws:s3:::{bucket}/{keys}"}]}
    client.put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))


def variant(settings: Settings, **s3) -> Settings:
    """The same settings with some S3 fields changed (validated, as the flow would build them)."""
    return Settings(s3={**settings.s3.model_dump(), **s3}, work_dir=settings.work_dir)


# ---------------------------------------------------------------- names and URIs


@pytest.mark.parametrize("uri,expected", [
    ("s3://my-bucket/prompts.jsonl", ("my-bucket", "prompts.jsonl")),
    ("s3://my.bucket-1/a/b/c.jsonl.gz", ("my.bucket-1", "a/b/c.jsonl.gz")),
    ("s3://abc", ("abc", "")),
])
def test_parse_s3_uri_accepts_plain_uris(uri, expected):
    assert parse_s3_uri(uri) == expected


@pytest.mark.parametrize("uri,fragment", [
    ("s3://bucket/../x", "'..'"),
    ("s3://bucket//abs", "starts with '/'"),
    ("s3://bucket/a/../b", "'..'"),
    ("s3://bucket/a/./b", "'.'"),
    ("s3://bucket/a//b", "empty path component"),
    ("s3://bucket/a/", "empty path component"),
    ("s3://bucket/a\nb", "control character"),
    ("s3://Bucket/x", "bucket name"),
    ("s3://ab/x", "bucket name"),
    ("s3://a..b/x", "bucket name"),
    ("s3://192.168.1.1/x", "bucket name"),
    ("s3://-bucket/x", "bucket name"),
    ("http://bucket/x", "not an S3 URI"),
])
def test_parse_s3_uri_rejects_hostile_uris(uri, fragment):
    with pytest.raises(ConfigError) as err:
        parse_s3_uri(uri)
    assert fragment in str(err.value)


@pytest.mark.parametrize("run_id", ["../x", "/abs", "a/../b", "a b", "..", ".hidden", "", "a/b", "x" * 129])
def test_hostile_run_ids_are_rejected(run_id, s3_settings):
    with pytest.raises(ConfigError, match="run_id"):
        validate_key_component(run_id, "run_id")
    with pytest.raises(ConfigError):
        open_output_store("s3://some-bucket/out", run_id, s3_settings.s3, s3_settings.work_path("staging"))


@pytest.mark.parametrize("name", ["../x", "/abs", "a/../b", "a b"])
def test_hostile_object_names_are_rejected(name, s3_settings, s3_bucket):
    store = open_output_store(f"s3://{s3_bucket}/out", "run-1", s3_settings.s3, s3_settings.work_path("staging"))
    with pytest.raises(ConfigError, match="object name"):
        store.write_bytes(name, b"x")
    with pytest.raises(ConfigError, match="object name"):
        store.read_bytes(name)


def test_hostile_output_prefix_is_rejected(s3_settings):
    with pytest.raises(ConfigError, match="'..'"):
        open_output_store("s3://some-bucket/a/../b", "run-1", s3_settings.s3, s3_settings.work_path("staging"))


# ---------------------------------------------------------------- input


@pytest.mark.parametrize("name,compress", [("prompts.jsonl", False), ("dir/prompts.jsonl.gz", True)])
def test_input_streams_line_by_line(name, compress, s3_settings, s3_bucket, s3_client):
    data = jsonl(2000) + b"not json\n"
    s3_client.put_object(Bucket=s3_bucket, Key=name, Body=gzip.compress(data) if compress else data)
    uri = f"s3://{s3_bucket}/{name}"
    check_input(uri, s3_settings.s3)
    with open_input(uri, s3_settings.s3) as stream:
        items = list(iter_input(stream, "jsonl", "prompt"))
    records = [i for i in items if isinstance(i, Record)]
    assert [r.id for r in records] == [f"r{i}" for i in range(2000)]
    assert records[1234].prompt == "prompt 1234 " and records[1234].fields == {"topic": 1234 % 7}
    assert [(b.line, b.reason[:12]) for b in items if isinstance(b, BadLine)] == [(2001, "invalid JSON")]


def test_input_is_read_as_it_is_consumed(s3_settings, s3_bucket, s3_client):
    data = jsonl(40_000, width=100)  # ~5 MiB
    s3_client.put_object(Bucket=s3_bucket, Key="big.jsonl", Body=data)
    with open_input(f"s3://{s3_bucket}/big.jsonl", s3_settings.s3) as stream:
        first = stream.readline(1 << 20)
        # Only a buffer's worth came over the wire, not the object.
        assert stream.raw._pos <= 512 * 1024 < len(data)
        assert first == data[: data.index(b"\n") + 1]
        assert first + stream.read() == data


@pytest.mark.faults
def test_input_resumes_when_the_body_breaks(s3_settings, s3_bucket, s3_client):
    data = jsonl(20_000, width=50)  # ~2 MiB
    s3_client.put_object(Bucket=s3_bucket, Key="flaky.jsonl", Body=data)
    with FaultProxy(s3_settings.s3.endpoint_url, fault_rate=0.5, seed=3, kinds=("truncate",)) as proxy:
        settings = variant(s3_settings, endpoint_url=proxy.url)
        with open_input(f"s3://{s3_bucket}/flaky.jsonl", settings.s3) as stream:
            lines = list(iter(stream.readline, b""))
            reopened = stream.raw.reopened
    assert b"".join(lines) == data and len(lines) == 20_000
    assert proxy.faults["truncate"] >= 1 and reopened == proxy.faults["truncate"]


def test_input_missing_bucket_missing_key_and_denied_each_say_so(s3_settings, s3_bucket, s3_client):
    s3_client.put_object(Bucket=s3_bucket, Key="secret/prompts.jsonl", Body=jsonl(3))
    deny(s3_client, s3_bucket, "s3:GetObject", "s3:HeadObject", keys="secret/*")

    with pytest.raises(ConfigError) as missing_bucket:
        check_input("s3://no-such-bucket-here/prompts.jsonl", s3_settings.s3)
    with pytest.raises(ConfigError) as missing_key:
        check_input(f"s3://{s3_bucket}/nope/prompts.jsonl", s3_settings.s3)
    with pytest.raises(ConfigError) as denied:
        check_input(f"s3://{s3_bucket}/secret/prompts.jsonl", s3_settings.s3)

    assert "bucket 'no-such-bucket-here' does not exist" in str(missing_bucket.value)
    assert f"s3://{s3_bucket}/nope/prompts.jsonl not found" in str(missing_key.value)
    assert "key 'nope/prompts.jsonl'" in str(missing_key.value)
    assert "Access denied reading input" in str(denied.value) and "s3:GetObject" in str(denied.value)
    assert "key 'secret/prompts.jsonl'" in str(denied.value)

    # Opening the stream (a GET, whose errors carry a code) gives the same answers.
    for uri, fragment in [("s3://no-such-bucket-here/p.jsonl", "does not exist"),
                          (f"s3://{s3_bucket}/nope/prompts.jsonl", "not found"),
                          (f"s3://{s3_bucket}/secret/prompts.jsonl", "Access denied")]:
        with pytest.raises(ConfigError, match=fragment):
            with open_input(uri, s3_settings.s3):
                pass


def test_input_uri_without_key_is_rejected(s3_settings):
    with pytest.raises(ConfigError, match="no object"):
        check_s3_input("s3://some-bucket", s3_settings.s3)


def test_credentials_never_reach_messages_or_logs(s3_settings, caplog):
    secret = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
    settings = variant(s3_settings, access_key_id="AKIAIOSFODNN7EXAMPLE", secret_access_key=secret)
    caplog.set_level(logging.DEBUG, logger="infra")
    with pytest.raises(ConfigError) as err:
        check_s3_input("s3://no-such-bucket-here/p.jsonl", settings.s3)
    chain, exc = [], err.value
    while exc is not None:
        chain.append(str(exc))
        exc = exc.__cause__
    assert all(secret not in text for text in chain + [caplog.text, repr(settings)])


def test_half_set_credentials_are_a_config_error(s3_settings):
    settings = variant(s3_settings, access_key_id="AKIA")
    with pytest.raises(ConfigError, match="both"):
        make_s3_client(settings.s3)


# ---------------------------------------------------------------- output


def test_publish_parts_and_manifest_byte_for_byte(s3_settings, s3_bucket, s3_client):
    store = open_output_store(f"s3://{s3_bucket}/runs/nightly/", "run-1", s3_settings.s3, s3_settings.work_path("staging"))
    assert store.location == f"s3://{s3_bucket}/runs/nightly/run-1"
    store.preflight()
    parts = {f"part-{i:05d}.jsonl": jsonl(300 + i) for i in range(3)}
    for name, data in parts.items():
        path, sha = stage(store, name, data)
        store.publish_file(name, path, sha)
        path.unlink()  # the caller's job once the part is published
    manifest = json.dumps({"parts": [{"name": n, "sha256": hashlib.sha256(d).hexdigest()} for n, d in parts.items()]}).encode()
    store.write_bytes("manifest.json", manifest)

    assert store.list_names() == ["manifest.json", *parts]  # sorted, no preflight marker
    for name, data in {**parts, "manifest.json": manifest}.items():
        key = f"runs/nightly/run-1/{name}"
        assert store.uri(name) == f"s3://{s3_bucket}/{key}"
        body, reply = fetch_verified(s3_client, s3_bucket, key)
        assert body == data
        assert reply["ChecksumSHA256"] == b64sha(data)
        assert reply["Metadata"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert store.read_bytes("manifest.json") == manifest
    assert store.read_bytes("missing.json") is None
    assert not list(store.staging_dir().iterdir())


def test_multipart_part_is_checksummed_per_part(s3_settings, s3_bucket, s3_client):
    settings = variant(s3_settings, multipart_threshold_mb=5)
    store = open_output_store(f"s3://{s3_bucket}", "run-mp", settings.s3, settings.work_path("staging"))
    data = os.urandom(12 * MIB + 12345)
    path, sha = stage(store, "part-00000.jsonl", data)
    store.publish_file("part-00000.jsonl", path, sha)

    head = s3_client.head_object(Bucket=s3_bucket, Key="run-mp/part-00000.jsonl", ChecksumMode="ENABLED")
    chunks = [data[i:i + 5 * MIB] for i in range(0, len(data), 5 * MIB)]
    composite = base64.b64encode(hashlib.sha256(b"".join(hashlib.sha256(c).digest() for c in chunks)).digest()).decode()
    # Three parts, one multipart upload: S3 keeps the SHA-256 of the parts' SHA-256s ("-3" on AWS).
    assert head["ChecksumSHA256"].split("-")[0] == composite, head
    assert head["ContentLength"] == len(data) and head["Metadata"]["sha256"] == sha
    body, _ = fetch_verified(s3_client, s3_bucket, "run-mp/part-00000.jsonl")
    assert hashlib.sha256(body).hexdigest() == sha and body == data
    assert store.list_names() == ["part-00000.jsonl"]


def test_publish_refuses_a_file_that_does_not_match_its_sha(s3_settings, s3_bucket, s3_client):
    store = open_output_store(f"s3://{s3_bucket}", "run-bad", s3_settings.s3, s3_settings.work_path("staging"))
    path, _ = stage(store, "part-00000.jsonl", b"what was written\n")
    with pytest.raises(StorageError, match="no longer matches its sha256"):
        store.publish_file("part-00000.jsonl", path, hashlib.sha256(b"something else\n").hexdigest())
    assert store.list_names() == []


@pytest.mark.faults
def test_every_object_lands_once_through_faults(s3_settings, s3_bucket, s3_client):
    parts = {f"part-{i:05d}.jsonl": jsonl(200, width=i) for i in range(8)}
    parts["part-00008.jsonl"] = os.urandom(6 * MIB)  # multipart at a 5 MiB threshold
    with FaultProxy(s3_settings.s3.endpoint_url, fault_rate=0.3, seed=7) as proxy:
        settings = variant(s3_settings, endpoint_url=proxy.url, multipart_threshold_mb=5)
        store = open_output_store(f"s3://{s3_bucket}/faulty", "run-f", settings.s3, settings.work_path("staging"))
        store.preflight()
        for name, data in parts.items():
            path, sha = stage(store, name, data)
            store.publish_file(name, path, sha)
            path.unlink()
        store.write_bytes("manifest.json", b'{"parts": 9}')
        listed = store.list_names()
    assert proxy.injected >= 5, proxy.faults  # the faults really happened
    assert listed == sorted([*parts, "manifest.json"])

    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=s3_bucket, Prefix="faulty/")["Contents"]]
    assert sorted(keys) == sorted(f"faulty/run-f/{n}" for n in [*parts, "manifest.json"])  # once each, nothing else
    assert s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []  # no upload left open
    for name, data in parts.items():
        body, reply = fetch_verified(s3_client, s3_bucket, f"faulty/run-f/{name}")
        assert hashlib.sha256(body).hexdigest() == hashlib.sha256(data).hexdigest()
        assert reply["Metadata"]["sha256"] == hashlib.sha256(data).hexdigest()


@pytest.mark.faults
@pytest.mark.parametrize("size_mb,request_", [
    (0, lambda m, t: m == "PUT"),                          # the part's one PUT
    (6, lambda m, t: m == "POST" and "uploadId=" in t),    # CompleteMultipartUpload
])
def test_a_lost_reply_is_not_a_lost_part(size_mb, request_, s3_settings, s3_bucket, s3_client, caplog):
    """The server acts but every reply to the upload's last request is lost: boto3 gives up,
    and publish_file finds by HEAD that the object landed whole."""
    data = os.urandom(size_mb * MIB or 1000)
    with FaultProxy(s3_settings.s3.endpoint_url, fault_rate=1.0, kinds=("drop_after",), only=request_) as proxy:
        settings = variant(s3_settings, endpoint_url=proxy.url, multipart_threshold_mb=5, max_attempts=2)
        store = open_output_store(f"s3://{s3_bucket}", "run-lost", settings.s3, settings.work_path("staging"))
        path, sha = stage(store, "part-00000.jsonl", data)
        with caplog.at_level(logging.DEBUG, logger="infra.storage.s3_output"):
            store.publish_file("part-00000.jsonl", path, sha)
    assert proxy.faults["drop_after"] >= 2  # every attempt botocore made
    assert "published s3://" in caplog.text
    body, reply = fetch_verified(s3_client, s3_bucket, "run-lost/part-00000.jsonl")
    assert body == data and reply["Metadata"]["sha256"] == sha


@pytest.mark.faults
def test_an_upload_that_keeps_failing_names_key_and_cause(s3_settings, s3_bucket):
    with FaultProxy(s3_settings.s3.endpoint_url, fault_rate=1.0, kinds=("slowdown",), only=lambda m, t: m == "PUT") as proxy:
        settings = variant(s3_settings, endpoint_url=proxy.url, max_attempts=1)
        store = open_output_store(f"s3://{s3_bucket}", "run-down", settings.s3, settings.work_path("staging"))
        path, sha = stage(store, "part-00007.jsonl", b"x\n")
        with pytest.raises(StorageError) as err:
            store.publish_file("part-00007.jsonl", path, sha)
    assert f"s3://{s3_bucket}/run-down/part-00007.jsonl failed 3 times" in str(err.value)
    assert "SlowDown" in str(err.value) and proxy.faults["slowdown"] >= 3


@pytest.mark.faults
def test_a_stalled_upload_is_cut_by_the_read_timeout(s3_settings, s3_bucket):
    """A store that takes the PUT and never answers: each attempt ends at NSDG_S3__READ_TIMEOUT_S,
    and the error says so instead of the run hanging."""
    with FaultProxy(s3_settings.s3.endpoint_url, fault_rate=1.0, kinds=("stall",), only=lambda m, t: m == "PUT") as proxy:
        settings = variant(s3_settings, endpoint_url=proxy.url, max_attempts=1, read_timeout_s=0.5)
        store = open_output_store(f"s3://{s3_bucket}", "run-stall", settings.s3, settings.work_path("staging"))
        path, sha = stage(store, "part-00003.jsonl", b"x\n")
        with pytest.raises(StorageError) as err:
            store.publish_file("part-00003.jsonl", path, sha)
    assert "part-00003.jsonl failed 3 times" in str(err.value) and "timeout" in str(err.value).lower()
    assert proxy.faults["stall"] >= 3  # every upload attempt stalled and was cut


@pytest.mark.faults
def test_input_streams_through_faults(s3_settings, s3_bucket, s3_client):
    data = jsonl(500)
    s3_client.put_object(Bucket=s3_bucket, Key="in.jsonl.gz", Body=gzip.compress(data))
    with FaultProxy(s3_settings.s3.endpoint_url, fault_rate=0.3, seed=11) as proxy:
        settings = variant(s3_settings, endpoint_url=proxy.url)
        for _ in range(5):
            check_input(f"s3://{s3_bucket}/in.jsonl.gz", settings.s3)
            with open_input(f"s3://{s3_bucket}/in.jsonl.gz", settings.s3) as stream:
                assert stream.read() == data
    assert proxy.injected >= 1, proxy.faults


def test_preflight_missing_bucket(s3_settings):
    store = open_output_store("s3://no-such-output-bucket/out", "run-1", s3_settings.s3, s3_settings.work_path("staging"))
    with pytest.raises(ConfigError) as err:
        store.preflight()
    text = str(err.value)
    assert "Output bucket 'no-such-output-bucket' does not exist" in text and "out/run-1/.preflight-" in text
    assert "Create it" in text


def test_preflight_denied_write(s3_settings, s3_bucket, s3_client):
    deny(s3_client, s3_bucket, "s3:PutObject")
    store = open_output_store(f"s3://{s3_bucket}/out", "run-1", s3_settings.s3, s3_settings.work_path("staging"))
    with pytest.raises(ConfigError) as err:
        store.preflight()
    text = str(err.value)
    assert f"Access denied writing s3://{s3_bucket}/out/run-1/.preflight-" in text and "s3:PutObject" in text
    with pytest.raises(ConfigError, match="Access denied writing"):
        store.write_bytes("manifest.json", b"{}")
    path, sha = stage(store, "part-00000.jsonl", b"x\n")
    with pytest.raises(ConfigError, match="Access denied writing"):
        store.publish_file("part-00000.jsonl", path, sha)


def test_denied_deletes_name_the_delete_permission(s3_settings, s3_bucket, s3_client):
    """A delete refused by policy names s3:DeleteObject, the conditional one (the lease's) too: it
    used to share the write's message, which sent the user to grant s3:PutObject."""
    store = open_output_store(f"s3://{s3_bucket}/out", "run-1", s3_settings.s3, s3_settings.work_path("staging"))
    version = store.create_exclusive("lease.json", b"{}")
    deny(s3_client, s3_bucket, "s3:DeleteObject")
    for delete in (lambda: store.delete("lease.json"), lambda: store.delete_if_version("lease.json", version)):
        with pytest.raises(ConfigError) as err:
            delete()
        text = str(err.value)
        assert f"Access denied deleting s3://{s3_bucket}/out/run-1/lease.json" in text, text
        assert "s3:DeleteObject" in text and "s3:PutObject" not in text, text


def test_an_unreachable_endpoint_is_one_storage_error_naming_it(s3_settings):
    """Every call's transport failure says what it was doing, on which object, and the endpoint."""
    settings = variant(s3_settings, endpoint_url="http://127.0.0.1:9", max_attempts=1, connect_timeout_s=1)
    store = open_output_store("s3://some-bucket/out", "run-1", settings.s3, settings.work_path("staging"))
    for call, doing in [(store.list_names, "Listing s3://some-bucket/out/run-1/"),
                        (lambda: store.read_bytes("a.json"), "Reading s3://some-bucket/out/run-1/a.json"),
                        (lambda: store.create_exclusive("lease.json", b"{}"), "Writing s3://some-bucket/out/run-1/lease.json")]:
        with pytest.raises(StorageError) as err:
            call()
        text = str(err.value)
        assert text.startswith(doing + " failed: ") and "Check the endpoint at http://127.0.0.1:9" in text, text


def test_list_names_sees_only_this_run(s3_settings, s3_bucket, s3_client):
    for key in ["out/run-1/a.json", "out/run-1/nested/b.json", "out/run-10/c.json", "out/run-1.json", "out/run-1/.hidden"]:
        s3_client.put_object(Bucket=s3_bucket, Key=key, Body=b"{}")
    store = open_output_store(f"s3://{s3_bucket}/out", "run-1", s3_settings.s3, s3_settings.work_path("staging"))
    assert store.list_names() == ["a.json"]


def test_list_names_pages_through_many_objects(s3_settings, s3_bucket, s3_client):
    store = open_output_store(f"s3://{s3_bucket}", "run-many", s3_settings.s3, s3_settings.work_path("staging"))
    store.LIST_PAGE_SIZE = 7  # the real paging, over fewer objects than S3's 1000 a page
    names = [f"part-{i:05d}.state.json" for i in range(30)]
    for name in names:
        s3_client.put_object(Bucket=s3_bucket, Key=f"run-many/{name}", Body=b"{}")
    assert store.list_names() == names


def test_store_pickles_and_stages_locally(s3_settings, s3_bucket):
    store = open_output_store(f"s3://{s3_bucket}/p", "run-1", s3_settings.s3, s3_settings.work_path("staging"))
    copy = pickle.loads(pickle.dumps(store))
    assert copy.location == store.location == f"s3://{s3_bucket}/p/run-1"
    copy.write_bytes("x.json", b"1")
    assert store.read_bytes("x.json") == b"1"
    # Under the prefix's own folder: a run of this id under another prefix has another (tests/test_spill.py).
    assert store.staging_dir() == Path(s3_settings.work_dir) / "staging" / s3_bucket / prefix_dir_name("p") / "run-1"
    assert store.staging_dir().is_dir() and copy.staging_dir() == store.staging_dir()
