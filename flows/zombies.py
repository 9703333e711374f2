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
TERMINAL_EVENTS = {f"prefect.flow-run.{state}" for state in ("Completed", "Failed", "Cancelled", "Crashed")}


def heartbeat_frequency() -> int:
    """PREFECT_FLOWS_HEARTBEAT_FREQUENCY as this environment sees it (Prefect's default: 180 s)."""
    from prefect.settings import get_current_settings

    value = get_current_settings().flows.heartbeat_frequency
    if value is None:
        raise ConfigError("PREFECT_FLOWS_HEARTBEAT_FREQUENCY is unset here, so flow runs send no heartbeats and "
                          "no run could ever be told dead from alive. Set it (e.g. 60) in the worker's environment "
                          "and here, then run again.")
    return int(value)


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
