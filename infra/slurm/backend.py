"""The `slurm` backend: submit the rendered job, find its first node, watch it, keep the
dead-man switch's heartbeat fresh, and cancel it.

Every job is named `nsdg-<flow-run id>` (or `nsdg-<run id>` outside Prefect), so a hook in
another process, or the reaper, finds it from the flow-run id alone.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from infra.deadline import Deadline, poll_until
from infra.errors import CommandError, DeadlineExceeded, SlurmJobError
from infra.settings import Profile, Settings
from infra.slurm.client import SlurmClient
from infra.slurm.parse import is_terminal
from infra.slurm.render import render_node_launcher, render_sbatch, write_job_files
from infra.slurm.spec import (HEARTBEAT_NAME, PREFLIGHT_FAILED_NAME, SIGNAL_MARKER_NAME, STDERR_PATTERN, STDOUT_PATTERN, SUBMITTED_NAME,
                              SbatchSpec)
from infra.system.logs import first_error_lines, log_tail
from infra.system.periodic import Periodic

log = logging.getLogger(__name__)
JOB_PREFIX = "nsdg-"
# A cancelled job stays in squeue (COMPLETING) while its ranks exit: Slurm sends SIGTERM, then
# SIGKILL after the cluster's KillWait (30 s by default), then runs the epilog.
DEFAULT_KILL_WAIT_S = 30.0
_kill_wait_s: float | None = None
# A running job's EndTime is read again this often (and at once when its warning signal arrives):
# a limit shortened with `scontrol update` is seen within this, at one squeue per replica.
END_REFRESH_S = 10.0
# A server lost this close to its job's end (or after it) was ended by the time limit: Slurm
# enforces limits on a timer, and this host's clock and the controller's may differ a little.
END_SLACK_S = 30.0
HELD_REASON = "JobHeldUser"  # squeue's reason for a job submitted with `sbatch --hold`


def job_name_for(flow_run_id: str | None, run_id: str) -> str:
    return f"{JOB_PREFIX}{flow_run_id or run_id}"[:128]


def job_comment(run_id: str, flow_run_id: str | None, replica: int = 0) -> str:
    return f"nsdg run={run_id} flow_run={flow_run_id or 'none'} replica={replica}"


def heartbeat(path: Path, interval: float) -> Periodic:
    """Touches the heartbeat file the job's dead-man switch watches, at once and then every
    `interval` s; a write that fails is logged and tried again at the next beat."""
    return Periodic(f"heartbeat-{path.parent.name}", lambda: _touch(path), interval, immediately=True,
                    what=f"could not refresh heartbeat {path}", transient=(OSError,), logger=log)


def _touch(path: Path) -> None:
    path.write_text(f"{datetime.now(timezone.utc).isoformat()}\n")


class SlurmBackend:
    name = "slurm"

    def __init__(self, settings: Settings, profile: Profile, *, run_id: str, flow_run_id: str | None = None,
                 client: SlurmClient | None = None, replica: int = 0, reward_step=None):
        self.settings, self.profile = settings, profile
        self.client = client or SlurmClient(command_timeout=settings.slurm.command_timeout_s)
        self.job_name = job_name_for(flow_run_id, run_id)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
        self.job_dir = Path(settings.slurm.job_root).expanduser().resolve() / run_id / stamp
        spec = SbatchSpec.from_settings(settings, profile, job_name=self.job_name,
                                        comment=job_comment(run_id, flow_run_id, replica), job_dir=self.job_dir)
        # Replicas on nodes that share an address (the local test cluster) must not share a port.
        self.spec = replace(spec, port=settings.server.port + replica)
        if reward_step is not None:  # a reward server swapped in later, or resident (infra/slurm/steps.py)
            self.spec = reward_step.job_for(self.spec)
        self.job_ids: list[str] = []
        self._url: str | None = None
        self._url_nodes: list[str] = []
        self._running_nodes: list[str] | None = None  # where the job first ran
        self._last_state = None
        self._last_poll = 0.0
        self._unknown_since: float | None = None
        self._heartbeat: Periodic | None = None
        self._running_at: float | None = None
        self._end: float | None = None  # EndTime while it runs
        self._end_read = float("-inf")
        self._warned: float | None = None

    @property
    def job_id(self) -> str | None:
        return self.job_ids[-1] if self.job_ids else None

    def start(self) -> None:
        self.job_dir.mkdir(parents=True, exist_ok=True)
        script = write_job_files(self.spec)
        # Before submit: the switch counts from the job's start.
        self._heartbeat = heartbeat(self.job_dir / HEARTBEAT_NAME, self.settings.slurm.heartbeat_interval_s).start()
        # Submitted held, recorded, then released: a crash or a lost sbatch answer before the id is
        # recorded leaves a held job, which is never allocated (and is cancelled here, or by the
        # reaper, which finds it by name), never a running allocation no one knows about.
        try:
            job_id = self.client.submit(script, extra_args=["--hold"])
        except CommandError:  # sbatch timed out: the controller may have taken the job all the same
            self._cancel_unrecorded_held()
            raise
        self.job_ids.append(job_id)  # from here on, release() cancels it
        try:
            (self.job_dir / SUBMITTED_NAME).write_text(f"{job_id}\n")
            self.client.release_hold(job_id)
        except BaseException:
            self._cancel_quietly([job_id])
            raise
        log.info("submitted Slurm job %s (%s), job dir %s", job_id, self.job_name, self.job_dir)

    def _cancel_unrecorded_held(self) -> None:
        """Cancel held jobs of this backend's comment (run, flow run, replica) that are not
        recorded: what an sbatch whose answer was lost submitted."""
        try:
            held = [job.job_id for job in self.client.active_jobs()
                    if job.comment == self.spec.comment and job.job_id not in self.job_ids and job.state == "PENDING"
                    and self.client.state(job.job_id).reason == HELD_REASON]
        except CommandError as exc:
            log.warning("could not look for a held job after a failed sbatch (%s): the reaper cancels any by name %s",
                        exc, self.job_name)
            return
        if held:
            log.warning("sbatch failed after submitting held job(s) %s: cancelling them", ", ".join(held))
            self._cancel_quietly(held)

    def _cancel_quietly(self, job_ids: list[str]) -> None:
        for job_id in job_ids:
            try:
                self.client.cancel(job_id)
            except CommandError as exc:  # the error being raised matters more; the reaper finds the job by name
                log.warning("could not cancel held Slurm job %s (%s); the reaper cancels it by name %s",
                            job_id, exc, self.job_name)

    def state(self):
        """The job's state, polled at most every slurm.poll_s (every wait loop calls this)."""
        now = time.monotonic()
        if self._last_state is None or now - self._last_poll >= self.settings.slurm.poll_s:
            self._poll()
        return self._last_state

    def _poll(self) -> None:
        self._last_state, self._last_poll = self.client.state(self.job_id), time.monotonic()
        if self._last_state.state == "RUNNING":
            if self._running_nodes is None:
                self._running_nodes, self._running_at = list(self._last_state.nodes), time.time()
            if self._last_state.end_time is not None:
                self._end = self._last_state.end_time

    def running_at(self) -> float | None:
        return self._running_at

    def warned_at(self) -> float | None:
        """When the job's batch script noted Slurm's warning signal (`--signal=B:USR1@<s>`,
        `scancel --signal=USR1 --batch`): a limit ahead, shortened, or a preemption."""
        try:
            text = (self.job_dir / SIGNAL_MARKER_NAME).read_text()
        except (FileNotFoundError, OSError):
            return None
        fields = dict(line.partition("=")[::2] for line in text.splitlines())
        try:
            return float(fields.get("received_at", ""))
        except ValueError:
            return None

    def ends_at(self) -> float | None:
        """When the job ends: Slurm's EndTime, or sooner, when the warning signal came, that time
        plus slurm.warn_signal_s (Slurm may send it early: the sooner end is the safe one)."""
        if not self.job_id:
            return None
        warned = self.warned_at()
        if warned != self._warned or time.monotonic() - self._end_read >= END_REFRESH_S:
            self._warned, self._end_read = warned, time.monotonic()
            self._poll()
        ends = [self._end] if self._end is not None else []
        if warned is not None and self.spec.warn_signal_s:
            ends.append(warned + self.spec.warn_signal_s)
        return min(ends) if ends else None

    def scheduled_end(self) -> str | None:
        """Why the job ended, or is ending, by the cluster's schedule (its time limit, a
        preemption, a requeue, the end its warning signal announced), not by a fault of its
        server; None otherwise."""
        if not self.job_id:
            return None
        st = self.state()
        if st.state == "TIMEOUT":
            return f"Slurm job {self.job_id} reached its time limit ({self.spec.time_limit})"
        if st.state in ("PREEMPTED", "DEADLINE"):
            return f"Slurm job {self.job_id} ended {st.state}"
        if requeued := self.requeued(st):
            return f"Slurm job {self.job_id} {requeued}"
        # The end as known (EndTime, or the warning signal's): a warning long before the end (a
        # --signal lead longer than the limit) does not make every later fault a planned end.
        if (end := self.ends_at()) is not None and time.time() >= end - END_SLACK_S:
            return f"Slurm job {self.job_id} reached its end ({datetime.fromtimestamp(end).isoformat(timespec='seconds')})"
        return None

    def url(self) -> str | None:
        """Rank 0's address, looked up again whenever the job runs on other nodes than before."""
        if not self.job_id:
            return None
        st = self.state()
        if st.state == "RUNNING" and (self._url is None or st.nodes != self._url_nodes):
            self._url = f"http://{self.client.first_node_addr(self.job_id)}:{self.spec.port}"
            self._url_nodes = list(st.nodes)
        return self._url

    def requeued(self, st) -> str | None:
        """A job that ran and is back in the queue, or runs again elsewhere, was requeued (a node
        failure or preemption with slurm.requeue, or `scontrol requeue`). It keeps its id, but its
        server is gone: the flow treats it as lost, cancels it and starts a new job."""
        if st.state == "REQUEUED":
            return "was requeued"
        if self._running_nodes is None:
            return None
        if st.state in ("PENDING", "CONFIGURING"):
            return f"was requeued: it ran on {','.join(self._running_nodes) or '?'} and is {st.state} again"
        if st.state == "RUNNING" and st.nodes and self._running_nodes and st.nodes != self._running_nodes:
            return (f"was requeued: it ran on {','.join(self._running_nodes)} and now runs on {','.join(st.nodes)}, "
                    "where its server starts from scratch")
        return None

    def logs(self) -> str:
        parts = []
        for pattern in (STDOUT_PATTERN, STDERR_PATTERN):
            path = self.job_dir / pattern.replace("%x", self.job_name).replace("%j", self.job_id or "")
            tail = log_tail(path)
            parts.append(f"--- {path.name} ---\n{tail}")
            if earlier := [line for line in first_error_lines(path) if line not in tail]:
                parts.append(f"--- first error lines of {path.name} ---\n" + "\n".join(earlier))
        return "\n".join(parts)

    def dead_reason(self) -> str | None:
        if not self.job_id:
            return None
        if failed := self.preflight_failure():
            return f"Slurm job {self.job_id} failed its preflight: {failed}; job dir {self.job_dir}"
        st = self.state()
        if st.state == "UNKNOWN":
            # Slurm can forget a job briefly between squeue and its other sources: give it a grace.
            self._unknown_since = self._unknown_since or time.monotonic()
            if time.monotonic() - self._unknown_since < self.settings.slurm.unknown_grace_s:
                return None
            return f"Slurm job {self.job_id} is unknown to squeue, sacct and scontrol; log tails:\n{self.logs()}"
        self._unknown_since = None
        if requeued := self.requeued(st):
            return (f"Slurm job {self.job_id} {requeued} ({st.describe()}); the flow cancels it and starts another; "
                    f"job dir {self.job_dir}; log tails:\n{self.logs()}")
        if st.terminal:
            return (f"Slurm job {self.job_id} ended {st.state} (exit code {st.exit_code}); "
                    f"job dir {self.job_dir}; log tails:\n{self.logs()}")
        return None

    def preflight_failure(self) -> str | None:
        """The line a node launcher's preflight wrote when a check failed (the job is ending; the
        ready wait need not run out its deadline)."""
        try:
            return (self.job_dir / PREFLIGHT_FAILED_NAME).read_text(errors="replace").strip() or None
        except OSError:
            return None

    def status(self) -> str:
        if not self.job_id:
            return "not submitted"
        st = self.state()
        reason = f", reason {st.reason}" if st.reason and st.reason != "None" else ""
        return f"Slurm job {self.job_id} {st.state}{reason}"

    def release(self) -> None:
        """scancel the whole job (never pkill), then wait until squeue no longer lists it."""
        if self._heartbeat is not None:
            self._heartbeat.stop()
        for job_id in self.job_ids:
            self.client.cancel(job_id)
        if self.job_ids:
            wait_gone(self.client, self.job_ids, kill_wait_s(self.client) + self.settings.slurm.release_margin_s)

    def ready_timeout(self) -> float:
        return self.settings.server.ready_timeout_s


