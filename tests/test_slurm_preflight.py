"""The in-job preflight on the local Slurm cluster (issue 25): before the server loads, the node
launcher checks what a misconfigured site fails (the model directory inside the container, the
GPUs, the server's port, a writable cache, the node's name). A failure ends the job within seconds
with one line naming the check, the value seen and the fix, and the backend reports that line at
once, not after the ready deadline."""

from __future__ import annotations

import shlex
import socket
from pathlib import Path

import pytest

from infra.deadline import Deadline, poll_until
from infra.errors import ServerNotReady
from infra.settings import Profile, ServerSettings, Settings, SlurmSettings
from infra.slurm.backend import SlurmBackend
from tests.engine_stubs import write_engine_stubs
from tests.fixtures_slurm import REPO_ROOT, simulated_server_command
from tests.ports import free_port

pytestmark = pytest.mark.slurm
ONE_NODE = Profile(backend="slurm", nodes=1, gpus_per_node=8, tensor_parallel=8, pipeline_parallel=1)


def nemo_model(folder: Path) -> str:
    """An extracted .nemo directory as the preflight sees it (its model_config.yaml)."""
    folder.mkdir(parents=True)
    (folder / "model_config.yaml").write_text("tensor_model_parallel_size: 8\n")
    return str(folder)


def backend(tmp_path: Path, *, model: str, command: list[str] | None = None, port: int | None = None,
            env: dict[str, str] | None = None) -> SlurmBackend:
    """The engine's own command (nemo) unless `command`; stand-ins for nvidia-smi on PATH."""
    stubs = write_engine_stubs(tmp_path / "bin")
    slurm = SlurmSettings(container_runtime="none", job_root=str(tmp_path / "jobs"), time_limit="00:05:00",
                          env={"PYTHONPATH": str(REPO_ROOT), **(env or {})},
                          setup=[f"export PATH={shlex.quote(str(stubs))}:$PATH"])
    settings = Settings(_env_file=None, slurm=slurm, model={"path": model},
                        server=ServerSettings(command=command, port=port or free_port()))
    return SlurmBackend(settings, ONE_NODE, run_id="preflight")


def reported(b: SlurmBackend) -> str:
    """What the backend says once the job is over: within seconds for a preflight failure."""
    b.start()
    try:
        return poll_until(b.dead_reason, deadline=Deadline(60), interval=0.3, what=f"job {b.job_id} to fail")
    finally:
        b.release()


def test_a_model_path_the_nodes_cannot_read_fails_the_preflight(slurm_cluster, tmp_path):
    reason = reported(backend(tmp_path, model=str(tmp_path / "not-mounted")))
    assert "failed its preflight: nsdg preflight failed on" in reason
    assert f"model: {tmp_path / 'not-mounted'} is not a readable directory here (inside the container)" in reason
    assert "log tails" not in reason  # the one line, not the logs


def test_a_model_directory_without_the_engines_file_fails_the_preflight(slurm_cluster, tmp_path):
    (tmp_path / "hf").mkdir()
    reason = reported(backend(tmp_path, model=str(tmp_path / "hf")))
    assert "has no readable model_config.yaml, which the engine loads first" in reason


def test_fewer_gpus_than_the_job_expects_fail_the_preflight(slurm_cluster, tmp_path):
    reason = reported(backend(tmp_path, model=nemo_model(tmp_path / "m"), env={"CUDA_VISIBLE_DEVICES": "0,1"}))
    assert "GPUs: nvidia-smi lists 2, the job expects 8 on each node" in reason


def test_a_taken_port_fails_the_preflight(slurm_cluster, tmp_path):
    with socket.socket() as taken:
        port = free_port()
        taken.bind(("0.0.0.0", port))
        taken.listen()
        reason = reported(backend(tmp_path, model="/unused", command=simulated_server_command(), port=port))
    assert f"port: {port} is already taken on" in reason and "NSDG_SERVER__PORT" in reason


def test_a_cache_that_cannot_be_written_fails_the_preflight(slurm_cluster, tmp_path):
    (tmp_path / "a-file").write_text("")
    reason = reported(backend(tmp_path, model="/unused", command=simulated_server_command(),
                              env={"XDG_CACHE_HOME": str(tmp_path / "a-file" / "cache")}))
    assert f"cache: {tmp_path / 'a-file' / 'cache'} is not writable" in reason


def test_a_passing_preflight_is_logged_and_the_server_starts(slurm_cluster, tmp_path):
    b = backend(tmp_path, model=nemo_model(tmp_path / "m"), command=None)
    b.start()
    try:
        out = b.job_dir / f"{b.job_name}-{b.job_id}.out"
        poll_until(lambda: True if out.exists() and "preflight passed" in out.read_text() else None,
                   deadline=Deadline(60), interval=0.3, what="the preflight to pass")
        text = out.read_text()
        assert "preflight: 8 GPUs, driver 550.54.15" in text and "server started" in text
        assert not (b.job_dir / "preflight-failed").exists()
    finally:
        b.release()


@pytest.mark.integration
def test_the_flow_fails_with_the_preflight_line(slurm_cluster, prefect_harness, workdir, monkeypatch):
    from flows.generate import generate
    from tests.fixtures_slurm import slurm_test_env

    for name, value in slurm_test_env(workdir, free_port(span=8), simulated_server=False).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("NSDG_MODEL__PATH", str(workdir / "not-mounted"))
    src = workdir / "in.jsonl"
    src.write_text("".join(f'{{"id": "p{i}", "prompt": "preflight prompt {i}"}}\n' for i in range(5)))
    with pytest.raises(ServerNotReady) as failed:
        generate(input_uri=str(src), output_uri="out", run_id="preflight-flow", profile="test1x8", shard_size=5)
    message = str(failed.value)
    assert f"model: {workdir / 'not-mounted'} is not a readable directory here" in message, message
    assert "log tails" not in message
    assert len(list((workdir / "jobs" / "preflight-flow").iterdir())) == 1  # one job, not a restart per failure
