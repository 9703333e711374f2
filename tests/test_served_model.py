"""Which model wrote a run's rows (infra/served_model.py): what is served is part of the run's
config, so a resume on another engine or model is refused; rows and the manifest name the served
model, not NSDG_MODEL__NAME; two attached servers serving different models never share a run."""

import json
import shutil

import pytest

from flows.generate import generate
from infra.errors import ConfigError
from infra.manifest import diff_config
from infra.planning import make_plan
from infra.sampling import SamplingParams
from infra.served_model import ServedModel, expected, model_dir_digest
from infra.settings import Settings
from infra.storage import LocalOutputStore
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


def test_two_attached_servers_serving_different_models_never_share_a_run(prefect_harness, workdir, tiny_model_dir):
    src = write(workdir / "in.jsonl", *({"id": f"r{i}", "prompt": f"Prompt {i}."} for i in range(8)))
    with running_server(workdir, "--engine", "simulated") as (sim_url, _), \
            running_server(workdir, "--model-dir", str(tiny_model_dir)) as (tiny_url, _):
        settings = {"NSDG_SERVER__URLS": json.dumps([sim_url, tiny_url]),
                    "NSDG_MODEL__TOKENIZER": str(tiny_model_dir / "tokenizer.json")}
        with pytest.MonkeyPatch.context() as mp:
            for k, v in settings.items():
                mp.setenv(k, v)
            with pytest.raises(ConfigError, match=r"(?s)would mix two models.*new id"):
                generate(input_uri=str(src), output_uri="out", run_id="a", profile="attach", sampling=SAMPLING,
                         shard_size=1, replicas=2)
    run_dir = workdir / "out" / "a"
    assert not (run_dir / "manifest.json").exists()
    assert len({r["generation"]["model"] for r in rows(run_dir)}) <= 1  # one model's rows at most
