"""The whole flow S3 → S3 against moto's S3 server over HTTP."""

import gzip
import hashlib
import json

import pytest

from flows.generate import generate

pytestmark = [pytest.mark.s3, pytest.mark.integration]


@pytest.fixture
def s3_env(s3_server, s3_bucket, workdir, monkeypatch):
    monkeypatch.setenv("NSDG_S3__ENDPOINT_URL", s3_server)
    monkeypatch.setenv("NSDG_S3__ADDRESSING_STYLE", "path")
    monkeypatch.setenv("NSDG_LOCAL__ENGINE", "simulated")
    monkeypatch.setenv("NSDG_WORK_DIR", str(workdir / "work"))
    return s3_bucket


def test_s3_to_s3_gzip_input_checksums_and_rerun(prefect_harness, s3_env, s3_client):
    bucket = s3_env
    lines = [json.dumps({"id": f"k{i}", "prompt": f"S3 prompt {i}", "lang": "en"}) for i in range(25)]
    s3_client.put_object(Bucket=bucket, Key="in/prompts.jsonl.gz", Body=gzip.compress(("\n".join(lines) + "\n").encode()))
    result = generate(input_uri=f"s3://{bucket}/in/prompts.jsonl.gz", output_uri=f"s3://{bucket}/out",
                      run_id="s3run", shard_size=10, batch_size=4)
    assert result["manifest"] == f"s3://{bucket}/out/s3run/manifest.json"
    manifest = json.loads(s3_client.get_object(Bucket=bucket, Key="out/s3run/manifest.json")["Body"].read())
    ids = []
    for part in manifest["parts"]:
        obj = s3_client.get_object(Bucket=bucket, Key=f"out/s3run/{part['name']}", ChecksumMode="ENABLED")
        data = obj["Body"].read()
        assert hashlib.sha256(data).hexdigest() == part["sha256"] and len(data) == part["bytes"]
        ids += [json.loads(l)["id"] for l in data.decode().splitlines()]
    assert ids == [f"k{i}" for i in range(25)]
    assert manifest["records_written"] == 25 and [p["records"] for p in manifest["parts"]] == [10, 10, 5]

    # Rerun with the same run_id: nothing is generated again, nothing is allocated.
    before = {p["name"]: s3_client.head_object(Bucket=bucket, Key=f"out/s3run/{p['name']}")["LastModified"] for p in manifest["parts"]}
    generate(input_uri=f"s3://{bucket}/in/prompts.jsonl.gz", output_uri=f"s3://{bucket}/out", run_id="s3run", shard_size=10, batch_size=4)
    after = {n: s3_client.head_object(Bucket=bucket, Key=f"out/s3run/{n}")["LastModified"] for n in before}
    assert before == after


def test_missing_input_key_fails_before_allocation(prefect_harness, s3_env, workdir):
    with pytest.raises(Exception, match="key|not found|No such"):
        generate(input_uri=f"s3://{s3_env}/nope.jsonl", output_uri=f"s3://{s3_env}/out", run_id="s3missing")
    assert not (workdir / "work" / "servers").exists()
