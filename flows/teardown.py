"""Release from the crash and cancellation hooks. They may run in another process (the
worker's), with no in-memory state: the allocation is found from the flow run alone."""

from __future__ import annotations

from prefect.logging.loggers import flow_run_logger

from flows.params import resolve_run_id
from infra.backends.local import release_local_of_run
from infra.run.lease import release_held
from infra.settings import load_settings
from infra.slurm.backend import release_jobs_of_flow_run


def release_for_flow_run(flow_run) -> list[str]:
    """Idempotent: cancel every Slurm job named after this flow run and stop a local server of
    this run. Returns what was released, for the log."""
    settings = load_settings()
    released = []
    run_id = (flow_run.parameters or {}).get("run_id") or resolve_run_id(flow_run)
    if release_local_of_run(settings, run_id):
        released.append(f"local server of run {run_id}")
    released += release_jobs_of_flow_run(settings, str(flow_run.id))
    return released


def release_lease_on_hook(flow, flow_run, state) -> None:
    """Completion and failure hooks run in the flow's own process: give the run's lease back now
    (a killed run's lease expires instead)."""
    release_held(str(flow_run.id))


def release_on_hook(flow, flow_run, state) -> None:
    logger = flow_run_logger(flow_run, flow)
    release_held(str(flow_run.id))  # in the flow's process (SIGTERM); elsewhere it holds none
    try:
        released = release_for_flow_run(flow_run)
    except Exception as exc:  # a hook that raises is only logged by Prefect; say what to do
        logger.error("teardown after %s failed: %s. Cancel the job by hand (scancel --name nsdg-%s).",
                     state.name, exc, flow_run.id)
        raise
    logger.info("teardown after %s: released %s", state.name, ", ".join(released) or "nothing (already released)")
