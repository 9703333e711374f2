"""NSDG_ALLOWED_URIS (infra/storage/locations.py): every door a parameter could walk out of an allowed
location through is knocked on, and each is refused with its message before anything is read;
a run directory swapped for a symlink after the check is never written through (infra/storage/local.py)."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from infra.errors import ConfigError, LocationChanged
from infra.storage.locations import check_allowed, check_run_locations
from infra.settings import load_settings
from infra.storage.local import LocalOutputStore


@pytest.fixture
def tree(tmp_path):
    """allowed/ (with data.jsonl, a symlink to a secret outside and a symlinked directory) and
    outside/secret."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "data.jsonl").write_text('{"prompt": "hi"}\n')
    (outside / "secret").write_text("id_rsa\n")
    (allowed / "link-to-secret").symlink_to(outside / "secret")
    (allowed / "link-to-dir").symlink_to(outside, target_is_directory=True)
    return allowed, outside


def confined(*entries) -> object:
    return load_settings(allowed_uris=[str(e) for e in entries])


def refused(uri, settings, what="input_uri") -> str:
    with pytest.raises(ConfigError) as caught:
        check_allowed(uri, settings.allowed_uris, what=what)
    message = str(caught.value)
    assert message.startswith(f"{what} ") and "\n" not in message, message
    return message


def test_unset_means_unrestricted(tree):
    _, outside = tree
    check_allowed(str(outside / "secret"), load_settings().allowed_uris, what="input_uri")


def test_inside_is_allowed_in_every_spelling(tree, monkeypatch):
    allowed, _ = tree
    settings = confined(allowed)
    monkeypatch.chdir(allowed)
    for uri in (str(allowed / "data.jsonl"), f"file://{allowed}/data.jsonl", "data.jsonl", "./sub/../data.jsonl",
                str(allowed), str(allowed / "not-yet" / "out"), f"{allowed}/"):
        check_allowed(uri, settings.allowed_uris, what="input_uri")


def test_dot_dot_escapes_are_refused(tree, monkeypatch):
    allowed, outside = tree
    settings = confined(allowed)
    message = refused(f"{allowed}/../outside/secret", settings)
    assert f"resolved: {outside / 'secret'}" in message and "NSDG_ALLOWED_URIS" in message and str(allowed) in message
    monkeypatch.chdir(allowed)
    refused("../outside/secret", settings)
    refused("sub/../../outside/secret", settings)
    refused(f"{allowed}-other/x", confined(allowed))  # a sibling sharing the prefix is not inside


def test_symlinks_pointing_out_are_refused(tree):
    allowed, outside = tree
    settings = confined(allowed)
    assert f"resolved: {outside / 'secret'}" in refused(str(allowed / "link-to-secret"), settings)
    refused(str(allowed / "link-to-dir" / "secret"), settings)
    refused(f"file://{allowed}/link-to-dir/secret", settings)


def test_file_uri_forms_are_refused_outside(tree):
    allowed, outside = tree
    settings = confined(f"file://{allowed}")  # an entry may be a file:// URI too
    check_allowed(f"file://{allowed}/data.jsonl", settings.allowed_uris, what="input_uri")
    for uri in (f"file://{outside}/secret", "file:///etc/passwd", f"file://{allowed}/../outside/secret",
                f"file://{allowed}/link-to-secret"):
        refused(uri, settings)
    with pytest.raises(ConfigError, match="Unsupported URI scheme"):  # FILE://, http://: never a local path
        check_allowed("FILE:///etc/passwd", settings.allowed_uris, what="input_uri")


