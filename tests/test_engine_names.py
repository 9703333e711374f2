"""What each engine lists in /v1/models, and what the client expects (engine-launch-audit B1, L6)."""

from __future__ import annotations

import pytest

from infra.backends.ready import make_client
from infra.engines import readiness
from infra.errors import ServerNotReady
from infra.settings import Profile, load_settings
from tests.localserver import running_server

MODEL_PATH = "/lustre/models/Nemotron-4-340B-Base-hf"


def trtllm_profile(**kw) -> Profile:
    return Profile(backend="slurm", engine="trtllm", nodes=2, gpus_per_node=8, tensor_parallel=8, pipeline_parallel=2, **kw)


@pytest.mark.integration
def test_trtllm_is_ready_under_its_model_directorys_basename(tmp_path, monkeypatch):
    """trtllm-serve <= 1.2 lists a local model directory under its basename and takes no
    --served-model-name: readiness on NSDG_MODEL__NAME failed after the whole 340B load."""
    monkeypatch.setenv("NSDG_MODEL__PATH", MODEL_PATH)
    settings = load_settings()
    assert settings.model.name == "nemotron-4-340b-base"  # the default, which trtllm never lists
    # The project's server answering /health and /v1/models the way trtllm-serve does.
    with running_server(tmp_path, "--engine", "simulated", "--served-model-name", "Nemotron-4-340B-Base-hf") as (url, _):
        client = make_client(settings, url, profile=trtllm_profile())
        assert client.model == "Nemotron-4-340B-Base-hf"
        assert readiness.step(client, "health", 10.0, "") is None
        # The same server under vllm's profile, which renders --served-model-name model.name: refused, named.
        vllm = Profile(backend="slurm", engine="vllm", nodes=2, gpus_per_node=8, tensor_parallel=8, pipeline_parallel=2)
        with pytest.raises(ServerNotReady, match="serves \\['Nemotron-4-340B-Base-hf'\\], not 'nemotron-4-340b-base'"):
            readiness.step(make_client(settings, url, profile=vllm), "health", 10.0, "")


def test_nemo_openai_keeps_two_requests_in_flight_like_nemos_other_server():
    """NeMo >= 2.1 serves /v1/completions one request at a time behind a lock (L6): 256 in flight
    would queue past the read timeout and count the server as hung."""
    settings = load_settings()
    nemo_openai = Profile(backend="slurm", engine="nemo-openai", nodes=2, gpus_per_node=8, tensor_parallel=8,
                          pipeline_parallel=2)
    assert settings.api(nemo_openai) == "openai-completions" and settings.in_flight(nemo_openai) == 2
    vllm = Profile(backend="slurm", engine="vllm", nodes=2, gpus_per_node=8, tensor_parallel=8, pipeline_parallel=2)
    assert settings.in_flight(vllm) == 256
