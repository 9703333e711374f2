"""Runs whose flow process died with nobody left to say so.

When the worker and the flow process both die (a login node reboots, the OOM killer takes
both), no `finally`, no `on_crashed` hook and no worker reports the run: Prefect shows it
Running for ever. The Slurm job is safe (its dead-man switch ends it), but the run is not.

Flow processes send a `prefect.flow-run.heartbeat` event every
`PREFECT_FLOWS_HEARTBEAT_FREQUENCY` seconds (Prefect's default 180, at least 30; flow runs take
it from the worker's environment). This module installs one automation on the Prefect server:
a run tagged `nemotron-sdg` that sent a heartbeat and then, within `within_s` (three heartbeats
by default), neither another heartbeat nor a terminal state, is set to Crashed with a message
saying why. The reaper then cancels its Slurm job if the dead-man
switch has not already. Prefect's own recipe ("detect zombie flows"), scoped to our tag so
other teams' flows on a shared server are untouched.

`within_s` must be several heartbeats long: a run marked Crashed while it is alive loses its
Slurm job to the reaper at its next pass. Three missed heartbeats is the floor we allow.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

from infra.errors import ConfigError

if TYPE_CHECKING:  # Prefect is imported when used: `nemotron-sdg --help` stays quick
    from prefect.automations import Automation

NAME = "nemotron-sdg: crash runs whose flow process stopped sending heartbeats"
TAG = "nemotron-sdg"  # every deployment in prefect.yaml carries it
MISSED_HEARTBEATS = 3
PREFECT_MIN_HEARTBEAT_S = 30  # flows heartbeat at least this far apart, whatever the setting asks
PREFECT_DEFAULT_HEARTBEAT_S = 180  # when PREFECT_FLOWS_HEARTBEAT_FREQUENCY is not set
TERMINAL_EVENTS = {f"prefect.flow-run.{state}" for state in ("Completed", "Failed", "Cancelled", "Crashed")}


def heartbeat_frequency() -> int | None:
    """PREFECT_FLOWS_HEARTBEAT_FREQUENCY as this environment sees it (None when unset)."""
    from prefect.settings import get_current_settings

    value = get_current_settings().flows.heartbeat_frequency
    return None if value is None else int(value)


def deployment_heartbeats() -> dict[str, float]:
    """Each deployment tagged TAG on the server -> the heartbeat its flow runs send: its job variables'
    PREFECT_FLOWS_HEARTBEAT_FREQUENCY (prefect.yaml sets it), else Prefect's default, 180 s (a worker
    could set another in its own environment, which no one can read from here: assume the default)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterTags

    with get_client(sync_client=True) as client:
        deployments = client.read_deployments(deployment_filter=DeploymentFilter(tags=DeploymentFilterTags(all_=[TAG])))
        flows = {d.flow_id: client.read_flow(d.flow_id).name for d in deployments}
    heartbeats = {}
    for d in deployments:
        value = ((d.job_variables or {}).get("env") or {}).get("PREFECT_FLOWS_HEARTBEAT_FREQUENCY")
        heartbeats[f"{flows[d.flow_id]}/{d.name}"] = max(float(value) if value else PREFECT_DEFAULT_HEARTBEAT_S,
                                                         PREFECT_MIN_HEARTBEAT_S)
    return heartbeats


def choose_heartbeat(given: float | None, deployed: dict[str, float], here: float | None) -> tuple[float, str]:
    """The heartbeat the dead-run window is sized for, and where it came from. A window sized for a
    shorter heartbeat than a deployment's runs send would mark its healthy runs Crashed (issue 27: the
    docs said --heartbeat-s 60 while the worker sent Prefect's default 180), so that is refused."""
    if deployed:
        slowest, seconds = max(deployed.items(), key=lambda item: item[1])
        if given is not None and given < seconds:
            raise ConfigError(
                f"--heartbeat-s {given:g} is shorter than the heartbeat of deployment {slowest!r}: its flow runs send "
                f"one every {seconds:g} s (PREFECT_FLOWS_HEARTBEAT_FREQUENCY in its job variables, else Prefect's "
                f"default 180), so its healthy runs would be marked Crashed. Leave --heartbeat-s out, or set "
                "flow_heartbeat_s in prefect.yaml and deploy again.")
        return (given or seconds), f"the deployments' flow runs heartbeat every {seconds:g} s ({slowest} the slowest)"
    if given is not None:
        return given, "--heartbeat-s (no nemotron-sdg deployment on the server yet: deploy with the same value)"
    if here is None:
        raise ConfigError("No nemotron-sdg deployment on the server to read the flow runs' heartbeat from, and "
                          "PREFECT_FLOWS_HEARTBEAT_FREQUENCY is unset here. Run `prefect --no-prompt deploy --all` "
                          "first, then this command again.")
    return here, "PREFECT_FLOWS_HEARTBEAT_FREQUENCY here (no nemotron-sdg deployment on the server yet)"


def zombie_automation(within_s: float, heartbeat_s: float) -> "Automation":
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    heartbeat_s = max(heartbeat_s, PREFECT_MIN_HEARTBEAT_S)
    if within_s < MISSED_HEARTBEATS * heartbeat_s:
        raise ConfigError(
            f"within_s={within_s:g} is shorter than {MISSED_HEARTBEATS} heartbeats of {heartbeat_s:g} s: a live run "
            f"that misses one heartbeat would be marked Crashed and lose its Slurm job. Use at least "
            f"{MISSED_HEARTBEATS * heartbeat_s:g} s, or lower PREFECT_FLOWS_HEARTBEAT_FREQUENCY (minimum 30)."
        )
    return Automation(
        name=NAME,
        description=(
            f"Sets a run tagged {TAG!r} to Crashed when {within_s:g} s pass after a heartbeat with neither another "
            "heartbeat nor a terminal state: its flow process is gone. Installed by `nemotron-sdg install-automations`."
        ),
        enabled=True,
        trigger=EventTrigger(
            posture=Posture.Proactive,
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *TERMINAL_EVENTS},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            match_related=ResourceSpecification({"prefect.resource.id": f"prefect.tag.{TAG}"}),
            for_each={"prefect.resource.id"},
            threshold=1,
            within=timedelta(seconds=within_s),
        ),
        actions=[ChangeFlowRunState(
            state=StateType.CRASHED,
            message=(f"No heartbeat from the flow process for {within_s:g} s: it is gone (worker and flow killed, "
                     "node lost). Its Slurm job ends by its dead-man switch or the reap deployment; "
                     "rerun with the same run_id to resume from the published shards."),
        )],
    )


def install(within_s: float, heartbeat_s: float) -> tuple[str, str]:
    """Create the automation, or update the one of the same name: (its id, "created"/"updated")."""
    from prefect.automations import Automation

    wanted = zombie_automation(within_s, heartbeat_s)
    try:
        existing = Automation.read(name=NAME)
    except ValueError:  # Prefect's "not found"
        created = wanted.create()
        return str(created.id), "created"
    for field in ("description", "enabled", "trigger", "actions"):
        setattr(existing, field, getattr(wanted, field))
    existing.update()
    return str(existing.id), "updated"