def kill_wait_s(client: SlurmClient) -> float:
    """The cluster's KillWait from `scontrol show config` (asked once per process; one quick
    controller call), or Slurm's default when it cannot be read."""
    global _kill_wait_s
    if _kill_wait_s is None:
        try:
            out = client.runner(["scontrol", "show", "config"], timeout=client.command_timeout, check=False).stdout
        except CommandError as exc:
            log.debug("scontrol show config: %s", exc)
            out = ""
        _kill_wait_s = parse_kill_wait(out)
    return _kill_wait_s


def parse_kill_wait(config: str) -> float:
    """`KillWait                = 30 sec` -> 30.0; DEFAULT_KILL_WAIT_S when absent."""
    for line in config.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "KillWait" and (words := value.split()) and words[0].isdigit():
            return float(words[0])
    return DEFAULT_KILL_WAIT_S


def wait_gone(client: SlurmClient, job_ids: list[str], seconds: float) -> list[str]:
    """Wait until squeue no longer lists the cancelled jobs, at most `seconds` (KillWait + margin).

    A job still listed then as COMPLETING (or an end state) has been cancelled and is being torn
    down by Slurm: it counts as released, logged, and its id is returned. Only a job still in
    another state (the cancel did not take) raises SlurmJobError."""
    pending = set(job_ids)
    deadline = Deadline(seconds)
    listed: dict[str, str] = {}
    asked = [float("-inf")]

    def gone():
        # Every 0.2 s for the usual quick exit, then once a second: no need to load slurmctld.
        if deadline.elapsed() > 5.0 and time.monotonic() - asked[0] < 1.0:
            return None
        asked[0] = time.monotonic()
        listed.clear()
        listed.update({j.job_id: j.state for j in client.active_jobs() if j.job_id in pending})
        return True if not listed else None

    try:
        poll_until(gone, deadline=deadline, interval=0.2, what=f"Slurm jobs {sorted(pending)} to leave squeue")
        return []
    except DeadlineExceeded as exc:
        stuck = sorted(j for j, state in listed.items() if state != "COMPLETING" and not is_terminal(state))
        if stuck:
            states = ", ".join(f"{j} {listed[j]}" for j in stuck)
            raise SlurmJobError(
                f"Slurm jobs {states} still listed {seconds:.0f} s after scancel. "
                f"Check `squeue -j {','.join(stuck)}` and cancel by hand if needed.", job_id=stuck[0], state=listed[stuck[0]],
            ) from exc
        done = sorted(listed)
        log.warning("Slurm jobs %s cancelled and still completing after %.0f s (KillWait, epilog): counted as released; "
                    "Slurm frees their nodes when they finish", ", ".join(done), seconds)
        return done


