"""What Slurm prints, turned into values: the job-state vocabulary, `JobState` and `JobSummary`,
and the pure `parse_*` functions `SlurmClient` (infra/slurm/client.py) runs on each command's
output, tested on recorded outputs; `time_limit_s` reads a time limit in sbatch's forms. No I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime

from infra.errors import ConfigError, SlurmJobError

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


def slurm_value(text: str | None) -> str | None:
    """A field as Slurm printed it, stripped; None for its spellings of "no value" ((null), N/A, ...)."""
    if text is None:
        return None
    text = text.strip()
    return None if text.lower() in _NO_VALUE else text


def parse_slurm_time(text: str | None) -> float | None:
    """`2026-12-02T05:30:00` (Slurm prints the controller's local time, no zone) -> epoch s;
    `N/A`, `Unknown`, `None` -> None."""
    text = slurm_value(text)
    if text is None or text.lower() == "unknown":
        return None
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S").timestamp()
    except ValueError:
        return None


def time_limit_s(text: str) -> float | None:
    """A Slurm time limit in seconds (sbatch's forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S); None
    for 0, which Slurm reads as no limit."""
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:
        hours, minutes, seconds = (parts + [0, 0])[:3]
    elif len(parts) == 3:
        hours, minutes, seconds = parts
    else:
        hours, (minutes, seconds) = 0, (parts + [0])[:2]
    total = ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds
    return float(total) or None


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
    text = slurm_value(hostlist)
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
                reason=slurm_value(fields[2]),
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
            exit_code=slurm_value(fields[2]),
            reason=slurm_value(fields[3]),
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
        exit_code=slurm_value(record.get("ExitCode")) if is_terminal(state) else None,
        reason=slurm_value(record.get("Reason")),
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
            jobs.append(JobSummary(fields[0].strip(), fields[2], normalize_state(fields[1]), slurm_value(fields[4]),
                                   slurm_value(fields[3])))
    return jobs


def parse_job_ids(stdout: str) -> list[str]:
    return [line.strip() for line in stdout.splitlines() if line.strip()]


def says_unknown_job(stderr: str) -> bool:
    """The words Slurm uses for a job id it has never seen or already purged."""
    return "invalid job id" in stderr.lower()


def says_already_finished(stderr: str) -> bool:
    text = stderr.lower()
    return "already completing or completed" in text or "invalid job id" in text
