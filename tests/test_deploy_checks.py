"""`prefect deploy` and the site's placeholders (issue 27): a deployment whose parameters still hold
CHANGE-ME is deployed with a warning naming the fields and its schedules off, on once the site is
edited; its step called as Prefect calls it, its output applied with Prefect's own templating."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from flows.deploy_checks import site_placeholders
from infra.errors import ConfigError
from infra.settings import placeholders

REPO = Path(__file__).resolve().parents[1]


def deployments(path: Path) -> dict[str, dict]:
    return {d["name"]: d for d in yaml.safe_load(path.read_text())["deployments"]}


def deploy_time_schedules(deployment: dict) -> list:
    """What `prefect deploy` gives the deployment's schedules: its own build steps imported by their
    dotted names and called as Prefect calls them (the `id` names the output), then Prefect's
    templating of the schedules with their outputs. Prefect's own steps (the clone step's `pwd`) are
    left out: Prefect's runner would start a temporary API server for them (a minute)."""
    from prefect.utilities.importtools import import_object
    from prefect.utilities.templating import apply_values

    outputs = {}
    for step in deployment["build"]:
        [(name, inputs)] = step.items()
        if not name.startswith("prefect."):
            inputs = dict(inputs)
            step_id = inputs.pop("id")
            outputs[step_id] = import_object(name)(**inputs)
    return apply_values(deployment.get("schedules") or [], outputs)


def test_the_repos_cluster_deployments_deploy_unscheduled_until_the_site_is_edited(tmp_path, monkeypatch, capfd):
    shutil.copy(REPO / "prefect.yaml", tmp_path / "prefect.yaml")
    monkeypatch.chdir(tmp_path)
    deps = deployments(tmp_path / "prefect.yaml")
    assert site_placeholders("nightly") == {"schedules_active": False, "fields": ["input_uri", "output_uri"]}
    assert "deployment 'nightly': its parameters still hold CHANGE-ME (input_uri, output_uri); deployed with its " \
           "schedules OFF" in capfd.readouterr().err
    [nightly] = deploy_time_schedules(deps["nightly"])
    assert nightly["active"] is False and nightly["cron"] == "0 2 * * *"
    assert deploy_time_schedules(deps["on-demand"]) == []  # no schedule: warned, and its runs refused at start
    assert "deployment 'on-demand': its parameters still hold CHANGE-ME (output_uri)" in capfd.readouterr().err

    edited = (tmp_path / "prefect.yaml").read_text().replace("CHANGE-ME-bucket", "team-bucket")
    (tmp_path / "prefect.yaml").write_text(edited)
    deps = deployments(tmp_path / "prefect.yaml")
    assert deploy_time_schedules(deps["nightly"])[0]["active"] is True
    deploy_time_schedules(deps["on-demand"])
    assert "CHANGE-ME" not in capfd.readouterr().err


def test_every_deployment_with_a_placeholder_has_the_step_and_keeps_its_working_directory():
    deps = deployments(REPO / "prefect.yaml")
    guarded = {name for name, d in deps.items() if placeholders(d.get("parameters") or {})}
    assert guarded == {"nightly", "on-demand"}
    for name in guarded:
        steps = deps[name]["build"]
        assert {"flows.deploy_checks.site_placeholders": {"id": "placeholders", "deployment": name}} in steps, name
        assert all(x["active"] == "{{ placeholders.schedules_active }}" for x in deps[name].get("schedules") or [])
        # Its own build list replaces the global one: the clone step the pull step reads must be in it.
        assert any(s.get("prefect.deployments.steps.run_shell_script", {}).get("id") == "clone" for s in steps), name


def test_a_step_naming_no_deployment_is_one_clear_error(tmp_path, monkeypatch):
    shutil.copy(REPO / "prefect.yaml", tmp_path / "prefect.yaml")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="no deployment named 'nightlyy'"):
        site_placeholders("nightlyy")
    assert site_placeholders("local-smoke") == {"schedules_active": True, "fields": []}
