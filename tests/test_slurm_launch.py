"""The Slurm launch as a real cluster runs it (issue 11; the findings are in docs/operators.md).

Refusals first: every launch that would break on a real cluster is one ConfigError line before
any job is submitted. Then jobs on the real local Slurm cluster: the ranks' environment, their
CPUs, USR1 as a warning, and a requeue handled as a planned rollover. Rendered lines are in the golden
files (tests/test_slurm_render.py); the stub-run checks of srun/apptainer argv are there too.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest

from flows.cli import main as cli_main
from infra.deadline import Deadline, poll_until
from infra.errors import ConfigError
from infra.settings import Profile, ServerSettings, Settings, SlurmSettings
from infra.slurm.backend import SlurmBackend
from infra.slurm.client import SlurmClient
from infra.slurm.parse import JobState
from infra.slurm.options import pyxis_image
from infra.slurm.render import render_sbatch
from infra.slurm.spec import SIGNAL_MARKER_NAME, SbatchSpec

REPO = Path(__file__).resolve().parents[1]
MODEL = "/lustre/models/Nemotron-4-340B-Base"


def spec(**changes) -> SbatchSpec:
    fields = dict(job_name="nsdg-launch-test", job_dir="/shared/jobs/j1", comment="nsdg run=launch-test flow_run=none",
                  nodes=2, tasks_per_node=8, gpus_per_node=8, tensor_parallel=8, pipeline_parallel=2,
                  model_path=MODEL)
    fields.update(changes)
    return SbatchSpec(**fields)


def refused(match: str, **changes) -> str:
    with pytest.raises(ConfigError, match=match) as info:
        spec(**changes).check_paths_seen_here()
    message = str(info.value)
    assert "\n" not in message, "a user's mistake is one line"
    return message


# --- images ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("image, rendered", [
    ("nvcr.io/nvidia/nemo:24.05", "nvcr.io#nvidia/nemo:24.05"),
    ("me@nvcr.io/nvidia/nemo:24.05", "me@nvcr.io#nvidia/nemo:24.05"),
    ("registry.local:5000/team/nemo:1", "registry.local:5000#team/nemo:1"),
    ("localhost/nemo:1", "localhost#nemo:1"),
    ("nvcr.io#nvidia/nemo:24.05", "nvcr.io#nvidia/nemo:24.05"),
    ("nvidia/cuda:12.4.0-base", "nvidia/cuda:12.4.0-base"),  # Docker Hub: no host to split off
    ("ubuntu:22.04", "ubuntu:22.04"),
    ("/lustre/images/nemo-24.05.sqsh", "/lustre/images/nemo-24.05.sqsh"),
])
def test_pyxis_image_names_the_registry_with_a_hash(image, rendered):
    assert pyxis_image(image) == rendered


DIGEST = "sha256:" + "0123456789abcdef" * 4


@pytest.mark.parametrize("image", ["nvcr.io/nvidia/nemo", "nvcr.io#nvidia/nemo:latest", "vllm/vllm-openai:nightly",
                                   "localhost:5000/nemo", "ubuntu", "nvcr.io/nvidia/nemo@sha256:abc"])
def test_a_floating_image_tag_is_refused(image):
    """Audit S7: two jobs of one run (a replacement, a rollover's successor) could pull different
    engine versions under `latest`; the registry's port is not a tag, a short digest not a pin."""
    message = refused("a floating tag", container_image=image)
    assert "pin a release tag" in message and "@sha256:" in message


@pytest.mark.parametrize("image", ["nvcr.io/nvidia/nemo:24.05", "localhost:5000/nemo:1", f"nvcr.io#nvidia/nemo@{DIGEST}",
                                   f"vllm/vllm-openai:v0.20.0-cu129@{DIGEST}", "/lustre/images/nemo.sqsh"])
def test_a_release_tag_a_digest_or_a_file_pins_the_image(image):
    spec(container_image=image)


def test_the_engines_own_floating_image_names_its_setting():
    settings = Settings(_env_file=None, model={"path": "/lustre/models/hf"},
                        slurm=SlurmSettings(images={"vllm": "vllm/vllm-openai:latest"}),
                        extra_profiles={"p": {"backend": "slurm", "nodes": 1, "gpus_per_node": 8, "tensor_parallel": 8,
                                              "engine": "vllm"}})
    with pytest.raises(ConfigError, match="NSDG_SLURM__IMAGES='vllm/vllm-openai:latest' is not valid: a floating tag"):
        SbatchSpec.from_settings(settings, "p", job_name="nsdg-pin", comment="nsdg run=pin", job_dir="/shared/jobs/p")


@pytest.mark.parametrize("image", ["nvcr.io/nvidia/nemo:24.05", "nvcr.io#nvidia/nemo:24.05",
                                   "docker://nvcr.io/nvidia/nemo:24.05"])
def test_apptainer_needs_a_local_image_and_says_how_to_pull_one(image):
    message = refused("apptainer needs a local image file", container_runtime="apptainer", container_image=image)
    assert "apptainer pull /shared/images/nemo-24.05.sif docker://nvcr.io/nvidia/nemo:24.05" in message
    refused("absolute path", container_runtime="apptainer", container_image="nemo.sif")


@pytest.mark.parametrize("image", ["./nemo.sqsh", "docker://nvcr.io/nvidia/nemo:24.05"])
def test_pyxis_refuses_relative_paths_and_schemes(image):
    assert "enroot import" in refused("container_image", container_image=image)


def test_a_local_image_that_is_missing_where_its_folder_is_visible(tmp_path):
    refused("there is no such file", container_runtime="apptainer", container_image=str(tmp_path / "nemo.sif"))
    (tmp_path / "nemo.sif").write_text("")
    spec(container_runtime="apptainer", container_image=str(tmp_path / "nemo.sif")).check_paths_seen_here()
    spec(container_image="/not/visible/here/nemo.sqsh").check_paths_seen_here()  # left to the nodes


# --- the model ---------------------------------------------------------------------------------------


def test_a_model_path_no_mount_covers_is_refused_when_auto_mount_is_off():
    message = refused("no container mount covers it", mount_model=False)
    assert "NSDG_SLURM__CONTAINER_MOUNTS" in message
    spec(mount_model=False, container_mounts=("/lustre/models:/lustre/models:ro",))  # covered: fine
    spec(mount_model=False, container_runtime="none")  # bare metal: the node's own filesystem


def test_the_model_is_mounted_read_only_unless_a_mount_covers_it():
    assert spec().mounts()[0] == f"{MODEL}:{MODEL}:ro"
    covered = spec(container_mounts=("/data:/lustre",))
    assert covered.mounts() == ["/data:/lustre", "/shared/jobs/j1:/shared/jobs/j1"]
    assert "is inside the mount /data:/lustre" in render_sbatch(covered)
    refused("cannot be mounted", model_path="/lustre/models/a:b")


def test_a_nemo_file_is_refused(tmp_path):
    tar = tmp_path / "Nemotron-4-340B-Base.nemo"
    tar.write_bytes(b"not a directory")
    assert "RAM-backed /tmp" in refused("is a .nemo file", model_path=str(tar))
    refused("is a .nemo file", model_path="/not/visible/Nemotron.nemo")
    plain_file = tmp_path / "model"
    plain_file.write_text("")
    refused("is a .nemo file", model_path=str(plain_file))
    extracted = tmp_path / "extracted.nemo"
    extracted.mkdir()
    spec(model_path=str(extracted)).check_paths_seen_here()


def test_a_checkpoint_of_bin_weights_only_is_refused_for_the_hf_engines(tmp_path):
    """Audit L7: the one-file conversion (pytorch_model.bin, ~680 GB) is torch.load-ed whole by each of a
    node's 8 vLLM workers: the load OOMs after the queue wait."""
    hf = tmp_path / "Nemotron-4-340B-Base-hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "pytorch_model.bin").write_bytes(b"")
    for engine in ("vllm", "trtllm"):
        assert "safe_serialization=True" in refused("no .safetensors", model_path=str(hf), engine=engine)
    (hf / "model-00001-of-00002.safetensors").write_bytes(b"")
    spec(model_path=str(hf), engine="vllm").check_paths_seen_here()


def test_a_per_tensor_fp8_checkpoint_is_refused_for_trtllm(tmp_path):
    """Audit S6: TensorRT-LLM maps quant_method fp8 only with weight_block_size; the community FP8
    checkpoint (per-tensor, dynamic activations) would fail its load, or load wrong."""
    hf = tmp_path / "Nemotron-4-340B-FP8-hf"
    hf.mkdir()
    (hf / "model-00001-of-00002.safetensors").write_bytes(b"")
    (hf / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "fp8",
                                                                        "activation_scheme": "dynamic"}}))
    assert "ModelOpt FP8 export" in refused("per-tensor FP8", model_path=str(hf), engine="trtllm")
    spec(model_path=str(hf), engine="vllm").check_paths_seen_here()  # vLLM loads it
    (hf / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "fp8",
                                                                        "weight_block_size": [128, 128]}}))
    spec(model_path=str(hf), engine="trtllm").check_paths_seen_here()


