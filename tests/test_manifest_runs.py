"""The manifest describes the run, not its last invocation: per-shard facts live in the state
objects, the manifest is built from all of them, and a rerun that generates nothing leaves a
complete manifest alone."""

import json

import pytest

from infra.run.manifest import Manifest, PartInfo, generated_tokens, run_job_ids, run_replicas

OLD_STATE = {"name": "part-00000.jsonl", "shard": 0, "records": 2, "sha256": "0" * 64, "bytes": 10,
             "config_hash": "abc", "first_line": 1, "last_line": 2, "rejected": 0}  # as written at a4ad598


def write_prompts(path, n):
    path.write_text("".join(json.dumps({"id": f"m{i}", "prompt": f"manifest prompt {i}"}) + "\n" for i in range(n)))
    return path


def tokens_in_parts(run_dir) -> int:
    return sum(json.loads(line)["generation"]["generated_tokens"]
               for p in run_dir.glob("part-*.jsonl") for line in p.read_text().splitlines())


def test_states_without_the_new_fields_still_load_and_count():
    old = PartInfo.from_json(json.dumps({**OLD_STATE, "from_a_later_version": 1}).encode())
    assert (old.generated_tokens, old.job_ids, old.invocation) == (None, [], None)
    new = PartInfo(**{**OLD_STATE, "name": "part-00001.jsonl", "shard": 1}, generated_tokens=7, replica=0,
                   job_ids=["41"], invocation="flow-a")
    assert generated_tokens([old, new]) == 7
    assert run_job_ids(None, [old, new], ["42"]) == ["41", "42"]
    # Part 0 finished on the replacement job (1869) after part 1 on the requeued one (1868): first submitted first.
    resumed = PartInfo(**{**OLD_STATE}, job_ids=["1869"])
    requeued = PartInfo(**{**OLD_STATE, "name": "part-00001.jsonl", "shard": 1}, job_ids=["1868"])
    assert run_job_ids(None, [resumed, requeued], ["1868", "1869"]) == ["1868", "1869"]
    assert run_job_ids(None, [resumed], ["1868_2", "local"]) == ["1868_2", "1869", "local"]
    earlier = Manifest("r", "abc", {}, "m", "local", "in", 4, 4, 0, [old, new], slurm_job_ids=["40"],
                       replicas=[{"replica": 0, "job_ids": ["40"]}])
    assert Manifest.from_json(earlier.to_json()) == earlier
    replicas = run_replicas(earlier, [old, new], [{"replica": 0, "job_ids": ["42"]}], "flow-b")
    assert [(r.get("invocation"), r["job_ids"]) for r in replicas] == [(None, ["40"]), ("flow-a", ["41"]), ("flow-b", ["42"])]


@pytest.mark.integration
def test_a_rerun_keeps_the_manifest_and_a_resume_adds_up(prefect_harness, workdir, monkeypatch):
    from flows.generate import generate

    monkeypatch.setenv("NSDG_LOCAL__ENGINE", "simulated")
    src = write_prompts(workdir / "in.jsonl", 40)
    params = dict(input_uri=str(src), output_uri=str(workdir / "out"), shard_size=10, batch_size=5)

    generate(run_id="a", **params)
    manifest_a = (workdir / "out" / "a" / "manifest.json").read_bytes()
    generate(run_id="a", **params)  # nothing to do
    assert (workdir / "out" / "a" / "manifest.json").read_bytes() == manifest_a

    # b loses its only server after the probe and 4 batches (shard 0), no restart allowed; then resumes.
    monkeypatch.setenv("NSDG_LOCAL__EXTRA_ARGS", json.dumps(["--fault-crash-after", "5"]))
    monkeypatch.setenv("NSDG_SERVER__MAX_IN_FLIGHT", "1")
    with pytest.raises(Exception):
        generate(run_id="b", max_server_restarts=0, **params)
    run_dir = workdir / "out" / "b"
    first = [PartInfo.from_json(p.read_bytes()) for p in run_dir.glob("part-*.state.json")]
    assert first and not (run_dir / "manifest.json").exists()
    monkeypatch.delenv("NSDG_LOCAL__EXTRA_ARGS")
    generate(run_id="b", **params)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["records_written"] == 40
    assert manifest["throughput"]["generated_tokens"] == tokens_in_parts(run_dir) > 0  # every part's, not the resume's
    invocations = {p["invocation"] for p in manifest["parts"]}
    assert len(invocations) == 2 and {p.invocation for p in first} < invocations
    assert [r["invocation"] for r in manifest["replicas"]] == [first[0].invocation, *(invocations - {first[0].invocation})]
    assert sum(r["records"] for r in manifest["replicas"]) == 40
    assert all(p["generated_tokens"] and p["seconds"] is not None and p["replica"] == 0 for p in manifest["parts"])


@pytest.mark.integration
def test_a_transient_storage_error_at_the_run_end_is_retried(prefect_harness, workdir, monkeypatch):
    """The run's end runs as tasks (close-parts, curate, publish-manifest) with the shards' retry
    policy: a storage hiccup on the manifest write costs a retry, not the run."""
    from flows.generate import generate
    from infra.errors import StorageError
    from infra.run.layout import MANIFEST
    from infra.storage.local import LocalOutputStore

    monkeypatch.setenv("NSDG_LOCAL__ENGINE", "simulated")
    src = write_prompts(workdir / "in.jsonl", 10)
    tries = []
    write_bytes = LocalOutputStore.write_bytes

    def flaky(self, name, data):
        if name == MANIFEST:
            tries.append(name)
            if len(tries) == 1:
                raise StorageError("a storage hiccup")
        return write_bytes(self, name, data)

    monkeypatch.setattr(LocalOutputStore, "write_bytes", flaky)
    result = generate(run_id="r", input_uri=str(src), output_uri=str(workdir / "out"), shard_size=5, batch_size=5)
    assert len(tries) == 2 and result["records_written"] == 10
    assert Manifest.from_json((workdir / "out" / "r" / MANIFEST).read_bytes()).records_written == 10
