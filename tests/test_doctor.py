"""`nemotron-sdg doctor`: each check's ok and problem line, from the CLI in a subprocess, against
the local Slurm cluster and the session's Prefect server (basic auth on)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures_prefect import clean_env
from tests.fixtures_slurm import slurm_test_env
from tests.ports import free_port

REPO = Path(__file__).resolve().parents[1]


def doctor(env: dict[str, str], cwd: Path, *args: str) -> tuple[int, dict[str, tuple[str, str]], str]:
    out = subprocess.run([sys.executable, "-m", "flows.cli", "doctor", "--profile", "test1x8", *args], cwd=cwd,
                         env={**clean_env(), "PYTHONPATH": str(REPO), **env}, capture_output=True, text=True,
                         timeout=120)
    assert "Traceback" not in out.stderr, out.stderr
    lines = {}
    for line in out.stdout.splitlines():
        status, _, rest = line.partition(" ")
        name, _, detail = rest.strip().partition(": ")
        lines[name] = (status, detail)
    return out.returncode, lines, out.stdout


def site_env(tmp_path: Path, tiny_model_dir: Path) -> dict[str, str]:
    """A working setup for the local cluster: apptainer with an image file here, the tiny model
    (and its tokenizer) as the model, the engine's own command (so the model path counts)."""
    image = tmp_path / "images" / "nemo.sif"
    image.parent.mkdir()
    image.write_bytes(b"")
    return {**slurm_test_env(tmp_path, free_port(), simulated_server=False),
            "NSDG_SLURM__CONTAINER_RUNTIME": "apptainer", "NSDG_SLURM__CONTAINER_IMAGE": str(image),
            "NSDG_SLURM__PARTITION": "debug", "NSDG_MODEL__PATH": str(tiny_model_dir),
            "NSDG_OUTPUT_URI": str(tmp_path / "out" / "runs")}


@pytest.mark.slurm
def test_a_working_setup_is_all_ok(slurm_cluster, prefect_server, tiny_model_dir, tmp_path):
    rc, lines, out = doctor({**site_env(tmp_path, tiny_model_dir), **prefect_server.client_env()}, tmp_path)
    assert rc == 0, out
    expected = ["settings", "profile", "launch", "slurm", "partition", "account", "image", "driver", "model", "job_root",
                "tokenizer", "output", "port", "prefect"]
    assert list(lines) == expected, out
    assert all(status == "ok" for name, (status, _) in lines.items() if name != "driver"), out
    # An image file's name says no CUDA build: the preflight checks no driver floor, and doctor says so.
    assert lines["driver"] == ("skip", "no driver floor: the tag of " + str(tmp_path / "images" / "nemo.sif") +
                               " names no CUDA build the preflight knows"), out
    assert lines["partition"][1] == "debug is up"
    assert not (tmp_path / "out").exists()  # the output probe left nothing behind


