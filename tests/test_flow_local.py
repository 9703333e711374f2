"""The whole generate flow on the local backend: real server subprocess, real Prefect API."""

import json
import hashlib

import psutil
import pytest

from flows.generate import generate
from infra.prompting.sampling import SamplingParams
from infra.prompting.tokens import token_counter

pytestmark = pytest.mark.integration


def write_prompts(path, n, varied=False):
    """`varied`: prompts of three lengths, so a batch mixes short and long ones."""
    with open(path, "w") as f:
        for i in range(n):
            tail = " Tell me more, please." * (i % 3) if varied else ""
            f.write(json.dumps({"id": f"r{i}", "prompt": f"Prompt number {i}: tell me something.{tail}", "extra": i}) + "\n")
    return path


def server_children(workdir):
    """serve-local processes of this test (their port file lives under its workdir)."""
    cmdlines = (" ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"]))
    return [c for c in cmdlines if "serve-local" in c and str(workdir) in c]


def test_flow_end_to_end_with_tiny_model(prefect_harness, workdir, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("NSDG_LOCAL__MODEL_DIR", str(tiny_model_dir))
    src = write_prompts(workdir / "in.jsonl", 11, varied=True)
    result = generate(input_uri=str(src), output_uri=str(workdir / "out"), run_id="t1",
                      sampling=SamplingParams(tokens_to_generate=6, greedy=True), batch_size=4, shard_size=5)
    run_dir = workdir / "out" / "t1"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert result["manifest"] == str(run_dir / "manifest.json")
    assert [p["name"] for p in manifest["parts"]] == ["part-00000.jsonl", "part-00001.jsonl", "part-00002.jsonl"]
    records = []
    for part in manifest["parts"]:
        data = (run_dir / part["name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == part["sha256"]
        lines = [json.loads(line) for line in data.decode().splitlines()]
        assert len(lines) == part["records"]
        records += lines
    inputs = [json.loads(line) for line in src.read_text().splitlines()]
    assert [r["id"] for r in records] == [i["id"] for i in inputs]  # every record once, in order
    for rec, inp in zip(records, inputs):
        assert rec["prompt"] == inp["prompt"] and rec["extra"] == inp["extra"]
        assert rec["completion"] and rec["generation"]["prompt_match"] == "exact"
    # tokens_to_generate is a per-row cap in the run's tokenizer, although the server runs a short
    # prompt's row to its batch's longest prompt + 6: the cut rows keep the server's count.
    counter = token_counter(str(tiny_model_dir / "tokenizer.json"))
    assert all(counter.count(r["completion"]) <= r["generation"]["generated_tokens"] <= 6 for r in records)
    cut = [r["generation"] for r in records if "server_tokens" in r["generation"]]
    assert cut and all(g["server_tokens"] > 6 and g["finish_reason"] == "length" for g in cut)
    assert manifest["records_in"] == manifest["records_written"] == 11
    assert manifest["config_hash"] and manifest["profile"] == "local"
    # The served model, not NSDG_MODEL__NAME (the name requests carry, kept apart).
    assert {r["generation"]["model"] for r in records} == {manifest["model"]} == {tiny_model_dir.name}
    assert {r["generation"]["requested_model"] for r in records} == {manifest["requested_model"]} == {"nemotron-4-340b-base"}
    served = manifest["served_model"]
    assert served["reported"] == {"id": "nemotron-4-340b-base", "root": str(tiny_model_dir)}
    assert served["expected"]["path"] == str(tiny_model_dir) and served["expected"]["digest"].startswith("sha256:")
    assert manifest["config"]["served_model"] == served["expected"]
    assert not server_children(workdir)  # released: no server process left


def test_rerun_is_free_and_bad_sampling_fails_before_allocation(prefect_harness, workdir, monkeypatch):
    monkeypatch.setenv("NSDG_LOCAL__ENGINE", "simulated")
    src = write_prompts(workdir / "in.jsonl", 4)
    generate(input_uri=str(src), output_uri="out", run_id="t2", shard_size=2)
    before = (workdir / "out" / "t2" / "part-00000.jsonl").stat().st_mtime_ns
    generate(input_uri=str(src), output_uri="out", run_id="t2", shard_size=2)
    assert (workdir / "out" / "t2" / "part-00000.jsonl").stat().st_mtime_ns == before
    assert (workdir / ".nemotron-sdg" / "servers" / "t2" / "replica-0" / "server.log").read_text().count("Running on") == 1
    with pytest.raises(Exception, match="temperature"):
        generate(input_uri=str(src), output_uri="out", run_id="t3", sampling={"temperature": 0})
    assert not (workdir / ".nemotron-sdg" / "servers" / "t3").exists()