# --- options that would break the launch ------------------------------------------------------------


@pytest.mark.parametrize("directive, why", [
    ("--gpu-bind=closest", "trainer.devices=8"),
    ("--gpus-per-task=1", "trainer.devices=8"),
    ("--ntasks-per-gpu=1", "trainer.devices=8"),
    ("--gres=gpu:h100:8", "counted twice"),
    ("--gres=nvme:1,gpu:8", "counted twice"),
    ("--mem=0", "NSDG_SLURM__MEM"),
    ("--export=ALL", "NSDG_SLURM__EXPORT"),
    ("--cpus-per-task=4", "NSDG_SLURM__CPUS_PER_TASK"),
    ("--requeue", "NSDG_SLURM__REQUEUE"),
    ("--no-requeue", "the default"),
    ("--propagate=ALL", "NSDG_SLURM__PROPAGATE"),
    # A step-level signal reaches the server itself (the local cluster's srun killed a `sleep`
    # server with it although the launcher traps it); only the batch shell's can be a warning.
    ("--signal=USR1@300", "--signal=B:"),
])
def test_extra_directives_that_break_the_launch_say_why(directive, why):
    assert why in refused("extra_directives", extra_directives=(directive,))


def test_mem_per_cpu_needs_the_mem_setting_off():
    refused("next to --mem=0", extra_directives=("--mem-per-cpu=8G",))
    assert "#SBATCH --mem-per-cpu=8G" in render_sbatch(spec(extra_directives=("--mem-per-cpu=8G",), mem=None))