def release_jobs_of_flow_run(settings: Settings, flow_run_id: str) -> list[str]:
    client = SlurmClient(command_timeout=settings.slurm.command_timeout_s)
    cancelled = client.cancel_by_name(job_name_for(flow_run_id, ""))
    return [f"Slurm job {j}" for j in cancelled]


def check_launch(settings: Settings, profile: Profile, *, run_id: str) -> SbatchSpec:
    """The refusals building the job's spec makes (container image, model path, directives, srun
    flags), made before the plan reads any input: a bad launch setting costs nothing."""
    return SbatchSpec.from_settings(settings, profile, job_name=job_name_for(None, run_id), comment=job_comment(run_id, None),
                             job_dir=Path(settings.slurm.job_root).expanduser() / run_id)


def render_for_profile(base: Settings, profile: str, *, model_path: str | None = None, account: str | None = None,
                       partition: str | None = None, run_id: str = "dry-run",
                       engine: str | None = None) -> list[tuple[str, str]]:
    """The scripts `nemotron-sdg render` prints: nothing is written or submitted. `engine`
    switches the profile's serving engine (infra/engines) for this render; the other arguments
    override `base`'s settings."""
    overrides = {}
    if model_path:
        overrides["model"] = base.model.model_copy(update={"path": model_path})
    if account or partition:
        overrides["slurm"] = base.slurm.model_copy(update={k: v for k, v in (("account", account), ("partition", partition)) if v})
    settings = base.model_copy(update=overrides)
    chosen = settings.profile(profile)
    if engine:
        chosen = chosen.model_copy(update={"engine": engine})
    # model_copy skips validation: build the spec, which validates every value it renders.
    spec = SbatchSpec.from_settings(settings, chosen, job_name=job_name_for(None, run_id),
                                    comment=job_comment(run_id, None),
                                    job_dir=Path(settings.slurm.job_root).expanduser() / run_id)
    return [("sbatch.sh", render_sbatch(spec)), ("node-launcher.sh", render_node_launcher(spec))]
