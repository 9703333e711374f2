"""A `prefect deploy` build step for prefect.yaml's cluster deployments: while a deployment's parameters
still hold the site's placeholders (`CHANGE-ME`, from an unedited `definitions.site`), the deploy
prints a warning naming each field and deploys the deployment's schedules OFF; the next deploy after
the edit turns them on.

Why not refuse, and why the schedules and not `paused`: Prefect's deploy runs build steps per
deployment, but a failing step fails the whole `prefect deploy --all` (every deployment after it
too), so refusing would also block the local deployments (local-smoke, the examples) that need no
site values and are how a site tries its setup first. A step's outputs template the deployment's
fields after the steps run, but prefect.yaml's schema checks `paused` as a boolean before any step
runs (a template there fails the whole file), while a schedule's `active` takes a template:
prefect.yaml sets `active: "{{ placeholders.schedules_active }}"` beside this step. So the nightly
cron cannot fire on a placeholder bucket; a run started by hand (on-demand has no schedule) is still
refused at its start, before any GPU, by the run's own placeholder check (flows/params.py
check_runnable).
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from infra.errors import ConfigError
from infra.settings import PLACEHOLDER, placeholders


def site_placeholders(deployment: str, file: str = "prefect.yaml") -> dict:
    """The build step (`flows.deploy_checks.site_placeholders`): {"schedules_active": bool, "fields":
    [...]} for `deployment` as `file` defines it (anchors resolved), read where `prefect deploy` runs."""
    path = Path(file)
    try:
        spec = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read it to check deployment {deployment!r} for placeholders: {exc}") from None
    found = [d for d in (spec or {}).get("deployments") or [] if d.get("name") == deployment]
    if not found:
        raise ConfigError(f"{path}: no deployment named {deployment!r}; the placeholders step names its own deployment")
    fields = [".".join(map(str, loc)) for loc, _ in placeholders(found[0].get("parameters") or {})]
    if fields:
        print(f"WARNING: deployment {deployment!r}: its parameters still hold {PLACEHOLDER} ({', '.join(fields)}); "
              f"deployed with its schedules OFF and its runs refused at start: edit `definitions.site` in {path} "
              "and deploy again", file=sys.stderr, flush=True)
    return {"schedules_active": not fields, "fields": fields}
