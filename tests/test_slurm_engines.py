"""The Slurm launch of each serving engine (infra/slurm/launch.py): a profile switched to an engine
and nothing else gives that engine's image and command; the launches that cannot work are one
ConfigError line; hostile values stay one shell word; `nemotron-sdg render --engine`; and the
vllm engine's Ray roles run for real with bash, `ray` and `vllm` replaced by the stand-ins of
tests/engine_stubs.py. Golden renders are in tests/test_slurm_render.py; the 2-node job on the
real local cluster is in tests/test_slurm_engine_flow.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from flows.cli import main as cli_main
from infra.deadline import Deadline, poll_until
from infra.errors import ConfigError
from infra.settings import Settings, SlurmSettings
from infra.slurm.launch import RAY_PORT_SPAN, ray_ports, server_command
from infra.slurm.render import render_node_launcher, render_sbatch, write_job_files
from infra.slurm.spec import SbatchSpec
from tests.engine_stubs import write_engine_stubs, write_hf_model
from tests.ports import free_port, free_ray_port
from tests.test_slurm_render import DESTRUCTIVE, HOSTILE, assigned_array, bash_n, finish, gone, sbatch_lines

HF = "/lustre/models/Nemotron-4-340B-Base-hf"
TWO_NODES = {"backend": "slurm", "nodes": 2, "gpus_per_node": 8, "tensor_parallel": 8, "pipeline_parallel": 2}


def settings_for(engine: str, profile: dict | None = None, *, model: str = HF, **slurm) -> tuple[Settings, str]:
    """Settings whose profile `p` is TWO_NODES (or `profile`) switched to `engine`."""
    settings = Settings(_env_file=None, model={"path": model}, slurm=SlurmSettings(**slurm),
                        extra_profiles={"p": {**(profile or TWO_NODES), "engine": engine}})
    return settings, "p"


def spec_for(engine: str, profile: dict | None = None, **slurm) -> SbatchSpec:
    settings, name = settings_for(engine, profile, **slurm)
    return SbatchSpec.from_settings(settings, name, job_name="nsdg-engine-test", comment="nsdg run=engine-test",
                                    job_dir="/shared/jobs/e1")


def refused(match: str, engine: str, profile: dict | None = None, *, server=None, **slurm) -> str:
    settings, name = settings_for(engine, profile, **slurm)
    if server:
        settings = settings.model_copy(update={"server": settings.server.model_copy(update=server)})
    with pytest.raises(ConfigError, match=match) as info:
        SbatchSpec.from_settings(settings, name, job_name="nsdg-engine-test", comment="nsdg run=engine-test",
                                 job_dir="/shared/jobs/e1")
    assert "\n" not in str(info.value), "a user's mistake is one line"
    return str(info.value)


# --- a profile switched to an engine, nothing else ---------------------------------------------------


def test_switching_the_profile_to_vllm_is_the_only_change_needed():
    spec = spec_for("vllm")
    sbatch, launcher = render_sbatch(spec), render_node_launcher(spec)
    assert "--ntasks-per-node=1" in sbatch_lines(sbatch) and "--gpus-per-node=8" in sbatch_lines(sbatch)
    assert "--container-image=vllm/vllm-openai:v0.20.0-cu129" in sbatch
    assert server_command(spec) == ("vllm", "serve", HF, "--served-model-name", "nemotron-4-340b-base",
                              "--tensor-parallel-size", "8", "--pipeline-parallel-size", "2",
                              "--distributed-executor-backend", "ray", "--max-model-len", "4096",
                              "--generation-config", "vllm",
                              "--host", "0.0.0.0", "--port", "1424")
    assert "ray start --head" in launcher and 'ray start --address="$HEAD_ADDRESS" --node-ip-address="$NODE_IP" "${RAY_NODE_ARGS[@]}" --block' in launcher
    assert "RAY_GPUS=16" in launcher


def test_vllm_on_one_node_runs_without_ray():
    one = {"backend": "slurm", "nodes": 1, "gpus_per_node": 8, "tensor_parallel": 8, "pipeline_parallel": 1}
    spec = spec_for("vllm", one)
    launcher = render_node_launcher(spec)
    assert "ray" not in " ".join(server_command(spec)) and "ray start" not in launcher and "RAY_" not in launcher
    assert server_command(spec)[:6] == ("vllm", "serve", HF, "--served-model-name", "nemotron-4-340b-base",
                                  "--tensor-parallel-size")


def test_trtllm_is_one_mpi_world_under_pmix():
    spec = spec_for("trtllm")
    sbatch = render_sbatch(spec)
    assert "TASKS_PER_NODE=8" in sbatch and "SRUN_ARGS=(--mpi=pmix)" in sbatch
    assert server_command(spec)[:3] == ("trtllm-llmapi-launch", "trtllm-serve", HF)
    assert "nvcr.io#nvidia/tensorrt-llm/release:1.0.0" in sbatch
    # The site's own PMIx flavour is kept, not doubled.
    assert "SRUN_ARGS=(--mpi=pmix_v4)" in render_sbatch(spec_for("trtllm", srun_args=["--mpi=pmix_v4"]))


def test_images_come_from_the_engine_map_then_the_defaults():
    assert spec_for("vllm", images={"vllm": "/shared/images/vllm.sqsh"}).container_image == "/shared/images/vllm.sqsh"
    # container_image stays NeMo's: it does not leak into another engine.
    assert spec_for("vllm", container_image="/shared/images/nemo.sqsh").container_image == "vllm/vllm-openai:v0.20.0-cu129"
    assert spec_for("nemo-openai").container_image == "nvcr.io/nvidia/nemo:24.12"
    assert spec_for("nemo", container_image="/shared/images/nemo.sqsh").container_image == "/shared/images/nemo.sqsh"


# --- launches that cannot work ---------------------------------------------------------------------


def test_custom_needs_a_command():
    assert "NSDG_SERVER__COMMAND" in refused("custom engine runs", "custom")


def test_vllm_keeps_tensor_parallelism_inside_a_node():
    tp16 = {**TWO_NODES, "tensor_parallel": 16, "pipeline_parallel": 1}
    assert "tensor_parallel=8 and pipeline_parallel=2" in refused("NVLink", "vllm", tp16)


def test_vllm_needs_gpus():
    cpu = {"backend": "slurm", "nodes": 1, "gpus_per_node": 0, "tensor_parallel": 1, "pipeline_parallel": 1}
    refused("sees all its GPUs", "vllm", cpu)


def test_ray_port_cannot_be_the_servers():
    refused("both listen", "vllm", ray_port=1424)
    # Nor may the server's port fall among the ports Ray's nodes and workers take after it.
    assert "Ray's ports are 1400..2499" in refused("both listen", "vllm", ray_port=1400)
    refused("slurm.ray_port", "vllm", ray_port=65000)


def test_a_ray_port_taken_on_a_worker_node_fails_its_preflight(ray_job):
    job_dir, stubs = ray_job
    spec = ray_spec(job_dir, free_port())
    write_job_files(spec)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", spec.ray_port + 2))
        taken.listen()
        rc, out = finish(start_role(job_dir, 1, stubs), timeout=30)
    assert rc == 3, out
    assert f"port: Ray's --object-manager-port {spec.ray_port + 2} is already taken on {socket.gethostname()}; set " \
           f"NSDG_SLURM__RAY_PORT to the start of {RAY_PORT_SPAN} free ports" in (job_dir / "preflight-failed").read_text()
    assert not (job_dir / "ray-stub" / "argv-1").exists()


@pytest.mark.parametrize("mpi", ["--mpi=none", "--mpi=pmi2"])
def test_trtllm_refuses_a_launch_without_pmix(mpi):
    refused("one MPI world through PMIx", "trtllm", srun_args=[mpi])


def test_unknown_engine_in_the_image_map():
    refused("keys are engine names", "vllm", images={"vlm": "/x.sqsh"})


def test_apptainer_needs_the_engines_own_image_file():
    message = refused("apptainer needs a local image file", "vllm", container_runtime="apptainer",
                      container_image="/shared/images/nemo-24.05.sif")
    assert "docker://vllm/vllm-openai:v0.20.0-cu129" in message and 'NSDG_SLURM__IMAGES=\'{"vllm": "..."}\'' in message


def test_vllm_refuses_a_nemo_checkpoint_it_can_see(tmp_path):
    nemo_dir = tmp_path / "Nemotron-4-340B-Base"
    nemo_dir.mkdir()
    (nemo_dir / "model_config.yaml").write_text("tensor_model_parallel_size: 8\n")
    refused("Hugging Face checkpoint", "vllm", model=str(nemo_dir))
    (nemo_dir / "config.json").write_text("{}")
    spec_for("vllm", model=str(nemo_dir))  # an HF directory passes


# --- hostile values ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", HOSTILE + [DESTRUCTIVE])
def test_served_model_name_is_one_word(name, tmp_path):
    settings, profile = settings_for("vllm")
    settings = settings.model_copy(update={"model": settings.model.model_copy(update={"name": name})})
    spec = SbatchSpec.from_settings(settings, profile, job_name="nsdg-engine-test", comment="nsdg run=engine-test",
                                    job_dir=str(tmp_path))
    launcher = render_node_launcher(spec)
    bash_n(launcher, tmp_path)
    words = assigned_array(launcher, "SERVER_CMD", tmp_path)
    assert words[words.index("--served-model-name") + 1] == name
    assert not (tmp_path / "PWNED").exists()


# --- nemotron-sdg render --engine --------------------------------------------------------------------


def test_render_shows_any_engine(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert cli_main(["render", "--profile", "h100x16", "--engine", "vllm", "--model-path", HF]) == 0
    out = capsys.readouterr().out
    assert "--distributed-executor-backend ray" in out and "#SBATCH --ntasks-per-node=1" in out
    assert "--generation-config vllm" in out  # the checkpoint's generation_config.json fills nothing (audit S5)
    assert 'RAY_raylet_start_wait_time_s="${RAY_raylet_start_wait_time_s:-120}"' in out  # audit S3
    assert cli_main(["render", "--profile", "h200x8", "--engine", "trtllm", "--model-path", HF]) == 0
    assert "trtllm-llmapi-launch trtllm-serve" in capsys.readouterr().out
    assert cli_main(["render", "--profile", "h100x16", "--engine", "custom"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nemotron-sdg render: ") and "NSDG_SERVER__COMMAND" in err and err.count("\n") == 1


# --- the Ray roles, run with bash --------------------------------------------------------------------


def ray_spec(job_dir: Path, port: int, wait_s: int = 60,
             env: tuple[tuple[str, str], ...] = (("RAY_HEAD_IP", "127.0.0.1"),)) -> SbatchSpec:
    """Both roles on this host: the head's loopback address is given, as a single-host site would."""
    return SbatchSpec(job_name="nsdg-ray-test", job_dir=str(job_dir), comment="nsdg run=ray-test", nodes=2,
                      tasks_per_node=8, gpus_per_node=8, tensor_parallel=8, pipeline_parallel=2, engine="vllm",
                      container_runtime="none", model_path=write_hf_model(job_dir.parent / "model"), port=port,
                      ray_port=free_ray_port(port),
                      launch_wait_s=wait_s, env=(("PYTHONPATH", str(Path(__file__).resolve().parents[1])), *env))


