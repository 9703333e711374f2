"""The generate flow on the real local Slurm cluster with the vllm engine's launch: a 2-node job of
one task per node, the Ray head on the first node and a Ray worker on the second, the head waiting
for every GPU, then `vllm serve` on the head, all as rendered (runtime `none`). `ray` and `vllm`
are the stand-ins of tests/engine_stubs.py, put on the ranks' PATH by slurm.setup; the stand-in
`vllm serve` runs the project's local server on the rendered --host/--port.
The flow speaks the engine's own API to it (openai-completions, requests in flight per replica)
and judges readiness as for vLLM: /health, the served model in /v1/models, a 1-token completion.
"""

import json
import os
import shlex
from pathlib import Path

import pytest

from flows.generate import generate
from tests.engine_stubs import write_hf_model, write_engine_stubs
from tests.fixtures_slurm import TEST_PROFILES, slurm_job_env, slurm_test_env
from tests.ports import free_port, free_ray_port
from tests.test_slurm_flow import cancel_after_first_part, our_jobs, prompts

pytestmark = [pytest.mark.slurm, pytest.mark.integration]
PROFILE = "vllm2x8"


@pytest.fixture
def vllm_env(slurm_cluster, prefect_harness, workdir, monkeypatch):
    """Settings for a profile switched to vllm; returns a function that sets the stand-in
    server's extra serve-local flags."""
    stubs = write_engine_stubs(workdir / "engine-bin")
    port = free_port(span=8)  # launch k listens on port + k
    profiles = {PROFILE: {**TEST_PROFILES["test2x8"], "engine": "vllm"}}
    for name, value in slurm_test_env(workdir, port, profiles=profiles, simulated_server=False).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("NSDG_SLURM__SETUP", json.dumps([f"export PATH={shlex.quote(str(stubs))}:$PATH"]))
    monkeypatch.setenv("NSDG_SLURM__RAY_PORT", str(free_ray_port(port, 8)))  # Ray's fixed ports follow it
    monkeypatch.setenv("NSDG_MODEL__PATH", write_hf_model(workdir / "model"))  # what the job's preflight reads

    def serve_flags(*flags: str) -> None:
        # Both "nodes" are this host, on loopback: the head's address is given, as a site gives it.
        monkeypatch.setenv("NSDG_SLURM__ENV", slurm_job_env(STUB_VLLM_EXTRA=json.dumps(flags), RAY_HEAD_IP="127.0.0.1"))

    serve_flags()
    return serve_flags


def record_ids(run_dir: Path) -> list[str]:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    return [json.loads(line)["id"] for part in manifest["parts"] for line in (run_dir / part["name"]).read_text().splitlines()]


def job_dirs(workdir: Path, run_id: str) -> list[Path]:
    return sorted((workdir / "jobs" / run_id).iterdir())


def test_vllm_launch_on_two_nodes(vllm_env, workdir):
    result = generate(input_uri=prompts(workdir / "in.jsonl", 30), output_uri="out", run_id="vllm-ok", profile=PROFILE,
                      shard_size=10, batch_size=8)
    assert result["records_written"] == 30
    assert record_ids(workdir / "out" / "vllm-ok") == [f"s{i}" for i in range(30)]
    (job_dir,) = job_dirs(workdir, "vllm-ok")
    state = job_dir / "ray-stub"
    head, worker = (json.loads((state / f"argv-{n}").read_text()) for n in (0, 1))
    assert head[:3] == ["start", "--head", "--node-ip-address=127.0.0.1"]
    ray_port = int(os.environ["NSDG_SLURM__RAY_PORT"])  # Ray's fixed ports follow it on every node (audit S3)
    assert worker[:3] == ["start", f"--address={(state / 'head').read_text()}", "--node-ip-address=127.0.0.1"]
    assert worker[3:5] == [f"--node-manager-port={ray_port + 1}", f"--object-manager-port={ray_port + 2}"]
    assert worker[-1] == "--block" and f"--ray-client-server-port={ray_port + 7}" in head
    serve = json.loads((state / "vllm-argv").read_text())
    env = json.loads((state / "vllm-env").read_text())
    # vLLM places workers by VLLM_HOST_IP (L1); the V2 Ray executor (L2); caches in the job's own place (L4).
    assert env["VLLM_HOST_IP"] == "127.0.0.1" and env["VLLM_USE_RAY_V2_EXECUTOR_BACKEND"] == "1"
    assert env["VLLM_CACHE_ROOT"].startswith(env["XDG_CACHE_HOME"]) and Path(env["XDG_CACHE_HOME"]).is_dir()
    for flag, value in (("--tensor-parallel-size", "8"), ("--pipeline-parallel-size", "2"),
                        ("--distributed-executor-backend", "ray"), ("--max-model-len", "4096")):
        assert serve[serve.index(flag) + 1] == value
    log = next(job_dir.glob("*.out")).read_text()
    assert "the Ray cluster shows 16 GPUs" in log and "Ray worker joined" in log
    assert not our_jobs("vllm-ok")


@pytest.mark.faults
def test_vllm_job_cancelled_from_outside_is_replaced(vllm_env, workdir, monkeypatch):
    vllm_env("--extra-latency", "0.2")
    # Two requests in flight (vLLM's default keeps dozens): 120 prompts then take about 12 s, so the
    # job is cancelled mid-run. On an idle machine the whole run once ended 0.4 s after its first part,
    # before the killer's scancel, and there was no second job to see.
    monkeypatch.setenv("NSDG_SERVER__MAX_IN_FLIGHT", "2")
    run_dir = workdir / "out" / "vllm-heal"
    killer = cancel_after_first_part(run_dir)
    generate(input_uri=prompts(workdir / "in.jsonl", 120), output_uri="out", run_id="vllm-heal", profile=PROFILE,
             shard_size=10, batch_size=5)
    killer.join(timeout=5)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert len(manifest["slurm_job_ids"]) == 2  # the cancelled job and its replacement
    assert record_ids(run_dir) == [f"s{i}" for i in range(120)]  # every record exactly once, in order
    assert not our_jobs("vllm-heal")


@pytest.mark.faults
def test_vllm_server_that_dies_mid_run_is_replaced(vllm_env, workdir):
    """The head's server crashes on its 4th request: its task exits non-zero, srun ends the step
    (the worker's Ray too), the job ends FAILED, and a new job finishes the run."""
    marker = workdir / "crashed-once"
    vllm_env("--extra-latency", "0.1", "--fault-crash-after", "3", "--fault-once-marker", str(marker))
    run_dir = workdir / "out" / "vllm-crash"
    generate(input_uri=prompts(workdir / "in.jsonl", 60), output_uri="out", run_id="vllm-crash", profile=PROFILE,
             shard_size=10, batch_size=5)
    assert marker.exists()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert len(manifest["slurm_job_ids"]) == 2 and manifest["server_restarts"] == 1
    assert record_ids(run_dir) == [f"s{i}" for i in range(60)]
    first_log = next(job_dirs(workdir, "vllm-crash")[0].glob("*.out")).read_text()
    assert "server exited with code 1" in first_log
    assert not our_jobs("vllm-crash")
