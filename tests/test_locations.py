"""NSDG_ALLOWED_URIS (infra/locations.py): every door a parameter could walk out of an allowed
location through is knocked on, and each is refused with its message before anything is read."""

from __future__ import annotations

import json
import os

import pytest

from infra.errors import ConfigError
from infra.locations import check_allowed, check_run_locations
from infra.settings import load_settings


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
        check_allowed(uri, settings, what=what)
    message = str(caught.value)
    assert message.startswith(f"{what} ") and "\n" not in message, message
    return message


def test_unset_means_unrestricted(tree):
    _, outside = tree
    check_allowed(str(outside / "secret"), load_settings(), what="input_uri")


def test_inside_is_allowed_in_every_spelling(tree, monkeypatch):
    allowed, _ = tree
    settings = confined(allowed)
    monkeypatch.chdir(allowed)
    for uri in (str(allowed / "data.jsonl"), f"file://{allowed}/data.jsonl", "data.jsonl", "./sub/../data.jsonl",
                str(allowed), str(allowed / "not-yet" / "out"), f"{allowed}/"):
        check_allowed(uri, settings, what="input_uri")


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
    check_allowed(f"file://{allowed}/data.jsonl", settings, what="input_uri")
    for uri in (f"file://{outside}/secret", "file:///etc/passwd", f"file://{allowed}/../outside/secret",
                f"file://{allowed}/link-to-secret"):
        refused(uri, settings)
    with pytest.raises(ConfigError, match="Unsupported URI scheme"):  # FILE://, http://: never a local path
        check_allowed("FILE:///etc/passwd", settings, what="input_uri")


def test_s3_prefix_is_a_directory_not_a_string_prefix():
    settings = confined("s3://team-bucket/nsdg", "s3://whole-bucket")
    for uri in ("s3://team-bucket/nsdg", "s3://team-bucket/nsdg/", "s3://team-bucket/nsdg/in/a.jsonl",
                "s3://whole-bucket/anything/at/all"):
        check_allowed(uri, settings, what="output_uri")
    for uri in ("s3://team-bucket/nsdg-other/x", "s3://team-bucket/nsdgx", "s3://team-bucket/other/nsdg/x",
                "s3://team-bucket/NSDG/x", "s3://team-bucket", "s3://other-bucket/nsdg/x", "s3://team-bucket-2/nsdg/x"):
        assert "outside the locations" in refused(uri, settings, "output_uri"), uri
    with pytest.raises(ConfigError, match="'..'"):  # a '..' component never reaches the check's comparison
        check_allowed("s3://team-bucket/nsdg/../secrets/x", settings, what="output_uri")
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
    check_run_locations(str(allowed / "data.jsonl"), str(allowed / "out"), "run-2", settings)
    with pytest.raises(ConfigError, match="^output_uri's run directory"):
        check_run_locations(str(allowed / "data.jsonl"), str(allowed / "out"), "run-1", settings)
    with pytest.raises(ConfigError, match="^output_uri "):
        check_run_locations(str(allowed / "data.jsonl"), str(outside), "run-2", settings)


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
