import hashlib
import json
from pathlib import Path

import pytest

from infra.errors import ConfigError, InputError
from infra.run.manifest import PartInfo, config_hash, diff_config
from infra.planning import RunConfig, make_plan, usable_records
from infra.prompting.sampling import SamplingParams
from infra.settings import Settings
from infra.storage.uris import validate_key_component
from infra.storage.local import LocalOutputStore


def cfg(path, **kw) -> RunConfig:
    base = dict(input_uri=str(path), output_uri="out", run_id="r1", profile="local",
                sampling=SamplingParams(tokens_to_generate=8), batch_size=4, shard_size=2,
                prompt_field="prompt", id_field="id", on_bad_input="fail")
    return RunConfig(**{**base, **kw})


def write(path, *objs):
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs))
    return path


def test_plan_counts_shards_and_writes_run_config(workdir):
    src = write(workdir / "in.jsonl", *({"prompt": f"p{i}"} for i in range(5)))
    store = LocalOutputStore(workdir / "out" / "r1")
    plan = make_plan(cfg(src), Settings(), store)
    assert (plan.records_in, plan.shards_total, plan.todo) == (5, 3, [0, 1, 2])
    assert json.loads((workdir / "out" / "r1" / "run.json").read_text())["config_hash"] == plan.config_hash


def test_bad_input_fails_with_lines_and_count(workdir):
    src = write(workdir / "in.jsonl", *(["{bad"] * 12), {"prompt": "fine"})
    with pytest.raises(InputError) as exc:
        make_plan(cfg(src), Settings(), LocalOutputStore(workdir / "o"))
    msg = str(exc.value)
    assert "12 unusable" in msg and "line 1:" in msg and "line 10:" in msg and "line 11:" not in msg
    assert "and 2 more" in msg and "on_bad_input='skip'" in msg