def test_s3_prefix_is_a_directory_not_a_string_prefix():
    settings = confined("s3://team-bucket/nsdg", "s3://whole-bucket")
    for uri in ("s3://team-bucket/nsdg", "s3://team-bucket/nsdg/", "s3://team-bucket/nsdg/in/a.jsonl",
                "s3://whole-bucket/anything/at/all"):
        check_allowed(uri, settings.allowed_uris, what="output_uri")
    for uri in ("s3://team-bucket/nsdg-other/x", "s3://team-bucket/nsdgx", "s3://team-bucket/other/nsdg/x",
                "s3://team-bucket/NSDG/x", "s3://team-bucket", "s3://other-bucket/nsdg/x", "s3://team-bucket-2/nsdg/x"):
        assert "outside the locations" in refused(uri, settings, "output_uri"), uri
    with pytest.raises(ConfigError, match="'..'"):  # a '..' component never reaches the check's comparison
        check_allowed("s3://team-bucket/nsdg/../secrets/x", settings.allowed_uris, what="output_uri")
    refused("/tmp/x", settings)  # a local path with only S3 entries


def test_url_encoded_and_unicode_look_alikes_are_refused(tree):
    allowed, _ = tree
    settings = confined(allowed, "s3://team-bucket/nsdg")
    for uri in (f"{allowed}/%2e%2e/outside/secret", f"file://{allowed}/..%2Foutside%2Fsecret",
                "s3://team-bucket/nsdg%2F..%2Fsecrets", f"{allowed}/%2E%2E%2F"):
        assert "percent-escape" in refused(uri, settings), uri
    for uri in (f"{allowed}/\u2025/outside/secret",  # TWO DOT LEADER: NFKC gives '..'
                f"{allowed}/\uff0e\uff0e\uff0foutside",  # fullwidth '..' and '/'
                f"{allowed}/..\u2215outside",  # DIVISION SLASH
                f"{allowed}/..\u2044outside",  # FRACTION SLASH
                "s3://team-bucket/nsdg\uff0f..\uff0fsecrets", f"{allowed}/data\u200b.jsonl"):
        message = refused(uri, settings)
        assert "look-alike" in message or "control character" in message, (uri, message)
    assert "control character" in refused(f"{allowed}/data.jsonl\x00/../../x", settings)


def test_run_directory_that_is_a_symlink_out_is_refused(tree):
    allowed, outside = tree
    (allowed / "out").mkdir()
    (allowed / "out" / "run-1").symlink_to(outside, target_is_directory=True)
    settings = confined(allowed)
    check_run_locations(str(allowed / "data.jsonl"), str(allowed / "out"), "run-2", settings.allowed_uris)
    with pytest.raises(ConfigError, match="^output_uri's run directory"):
        check_run_locations(str(allowed / "data.jsonl"), str(allowed / "out"), "run-1", settings.allowed_uris)
    with pytest.raises(ConfigError, match="^output_uri "):
        check_run_locations(str(allowed / "data.jsonl"), str(outside), "run-2", settings.allowed_uris)


def swap_for_symlink(path, target) -> None:
    """What anyone who can write in the shared allowed directory can do mid-run."""
    os.rename(path, f"{path}.moved")
    os.symlink(target, path, target_is_directory=True)


def refused_write(write, store, now: str) -> None:
    with pytest.raises(LocationChanged) as caught:
        write()
    message = str(caught.value)
    assert f"Output directory {store.root} " in message and f"it now resolves to {now}" in message, message
    assert "rerun with the same run_id" in message and "\n" not in message, message