@pytest.mark.slurm
def test_each_broken_setting_is_named_with_its_fix(slurm_cluster, prefect_server, tiny_model_dir, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        env = {**site_env(tmp_path, tiny_model_dir), "NSDG_SLURM__PARTITION": "gpu-nope",
               "NSDG_SLURM__ACCOUNT": "proj-x",
               "NSDG_SLURM__CONTAINER_IMAGE": str(tmp_path / "images" / "missing.sif"),
               "NSDG_MODEL__PATH": str(tmp_path / "no-model"), "NSDG_MODEL__TOKENIZER": str(tmp_path / "no-tok.json"),
               "NSDG_SLURM__JOB_ROOT": str(a_file / "jobs"), "NSDG_OUTPUT_URI": str(a_file / "out"),
               "NSDG_SERVER__PORT": str(taken.getsockname()[1]),
               "PREFECT_API_URL": prefect_server.api_url, "PREFECT_API_AUTH_STRING": "nsdg-test:wrong"}
        rc, lines, out = doctor(env, tmp_path, "--json")
    assert rc == 2
    checks = {c["name"]: c for c in json.loads(out)}
    problems = {name for name, c in checks.items() if c["status"] == "problem"}
    assert problems == {"launch", "partition", "image", "model", "job_root", "tokenizer", "output", "port", "prefect"}, out
    assert "'gpu-nope' is not a partition here (sinfo lists debug)" in checks["partition"]["detail"]
    assert checks["account"]["status"] == "skip"  # no accounting database on the local cluster
    assert "no accounting database" in checks["account"]["detail"]
    assert "missing.sif: no such file" in checks["image"]["detail"]
    assert "not found on this host" in checks["model"]["detail"]
    assert "not writable" in checks["job_root"]["detail"] and "not writable" in checks["output"]["detail"]
    assert "is taken on this host" in checks["port"]["detail"]
    assert "refused the credentials (HTTP 401)" in checks["prefect"]["detail"]


def test_settings_that_do_not_load_are_one_line(tmp_path):
    rc, lines, out = doctor({"NSDG_SERVER__PORT": "80"}, tmp_path)
    assert rc == 2 and list(lines) == ["settings"], out
    assert "NSDG_SERVER__PORT" in lines["settings"][1] and "greater than or equal to 1024" in lines["settings"][1]
    rc, lines, out = doctor({}, tmp_path, "--profile", "nope")
    assert rc == 2 and lines["profile"][0] == "problem" and "Unknown profile 'nope'" in lines["profile"][1], out


def test_no_slurm_on_path_and_no_prefect_server(tmp_path, tiny_model_dir):
    env = {**site_env(tmp_path, tiny_model_dir), "PATH": str(tmp_path / "empty-bin"),
           "PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api"}
    rc, lines, out = doctor(env, tmp_path)
    assert rc == 2, out
    assert lines["slurm"][0] == "problem" and "sbatch, squeue, scontrol not on PATH" in lines["slurm"][1]
    assert lines["partition"][0] == lines["account"][0] == "skip"
    assert lines["prefect"][0] == "problem" and "does not answer" in lines["prefect"][1]
    assert lines["model"][0] == lines["tokenizer"][0] == lines["output"][0] == "ok", out


@pytest.mark.parametrize("image, env, line", [
    ("vllm/vllm-openai:v0.20.0", {}, "ok: the nodes need NVIDIA driver 580.65.06 or newer (the CUDA build of "
                                     "vllm/vllm-openai:v0.20.0); the job's preflight refuses an older one"),
    ("vllm/vllm-openai:v0.20.0-cu129", {}, "ok: the nodes need NVIDIA driver 525.60.13 or newer"),
    ("vllm/vllm-openai:v0.20.0", {"NSDG_DRIVER_MIN": "570"},
     "ok: the nodes need NVIDIA driver 570 or newer (NSDG_DRIVER_MIN in NSDG_SLURM__ENV)"),
    ("vllm/vllm-openai:v0.20.0", {"NSDG_DRIVER_MIN": "0"}, "ok: any driver: NSDG_DRIVER_MIN in NSDG_SLURM__ENV is 0"),
])
def test_doctor_reports_the_driver_floor_the_jobs_preflight_enforces(tmp_path, tiny_model_dir, image, env, line):
    """The floor comes from the definition the node launcher is rendered from (infra/slurm/launch.py)."""
    from infra.settings import Settings
    from infra.slurm.backend import check_launch
    from infra.slurm.launch import enforced_driver_floor

    site = {**site_env(tmp_path, tiny_model_dir), "PATH": str(tmp_path / "empty-bin"), "NSDG_SLURM__CONTAINER_RUNTIME": "pyxis",
            "NSDG_SLURM__IMAGES": json.dumps({"vllm": image}), "NSDG_SLURM__ENV": json.dumps(env)}
    rc, lines, out = doctor(site, tmp_path, "--engine", "vllm")
    status, detail = lines["driver"]
    assert f"{status}: {detail}".startswith(line), out
    with pytest.MonkeyPatch.context() as mp:
        for name, value in site.items():
            mp.setenv(name, value)
        settings = Settings(_env_file=None)
        spec = check_launch(settings, settings.profile("test1x8").model_copy(update={"engine": "vllm"}), run_id="d")
    floor, _ = enforced_driver_floor(spec, dict(spec.env))
    assert f"driver {floor} or newer" in detail or floor == "0"


@pytest.mark.slurm
def test_trtllm_needs_srun_to_list_pmix(slurm_cluster, tiny_model_dir, tmp_path):
    env = site_env(tmp_path, tiny_model_dir)
    rc, lines, out = doctor(env, tmp_path, "--engine", "trtllm")
    assert lines["mpi"][0] == "ok" and "srun lists the pmix plugin" in lines["mpi"][1], out
    # A Slurm built without the plugin: srun (a stand-in, first on PATH) lists none.
    stubs = tmp_path / "stub-bin"
    stubs.mkdir()
    (stubs / "srun").write_text("#!/bin/sh\nprintf 'MPI plugin types are...\\n\\tnone\\n\\tpmi2\\n'\n")
    (stubs / "srun").chmod(0o755)
    rc, lines, out = doctor({**env, "PATH": f"{stubs}:{os.environ['PATH']}"}, tmp_path, "--engine", "trtllm")
    assert rc == 2 and lines["mpi"][0] == "problem" and "shows no pmix plugin" in lines["mpi"][1], out
    rc, lines, out = doctor(env, tmp_path)  # nemo: no MPI world, no such check
    assert "mpi" not in lines, out