def test_skip_writes_rejects(workdir):
    src = write(workdir / "in.jsonl", {"prompt": "ok"}, "{bad", {"id": "ok-2", "prompt": "x"}, {"id": "ok-2", "prompt": "dup"})
    store = LocalOutputStore(workdir / "o")
    plan = make_plan(cfg(src, on_bad_input="skip"), Settings(), store)
    assert (plan.records_in, plan.rejected) == (2, 2)
    rejects = [json.loads(line) for line in (workdir / "o" / "input-rejects.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rejects] == [2, 4] and "duplicate id" in rejects[1]["reason"]


def test_too_long_prompt_rejected_before_allocation(workdir):
    src = write(workdir / "in.jsonl", {"prompt": "x" * 5000})
    with pytest.raises(InputError, match="context length"):
        make_plan(cfg(src), Settings(), LocalOutputStore(workdir / "o"))


def test_empty_and_missing_input(workdir):
    with pytest.raises(InputError, match="no usable prompt"):
        make_plan(cfg(write(workdir / "e.jsonl")), Settings(), LocalOutputStore(workdir / "o"))
    with pytest.raises(ConfigError, match="not found"):
        make_plan(cfg(workdir / "missing.jsonl"), Settings(), LocalOutputStore(workdir / "o"))


def test_published_parts_are_skipped_and_changed_config_refused(workdir):
    src = write(workdir / "in.jsonl", *({"prompt": f"p{i}"} for i in range(4)))
    store = LocalOutputStore(workdir / "o")
    plan = make_plan(cfg(src), Settings(), store)
    part = PartInfo("part-00000.jsonl", 0, 2, hashlib.sha256(b"x").hexdigest(), 1, plan.config_hash, 1, 2)
    store.write_bytes("part-00000.jsonl", b"x")
    store.write_bytes(part.state_name(), part.to_json())
    assert make_plan(cfg(src), Settings(), store).todo == [1]
    store.write_bytes("part-00000.jsonl", b"y")  # not the bytes its state names (a kill between part and state)
    assert make_plan(cfg(src), Settings(), store).todo == [0, 1]
    with pytest.raises(ConfigError, match="tokens_to_generate|sampling"):
        make_plan(cfg(src, sampling=SamplingParams(tokens_to_generate=9)), Settings(), store)


def test_config_hash_and_diff():
    assert config_hash({"a": 1, "b": 2}) == config_hash({"b": 2, "a": 1})
    assert diff_config({"a": 1}, {"a": 2}) == ["a: 1 -> 2"]


@pytest.mark.parametrize("bad", ["../x", "/abs", "a/../b", "a b", "", ".hidden", "a;rm", "x" * 200, "a\nb"])
def test_hostile_run_ids_rejected(bad):
    with pytest.raises(ConfigError):
        validate_key_component(bad, "run_id")


def test_half_written_files_a_kill_left_are_discarded_and_nothing_else(workdir):
    src = write(workdir / "in.jsonl", {"prompt": "a"})
    store = LocalOutputStore(workdir / "o")
    store.root.mkdir(parents=True)
    # A kill can stop any object's writer, not only a part's: curation's kept rows, a state, the manifest.
    stale = [".part-00000.jsonl.abc123.tmp", ".kept-00000.jsonl.1f2e3d4c.tmp", ".part-00000.jsonl.state.json.9a8b.tmp",
             ".manifest.json.0c0c0c0c.tmp"]
    for name in stale:
        (store.root / name).write_text('{"id": "half')
    # Left: another flow taking the run over now (its lease's temp file), a spill, a folder and a link
    # of a temp file's name, and what a temp name never is.
    outside = workdir / "outside.jsonl"
    outside.write_text("keep\n")
    kept = [".run.lease.5e5e5e5e.tmp", ".part-00001.jsonl.spill", "notes.tmp"]
    for name in kept:
        (store.root / name).write_text("x")
    (store.root / ".folder.tmp").mkdir()
    (store.root / ".link.jsonl.abcd.tmp").symlink_to(outside)
    make_plan(cfg(src), Settings(), store)
    left = {p.name for p in store.root.iterdir()}
    assert not left & set(stale), left
    assert {*kept, ".folder.tmp", ".link.jsonl.abcd.tmp"} <= left and outside.read_text() == "keep\n"


def test_truncate_left_keeps_the_end_of_long_prompts(workdir):
    src = write(workdir / "in.jsonl", {"prompt": "start " + "x" * 5000 + " the end"})
    store = LocalOutputStore(workdir / "o")
    plan = make_plan(cfg(src, overlong_prompts="truncate_left"), Settings(), store)
    assert plan.records_in == 1 and plan.rejected == 0
    assert plan.config["overlong_prompts"] == "truncate_left"


def test_breaker_trips_on_the_share_of_the_window():
    from infra.errors import CircuitOpen
    from infra.generation import Breaker

    b = Breaker(window=20, max_share=0.1)
    for i in range(200):  # 1 failure in 10: at the limit, never above it
        b.record(i % 10 != 0, "bad")
    with pytest.raises(CircuitOpen, match="3 of the last 20"):
        b.record(False, "boom")
        b.record(False, "boom")


def test_idset_remembers_every_id_on_disk():
    from infra.storage.scratch import IdSet, digest

    with IdSet(cache_mb=1) as ids:
        folder = Path(ids._dir.name)
        assert all(ids.add(f"rec-{i}") for i in range(5000))
        assert len(ids) == 5000
        assert not any(ids.add(f"rec-{i}") for i in range(5000))
        assert ids.add("rec-5000") and not ids.add("rec-5000")
        assert ids.add("") and not ids.add("")
        assert ids.add("\udcff") and ids.add("é") and not ids.add("é")  # lone surrogates from the reader too
        assert len(ids) == 5004
    assert not folder.exists()  # the scratch file goes with it
    ids.close()  # idempotent
    assert digest("rec-1") == -0xB7679BA4C3F6CD3  # the same in every process: BLAKE2b, not the salted hash()


def test_generation_pass_skips_the_lines_the_plan_found_duplicate(workdir):
    rows = [{"id": "a", "prompt": "1"}, {"id": "b", "prompt": "2"}, {"id": "a", "prompt": "3"},
            {"prompt": "4"}, {"id": "b", "prompt": "5"}, {"id": "c", "prompt": "6"}]
    src = write(workdir / "in.jsonl", *rows)
    run = cfg(src, on_bad_input="skip")
    plan = make_plan(run, Settings(), LocalOutputStore(workdir / "o"))
    assert plan.duplicate_lines == frozenset({3, 5}) and (plan.records_in, plan.rejected) == (4, 2)
    with open(src, "rb") as stream:
        kept = [r.prompt for r in usable_records(stream, run, Settings(), plan.format, plan.duplicate_lines)]
    assert kept == ["1", "2", "4", "6"]  # the first of each id, as the plan counted


def test_a_rendered_prompt_past_the_char_limit_is_a_bad_line_and_chunks_hold_few_characters(workdir, monkeypatch):
    """Review 2 (D11): the plan held every rendered prompt of a 1,024-line chunk, however long."""
    from infra import planning
    from infra.recipes import RecipeParams, load_recipe

    limit = 16 * Settings().model.context_length  # templates.prompt_char_limit: 16 characters a context token
    src = write(workdir / "in.jsonl", *({"n": n} for n in [limit + 1, 300, 300, 300, 300, 300, 300]))
    recipe = load_recipe(RecipeParams(prompt_template="{{ 'x' * (n - 1) }}\n"), Settings())
    held = []
    counts = planning.RecordCheck.counts_begun
    monkeypatch.setattr(planning, "COUNT_CHUNK_CHARS", 1000, raising=False)
    monkeypatch.setattr(planning.RecordCheck, "counts_begun",
                        lambda self, recs: held.append(sum(len(r.prompt) for r in recs)) or counts(self, recs))
    plan = make_plan(cfg(src, recipe=recipe, on_bad_input="skip"), Settings(), LocalOutputStore(workdir / "o"))
    assert (plan.records_in, plan.rejected) == (6, 1)
    reject = json.loads((workdir / "o" / "input-rejects.jsonl").read_text())
    assert reject["line"] == 1 and f"the rendered prompt is longer than {limit} characters" in reject["reason"]
    assert sum(held) == 1800 and max(held) <= 1000 + 300  # a chunk closes once it holds COUNT_CHUNK_CHARS
