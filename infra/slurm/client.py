"""Talk to Slurm: submit, look up state, find, cancel, locate the first node, read log tails.

Every command goes through one runner (`infra.system.commands.run_command` by default) as an argv
list with a timeout; the text it prints is turned into values by the pure `parse_*` functions
below, which are tested on recorded outputs.

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
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from infra.system.commands import CommandResult, run_command
from infra.errors import CommandError, ConfigError, SlurmJobError

log = logging.getLogger(__name__)

Runner = Callable[..., CommandResult]

# --- states ------------------------------------------------------------------------------------

ACTIVE_STATES = frozenset(
    {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING", "SIGNALING",
     "STAGE_OUT", "STOPPED"}
)
TERMINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
     "PREEMPTED", "REVOKED", "SPECIAL_EXIT"}
)
UNKNOWN = "UNKNOWN"
STATE_SOURCES = ("squeue", "sacct", "scontrol", "jobcomp")

# Every spelling Slurm prints (long names from squeue %T / sacct / scontrol, short codes from
# squeue %t, and the older aliases) -> the one name this project uses.
_STATE_TABLE: dict[str, str] = {
    **{s: s for s in ACTIVE_STATES | TERMINAL_STATES},
    "PD": "PENDING", "CF": "CONFIGURING", "R": "RUNNING", "CG": "COMPLETING", "S": "SUSPENDED",
    "RQ": "REQUEUED", "RH": "REQUEUED", "RF": "REQUEUED", "REQUEUE_HOLD": "REQUEUED", "REQUEUE_FED": "REQUEUED",
    "RS": "RESIZING", "SI": "SIGNALING", "SO": "STAGE_OUT", "ST": "STOPPED", "RD": "PENDING",
    "RESV_DEL_HOLD": "PENDING",
    "CD": "COMPLETED", "F": "FAILED", "CA": "CANCELLED", "TO": "TIMEOUT", "NF": "NODE_FAIL",
    "OOM": "OUT_OF_MEMORY", "BF": "BOOT_FAIL", "DL": "DEADLINE", "PR": "PREEMPTED", "RV": "REVOKED",
    "SE": "SPECIAL_EXIT", "OUT_OF_ME": "OUT_OF_MEMORY", "OUT_OF_ME+": "OUT_OF_MEMORY",
}


def normalize_state(raw: str) -> str:
    """`CANCELLED by 1000`, `CANCELLED+`, `ca`, `OUT_OF_ME+` -> CANCELLED / OUT_OF_MEMORY;
    anything not in the table -> UNKNOWN."""
    words = raw.strip().split()
    if not words:
        return UNKNOWN
    word = words[0].upper()
    return _STATE_TABLE.get(word) or _STATE_TABLE.get(word.rstrip("+"), UNKNOWN)


def is_terminal(state: str) -> bool:
    return state in TERMINAL_STATES


@dataclass(frozen=True)
class JobState:
    """What Slurm says about one job. `exit_code` is Slurm's `exit:signal` text (e.g. `3:0`),
    None while the job runs; `source` names the command that answered."""

    job_id: str
    state: str
    exit_code: str | None = None
    reason: str | None = None
    nodes: list[str] = field(default_factory=list)
    source: str = "none"
    end_time: float | None = None  # epoch s: EndTime of a running job (its time limit), when known

    @property
    def terminal(self) -> bool:
        return is_terminal(self.state)

    @property
    def exit_status(self) -> int | None:
        """The exit status of the batch script (the part before `:`), when known."""
        if not self.exit_code:
            return None
        head = self.exit_code.split(":", 1)[0]
        return int(head) if head.isdigit() else None

    def describe(self) -> str:
        parts = [f"job {self.job_id} is {self.state}"]
        if self.exit_code:
            parts.append(f"exit code {self.exit_code}")
        if self.reason:
            parts.append(f"reason {self.reason}")
        if self.nodes:
            parts.append(f"nodes {','.join(self.nodes)}")
        return ", ".join(parts) + f" (from {self.source})"


@dataclass(frozen=True)
class JobSummary:
    """One line of `squeue`: a job still known to the controller as pending or running."""

    job_id: str
    name: str
    state: str
    comment: str | None
    work_dir: str | None = None  # %Z: where the job runs (SlurmBackend: its job directory)


# --- pure parsers --------------------------------------------------------------------------------

_JOB_ID = re.compile(r"^\d+(_\d+|\+\d+)?$")
_NO_VALUE = {"", "(null)", "none", "n/a", "none assigned"}
_SEP = "|"
SQUEUE_STATE_FORMAT = _SEP.join(["%i", "%T", "%r", "%N", "%e"])
SQUEUE_LIST_FORMAT = _SEP.join(["%i", "%T", "%j", "%Z", "%k"])
SACCT_FIELDS = "JobID,State,ExitCode,Reason,NodeList"


def _value(text: str | None) -> str | None:
    if text is None:
        return None
    text = text.strip()
    return None if text.lower() in _NO_VALUE else text


def parse_slurm_time(text: str | None) -> float | None:
    """`2026-12-02T05:30:00` (Slurm prints the controller's local time, no zone) -> epoch s;
    `N/A`, `Unknown`, `None` -> None."""
    text = _value(text)
    if text is None or text.lower() == "unknown":
        return None
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S").timestamp()
    except ValueError:
        return None


def check_job_id(job_id: str) -> str:
    job_id = str(job_id).strip()
    if not _JOB_ID.match(job_id):
        raise ConfigError(f"{job_id!r} is not a Slurm job id (expected digits, e.g. '12345').")
    return job_id


def parse_sbatch_parsable(stdout: str) -> str:
    """`sbatch --parsable` prints `ID` or `ID;cluster` (after any warnings): return ID."""
    lines = [line.strip() for line in stdout.splitlines() if line.strip()]
    if lines:
        candidate = lines[-1].split(";", 1)[0].strip()
        if _JOB_ID.match(candidate):
            return candidate
    raise SlurmJobError(
        f"sbatch --parsable printed {stdout.strip()[-300:]!r}, not a job id. "
        "Check the sbatch script and the partition; run sbatch by hand to see why."
    )


def expand_hostlist(hostlist: str) -> list[str]:
    """`node[1-2,5],gpu-a[01-02]` -> node1 node2 node5 gpu-a01 gpu-a02 (zero padding kept).
    Handles one bracket group per name, which is what Slurm prints for ordinary node names."""
    text = _value(hostlist)
    if text is None:
        return []
    names: list[str] = []
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)?", text):
        match = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", item)
        if not match:
            names.append(item)
            continue
        prefix, ranges, suffix = match.groups()
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not hi:
                names.append(f"{prefix}{lo}{suffix}")
                continue
            width = len(lo) if lo.startswith("0") else 0
            names.extend(f"{prefix}{i:0{width}d}{suffix}" for i in range(int(lo), int(hi) + 1))
    return names


def parse_squeue_state(job_id: str, stdout: str) -> JobState | None:
    """Output of `squeue -h -j ID -o '%i|%T|%r|%N|%e'`; None when squeue does not list the job.
    The end time counts only while the job runs (a pending job's is Slurm's guess)."""
    for line in stdout.splitlines():
        fields = line.strip().split(_SEP)
        if len(fields) >= 4 and fields[0] == job_id:
            state = normalize_state(fields[1])
            return JobState(
                job_id=job_id,
                state=state,
                reason=_value(fields[2]),
                nodes=expand_hostlist(fields[3]),
                source="squeue",
                end_time=parse_slurm_time(fields[4]) if len(fields) > 4 and state == "RUNNING" else None,
            )
    return None


def parse_sacct(job_id: str, stdout: str, *, source: str = "sacct") -> JobState | None:
    """Output of `sacct --parsable2 -n -X -j ID -o JobID,State,ExitCode,Reason,NodeList`;
    the last line for the job wins (the latest record after a requeue); None when absent."""
    found: JobState | None = None
    for line in stdout.splitlines():
        fields = line.strip().split(_SEP)
        if len(fields) < 5 or fields[0] != job_id:
            continue
        found = JobState(
            job_id=job_id,
            state=normalize_state(fields[1]),
            exit_code=_value(fields[2]),
            reason=_value(fields[3]),
            nodes=expand_hostlist(fields[4]),
            source=source,
        )
    return found


def parse_scontrol_record(text: str) -> dict[str, str]:
    """One `scontrol show ... -o` line -> {key: value}. Keys may hold `:` and `/`
    (`AllocNode:Sid`, `CPUs/Task`); values run up to the next ` Key=`."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    record: dict[str, str] = {}
    for chunk in re.split(r" +(?=[A-Za-z][A-Za-z0-9_:/]*=)", line):
        key, sep, value = chunk.partition("=")
        if sep:
            record[key] = value.strip()
    return record


def parse_scontrol_job(job_id: str, stdout: str) -> JobState | None:
    record = parse_scontrol_record(stdout)
    if record.get("JobId") != job_id or "JobState" not in record:
        return None
    state = normalize_state(record["JobState"])
    return JobState(
        job_id=job_id,
        state=state,
        exit_code=_value(record.get("ExitCode")) if is_terminal(state) else None,
        reason=_value(record.get("Reason")),
        nodes=expand_hostlist(record.get("NodeList", "")),
        source="scontrol",
        end_time=parse_slurm_time(record.get("EndTime")) if state == "RUNNING" else None,
    )


def parse_squeue_list(stdout: str) -> list[JobSummary]:
    """Output of `squeue -h -o '%i|%T|%j|%Z|%k'`. The comment is last, so it may hold `|`; job
    names and job directories we create never do (both are validated)."""
    jobs = []
    for line in stdout.splitlines():
        fields = line.rstrip("\n").split(_SEP, 4)
        if len(fields) == 5 and fields[0].strip():
            jobs.append(JobSummary(fields[0].strip(), fields[2], normalize_state(fields[1]), _value(fields[4]),
                                   _value(fields[3])))
    return jobs


def parse_job_ids(stdout: str) -> list[str]:
    return [line.strip() for line in stdout.splitlines() if line.strip()]


def says_unknown_job(stderr: str) -> bool:
    """The words Slurm uses for a job id it has never seen or already purged."""
    return "invalid job id" in stderr.lower()


def says_already_finished(stderr: str) -> bool:
    text = stderr.lower()
    return "already completing or completed" in text or "invalid job id" in text


def log_tail(path: str | os.PathLike[str], lines: int = 40, *, max_bytes: int = 256 * 1024) -> str:
    """The last `lines` lines of a job's log file, or "" if it does not exist (yet)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        return ""
    text = data.decode("utf-8", errors="replace")
    return "\n".join(text.rstrip("\n").splitlines()[-lines:]) if lines > 0 else ""


# The words a failing rank's first report carries: Python tracebacks and logging levels, srun's
# and slurmstepd's "error:", NeMo's and CUDA's "Error"/"FATAL".
_ERROR_LINE = re.compile(r"\b(error|exception|traceback|fatal)\b", re.IGNORECASE)


def first_error_lines(path: str | os.PathLike[str], limit: int = 6, *, max_bytes: int = 16 * 1024 * 1024) -> list[str]:
    """The first `limit` lines of a job's log that look like an error, from its first `max_bytes`.

    With 16 ranks writing to one log, the rank that failed first reports once and then the other
    fifteen log their shutdown: the cause is near the top, the tail is noise."""
    found: list[str] = []
    try:
        with open(path, "rb") as fh:
            for raw in fh.read(max_bytes).splitlines():
                line = raw.decode("utf-8", errors="replace").rstrip()
                if _ERROR_LINE.search(line):
                    found.append(line)
                    if len(found) >= limit:
                        break
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        pass
    return found


# --- the client ----------------------------------------------------------------------------------


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
        """The first node of a running job: NodeList from `scontrol show job`, expanded by
        `scontrol show hostnames`. Global rank 0 (the NeMo HTTP server) runs there."""
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
        nodelist = _value(record.get("NodeList"))
        if nodelist is None:
            state = normalize_state(record.get("JobState", ""))
            reason = _value(record.get("Reason"))
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
        return names[0]

    def node_addr(self, node: str) -> str:
        """A node's NodeAddr from `scontrol show node NAME -o` (Slurm's answer, not DNS)."""
        record = parse_scontrol_record(self._run(["scontrol", "show", "node", node, "-o"]).stdout)
        addr = _value(record.get("NodeAddr")) or _value(record.get("NodeHostName"))
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

    def _scancel(self, job_ids: list[str]) -> None:
        result = self._run(["scancel", *job_ids], check=False)
        if result.returncode == 0:
            return
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        if not lines or any(not says_already_finished(line) for line in lines):
            raise self._failed(result, f"cancelling job(s) {', '.join(job_ids)}")

    log_tail = staticmethod(log_tail)

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
