"""Talk to Slurm: submit, look up state, find, cancel, locate the first node.

Every command goes through one runner (`infra.system.commands.run_command` by default) as an argv
list with a timeout; the text it prints is turned into values by the pure `parse_*` functions
of infra/slurm/parse.py, which are tested on recorded outputs.

A job is submitted held (`sbatch --hold`) and released (`scontrol release`) once its id is
recorded (infra/slurm/backend.py): a held job is never allocated.

How `SlurmClient.state` finds a job, first answer wins:

    squeue -h -j ID               pending, running, completing jobs (finished ones are not listed)
    sacct --parsable2 -n -X -j ID the accounting database (absent without slurmdbd)
    scontrol show job ID -o       the controller's memory: finished jobs for MinJobAge seconds
    sacct --completion ...        the job-completion log (jobcomp/filetxt, as on the local cluster)
    -> JobState(state="UNKNOWN")  no source knows the job

A source that says "I do not know this job" passes the question on; a source that is not
there (sacct without accounting, `--completion` on a Slurm that dropped it) is skipped; a
controller that does not answer raises `CommandError`, because "unknown" would be a lie.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from infra.errors import CommandError, ConfigError, SlurmJobError
from infra.slurm.parse import (
    SACCT_FIELDS,
    SQUEUE_LIST_FORMAT,
    SQUEUE_STATE_FORMAT,
    STATE_SOURCES,
    UNKNOWN,
    JobState,
    JobSummary,
    check_job_id,
    normalize_state,
    parse_job_ids,
    parse_sacct,
    parse_sbatch_parsable,
    parse_scontrol_job,
    parse_scontrol_record,
    parse_squeue_list,
    parse_squeue_state,
    says_already_finished,
    says_unknown_job,
    slurm_value,
)
from infra.system.commands import CommandResult, run_command

log = logging.getLogger(__name__)

Runner = Callable[..., CommandResult]

class SlurmClient:
    """Slurm commands through one runner. `runner(argv, timeout=..., check=...)` returns a
    CommandResult and raises CommandError (see infra.system.commands.run_command)."""

    def __init__(self, runner: Runner = run_command, command_timeout: float = 30.0):
        self.runner = runner
        self.command_timeout = command_timeout

    def _run(self, argv: Sequence[str], *, check: bool = True) -> CommandResult:
        return self.runner(list(argv), timeout=self.command_timeout, check=check)

    # submit ---------------------------------------------------------------------------------
    def submit(self, script_path: Path, *, extra_args: Iterable[str] = ()) -> str:
        """`sbatch --parsable [extra_args] SCRIPT`; returns the job id."""
        args = [str(a) for a in extra_args]
        result = self._run(["sbatch", "--parsable", *args, str(script_path)])
        job_id = parse_sbatch_parsable(result.stdout)
        log.info("submitted %s as Slurm job %s", script_path, job_id)
        return job_id

    def release_hold(self, job_id: str) -> None:
        """`scontrol release ID`: let a job submitted with `sbatch --hold` be scheduled."""
        result = self._run(["scontrol", "release", check_job_id(job_id)], check=False)
        if result.returncode != 0:
            raise self._failed(result, f"releasing the hold on job {job_id}")

    # state ------------------------------------------------------------------------------------
    def state(self, job_id: str, *, sources: Sequence[str] = STATE_SOURCES) -> JobState:
        """Ask each source in turn (see the module docstring); UNKNOWN when none knows the job.
        `sources` picks a subset, in order, from STATE_SOURCES."""
        job_id = check_job_id(job_id)
        lookups = {
            "squeue": self._state_squeue,
            "sacct": self._state_sacct,
            "scontrol": self._state_scontrol,
            "jobcomp": self._state_jobcomp,
        }
        for source in sources:
            if source not in lookups:
                raise ConfigError(f"Unknown job-state source {source!r}. Valid sources: {', '.join(STATE_SOURCES)}.")
            found = lookups[source](job_id)
            if found is not None:
                return found
        return JobState(job_id=job_id, state=UNKNOWN, source="none")

    def _state_squeue(self, job_id: str) -> JobState | None:
        result = self._run(["squeue", "-h", "-j", job_id, "-o", SQUEUE_STATE_FORMAT], check=False)
        if result.returncode != 0:
            if says_unknown_job(result.stderr):
                return None
            raise self._failed(result, f"looking up job {job_id}")
        return parse_squeue_state(job_id, result.stdout)

    def _state_sacct(self, job_id: str) -> JobState | None:
        return self._sacct(job_id, [], source="sacct")

    def _state_jobcomp(self, job_id: str) -> JobState | None:
        return self._sacct(job_id, ["--completion"], source="jobcomp")

    def _sacct(self, job_id: str, extra: list[str], *, source: str) -> JobState | None:
        argv = ["sacct", *extra, "--parsable2", "-n", "-X", "-j", job_id, "-o", SACCT_FIELDS]
        try:
            result = self._run(argv, check=False)
        except CommandError as exc:  # not installed, or timed out: this source is not there
            log.debug("%s unavailable for job %s: %s", source, job_id, exc)
            return None
        if result.returncode != 0:
            # "Slurm accounting storage is disabled", no slurmdbd, an option this Slurm lacks.
            log.debug("%s unavailable for job %s: %s", source, job_id, result.stderr.strip()[-200:])
            return None
        return parse_sacct(job_id, result.stdout, source=source)

    def _state_scontrol(self, job_id: str) -> JobState | None:
        result = self._run(["scontrol", "show", "job", job_id, "-o"], check=False)
        if result.returncode != 0:
            if says_unknown_job(result.stderr):
                return None
            raise self._failed(result, f"looking up job {job_id}")
        return parse_scontrol_job(job_id, result.stdout)

    def pending_reason(self, job_id: str) -> str | None:
        """Why a pending job waits (`Resources`, `Priority`, `PartitionNodeLimit`, ...); None
        when the job is not pending."""
        found = self.state(job_id)
        return found.reason if found.state == "PENDING" else None

    # find -----------------------------------------------------------------------------------
    def find_jobs(self, name: str) -> list[str]:
        """Ids of pending/running jobs called `name` (`squeue -h -n NAME -o %i`)."""
        if not name or "," in name or name != name.strip():
            raise ConfigError(f"{name!r} is not a single Slurm job name (no commas, no surrounding spaces).")
        return parse_job_ids(self._run(["squeue", "-h", "-n", name, "-o", "%i"]).stdout)

    def active_jobs(self) -> list[JobSummary]:
        """Every pending/running job the controller lists, with its name and comment."""
        return parse_squeue_list(self._run(["squeue", "-h", "-o", SQUEUE_LIST_FORMAT]).stdout)

    def find_jobs_by_comment(self, substr: str) -> list[str]:
        """Ids of pending/running jobs whose comment contains `substr`."""
        return [job.job_id for job in self.active_jobs() if job.comment and substr in job.comment]

    # nodes ----------------------------------------------------------------------------------
    def first_node(self, job_id: str) -> str:
        """The first node of a running job. Global rank 0 (the NeMo HTTP server) runs there."""
        return self.job_nodes(job_id)[0]

    def job_nodes(self, job_id: str) -> list[str]:
        """A running job's nodes in Slurm's order (srun --relative counts in it): NodeList from
        `scontrol show job`, expanded by `scontrol show hostnames`."""
        job_id = check_job_id(job_id)
        result = self._run(["scontrol", "show", "job", job_id, "-o"], check=False)
        if result.returncode != 0:
            if says_unknown_job(result.stderr):
                raise SlurmJobError(
                    f"Slurm does not know job {job_id}, so it has no first node. "
                    "Check the job id; a job that ended long ago is forgotten by the controller.",
                    job_id=job_id, state=UNKNOWN,
                )
            raise self._failed(result, f"looking up the nodes of job {job_id}")
        record = parse_scontrol_record(result.stdout)
        nodelist = slurm_value(record.get("NodeList"))
        if nodelist is None:
            state = normalize_state(record.get("JobState", ""))
            reason = slurm_value(record.get("Reason"))
            raise SlurmJobError(
                f"Job {job_id} has no nodes yet (state {state}, reason {reason or 'none'}). "
                "Wait until it is RUNNING before asking for its first node.",
                job_id=job_id, state=state,
            )
        names = parse_job_ids(self._run(["scontrol", "show", "hostnames", nodelist]).stdout)
        if not names:
            raise SlurmJobError(
                f"`scontrol show hostnames {nodelist}` printed nothing for job {job_id}. "
                "Check the node list with `scontrol show job`.",
                job_id=job_id, state=normalize_state(record.get("JobState", "")),
            )
        return names

    def node_addr(self, node: str) -> str:
        """A node's NodeAddr from `scontrol show node NAME -o` (Slurm's answer, not DNS)."""
        record = parse_scontrol_record(self._run(["scontrol", "show", "node", node, "-o"]).stdout)
        addr = slurm_value(record.get("NodeAddr")) or slurm_value(record.get("NodeHostName"))
        if addr is None:
            raise SlurmJobError(
                f"`scontrol show node {node}` has no NodeAddr. Check the node's entry in slurm.conf."
            )
        return addr

    def first_node_addr(self, job_id: str) -> str:
        """The address to reach the first node of a running job at (the NeMo server's host)."""
        return self.node_addr(self.first_node(job_id))

    # cancel ---------------------------------------------------------------------------------
    def cancel(self, job_id: str) -> None:
        """`scancel ID`. A job that already ended, or that Slurm never knew, is not an error."""
        self._scancel([check_job_id(job_id)])

    def cancel_by_name(self, name: str) -> list[str]:
        """Cancel every pending/running job called `name`; returns the ids it cancelled."""
        job_ids = self.find_jobs(name)
        if job_ids:
            self._scancel(job_ids)
            log.info("cancelled Slurm jobs %s (name %s)", ", ".join(job_ids), name)
        return job_ids

    # steps ----------------------------------------------------------------------------------
    def steps(self, job_id: str) -> list[tuple[str, str]]:
        """The running steps of a job as (step id, step name), from `squeue -h -s -j ID -o %i|%j`
        (the batch and extern steps included where Slurm lists them)."""
        out = self._run(["squeue", "-h", "-s", "-j", check_job_id(job_id), "-o", "%i|%j"], check=False).stdout
        rows = [line.strip().split("|", 1) for line in out.splitlines() if "|" in line]
        return [(step, name) for step, name in rows if step.startswith(f"{job_id}.")]

    def cancel_step(self, step_id: str, signal: str | None = None) -> None:
        """`scancel JOB.STEP`: that step ends (its tasks are killed); the job and its other steps stay.
        With `signal` (TERM), `scancel --signal=TERM JOB.STEP` only signals its tasks, which may end it."""
        job_id, _, step = step_id.partition(".")
        if not step.isdigit():
            raise ConfigError(f"{step_id!r} is not a Slurm step id (expected JOB.STEP, e.g. '12345.0').")
        self._scancel([*([f"--signal={signal}"] if signal else []), f"{check_job_id(job_id)}.{step}"])

    def _scancel(self, job_ids: list[str]) -> None:
        result = self._run(["scancel", *job_ids], check=False)
        if result.returncode == 0:
            return
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        if not lines or any(not says_already_finished(line) for line in lines):
            raise self._failed(result, f"cancelling job(s) {', '.join(job_ids)}")

    # errors -----------------------------------------------------------------------------------
    @staticmethod
    def _failed(result: CommandResult, doing: str) -> CommandError:
        shown = " ".join(result.argv)
        stderr = result.stderr.strip()
        return CommandError(
            f"`{shown}` failed with exit code {result.returncode} while {doing}: {stderr[-500:] or '(no stderr)'}. "
            "Check that slurmctld answers (`scontrol ping`), then retry.",
            argv=list(result.argv), returncode=result.returncode, stderr=result.stderr,
        )