def test_a_run_directory_swapped_for_a_symlink_mid_run_is_never_written_through(tree):
    """S1 (review 2): the check held at the start; every later write checks again and refuses."""
    allowed, outside = tree
    run = allowed / "out" / "r"
    store = LocalOutputStore(run)
    store.write_bytes("part-00000.jsonl", b"a\n")
    staged = store.staging_dir() / ".part-00001.jsonl.staged.tmp"
    staged.write_bytes(b"b\n")
    version = store.create_exclusive("run.lease", b"lease")
    swap_for_symlink(run, outside)
    writes = {"write_bytes": lambda: store.write_bytes("part-00002.jsonl", b"c\n"),
              "publish_file": lambda: store.publish_file("part-00001.jsonl", staged, "sha"),
              "staging_dir": store.staging_dir, "preflight": store.preflight,
              "create_exclusive": lambda: store.create_exclusive("other.lease", b"x"),
              "replace_if_version": lambda: store.replace_if_version("run.lease", b"renewed", version),
              "delete_if_version": lambda: store.delete_if_version("run.lease", version)}
    for write in writes.values():
        refused_write(write, store, f"{outside} (a symlink)")
    assert sorted(os.listdir(outside)) == ["secret"]  # nothing landed outside
    moved = allowed / "out" / "r.moved"
    assert sorted(os.listdir(moved)) == [".part-00001.jsonl.staged.tmp", "part-00000.jsonl", "run.lease"]
    assert (moved / "run.lease").read_bytes() == b"lease"


def test_a_symlink_swapped_in_before_the_first_write_or_above_the_run_directory_is_refused(tree):
    allowed, outside = tree
    early = LocalOutputStore(allowed / "out" / "r1")  # made right after the check, nothing written yet
    (allowed / "out").mkdir()
    (allowed / "out" / "r1").symlink_to(outside, target_is_directory=True)
    refused_write(lambda: early.write_bytes("run.json", b"{}"), early, f"{outside} (a symlink)")
    above = LocalOutputStore(allowed / "out2" / "r")
    above.write_bytes("run.json", b"{}")
    swap_for_symlink(allowed / "out2", outside)  # the output_uri, not the run directory
    (outside / "r").mkdir()  # the same name waits there
    refused_write(lambda: above.write_bytes("part-00000.jsonl", b"x"), above, str(outside / "r"))
    assert not list((outside / "r").iterdir())
    # A symlink that was there when the run checked its locations (inside them) is the run directory.
    (allowed / "real").mkdir()
    (allowed / "out3").symlink_to(allowed / "real", target_is_directory=True)
    linked = LocalOutputStore(allowed / "out3")
    linked.write_bytes("part-00000.jsonl", b"x\n")
    assert (allowed / "real" / "part-00000.jsonl").read_bytes() == b"x\n" and linked.list_names() == ["part-00000.jsonl"]


def test_the_setting_comes_from_the_environment_and_bad_entries_are_named(tree, monkeypatch):
    allowed, _ = tree
    monkeypatch.setenv("NSDG_ALLOWED_URIS", json.dumps([str(allowed), "s3://team-bucket/nsdg/"]))
    assert load_settings().allowed_uris == [str(allowed), "s3://team-bucket/nsdg/"]
    for entry, needle in (("relative/dir", "not an absolute path"), ("s3://Bad_Bucket/x", "bucket"),
                          (f"{allowed}/%2e%2e", "percent-escape"), ("", "non-empty")):
        monkeypatch.setenv("NSDG_ALLOWED_URIS", json.dumps([entry]))
        with pytest.raises(ConfigError, match="NSDG_ALLOWED_URIS") as caught:
            load_settings()
        assert needle in str(caught.value), (entry, str(caught.value))


@pytest.mark.integration
def test_the_flow_refuses_before_reading_or_allocating(prefect_harness, workdir, tree, monkeypatch):
    from flows.generate import generate

    allowed, outside = tree
    monkeypatch.setenv("NSDG_ALLOWED_URIS", json.dumps([str(allowed)]))
    monkeypatch.setenv("NSDG_LOCAL__ENGINE", "simulated")
    os.mkfifo(outside / "fifo")  # reading it would block: the refusal must come first
    for input_uri, output_uri in ((str(outside / "fifo"), str(allowed / "out")),
                                  (str(allowed / "link-to-dir" / "fifo"), str(allowed / "out")),
                                  (str(allowed / "data.jsonl"), str(outside / "out"))):
        with pytest.raises(ConfigError, match="outside the locations this installation allows"):
            generate(input_uri=input_uri, output_uri=output_uri, run_id="r1")
    assert not (allowed / "out").exists() and not (outside / "out").exists()
    assert not (workdir / ".nemotron-sdg").exists()  # no local server was started


