"""`push_to_hub` (infra/run/hub.py): after everything is published, the card and exports go to a Hub
dataset repository through huggingface_hub. No Hub is reachable from here, so the test points
HF_ENDPOINT at a closed local port: the run ends with one line naming the repository, the endpoint and
what was seen, exit 2, every output intact and loadable, the token nowhere in what the run printed or
wrote. An upload to a real Hub is not tested (none reachable)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from benchmarks.faults import local_env
from infra.pipeline.files import pipeline_from_text

pytestmark = pytest.mark.integration

PIPELINE = """\
input: topics.jsonl
servers:
  main: {profile: local}
push_to_hub: {repo_id: test-org/sdg-set}
defaults:
  prompt_format: raw
  sampling: {temperature: 0.9, random_seed: 3, tokens_to_generate: 6}
stages:
  - name: answers
    recipe: {prompt_template: "Tell me about {{ topic }}:", samples_per_prompt: 2}
  - name: prefs
    kind: pairs
    from: answers
    pairs: {score: sample, min_margin: 1}
"""
TOKEN = "hf_nsdgTestTokenNeverShown0123456789"


def closed_port() -> int:
    with socket.socket() as s:  # bound then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_bad_repo_id_is_refused_before_anything_runs():
    with pytest.raises(Exception, match="push_to_hub.repo_id"):
        pipeline_from_text(PIPELINE.replace("test-org/sdg-set", "no-owner"), "p.yaml")


def test_an_unreachable_hub_fails_in_one_line_after_everything_is_published(prefect_server, workdir):
    datasets = pytest.importorskip("datasets")
    (workdir / "topics.jsonl").write_text("".join(json.dumps({"id": f"t{i}", "topic": f"topic {i}"}) + "\n" for i in range(3)))
    (workdir / "pipeline.yaml").write_text(PIPELINE)
    endpoint = f"http://127.0.0.1:{closed_port()}"
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env |= {**local_env(workdir), **prefect_server.client_env(), "PREFECT_HOME": str(workdir / "prefect"),
            "HF_ENDPOINT": endpoint, "HF_TOKEN": TOKEN, "HF_HOME": str(workdir / "hf-home")}
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--pipeline", "pipeline.yaml", "--run-id", "hub1",
                           "--output-uri", str(workdir / "out")], cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"nemotron-sdg run: push_to_hub test-org/sdg-set: the Hub at {endpoint} did not take the dataset"), last
    assert "the run is complete in" in last and "rerun with the same run id" in last and "Traceback" not in done.stderr
    run_dir = workdir / "out" / "hub1"
    manifest = json.loads((run_dir / "manifest.json").read_text())  # published before the push
    assert "hub" not in manifest and {e["config"] for e in manifest["dataset"]["exports"]} >= {"sft", "dpo_trl"}
    sft = datasets.load_dataset(str(run_dir), split="train", cache_dir=str(workdir / "hf"))
    assert len(sft) == 6 and (run_dir / "data/dpo-trl.parquet").exists()
    written = [p.read_bytes() for p in run_dir.rglob("*") if p.is_file()]
    assert all(TOKEN.encode() not in b for b in written) and TOKEN not in done.stderr + done.stdout


@pytest.mark.parametrize("where", ["local", "s3"])
def test_the_files_pushed_are_the_published_ones_read_from_disk_or_copied_one_at_a_time(where, tmp_path, request):
    """What huggingface_hub is handed: a local run's own files by path; an S3 run's, copied into the
    push's temp folder (the whole set is never held in memory), byte-equal to what was published."""
    from infra.run.hub import dataset_files
    from infra.settings import Settings
    from infra.storage import open_output_store

    settings = request.getfixturevalue("s3_settings") if where == "s3" else Settings()
    out = f"s3://{request.getfixturevalue('s3_bucket')}/out" if where == "s3" else str(tmp_path / "out")
    root = open_output_store(out, "hubfiles", settings.s3, tmp_path / "staging")
    data = open_output_store(f"{out}/hubfiles", "data", settings.s3, tmp_path / "staging")
    root.write_bytes("README.md", b"---\nconfigs: []\n---\n# card\n")
    data.write_bytes("sft.jsonl", b'{"messages": []}\n')
    data.write_bytes("sft.parquet", b"PAR1 not really")
    dataset = {"exports": [{"config": "sft", "files": {"jsonl": {"name": "sft.jsonl"}, "parquet": {"name": "sft.parquet"}}}]}
    into = tmp_path / "copies"
    files = dataset_files(root, data, dataset, into)
    assert [p for p, _ in files] == ["README.md", "data/sft.jsonl", "data/sft.parquet"]
    assert [open(f, "rb").read() for _, f in files] == [b"---\nconfigs: []\n---\n# card\n", b'{"messages": []}\n',
                                                        b"PAR1 not really"]
    assert all(f.startswith(str(into)) for _, f in files) == (where == "s3")
    data.delete("sft.parquet")
    with pytest.raises(Exception, match=r"push_to_hub: data/sft.parquet missing from .*rerun with the same run id"):
        dataset_files(root, data, dataset, into)
