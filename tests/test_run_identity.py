"""What a run is: the config hash covers everything that decides which records exist and where
shards begin (the token counter included), and every record has one id, given or derived."""

import json

import pytest

from infra.prompting.dataset import derived_id
from infra.errors import ConfigError
from infra.planning import RunConfig, make_plan, usable_records
from infra.settings import Settings
from infra.storage import open_input
from infra.storage.local import LocalOutputStore
from infra.prompting.tokens import token_counter
from tests.test_planning import cfg as planning_cfg, write

LONG = "Describe, in one sentence, the long history of the lighthouse keepers who watched over the northern sea."


def cfg(path, **kw) -> RunConfig:
    return planning_cfg(path, **{"batch_size": 3, "shard_size": 3, "on_bad_input": "skip", **kw})


@pytest.fixture
def short_context() -> Settings:
    # 64 tokens: LONG (104 bytes) is too long by the byte estimate, fits by the real tokenizer.
    return Settings(model={"context_length": 64})


def test_counter_identity_names_the_kind_and_the_file_digest(tiny_model_dir, tmp_path):
    assert token_counter(None).identity == "utf-8 byte estimate"
    real = token_counter(str(tiny_model_dir))
    assert real.identity.startswith("tokenizer.json sha256:")
    copy = tmp_path / "elsewhere" / "tokenizer.json"  # the file decides, not its path
    copy.parent.mkdir()
    copy.write_bytes((tiny_model_dir / "tokenizer.json").read_bytes())
    assert token_counter(str(copy)).identity == real.identity


def test_resume_under_another_token_counter_is_refused(workdir, tiny_model_dir, short_context):
    src = write(workdir / "in.jsonl", *({"id": f"r{i:02d}", "prompt": LONG if i == 1 else f"Prompt {i}."} for i in range(12)))
    store = LocalOutputStore(workdir / "out" / "r1")
    first = make_plan(cfg(src), short_context, store)
    assert (first.records_in, first.rejected) == (11, 1)  # the byte estimate refuses LONG
    with pytest.raises(ConfigError) as exc:
        make_plan(cfg(src, counter=token_counter(str(tiny_model_dir / "tokenizer.json"))), short_context, store)
    msg = str(exc.value)
    assert "token_counter: 'utf-8 byte estimate' -> 'tokenizer.json sha256:" in msg and "--new-run" in msg
    assert make_plan(cfg(src), short_context, store).config_hash == first.config_hash  # the same counter resumes


def test_every_plan_rewrites_the_input_rejects(workdir, short_context):
    src = write(workdir / "in.jsonl", {"id": "a", "prompt": "fits"}, {"id": "b", "prompt": "fits too"})
    store = LocalOutputStore(workdir / "out" / "r1")
    # Left by an earlier plan that refused a line this plan accepts.
    store.write_bytes("input-rejects.jsonl", b'{"line": 2, "reason": "too long"}\n')
    plan = make_plan(cfg(src), short_context, store)
    assert plan.rejected == 0 and store.read_bytes("input-rejects.jsonl") == b""


def test_a_given_id_equal_to_another_lines_derived_id_is_a_duplicate(workdir):
    taken = derived_id(1, "tell me about the sea")  # what an earlier run's output called line 1
    src = write(workdir / "in.jsonl", {"prompt": "tell me about the sea"}, {"id": taken, "prompt": "tell me about a ship"},
                {"prompt": "and a third"}, {"id": derived_id(5, "later line"), "prompt": "claims line 5"},
                {"prompt": "later line"})
    run = cfg(src, shard_size=8)
    plan = make_plan(run, Settings(), LocalOutputStore(workdir / "out" / "r1"))
    assert plan.duplicate_lines == frozenset({2, 5}) and (plan.records_in, plan.rejected) == (3, 2)
    with open_input(str(src), Settings().s3) as stream:
        ids = [r.id for r in usable_records(stream, run, Settings(), plan.format, plan.duplicate_lines)]
    assert ids == [taken, derived_id(3, "and a third"), derived_id(5, "later line")]  # derived ids unchanged
    rejects = [json.loads(l) for l in (workdir / "out" / "r1" / "input-rejects.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rejects] == [2, 5] and all("duplicate id" in r["reason"] for r in rejects)


def test_the_run_config_carries_the_runs_one_counter(tiny_model_dir):
    """Built once with the config from the tokenizer path; its identity is what the config hash names."""
    from flows.params import RunParams

    path = str(tiny_model_dir / "tokenizer.json")
    params = RunParams(input_uri="in.jsonl", output_uri="out", run_id="r1", prompt_format="raw")
    run = params.to_run_config(tokenizer=path)  # the tokenizer is the settings' (flows/generate.py), not a parameter
    assert run.counter is token_counter(path) and run.counter.identity.startswith("tokenizer.json sha256:")
    assert params.to_run_config().counter.identity == "utf-8 byte estimate"
