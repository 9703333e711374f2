"""The `reap` flow: the out-of-band net under teardown. It cancels Slurm jobs of ours whose
flow run is over, for the exits where neither the flow's `finally` nor its hooks ran (the
worker and the flow both killed, a hook that failed, a login node rebooted).

A job is ours when both hold:
- it is named `nsdg-<flow-run id>` (infra.slurm.backend.job_name_for): a job with any other
  name, or `nsdg-` followed by something that is not a flow-run id (`nemotron-sdg run` outside
  a deployment names its job after the run id), is never touched;
- its working directory lies under this installation's `NSDG_SLURM__JOB_ROOT` (every job of
  SlurmBackend runs with `--chdir` in its job directory there), so a second installation with
  its own Prefect server and job root, on the same Slurm account, is out of reach.

For each such job the flow asks this Prefect server about the flow run:

    terminal (Completed, Failed, Cancelled, Crashed)    -> cancel: the run can no longer release it
    unknown to the API (404)                            -> cancel: no run will ever release it
    any other state (Scheduled ... Running, Cancelling) -> keep: the run still owns its job
    the API did not answer                              -> keep: never cancel on a doubt
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import TERMINAL_STATES, StateType
from prefect.exceptions import ObjectNotFound
from pydantic import Field

from infra.settings import load_settings
from infra.slurm.backend import JOB_PREFIX
from infra.slurm.client import SlurmClient
from infra.slurm.parse import JobSummary
from infra.system.paths import is_under

UNKNOWN_RUN = "unknown to the API"
NO_ANSWER = "no answer from the API"


@dataclass(frozen=True)
class Verdict:
    job_id: str
    job_name: str
    flow_run_id: str
    cancel: bool
    reason: str


def flow_run_id_of(job_name: str) -> UUID | None:
    """`nsdg-<uuid>` -> the flow-run id; anything else -> None (not a job of a flow run)."""
    if not job_name.startswith(JOB_PREFIX):
        return None
    try:
        return UUID(job_name[len(JOB_PREFIX):])
    except ValueError:
        return None


def jobs_of_flow_runs(jobs: list[JobSummary], job_root: Path) -> list[JobSummary]:
    """Only `nsdg-<flow-run id>` jobs running in a directory under `job_root`."""
    return [job for job in jobs if flow_run_id_of(job.name) is not None and is_under(job.work_dir, job_root)]


def judge(job: JobSummary, run_state: StateType | str) -> Verdict:
    """Whether to cancel one job of a flow run, given what the API says about the run:
    a StateType, UNKNOWN_RUN or NO_ANSWER."""
    run_id = str(flow_run_id_of(job.name))
    if run_state == UNKNOWN_RUN:
        return Verdict(job.job_id, job.name, run_id, True, f"flow run {run_id} is {UNKNOWN_RUN}")
    if run_state == NO_ANSWER:
        return Verdict(job.job_id, job.name, run_id, False, f"flow run {run_id}: {NO_ANSWER}; kept")
    name = run_state.value if isinstance(run_state, StateType) else str(run_state)
    if run_state in TERMINAL_STATES:
        return Verdict(job.job_id, job.name, run_id, True, f"flow run {run_id} is {name}")
    return Verdict(job.job_id, job.name, run_id, False, f"flow run {run_id} is {name}; kept")


def run_states(run_ids: set[UUID], logger) -> dict[UUID, StateType | str]:
    states: dict[UUID, StateType | str] = {}
    with get_client(sync_client=True) as api:
        for run_id in run_ids:
            try:
                run = api.read_flow_run(run_id)
            except ObjectNotFound:
                states[run_id] = UNKNOWN_RUN
            except Exception as exc:  # the API hiccuped: keep the job, look again next time
                logger.warning("could not read flow run %s: %s", run_id, exc)
                states[run_id] = NO_ANSWER
            else:
                states[run_id] = run.state.type if run.state else NO_ANSWER
    return states


@flow(name="reap")
def reap(
    dry_run: Annotated[bool, Field(description="only report which jobs would be cancelled")] = False,
) -> dict:
    """Cancel Slurm jobs named nsdg-<flow-run id> whose flow run is over or unknown.

    Args:
        dry_run: only report which jobs would be cancelled
    """
    logger = get_run_logger()
    settings = load_settings()
    slurm = SlurmClient(command_timeout=settings.slurm.command_timeout_s)
    job_root = Path(settings.slurm.job_root).expanduser().resolve()
    ours = jobs_of_flow_runs(slurm.active_jobs(), job_root)
    states = run_states({flow_run_id_of(job.name) for job in ours}, logger)
    verdicts = [judge(job, states[flow_run_id_of(job.name)]) for job in ours]
    cancelled, failed = [], []
    for v in verdicts:
        if not v.cancel:
            logger.info("job %s (%s): %s", v.job_id, v.job_name, v.reason)
        elif dry_run:
            logger.info("dry run: would cancel job %s (%s): %s", v.job_id, v.job_name, v.reason)
        else:
            try:
                slurm.cancel(v.job_id)
            except Exception as exc:  # try every job, then fail the run so the UI shows it
                logger.error("could not cancel job %s (%s): %s", v.job_id, v.job_name, exc)
                failed.append(v.job_id)
                continue
            logger.warning("cancelled job %s (%s): %s", v.job_id, v.job_name, v.reason)
            cancelled.append(v.job_id)
    if cancelled or failed:
        create_table_artifact(
            [{"job": v.job_id, "name": v.job_name, "reason": v.reason,
              "result": "failed" if v.job_id in failed else "cancelled" if v.job_id in cancelled else "kept"}
             for v in verdicts],
            description="Slurm jobs of flow runs under the job root, and what the reaper did",
        )
    if failed:
        raise RuntimeError(f"could not cancel Slurm jobs {', '.join(failed)}; cancel them by hand with scancel")
    logger.info("%d job(s) of flow runs under %s, %d cancelled", len(verdicts), job_root, len(cancelled))
    return {"seen": [v.job_id for v in verdicts], "cancelled": cancelled,
            "would_cancel": [v.job_id for v in verdicts if v.cancel] if dry_run else []}
