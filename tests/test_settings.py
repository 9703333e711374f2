import pytest

from infra.errors import ConfigError
from infra.settings import BUILTIN_PROFILES, Profile, load_settings


def test_defaults_and_builtin_profiles(workdir):
    s = load_settings()
    assert s.server.port == 1424
    assert s.server.ready_timeout_s == 2700
    h100 = s.profile("h100x16")
    assert (h100.nodes, h100.gpus_per_node, h100.tensor_parallel, h100.pipeline_parallel) == (2, 8, 8, 2)
    assert s.profile("a100x16") == BUILTIN_PROFILES["a100x16"]
    h200 = s.profile("h200x8")
    assert (h200.nodes, h200.tensor_parallel, h200.pipeline_parallel) == (1, 8, 1)
    assert s.profile("local").backend == "local"


def test_env_nested_and_dotenv(workdir, monkeypatch):
    monkeypatch.setenv("NSDG_SERVER__PORT", "5555")
    (workdir / ".env").write_text("NSDG_SLURM__ACCOUNT=acct-1\nNSDG_MODEL__CONTEXT_LENGTH=2048\n")
    s = load_settings()
    assert s.server.port == 5555
    assert s.slurm.account == "acct-1"
    assert s.model.context_length == 2048


def test_error_names_the_variable_and_range(workdir, monkeypatch):
    monkeypatch.setenv("NSDG_SERVER__PORT", "70000")
    with pytest.raises(ConfigError) as exc:
        load_settings()
    assert "NSDG_SERVER__PORT" in str(exc.value)
    assert "65535" in str(exc.value)


def test_secret_never_echoed(workdir, monkeypatch):
    monkeypatch.setenv("NSDG_S3__SECRET_ACCESS_KEY", "hunter2-very-secret")
    s = load_settings()
    assert "hunter2" not in repr(s) and "hunter2" not in str(s.model_dump())
    assert s.s3.secret_access_key.get_secret_value() == "hunter2-very-secret"
    monkeypatch.setenv("NSDG_S3__MAX_ATTEMPTS", "0")
    with pytest.raises(ConfigError) as exc:
        load_settings()
    assert "hunter2" not in str(exc.value)


def test_unknown_profile_lists_valid_ones(workdir):
    with pytest.raises(ConfigError) as exc:
        load_settings().profile("h100x32")
    assert "h100x16" in str(exc.value) and "local" in str(exc.value)


def test_extra_profile_and_topology_check(workdir, monkeypatch):
    monkeypatch.setenv("NSDG_EXTRA_PROFILES", '{"mini": {"backend": "slurm", "nodes": 2, "gpus_per_node": 8, "tensor_parallel": 8, "pipeline_parallel": 2}}')
    assert load_settings().profile("mini").nodes == 2
    with pytest.raises(ValueError, match="must equal"):
        Profile(backend="slurm", nodes=2, gpus_per_node=8, tensor_parallel=8, pipeline_parallel=1)


def test_slurm_names_validated(workdir, monkeypatch):
    monkeypatch.setenv("NSDG_SLURM__ACCOUNT", "a'; rm -rf /")
    with pytest.raises(ConfigError, match="NSDG_SLURM__ACCOUNT"):
        load_settings()


def test_dotenv_shared_with_prefect_loads_and_never_echoes_its_password(workdir):
    """docs/operators.md puts PREFECT_API_URL and PREFECT_API_AUTH_STRING in the clone's .env, which
    the flow reads too: those keys are Prefect's; a misspelled NSDG_ key still fails, without echoing
    an auth value."""
    (workdir / ".env").write_text("PREFECT_API_URL=https://prefect.example/api\nPREFECT_API_AUTH_STRING=nsdg:hunter2-pw\n"
                                  "NSDG_SLURM__ACCOUNT=acct-1\nNSDG_ALLOWED_URIS=[\"/lustre/nsdg\"]\n")
    s = load_settings()
    assert s.slurm.account == "acct-1" and s.allowed_uris == ["/lustre/nsdg"]
    with open(workdir / ".env", "a") as env:
        env.write("NSDG_SLURM_ACOUNT=typo\nNSDG_API_AUTH_STRING=nsdg:hunter2-pw\n")
    with pytest.raises(ConfigError) as exc:
        load_settings()
    assert "NSDG_SLURM_ACOUNT" in str(exc.value) and "NSDG_NSDG_" not in str(exc.value)
    assert "hunter2" not in str(exc.value)


def test_a_json_setting_that_is_not_json_is_one_clear_error(workdir, monkeypatch):
    monkeypatch.setenv("NSDG_EXTRA_PROFILES", "{not json")
    with pytest.raises(ConfigError, match="NSDG_EXTRA_PROFILES: not valid JSON"):
        load_settings()