def test_a_recipes_template_and_examples_files_are_confined_too(prefect_harness, workdir, tree, monkeypatch):
    from flows.generate import generate
    from infra.recipes import RecipeParams

    allowed, outside = tree
    (outside / "t.j2").write_text("{{ prompt }}")
    os.mkfifo(outside / "examples.jsonl")  # reading it would block: the refusal must come first
    monkeypatch.setenv("NSDG_ALLOWED_URIS", json.dumps([str(allowed)]))
    monkeypatch.setenv("NSDG_LOCAL__ENGINE", "simulated")
    recipes = {"recipe.prompt_template": RecipeParams(prompt_template=str(outside / "t.j2")),
               "recipe.examples_uri": RecipeParams(prompt_template="{% for e in examples %}{{ e.prompt }}{% endfor %}",
                                                   examples_uri=str(outside / "examples.jsonl"), examples_per_prompt=1)}
    for what, recipe in recipes.items():
        with pytest.raises(ConfigError, match=f"^{what} .*outside the locations this installation allows"):
            generate(input_uri=str(allowed / "data.jsonl"), output_uri=str(allowed / "out"), run_id="r1", recipe=recipe)
    assert not (allowed / "out").exists()


@pytest.mark.integration
def test_a_run_whose_directory_is_swapped_mid_run_writes_nothing_outside(prefect_harness, workdir, tree, monkeypatch):
    """S1 (review 2), the flow: after part 1 the run directory becomes a symlink out of the allowed
    set; the run fails with LocationChanged, nothing lands outside, and the advice (put it back,
    rerun with the same run_id) completes the run."""
    from flows.generate import generate
    from infra.deadline import Deadline, poll_until
    from infra.run.layout import LEASE_NAME
    from infra.run.lease import LeaseRecord

    allowed, outside = tree
    monkeypatch.setenv("NSDG_ALLOWED_URIS", json.dumps([str(allowed)]))
    monkeypatch.setenv("NSDG_LOCAL__ENGINE", "simulated")
    monkeypatch.setenv("NSDG_LOCAL__EXTRA_ARGS", json.dumps(["--extra-latency", "0.05"]))
    monkeypatch.setenv("NSDG_RUN_LEASE_TTL_S", "3")  # the failed run's lease cannot be deleted through the swap
    src, run = allowed / "in.jsonl", allowed / "out" / "r"
    src.write_text("".join(json.dumps({"id": f"a{i:03d}", "prompt": f"prompt {i}"}) + "\n" for i in range(200)))

    def swap_mid_run() -> None:
        poll_until(lambda: (run / "part-00001.jsonl.state.json").exists() or None, deadline=Deadline(120),
                   interval=0.01, what="part 1's state")
        swap_for_symlink(run, outside)

    swapper = threading.Thread(target=swap_mid_run, daemon=True)
    swapper.start()
    params = dict(input_uri=str(src), output_uri=str(allowed / "out"), run_id="r", shard_size=20, batch_size=10)
    with pytest.raises(LocationChanged, match=f"now resolves to {outside} \\(a symlink\\)"):
        generate(**params)
    swapper.join(timeout=10)
    assert sorted(os.listdir(outside)) == ["secret"]

    run.unlink()  # the advice: put the run directory back, rerun with the same run_id
    os.rename(f"{run}.moved", run)
    lease = LeaseRecord.from_json((run / LEASE_NAME).read_bytes())
    poll_until(lambda: lease.expires_at < time.time() or None, deadline=Deadline(30), interval=0.2,
               what="the failed run's lease to expire")
    generate(**params)
    ids = [json.loads(line)["id"] for p in sorted(run.glob("part-*.jsonl")) for line in p.read_text().splitlines()]
    assert ids == [f"a{i:03d}" for i in range(200)] and (run / "manifest.json").exists()
