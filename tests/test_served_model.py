"""Which model wrote a run's rows (infra/engines/served_model.py): what is served is part of the run's
config, so a resume on another engine or model is refused; rows and the manifest name the served
model, not NSDG_MODEL__NAME; two attached servers serving different models never share a run."""

import json
import shutil

import pytest

from flows.generate import generate
from infra.errors import ConfigError
from infra.run.manifest import diff_config
from infra.planning import make_plan
from infra.prompting.sampling import SamplingParams
from infra.engines.served_model import ServedModel, expected, model_dir_digest
from infra.settings import Settings
from infra.storage.local import LocalOutputStore
from tests.localserver import running_server
from tests.test_planning import cfg, write

pytestmark = pytest.mark.integration
SAMPLING = SamplingParams(tokens_to_generate=4, greedy=True)


def rows(run_dir):
    return [json.loads(line) for p in sorted(run_dir.glob("part-*.jsonl")) if p.name.count(".") == 1
            for line in p.read_text().splitlines()]


def test_digest_tells_weights_apart_without_reading_them_whole(tiny_model_dir, tmp_path):
    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    assert model_dir_digest(copy) == model_dir_digest(tiny_model_dir)  # the files decide, not the path
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # same size, one byte of the last tensor
    weights.write_bytes(bytes(data))
    assert model_dir_digest(copy) != model_dir_digest(tiny_model_dir)


def test_slurm_identity_is_the_model_path_engine_and_image():
    settings = Settings(model={"path": "/models/base"}, slurm={"images": {"vllm": "/img/vllm.sqsh"}})
    nemo = expected(settings, settings.profile("h100x16"))
    vllm = expected(settings, settings.profile("h100x16").model_copy(update={"engine": "vllm"}))
    instruct = expected(Settings(model={"path": "/models/instruct"}), settings.profile("h100x16"))
    assert (nemo["engine"], nemo["path"], nemo["image"]) == ("nemo", "/models/base", "nvcr.io/nvidia/nemo:24.05")
    assert diff_config(nemo, vllm) == ["api: 'nemo-generate' -> 'openai-completions'", "engine: 'nemo' -> 'vllm'",
                                       "image: 'nvcr.io/nvidia/nemo:24.05' -> '/img/vllm.sqsh'"]
    assert diff_config(nemo, instruct) == ["path: '/models/base' -> '/models/instruct'"]
    assert ServedModel("nemotron-4-340b-base", instruct).label == "instruct"


def test_resume_on_changed_weights_is_refused_at_plan(workdir, tiny_model_dir):
    model = shutil.copytree(tiny_model_dir, workdir / "model")
    src = write(workdir / "in.jsonl", *({"prompt": f"p{i}"} for i in range(4)))
    store = LocalOutputStore(workdir / "out" / "r1")
    make_plan(cfg(src), Settings(local={"model_dir": str(model), "engine": "transformers"}), store)
    (model / "config.json").write_text((model / "config.json").read_text() + "\n")  # another checkpoint, same path
    with pytest.raises(ConfigError, match=r"(?s)served_model\.digest: 'sha256:\w+' -> 'sha256:\w+'.*new id") as exc:
        make_plan(cfg(src), Settings(local={"model_dir": str(model), "engine": "transformers"}), store)
    assert "served_model.path" not in str(exc.value)


def test_resume_on_another_local_engine_is_refused(prefect_harness, workdir, tiny_model_dir, monkeypatch):
    """model_mixed.py's fast variant: a run of the simulated engine (real server subprocess) resumed
    under its run_id on the tiny transformers model is refused before any server starts."""
    src = write(workdir / "in.jsonl", *({"id": f"r{i}", "prompt": f"Prompt {i}."} for i in range(4)))
    monkeypatch.setenv("NSDG_MODEL__TOKENIZER", str(tiny_model_dir / "tokenizer.json"))  # one counter for both
    monkeypatch.setenv("NSDG_LOCAL__ENGINE", "simulated")
    generate(input_uri=str(src), output_uri="out", run_id="m", sampling=SAMPLING, shard_size=2)
    run_dir = workdir / "out" / "m"
    assert {r["generation"]["model"] for r in rows(run_dir)} == {"simulated"}
    monkeypatch.setenv("NSDG_LOCAL__ENGINE", "transformers")
    monkeypatch.setenv("NSDG_LOCAL__MODEL_DIR", str(tiny_model_dir))
    with pytest.raises(ConfigError) as exc:
        generate(input_uri=str(src), output_uri="out", run_id="m", sampling=SAMPLING, shard_size=2)
    message = str(exc.value)
    assert "served_model.engine: 'simulated' -> 'transformers'" in message
    assert f"served_model.path: None -> '{tiny_model_dir}'" in message and "--new-run" in message


def test_resume_attached_to_a_server_of_another_model_is_refused(prefect_harness, workdir, monkeypatch):
    """An attached URL's model is not in the settings: its GET /v1/models is. A run that one server
    left half done (it crashed), resumed against a server that names another model (NeMo's API
    carries no model name, so nothing else would notice), is refused before that server generates a row."""
    src = write(workdir / "in.jsonl", *({"id": f"r{i}", "prompt": f"Prompt {i}."} for i in range(6)))
    run = dict(input_uri=str(src), output_uri="out", run_id="a", profile="attach", sampling=SAMPLING, shard_size=1,
               max_server_restarts=0)
    # Request 4 kills it: the readiness probe and about 2 shards are answered.
    with running_server(workdir, "--engine", "simulated", "--fault-crash-after", "3") as (first_url, _):
        monkeypatch.setenv("NSDG_SERVER__URL", first_url)
        with pytest.raises(Exception) as first:
            generate(**run)
    assert not isinstance(first.value, ConfigError)
    run_dir = workdir / "out" / "a"
    done = rows(run_dir)
    assert done and {r["generation"]["model"] for r in done} == {"simulated"}
    assert {r["generation"]["requested_model"] for r in done} == {"nemotron-4-340b-base"}
    with running_server(workdir, "--engine", "simulated", "--served-model-name", "nemotron-4-340b-instruct") as (url, _):
        monkeypatch.setenv("NSDG_SERVER__URL", url)
        with pytest.raises(ConfigError, match=r"(?s)'id': 'nemotron-4-340b-base'.*would mix two models.*new id") as exc:
            generate(**run)
    assert f"server at {url} serves {{'id': 'nemotron-4-340b-instruct', 'root': 'simulated'}}" in str(exc.value)
    assert rows(run_dir) == done and not (run_dir / "manifest.json").exists()
