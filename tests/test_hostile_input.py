"""Property-based tests (hypothesis) over every entry point that takes a string from a UI form or
an operator's setting: run ids, object names, URIs, allowed locations, Slurm values, the job's
environment, extra profiles JSON, template text. For any input: nothing reaches a shell unquoted, nothing lands
outside its directory or prefix, and a refusal is a ConfigError with a message, never a crash.
Bounded examples, no network, no Slurm: pure code and bash on temp files."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

from hypothesis import HealthCheck, assume, example, given, settings, strategies as st

from infra.errors import ConfigError
from infra.storage.locations import check_allowed
from infra.settings import load_settings
from infra.slurm.options import check_directive, check_env
from infra.slurm.render import render_sbatch
from infra.slurm.spec import SbatchSpec
from infra.storage import open_output_store
from infra.storage.local import LocalOutputStore
from infra.storage.uris import KEY_COMPONENT, local_path, parse_s3_uri, validate_key_component

FAST = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SLOW = settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# What a form field might carry: path syntax, shell syntax, escapes, controls, look-alikes.
NASTY = "./\\-_~$`'\";&|<>(){}[]*?!#%= \t\n\r\x00\x7f:@,+\u2025\uff0e\uff0f\u2215\u200b\u00e9\u202e"
hostile = st.text(alphabet=st.sampled_from(NASTY) | st.characters(codec="utf-8"), max_size=40)
hostile_or_safe = hostile | st.from_regex(KEY_COMPONENT, fullmatch=True)
path_like = st.lists(st.sampled_from(["..", ".", "", "a", "b", "link", "%2e%2e", "\u2025", "~", "x\x00"]),
                     max_size=6).map("/".join)


def _refusal(exc: ConfigError) -> None:
    message = str(exc)
    assert message and "Traceback" not in message


@FAST
@given(value=hostile_or_safe)
@example(value="a'; echo foo")
@example(value="..")
@example(value="a/../../b")
def test_run_ids_and_object_names_stay_in_their_directory(value, tmp_path):
    try:
        validate_key_component(value, "run_id")
    except ConfigError as exc:
        _refusal(exc)
        return
    assert shlex.quote(value) == value  # nothing a shell would read as syntax
    assert (tmp_path / value).resolve().parent == tmp_path.resolve()
    assert "/" not in value and ".." not in value and not value.startswith(".")


@FAST
@given(name=hostile_or_safe | path_like, data=st.binary(max_size=8))
@example(name="../outside", data=b"x")
@example(name="../../etc/passwd", data=b"")
def test_the_local_store_never_writes_or_reads_outside_its_run(name, data, tmp_path_factory):
    base = tmp_path_factory.mktemp("store")
    (base / "outside").write_bytes(b"secret")
    store = LocalOutputStore(base / "run")
    for op in (lambda: store.write_bytes(name, data), lambda: store.read_bytes(name)):
        try:
            result = op()
        except ConfigError as exc:
            _refusal(exc)
            continue
        assert result != b"secret"
    outside = sorted(p.relative_to(base) for p in base.rglob("*") if not p.is_relative_to(base / "run"))
    assert outside == [Path("outside"), Path("run")] or outside == [Path("outside")]
    assert (base / "outside").read_bytes() == b"secret"


@FAST
@given(output=hostile | path_like, run_id=hostile_or_safe)
def test_opening_an_output_store_refuses_or_stays_under_the_output(output, run_id, tmp_path):
    settings_ = load_settings(_env_file=None)
    try:
        store = open_output_store(output, run_id, settings_.s3, settings_.work_path("staging"))
    except ConfigError as exc:
        _refusal(exc)
        return
    assert isinstance(store, LocalOutputStore)
    assert store.root.parent == local_path(output)


s3_key_parts = st.lists(st.sampled_from(["a", "pre", "prefix-other", "..", ".", "", "%2F", "x y", "\uff0f", "é"]),
                        max_size=4).map("/".join)


@FAST
@given(bucket=st.sampled_from(["team-bucket", "Team", "a", "xn--b", "1.2.3.4", "b_b", "ok-1"]) | hostile,
       key=s3_key_parts | hostile)
def test_s3_uris_parse_or_are_refused(bucket, key):
    uri = f"s3://{bucket}/{key}"
    try:
        got_bucket, got_key = parse_s3_uri(uri)
    except ConfigError as exc:
        _refusal(exc)
        return
    assert got_bucket == bucket and got_key == key
    assert not {".", ".."} & set(key.split("/")) and "\x00" not in key


@FAST
@given(tail=path_like | hostile, scheme=st.sampled_from(["", "file://", "FILE://", "s3://team-bucket/", "http://"]))
@example(tail="../outside/secret", scheme="")
@example(tail="link/secret", scheme="file://")
def test_allowed_locations_refuse_or_resolve_inside(tail, scheme, tmp_path_factory):
    base = tmp_path_factory.mktemp("confined")
    allowed = base / "allowed"
    (allowed / "a").mkdir(parents=True, exist_ok=True)
    if not (allowed / "link").exists():
        (allowed / "link").symlink_to(base, target_is_directory=True)
    confined = load_settings(_env_file=None, allowed_uris=[str(allowed), "s3://team-bucket/pre"])
    uri = f"{scheme}{allowed}/{tail}" if scheme in ("", "file://", "FILE://") else f"{scheme}{tail}"
    try:
        check_allowed(uri, confined.allowed_uris, what="input_uri")
    except ConfigError as exc:
        _refusal(exc)
        return
    if uri.startswith("s3://"):
        _, key = parse_s3_uri(uri.rstrip("/"))
        assert key == "pre" or key.startswith("pre/")
    else:
        resolved = local_path(uri).resolve()
        assert resolved == allowed.resolve() or resolved.is_relative_to(allowed.resolve())


@FAST
@given(directive=hostile | st.builds("--{}={}".format, st.sampled_from(["constraint", "signal", "nodelist",
                                                                         "gres", "chdir", "output"]), hostile))
@example(directive="--constraint=h100\n#SBATCH --export=ALL")
@example(directive="--constraint=x;rm -rf /")
def test_extra_directives_are_one_safe_line_or_refused(directive):
    try:
        check_directive(directive)
    except ConfigError as exc:
        _refusal(exc)
        return
    # An #SBATCH line is a comment to bash and split at blanks by sbatch: one line, one word
    # (constraint expressions keep their & and |), no quoting or expansion syntax.
    assert "\n" not in directive and "\r" not in directive and "\x00" not in directive
    assert not set(directive) & set(" \t'\"\\`$;<>()#")


def _spec(**slurm) -> SbatchSpec:
    settings_ = load_settings(_env_file=None, model={"path": "/lustre/models/m"},
                              slurm={"container_runtime": "none", **slurm})
    return SbatchSpec.from_settings(settings_, "h200x8", job_name="nsdg-prop", comment="nsdg run=prop",
                                    job_dir="/tmp/nsdg-prop-job")


@SLOW
@given(value=hostile)
@example(value="a'; touch /tmp/nsdg-pwned; '")
@example(value="$(touch /tmp/nsdg-pwned)`touch /tmp/nsdg-pwned`")
def test_site_env_values_reach_bash_verbatim(value, tmp_path):
    """A value in NSDG_SLURM__ENV is written into sbatch.sh: bash must hold exactly it, and run nothing."""
    try:
        check_env({"SITE_VALUE": value})
        script = render_sbatch(_spec(env={"SITE_VALUE": value}))
    except ConfigError as exc:
        _refusal(exc)
        return
    # split at "\n" only: bash does, while splitlines() also cuts at U+2028, U+0085 and the like
    [line] = [ln for ln in script.split("\n") if ln.startswith("export SITE_VALUE=")]
    probe = tmp_path / "probe.sh"
    probe.write_text(f'{line}\nprintf "%s" "$SITE_VALUE"\n', encoding="utf-8")
    out = subprocess.run(["bash", str(probe)], capture_output=True, cwd=tmp_path, timeout=30,
                         env={"PATH": os.environ["PATH"]})
    assert out.returncode == 0 and out.stdout.decode("utf-8", "surrogateescape") == value, (line, out)
    assert list(tmp_path.iterdir()) == [probe]


@FAST
@given(field=st.sampled_from(["account", "partition", "qos", "reservation", "time_limit", "mem", "propagate"]),
       value=hostile_or_safe)
def test_slurm_names_from_settings_are_safe_or_refused(field, value):
    try:
        script = render_sbatch(_spec(**{field: value}))
    except ConfigError as exc:
        _refusal(exc)
        return
    header = [ln for ln in script.split("\n") if ln.startswith("#SBATCH ")]
    assert any(value in ln for ln in header) or not value
    assert all(shlex.split(ln[len("#SBATCH "):]) for ln in header)  # each still one well-formed line


json_values = st.recursive(st.none() | st.booleans() | st.integers(-10, 100) | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                           max_leaves=10)
profile_fields = st.fixed_dictionaries({}, optional={
    "backend": st.sampled_from(["slurm", "local", "attach", "bash", ""]) | json_values,
    "nodes": st.integers(-1, 100) | json_values, "gpus_per_node": st.integers(-1, 20),
    "tensor_parallel": st.integers(0, 70), "pipeline_parallel": st.integers(0, 3),
    "gpu_type": hostile | st.none(), "prompt_format": st.sampled_from(["raw", "chat", "x"]), "extra": json_values})


@FAST
@given(text=st.one_of(st.dictionaries(hostile_or_safe, profile_fields, max_size=3).map(json.dumps),
                      json_values.map(json.dumps), hostile))
@example(text="{not json")
@example(text='{"mini": {"backend": "slurm", "nodes": 1, "gpus_per_node": 8, "tensor_parallel": 8}}')
def test_extra_profiles_json_loads_or_is_one_clear_error(text, monkeypatch):
    assume("\x00" not in text)  # the environment itself cannot hold a NUL
    monkeypatch.setenv("NSDG_EXTRA_PROFILES", text)
    try:
        loaded = load_settings(_env_file=None)
    except ConfigError as exc:
        _refusal(exc)
        assert "NSDG_EXTRA_PROFILES" in str(exc)
        return
    for name in loaded.extra_profiles:
        assert loaded.profile(name).backend in ("slurm", "local", "attach")


def test_the_strategies_reach_both_sides():
    """Guard against a property that only ever refuses: each entry point accepts some input."""
    validate_key_component("run-1", "run_id")
    check_directive("--constraint=h100")
    assert parse_s3_uri("s3://team-bucket/pre/a") == ("team-bucket", "pre/a")


# --- template text (recipe.prompt_template): sandboxed, never the environment -----------------------

SECRET = "nsdg-marker-7f3a9c"
JINJA_PIECES = [
    "{{ prompt }}", "{{ topic|upper }}", "{{ missing }}", "{% for e in examples %}{{ e }}{% endfor %}",
    "{{ ''.__class__.__mro__ }}", "{{ cycler.__init__.__globals__.os.environ }}", "{{ lipsum.__globals__ }}",
    "{{ lipsum.__globals__['os'].environ['NSDG_HOSTILE_SECRET'] }}", "{{ joiner.__init__.__globals__ }}",
    "{{ namespace.__init__.__globals__['os'].environ }}", "{{ self.__init__.__globals__ }}", "{{ config }}",
    "{{ range.__self__ }}", "{{ prompt.__class__.__base__.__subclasses__() }}", "{% set x = prompt * 3 %}{{ x }}",
    "{{ 1/0 }}", "{{", "}}", "{% if %}", "{% endfor %}", "{# c #}", "{{ examples[99] }}",
    # Work and memory (review 2, D10): each is a bad line at once, never a hang, an exhausted host or a crash.
    "{{ 9 ** (9 ** 9) }}", "{{ 'a' * 3000000000 }}", "{{ '%1900000000s' % prompt }}", "{{ prompt|center(1900000000) }}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
]
template_text = st.lists(st.sampled_from(JINJA_PIECES) | hostile, max_size=6).map("".join)


@FAST
@given(text=template_text)
@example(text="{{ cycler.__init__.__globals__.os.environ['NSDG_HOSTILE_SECRET'] }}")
@example(text="{{ lipsum.__globals__['os'].popen('echo pwned').read() }}")
@example(text="{{ 9 ** (9 ** 9) }}{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}")
def test_templates_reach_no_python_object_or_environment_variable(text, monkeypatch):
    from infra.recipes.templates import PromptTemplate, RenderError, render

    monkeypatch.setenv("NSDG_HOSTILE_SECRET", SECRET)
    try:
        compiled = PromptTemplate("inline", text).compiled()
    except ConfigError as exc:  # a syntax error: the user's to fix, one message
        _refusal(exc)
        return
    context = {"prompt": "hello", "topic": "sea", "examples": [{"prompt": "q", "completion": "a"}], "separator": "\n"}
    try:
        out = render(compiled, context)
    except RenderError as exc:  # a bad line for this record (sandbox refusal, missing field, ...)
        assert str(exc)
        return
    assert SECRET not in out
    assert "<function" not in out and "<class" not in out and "<module" not in out