@pytest.mark.parametrize("arg, why", [
    ("--gpu-bind=none", "trainer.devices=8"),
    ("--gpus-per-task=1", "trainer.devices=8"),
    ("--ntasks=4", "one task per GPU"),
    ("-n4", "one task per GPU"),
    ("-o", "log, which the flow reads"),
    ("--error=/tmp/x", "log, which the flow reads"),
    ("--distribution=cyclic", "NVLink"),
    ("--container-mount-home", "pip --user"),
    ("--overcommit", "allowed options are"),
    ("--mpi=pmix x", "no spaces"),
])
def test_disallowed_srun_args_are_refused(arg, why):
    assert why in refused("srun_args", srun_args=(arg,))


def test_allowed_srun_args_render_on_the_srun_line(tmp_path):
    text = render_sbatch(spec(srun_args=("--mpi=pmix", "--cpu-bind=none", "--wait=10", "--container-writable")))
    assert "SRUN_ARGS=(--mpi=pmix --cpu-bind=none --wait=10 --container-writable)" in text
    refused("needs container_runtime 'pyxis'", srun_args=("--container-writable",), container_runtime="none")


@pytest.mark.parametrize("env, match", [
    ({"AWS_SECRET_ACCESS_KEY": "x"}, "keep secrets out"),
    ({"HF_TOKEN": "x"}, "keep secrets out"),
    ({"WANDB_API_KEY": "x"}, "keep secrets out"),
    ({"SLURM_CPUS_PER_TASK": "4"}, "not SLURM_"),
    ({"BAD-NAME": "x"}, "variable name"),
    ({"NCCL_DEBUG": "INFO\nrm -rf /"}, "control characters"),
])
def test_bad_site_env_is_refused(env, match):
    refused(match, env=tuple(env.items()))


@pytest.mark.parametrize("name", ["VIRTUAL_ENV", "PYTHONPATH", "AWS_SECRET_ACCESS_KEY", "NSDG_S3__SECRET_ACCESS_KEY",
                                  "PREFECT_API_KEY", "GITHUB_TOKEN", "ALL", "A=1"])
def test_export_list_keeps_the_orchestrator_and_secrets_out(name):
    refused("slurm.export", export=(name,))


def test_setup_lines_are_one_line_each():
    refused("slurm.setup", setup=("module load a\nmodule load b",))
    refused("slurm.setup", setup=("",))