def start_role(job_dir: Path, node: int, stubs: Path) -> subprocess.Popen:
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "SLURM_NODEID": str(node),
           "SLURM_PROCID": str(node), "SLURM_JOB_ID": "77", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}
    return subprocess.Popen(["bash", str(job_dir / "node-launcher.sh")], cwd=job_dir, env=env,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def listening(port: int) -> bool | None:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return None


def stub_pids(job_dir: Path, name: str) -> list[int]:
    """Processes running a stand-in from this test (their argv names the stub's path)."""
    out = subprocess.run(["pgrep", "-f", str(job_dir.parent / "bin" / name)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


@pytest.fixture
def ray_job(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    job_dir = root / "job"
    job_dir.mkdir()
    return job_dir, write_engine_stubs(root / "bin")


def test_a_head_whose_hostname_resolves_to_loopback_is_refused_at_once(ray_job):
    """Audit L1: a node name mapped to 127.0.1.1 (Debian's /etc/hosts) made the head advertise an
    address no other node reaches; vLLM then waited 30 minutes for a placement group on 16 GPUs."""
    job_dir, stubs = ray_job
    # The node's own name otherwise: the preflight checks that it resolves (getent hosts) first.
    real = shutil.which("hostname")
    (stubs / "hostname").write_text(f'#!/bin/sh\n[ "$1" = --ip-address ] && echo 127.0.1.1 || exec {real} "$@"\n')
    (stubs / "hostname").chmod(0o755)
    write_job_files(ray_spec(job_dir, free_port(), env=()))
    head = start_role(job_dir, 0, stubs)
    try:
        out, _ = head.communicate(timeout=30)
    finally:
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGKILL)
    assert head.returncode == 1
    assert f"hostname --ip-address gives '127.0.1.1' on {socket.gethostname()}, which the other nodes cannot reach: set RAY_HEAD_IP" in out.decode()
    assert not (job_dir / "ray-head").exists() and not stub_pids(job_dir, "ray")


def test_ray_head_waits_for_the_worker_then_serves(ray_job):
    job_dir, stubs = ray_job
    port = free_port()
    spec = ray_spec(job_dir, port)
    write_job_files(spec)
    head = start_role(job_dir, 0, stubs)
    worker = None
    try:
        poll_until(lambda: True if (job_dir / "ray-head").exists() else None, deadline=Deadline(30), interval=0.05,
                   what="the head's address")
        assert not (job_dir / "ray-stub" / "vllm-argv").exists(), "vllm started before the worker joined"
        worker = start_role(job_dir, 1, stubs)
        poll_until(lambda: listening(port), deadline=Deadline(60), interval=0.1, what="the server behind vllm serve")
        stub_state = job_dir / "ray-stub"
        head_argv, worker_argv = (json.loads((stub_state / f"argv-{n}").read_text()) for n in (0, 1))
        address = (stub_state / "head").read_text()
        # Ray's ports fixed from the head's (audit S3), each node's and the head's own.
        node_ports, head_ports = ray_ports(spec)
        assert head_argv == ["start", "--head", "--node-ip-address=127.0.0.1", f"--port={spec.ray_port}", *node_ports,
                             *head_ports, "--block"]
        assert worker_argv == ["start", f"--address={address}", "--node-ip-address=127.0.0.1", *node_ports, "--block"]
        assert node_ports[0] == f"--node-manager-port={spec.ray_port + 1}"
        assert node_ports[-1] == f"--max-worker-port={spec.ray_port + RAY_PORT_SPAN - 1}"
        assert json.loads((stub_state / "vllm-argv").read_text())[:3] == ["serve", str(job_dir.parent / "model"),
                                                                          "--served-model-name"]
        for proc in (worker, head):
            os.kill(proc.pid, signal.SIGTERM)
        (rc_w, out_w), (rc_h, out_h) = finish(worker), finish(head)
    finally:
        for proc in (p for p in (head, worker) if p is not None):
            finish(proc, timeout=0.1) if proc.poll() is None else None
    # The server's own code (the stand-in stops cleanly on SIGTERM); a worker's Ray ending is never 0.
    assert rc_h == 0 and rc_w == 1, out_h + out_w
    assert "received SIGTERM" in out_h and "received SIGTERM" in out_w
    assert "the Ray cluster shows 16 GPUs" in out_h
    assert all(gone(pid) for name in ("ray", "vllm") for pid in stub_pids(job_dir, name)), "a role left a process"
    assert listening(port) is None


def test_worker_without_a_head_gives_up_at_its_deadline(ray_job):
    job_dir, stubs = ray_job
    write_job_files(ray_spec(job_dir, free_port(), wait_s=1))
    rc, out = finish(start_role(job_dir, 1, stubs), timeout=30)
    assert rc == 1 and "no Ray head published" in out, out


def test_head_without_its_workers_gives_up_and_stops_ray(ray_job):
    job_dir, stubs = ray_job
    write_job_files(ray_spec(job_dir, free_port(), wait_s=2))
    rc, out = finish(start_role(job_dir, 0, stubs), timeout=30)
    assert rc == 1 and "did not show 16 GPUs within 2s" in out, out
    assert not (job_dir / "ray-stub" / "vllm-argv").exists()
    assert all(gone(pid) for pid in stub_pids(job_dir, "ray")), "the Ray head outlived its launcher"


def test_a_worker_whose_ray_exits_ends_its_task_non_zero(ray_job):
    """`ray start --block` returning 0 would leave srun's step running without that node's GPUs."""
    job_dir, stubs = ray_job
    write_job_files(ray_spec(job_dir, free_port()))
    (job_dir / "ray-stub").mkdir()
    (job_dir / "ray-stub" / "head").write_text("127.0.0.1:6379")  # a head on this host, which the worker reaches
    (job_dir / "ray-head").write_text("77.0 127.0.0.1:6379\n")
    worker = start_role(job_dir, 1, stubs)
    poll_until(lambda: stub_pids(job_dir, "ray") or None, deadline=Deadline(30), interval=0.05, what="the Ray worker")
    poll_until(lambda: True if (job_dir / "ray-stub" / "node-1").exists() else None, deadline=Deadline(30),
               interval=0.05, what="the worker's registration")
    for pid in stub_pids(job_dir, "ray"):
        os.kill(pid, signal.SIGTERM)  # the stand-in exits 0, as `ray start --block` may when Ray stops
    rc, out = finish(worker, timeout=30)
    assert rc == 1 and "Ray worker exited with code 0" in out, out


def test_a_requeued_job_does_not_join_the_last_starts_head(ray_job):
    job_dir, stubs = ray_job
    write_job_files(ray_spec(job_dir, free_port(), wait_s=1))
    (job_dir / "ray-head").write_text("76.0 10.0.0.1:6379\n")  # another job's (or start's) head
    rc, out = finish(start_role(job_dir, 1, stubs), timeout=30)
    assert rc == 1 and "no Ray head published" in out, out
    assert not (job_dir / "ray-stub" / "argv-1").exists()


@pytest.mark.parametrize("engine", ["vllm", "trtllm"])
def test_openai_only_engines_refuse_the_nemo_api(engine):
    assert "NSDG_SERVER__API" in refused("serves only /v1/completions", engine, server={"api": "nemo-generate"})
    settings, name = settings_for(engine)  # the engine's own API, or a command of one's own, is fine
    own = settings.model_copy(update={"server": settings.server.model_copy(
        update={"api": "nemo-generate", "command": ["serve", "--port", "{port}"]})})
    for s in (settings, own):
        SbatchSpec.from_settings(s, name, job_name="nsdg-engine-test", comment="nsdg run=engine-test", job_dir="/shared/jobs/e1")


# --- the driver floor of the engine's image (the in-job preflight, run with bash) --------------------


def one_node_vllm(job_dir: Path, image: str) -> SbatchSpec:
    return SbatchSpec(job_name="nsdg-driver-test", job_dir=str(job_dir), comment="nsdg run=driver-test", nodes=1,
                      tasks_per_node=8, gpus_per_node=8, tensor_parallel=8, pipeline_parallel=1, engine="vllm",
                      container_image=image, model_path=write_hf_model(job_dir.parent / "model"), port=free_port())


@pytest.mark.parametrize("image, driver, floor", [("vllm/vllm-openai:v0.20.0", "570.124.06", "580.65.06"),
                                                  ("vllm/vllm-openai:v0.20.0-cu129", "470.256.02", "525.60.13")])
def test_a_driver_older_than_the_images_cuda_fails_the_preflight(ray_job, image, driver, floor):
    """Audit L3: vLLM's plain v0.20.0 tag is its CUDA 13.0 build; on an R570 node it would fail at
    the first CUDA call, after the load. The preflight says so in one line, in seconds."""
    job_dir, stubs = ray_job
    write_job_files(one_node_vllm(job_dir, image))
    proc = subprocess.Popen(["bash", str(job_dir / "node-launcher.sh")], cwd=job_dir, start_new_session=True,
                            env={**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "SLURM_PROCID": "0",
                                 "STUB_DRIVER_VERSION": driver}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    rc, out = finish(proc)
    assert rc == 3, out
    line = (job_dir / "preflight-failed").read_text().strip()
    assert line.endswith(f"driver: NVIDIA driver {driver} on {socket.gethostname()}, the image's CUDA needs {floor} "
                         "or newer; use an image built for an older CUDA (e.g. vLLM's -cu129 tags, 525.60.13) or ask "
                         "the site's operators for a newer driver"), line
    assert "server started" not in out


def test_a_driver_at_the_images_floor_passes_and_the_site_may_lower_it(ray_job):
    job_dir, stubs = ray_job
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "SLURM_PROCID": "0"}
    for image, extra in (("vllm/vllm-openai:v0.20.0-cu130", {"STUB_DRIVER_VERSION": "580.65.06"}),
                         ("vllm/vllm-openai:v0.20.0", {"STUB_DRIVER_VERSION": "570.124.06", "NSDG_DRIVER_MIN": "570"})):
        write_job_files(one_node_vllm(job_dir, image))
        proc = subprocess.Popen(["bash", str(job_dir / "node-launcher.sh")], cwd=job_dir, start_new_session=True,
                                env={**env, **extra}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        # The server (the vllm stand-in) runs on after the preflight: read up to its verdict, then
        # end the launcher's group (a timer bounds the read should neither line come).
        timer = threading.Timer(30, os.killpg, (proc.pid, signal.SIGKILL))
        timer.start()
        seen, out = "", []
        try:
            for raw in iter(proc.stdout.readline, b""):
                out.append(raw.decode(errors="replace"))
                if "preflight passed" in out[-1] or "preflight failed" in out[-1]:
                    seen = out[-1]
                    break
        finally:
            timer.cancel()
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        assert "preflight passed" in seen, "".join(out)
        assert not (job_dir / "preflight-failed").exists()
