"""Fault cases of the run's identity: the tokenizer or the input changes under a resumed run, an S3
multipart upload is left open (issue 12: F1, F2, F8; benchmarks/faults.py runs them)."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path

from benchmarks.fault_harness import (REPO, Row, _wait, count_outcomes, environment, local_env, local_servers,
                                      moto_server, write_prompts)


def _outcomes(run_dir: Path, ids: list[str]) -> tuple[list[str], list[str]]:
    """(written, rejected) ids; an input reject names its line, not its id."""
    written = [json.loads(line)["id"] for p in sorted(run_dir.glob("part-*.jsonl")) for line in p.read_text().splitlines()]
    rejects = run_dir / "rejects.jsonl"
    rows = [json.loads(line) for line in rejects.read_text().splitlines()] if rejects.exists() else []
    return written, [r.get("id") or ids[r["line"] - 1] for r in rows]


def case_tokenizer_changed(tmp: Path) -> Row:
    """A run under the byte estimate loses its server; the resume sets NSDG_MODEL__TOKENIZER,
    which changes which prompts fit: refused, naming token_counter; resumed as started, it finishes."""
    from flows.generate import generate

    long = "Describe, in one sentence, the long history of the lighthouse keepers who watched over the northern sea."
    ids = [f"t{i:02d}" for i in range(12)]
    with open(tmp / "in.jsonl", "w") as f:
        for i, rid in enumerate(ids):
            f.write(json.dumps({"id": rid, "prompt": long if i == 1 else f"Prompt {i}: the sea."}) + "\n")
    params = dict(input_uri=str(tmp / "in.jsonl"), output_uri=str(tmp / "out"), run_id="r", shard_size=3, batch_size=3,
                  on_bad_input="skip", sampling={"tokens_to_generate": 8}, max_server_restarts=0)
    tight = {"NSDG_MODEL__CONTEXT_LENGTH": "64", "NSDG_SERVER__MAX_IN_FLIGHT": "1"}
    # The Makefile's NSDG_LOCAL__MODEL_DIR is relative to the checkout, and this case runs elsewhere.
    tokenizer = (REPO / os.environ.get("NSDG_LOCAL__MODEL_DIR", ".cache/tiny-model") / "tokenizer.json").resolve()
    refused = 0
    with environment(local_env(tmp, "--fault-crash-after", "2", **tight)):
        try:
            generate(**params)  # the probe, shard 0, then the server is gone
        except Exception:
            pass
    with environment(local_env(tmp, **tight, NSDG_MODEL__TOKENIZER=str(tokenizer))):
        try:
            generate(**params)
        except Exception as exc:
            refused = int("token_counter" in str(exc))
    with environment(local_env(tmp, **tight)):
        generate(**params)
    written, rejected = _outcomes(tmp / "out" / "r", ids)
    lost, dup = count_outcomes(ids, written, rejected)
    return Row("resume under another tokenizer", injected=1, detected=refused, lost=lost, duplicated=dup,
               leaked=local_servers(tmp), note="refused (token_counter differs); resumed as started")


def case_input_changed(tmp: Path) -> Row:
    """The input is rewritten in place while the run reads it; restored, the rerun finishes."""
    from flows.generate import generate
    from infra.errors import InputChanged

    src, run_dir = tmp / "in.jsonl", tmp / "out" / "r"
    ids = write_prompts(src, 300)
    v1 = src.read_bytes()

    def rewrite() -> None:
        _wait(lambda: (run_dir / "part-00001.jsonl.state.json").exists(), 120, "the second part")
        write_prompts(src, 300, poison=set(range(300)), word="CHANGED")  # same ids, other prompts

    changer = threading.Thread(target=rewrite, daemon=True)
    changer.start()
    params = dict(input_uri=str(src), output_uri=str(tmp / "out"), run_id="r", shard_size=20, batch_size=10)
    detected = 0
    with environment(local_env(tmp, "--extra-latency", "0.05")):
        try:
            generate(**params)
        except InputChanged:
            detected = 1
    changer.join(timeout=10)
    mixed = sum("CHANGED" in json.loads(line)["prompt"] for p in run_dir.glob("part-*.jsonl") for line in p.read_text().splitlines())
    src.write_bytes(v1)
    with environment(local_env(tmp)):
        generate(**params)
    written, rejected = _outcomes(run_dir, ids)
    lost, dup = count_outcomes(ids, written, rejected)
    return Row("input rewritten mid-run, then restored", injected=1, detected=detected, lost=lost, duplicated=dup + mixed,
               leaked=local_servers(tmp), note="InputChanged; nothing of the new input published; rerun finishes")


def case_s3_multipart(tmp: Path) -> Row:
    """An upload a killed flow left open, then a run with multipart parts under 30% S3 faults:
    the plan aborts the stale upload, failed attempts abort theirs, none stays open."""
    import boto3

    from flows.generate import generate
    from tests.fixtures_s3 import FaultProxy

    ids = [f"m{i:02d}" for i in range(12)]
    with open(tmp / "in.jsonl", "w") as f:  # 6 records of ~1 MB a part: multipart at a 5 MiB threshold
        for rid in ids:
            f.write(json.dumps({"id": rid, "prompt": f"Prompt {rid}: the sea.", "pad": "x" * 900_000}) + "\n")
    with moto_server() as endpoint, FaultProxy(endpoint, fault_rate=0.3, seed=11) as proxy:
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket="faults-multipart")  # moto's state is per process: not the S3 outage's bucket
        stale = s3.create_multipart_upload(Bucket="faults-multipart", Key="runs/r/part-00000.jsonl")
        s3.upload_part(Bucket="faults-multipart", Key="runs/r/part-00000.jsonl", UploadId=stale["UploadId"], PartNumber=1, Body=b"x" * (5 << 20))
        env = {**local_env(tmp), "NSDG_S3__ENDPOINT_URL": proxy.url, "NSDG_S3__ADDRESSING_STYLE": "path",
               "NSDG_S3__MULTIPART_THRESHOLD_MB": "5"}
        with environment(env):
            generate(input_uri=str(tmp / "in.jsonl"), output_uri="s3://faults-multipart/runs", run_id="r", shard_size=6, batch_size=6)
        manifest = json.loads(s3.get_object(Bucket="faults-multipart", Key="runs/r/manifest.json")["Body"].read())
        written = [json.loads(line)["id"] for p in manifest["parts"]
                   for line in s3.get_object(Bucket="faults-multipart", Key=f"runs/r/{p['name']}")["Body"].read().decode().splitlines()]
        uploads = s3.list_multipart_uploads(Bucket="faults-multipart").get("Uploads", [])
    lost, dup = count_outcomes(ids, written, [])
    return Row("S3 multipart upload left open, then 30% faults", injected=1 + proxy.injected,
               detected=int(all(u["UploadId"] != stale["UploadId"] for u in uploads)), lost=lost, duplicated=dup,
               leaked=local_servers(tmp) + len(uploads), note="leaked counts open multipart uploads")


CASES: dict[str, Callable[[Path], Row]] = {
    "tokenizer_changed": case_tokenizer_changed,
    "input_changed": case_input_changed,
    "s3_multipart": case_s3_multipart,
}