def test_settings_reach_the_spec(tmp_path):
    settings = Settings(_env_file=None, model={"path": MODEL}, slurm=SlurmSettings(
        env={"NCCL_DEBUG": "INFO"}, setup=["module load nemo"], srun_args=["--mpi=pmix"], mem="", propagate="",
        requeue=True, cpus_per_task=4, gpu_request="gres", export=["PATH"]))
    built = SbatchSpec.from_settings(settings, "h200x8", job_name="nsdg-x", comment="c", job_dir=tmp_path)
    assert (built.env, built.setup, built.srun_args, built.mem, built.propagate) == (
        (("NCCL_DEBUG", "INFO"),), ("module load nemo",), ("--mpi=pmix",), None, None)
    assert (built.requeue, built.cpus_per_task, built.gpu_request, built.export) == (True, 4, "gres", ("PATH",))


def test_render_refuses_with_one_line_and_exit_code_2(monkeypatch, capsys):
    monkeypatch.setenv("NSDG_SLURM__CONTAINER_RUNTIME", "apptainer")
    assert cli_main(["render", "--profile", "h100x16", "--model-path", MODEL]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "apptainer pull" in err
    monkeypatch.setenv("NSDG_SLURM__CONTAINER_RUNTIME", "pyxis")
    monkeypatch.setenv("NSDG_SLURM__EXTRA_DIRECTIVES", '["--gpu-bind=closest"]')
    assert cli_main(["render", "--profile", "h100x16", "--model-path", MODEL]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--gpu-bind is refused" in err


# --- a requeue, as the backend sees it ----------------------------------------------------------------


class RecordedSlurm:
    """Answers squeue/scontrol from a script of states, as SlurmClient's runner: the branch where
    a requeued job runs again on other nodes cannot be reached on the local cluster (Slurm holds a
    requeued job for two minutes, and both its nodes share one address)."""

    def __init__(self, states: list[tuple[str, str]]):
        self.states, self.now = states, 0

    def __call__(self, argv, *, timeout, check=True):
        from infra.system.commands import CommandResult

        state, nodes = self.states[min(self.now, len(self.states) - 1)]
        if argv[:2] == ["squeue", "-h"] and "-j" in argv:
            out = f"77|{state}|None|{nodes}\n"
        elif argv[:3] == ["scontrol", "show", "job"]:
            out = f"JobId=77 JobName=nsdg-x JobState={state} NodeList={nodes} Reason=None\n"
        elif argv[:3] == ["scontrol", "show", "hostnames"]:
            out = "\n".join(nodes.split(",")) + "\n"
        elif argv[:3] == ["scontrol", "show", "node"]:
            out = f"NodeName={argv[3]} NodeAddr=10.0.0.{argv[3][-1]} State=ALLOCATED\n"
        else:
            raise AssertionError(f"unexpected command {argv}")
        return CommandResult(list(argv), 0, out, "")


def recorded_backend(tmp_path, states) -> tuple[SlurmBackend, RecordedSlurm]:
    runner = RecordedSlurm(states)
    settings = Settings(_env_file=None, slurm=SlurmSettings(job_root=str(tmp_path), container_runtime="none", poll_s=0.001))
    backend = SlurmBackend(settings, settings.profile("h200x8"), run_id="rq", client=SlurmClient(runner=runner))
    backend.job_ids.append("77")
    return backend, runner


def step(runner: RecordedSlurm) -> None:
    runner.now += 1
    time.sleep(0.002)


def test_a_requeued_job_is_a_lost_server_and_its_url_is_looked_up_again(tmp_path):
    backend, runner = recorded_backend(tmp_path, [("RUNNING", "node1"), ("RUNNING", "node2")])
    assert backend.url() == "http://10.0.0.1:1424" and backend.dead_reason() is None
    step(runner)
    assert backend.url() == "http://10.0.0.2:1424"
    assert "was requeued: it ran on node1 and now runs on node2" in backend.dead_reason()


@pytest.mark.parametrize("after", ["PENDING", "REQUEUED", "CONFIGURING"])
def test_a_job_back_in_the_queue_after_running_was_requeued(tmp_path, after):
    backend, runner = recorded_backend(tmp_path, [("PENDING", ""), ("RUNNING", "node1"), (after, "")])
    assert backend.dead_reason() is None  # pending before it ever ran: just waiting
    step(runner)
    assert backend.dead_reason() is None
    step(runner)
    assert "was requeued" in backend.dead_reason()


# --- on the local Slurm cluster ------------------------------------------------------------------------

PROFILES = {"t2x8": Profile(backend="slurm", nodes=2, gpus_per_node=8, tensor_parallel=8, pipeline_parallel=2),
            "t1x1": Profile(backend="slurm", nodes=1, gpus_per_node=1, tensor_parallel=1, pipeline_parallel=1)}


def cluster_backend(tmp_path, profile: str, command: list[str], **slurm) -> SlurmBackend:
    settings = Settings(_env_file=None, slurm=SlurmSettings(container_runtime="none", job_root=str(tmp_path / "jobs"),
                                                              time_limit="00:05:00", **slurm),
                        server=ServerSettings(command=command))
    return SlurmBackend(settings, PROFILES[profile], run_id=f"launch-{profile}")


def wait_state(backend: SlurmBackend, states: set[str], seconds: float = 90) -> JobState:
    return poll_until(lambda: (st if (st := backend.client.state(backend.job_id)).state in states else None),
                      deadline=Deadline(seconds), interval=0.3, what=f"job {backend.job_id} to be one of {states}")


# Each rank writes its environment, its CPU count and (rank 0) the step's allocation, then exits.
RANK_REPORT = r"""
out="$1"
env > "$out/env-$SLURM_PROCID"
nproc > "$out/nproc-$SLURM_PROCID"
if [ "$SLURM_PROCID" = 0 ]; then scontrol show step "$SLURM_JOB_ID.$SLURM_STEP_ID" -o > "$out/step"; fi
"""


@pytest.mark.slurm
def test_ranks_get_the_site_env_and_their_cpus_but_not_the_orchestrators_env(slurm_cluster, tmp_path, monkeypatch):
    out = tmp_path / "report"
    out.mkdir()
    venv_bin = tmp_path / "orchestrator-venv" / "bin"  # what an activated .venv puts first on PATH
    venv_bin.mkdir(parents=True)
    (venv_bin.parent / "pyvenv.cfg").write_text("home = /usr/bin\n")
    monkeypatch.setenv("PATH", f"{venv_bin}:{os.environ['PATH']}")
    monkeypatch.setenv("VIRTUAL_ENV", str(venv_bin.parent))
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-s3cr3t-value")
    monkeypatch.setenv("NSDG_S3__SECRET_ACCESS_KEY", "nsdg-s3cr3t-value")
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", "nsdg:prefect-s3cr3t-value")
    site_env = {"NCCL_SOCKET_IFNAME": "lo", "NCCL_IB_HCA": "mlx5_0,mlx5_1", "NCCL_DEBUG": "INFO"}
    backend = cluster_backend(tmp_path, "t2x8", ["bash", "-c", RANK_REPORT, "rank-report", str(out)], env=site_env)
    backend.start()
    try:
        final = wait_state(backend, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"})
    finally:
        backend.release()
    assert final.state == "COMPLETED", backend.logs()
    envs = {int(p.name.split("-")[1]): dict(line.split("=", 1) for line in p.read_text().splitlines() if "=" in line)
            for p in out.glob("env-*")}
    assert sorted(envs) == list(range(16))
    for rank, env in envs.items():
        assert {k: env.get(k) for k in site_env} == site_env, rank
        assert "VIRTUAL_ENV" not in env and "PYTHONPATH" not in env, rank
        assert str(venv_bin) not in env["PATH"], rank
        assert env["PYTHONNOUSERSITE"] == "1" and env["HYDRA_FULL_ERROR"] == "1"
        # 16 CPUs per node shared by 8 ranks: srun got --cpus-per-task=2.
        assert env["SLURM_CPUS_PER_TASK"] == "2", rank
    text = "".join(p.read_text() for p in out.glob("env-*"))
    assert "s3cr3t" not in text
    # The step was allocated 2 CPUs per task (the local cluster's task/none binds nothing, so
    # `nproc` shows this machine's CPUs; it is recorded, not asserted).
    assert "TRES=cpu=32," in (out / "step").read_text()
    assert all(int((out / f"nproc-{r}").read_text()) >= 1 for r in range(16))


@pytest.mark.slurm
def test_usr1_is_a_warning_noted_in_the_job_dir(slurm_cluster, tmp_path):
    backend = cluster_backend(tmp_path, "t1x1", ["sleep", "120"])
    backend.start()
    marker = backend.job_dir / SIGNAL_MARKER_NAME
    try:
        wait_state(backend, {"RUNNING"})
        poll_until(lambda: True if (backend.job_dir / "rank0-host").exists() else None, deadline=Deadline(30),
                   interval=0.2, what="rank 0 to start")
        subprocess.run(["scancel", "--signal=USR1", "--batch", backend.job_id], check=True, timeout=30)
        poll_until(lambda: True if marker.exists() else None, deadline=Deadline(30), interval=0.2,
                   what=f"{marker} after USR1 to the batch shell")
        assert "signal=USR1" in marker.read_text() and "by=batch" in marker.read_text()
        time.sleep(2)  # a job the signal killed would be COMPLETING or gone by now
        assert backend.client.state(backend.job_id).state == "RUNNING", backend.logs()
    finally:
        backend.release()


@pytest.mark.slurm
def test_requeue_is_refused_by_default(slurm_cluster, tmp_path):
    backend = cluster_backend(tmp_path, "t1x1", ["sleep", "120"])
    backend.start()
    try:
        wait_state(backend, {"RUNNING"})
        result = subprocess.run(["scontrol", "requeue", backend.job_id], capture_output=True, text=True, timeout=30)
        assert result.returncode != 0 and "disabled" in result.stderr
    finally:
        backend.release()


@pytest.mark.slurm
@pytest.mark.integration
def test_a_requeued_job_is_replaced_and_nothing_is_lost(prefect_harness, slurm_cluster, workdir, monkeypatch, caplog):
    from flows.generate import generate
    from tests.fixtures_slurm import slurm_test_env
    from tests.ports import free_port

    profiles = {"t1x8": PROFILES["t2x8"].model_copy(update={"nodes": 1, "pipeline_parallel": 1}).model_dump()}
    for name, value in slurm_test_env(workdir, free_port(span=8), "--extra-latency", "0.2", profiles=profiles).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("NSDG_SLURM__REQUEUE", "true")
    src = workdir / "in.jsonl"
    src.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"requeue prompt {i}"}) + "\n" for i in range(80)))
    run_dir = workdir / "out" / "slurm-requeue"
    requeued: list[str] = []

    def requeue_after_first_part():
        poll_until(lambda: True if list(run_dir.glob("part-*.state.json")) else None,
                   deadline=Deadline(120), interval=0.2, what="the first published part")
        jobs = [j.job_id for j in SlurmClient().active_jobs() if "run=slurm-requeue " in (j.comment or "")]
        subprocess.run(["scontrol", "requeue", jobs[0]], check=True, timeout=30)
        requeued.append(jobs[0])

    thread = threading.Thread(target=requeue_after_first_part, daemon=True)
    thread.start()
    with caplog.at_level(logging.WARNING):
        generate(input_uri=str(src), output_uri="out", run_id="slurm-requeue", profile="t1x8", shard_size=10,
                 batch_size=5)
    thread.join(timeout=5)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    ids = [json.loads(line)["id"] for p in manifest["parts"] for line in (run_dir / p["name"]).read_text().splitlines()]
    assert ids == [f"q{i}" for i in range(80)]  # every record exactly once, in order
    # A requeue (as a preemption) is the cluster's doing: a planned rollover, not a server restart.
    assert requeued and manifest["server_restarts"] == 0 and manifest["slurm_job_ids"][0] == requeued[0]
    assert manifest["rollovers"]["count"] == 1
    assert len(manifest["slurm_job_ids"]) == 2
    assert re.search(rf"Slurm job {requeued[0]} was requeued", caplog.text), caplog.text[-3000:]
    active = [j for j in SlurmClient().active_jobs() if "run=slurm-requeue " in (j.comment or "")]
    assert not active, f"left in squeue: {active}"


@pytest.mark.integration
def test_a_bad_launch_setting_fails_the_flow_before_the_input_is_read(prefect_harness, workdir, tmp_path, monkeypatch):
    from flows.generate import generate

    model = tmp_path / "Nemotron-4-340B-Base.nemo"
    model.write_bytes(b"not a directory")
    monkeypatch.setenv("NSDG_MODEL__PATH", str(model))
    # The input does not exist: had the plan run first, this would be the error.
    with pytest.raises(ConfigError, match=r"\.nemo") as exc:
        generate(input_uri=str(tmp_path / "missing.jsonl"), output_uri=str(workdir / "out"), run_id="r1", profile="h200x8")
    assert "missing.jsonl" not in str(exc.value)
    assert not (workdir / "out" / "r1").exists()  # nothing was written either
