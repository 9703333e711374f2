"""A reward server swapped into the generator's Slurm job (issue 29; docs/pipelines.md, "Allocation").

The generator and Nemotron-4-340B-Reward (about 635 GB each in BF16) do not both fit on 2 x 8 H100.
So a pipeline whose reward server says `swap_with: <generator>` gets ONE job with two steps: when the
generating stages are done, the generator's step is stopped (not the job) and NeMo-Aligner's
`serve_reward_model.py` starts as a new step on the same nodes, with no second queue wait; the job is
released after the last score.

How a step is started, and why this way: the batch script starts every step itself, the one the
orchestrator last asked for (infra/templates/sbatch-steps.sh.tmpl). The orchestrator writes
`step-request` ("<n> <step>") in the job directory, then stops the running step (`scancel
--signal=TERM <job>.<step>`, then `scancel <job>.<step>` if it outlives KillWait: real Slurm signals
or ends any one step and leaves the job); its srun returns in the batch script, which reads the
request and runs `srun` for the next step. The alternative, `srun --jobid=<job> --overlap` from the flow's host, would make a step's life
the life of an srun process on the flow's host (a restarted worker or a lost ssh session ends the
reward server), would need pyxis/apptainer and the site's srun flags on that host as well, and would
bypass the batch script's dead-man switch and signal handling. Inside the batch script the new step
inherits all of it, and the rendered job shows both steps.

`RewardStep` is what the reward step is made of besides the job's own spec; `SwapKeeper` is the
flow's side: it takes the job the replica pool releases (the generator's last healthy job), swaps
its step, waits for `/v2/models/<model>/ready`, and releases the job after scoring; with no job to
take (a rerun whose generating stages were done), it submits one whose first step is the reward's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from infra.deadline import Deadline, poll_until
from infra.errors import ConfigError, DeadlineExceeded, ServerLost, SlurmJobError
from infra.slurm.backend import SlurmBackend, job_comment, job_name_for, kill_wait_s
from infra.slurm.launch import REWARD_ENGINE, image_for
from infra.slurm.spec import STEP_REQUEST_NAME, SbatchSpec

log = logging.getLogger(__name__)
STEPS = ("generator", "reward")


def step_name(step: str) -> str:
    """The srun --job-name of a step (squeue -s lists it)."""
    return f"nsdg-{step}"


@dataclass(frozen=True)
class RewardStep:
    """The reward server's launch: its name in the pipeline, topology, checkpoint, port, script,
    image, and the command that replaces the script (tests, site wrappers)."""

    server: str
    tensor_parallel: int
    pipeline_parallel: int
    model_path: str | None
    port: int | None
    script: str
    image: str
    command: tuple[str, ...] | None = None
    # Resident (a pipeline's `resident: true`): started with the generator, on `nodes` of its own.
    resident: bool = False
    nodes: int | None = None

    def job_for(self, job: SbatchSpec) -> SbatchSpec:
        """The generator's job `job` with this reward step (swapped in later, or resident beside it)."""
        reward = self.spec_for(job)  # its own mistakes named by it
        try:
            return replace(job, reward=reward, resident=self.resident)
        except ConfigError as exc:
            how = "resident in" if self.resident else "swapped into"
            raise ConfigError(f"servers.{self.server} ({how} the generator's job): {exc}".replace("\n", " ")) from None

    def spec_for(self, job: SbatchSpec) -> SbatchSpec:
        """The reward step's spec on `job`'s nodes (validated again: a bad value is one line)."""
        where = f"servers.{self.server}"
        if self.command is None and self.model_path is None:
            raise ConfigError(f"{where}.model_path: give the reward checkpoint's directory on the cluster "
                              "(serve_reward_model.py rm_model_file), or NSDG_SERVER__REWARD_COMMAND to run another command")
        try:
            return replace(job, engine=REWARD_ENGINE, tensor_parallel=self.tensor_parallel,
                           pipeline_parallel=self.pipeline_parallel, model_path=self.model_path or job.model_path,
                           eval_script=self.script, port=self.port or job.port, container_image=self.image,
                           server_command=self.command, reward=None, resident=False,
                           **({"nodes": self.nodes} if self.nodes else {}))
        except ConfigError as exc:
            raise ConfigError(f"{where} (started in the generator's job): {exc}".replace("\n", " ")) from None


def request_step(job_dir: Path, step: str) -> int:
    """Ask the job's batch script for `step` next: "<n> <step>" under a temp name, renamed. Returns n."""
    if step not in STEPS:
        raise ValueError(f"unknown step {step!r}")
    path = Path(job_dir) / STEP_REQUEST_NAME
    try:
        n = int(path.read_text().split()[0]) + 1
    except (OSError, ValueError, IndexError):
        n = 1
    tmp = path.with_name(f".{STEP_REQUEST_NAME}.tmp")
    tmp.write_text(f"{n} {step}\n")
    tmp.replace(path)
    return n


def stop_steps(backend: SlurmBackend, step: str, wait_s: float) -> float:
    """Stop the job's running `step` (not the job): SIGTERM to its tasks (the launcher stops its
    server's process group), and after `wait_s` without its end `scancel JOB.STEP`, which kills them
    (a plain step cancel is a SIGKILL at once). Returns the seconds until squeue listed it no more;
    SlurmJobError when it is still listed after the kill and another `wait_s`."""
    client, job_id, name = backend.client, backend.job_id, step_name(step)
    t0 = time.monotonic()

    def running() -> list[str]:
        return [step_id for step_id, seen in client.steps(job_id) if seen == name]

    for signal in ("TERM", None):
        for step_id in running():
            client.cancel_step(step_id, signal)
        try:
            poll_until(lambda: True if not running() else None, deadline=Deadline(wait_s), interval=0.5,
                       what=f"step {name} of Slurm job {job_id} to end")
            return time.monotonic() - t0
        except DeadlineExceeded:
            log.warning("step %s of Slurm job %s still runs %.0f s after SIG%s", name, job_id, wait_s, signal or "KILL")
    raise SlurmJobError(f"step {name} of Slurm job {job_id} still runs {2 * wait_s:.0f} s after SIGTERM and `scancel "
                        f"{job_id}.<step>`: check `squeue -s -j {job_id}`; the job is released instead", job_id=job_id)


def reward_url(backend: SlurmBackend) -> str | None:
    """The reward server's base URL once the job runs: its step's first node (the job's first, or
    a resident step's, after the generator's nodes), the reward step's port."""
    spec = backend.spec
    if backend.job_id is None or spec.reward is None or backend.state().state != "RUNNING":
        return None
    client = backend.client
    node = client.job_nodes(backend.job_id)[spec.nodes] if spec.resident else client.first_node(backend.job_id)
    return f"http://{client.node_addr(node)}:{spec.reward.port}"


class SwapKeeper:
    """The job a reward server is swapped into, from the pool's release to the last score.

    `keep` stands for the pool's release: a healthy job with a reward step is kept and swapped at
    once (the reward server loads while the generating stages are curated); any other is released,
    and so is a job kept before (the last one released is kept). `connect` waits for the reward
    server; `release` gives the job back. Seconds are recorded for the manifest."""

    def __init__(self, step: RewardStep, *, new_job: Callable[[], SlurmBackend], release: Callable[[object], None],
                 ready_timeout_s: float, poll_s: float, gpus: int):
        self.step, self.new_job, self._release, self.gpus = step, new_job, release, gpus
        self.ready_timeout_s, self.poll_s = ready_timeout_s, poll_s
        self.kept: SlurmBackend | None = None
        self.swaps: list[dict] = []  # one per time the reward server ran in a job
        self._back_at: dict[str, float] = {}  # job id -> when its generator step was asked for again

    def keep(self, backend) -> None:
        reward = getattr(getattr(backend, "spec", None), "reward", None)
        if reward is None or backend.dead_reason() is not None or backend.scheduled_end() is not None:
            self._release(backend)
            return
        if self.kept is not None:
            self.release()
        self.kept = backend
        started = time.time()
        try:
            request_step(backend.job_dir, "reward")
            stopped = stop_steps(backend, "generator", kill_wait_s(backend.client) + backend.settings.slurm.release_margin_s)
        except Exception:
            self.kept = None
            self._release(backend)
            raise
        since = max(backend.running_at() or started, self._back_at.get(backend.job_id, 0.0))  # once per generator step
        self.swaps.append({"job_id": backend.job_id, "swap_started_at": started, "generator_stop_s": round(stopped, 3),
                           "generator_held_s": round(started - since, 3)})
        log.info("Slurm job %s: generator step stopped in %.1f s; reward step %s asked for", backend.job_id, stopped,
                 step_name("reward"))

    def connect(self, client_for: Callable[[str], object]) -> object:
        """A ready reward client (`client_for(url)`), from the kept job or a new one whose first step
        is the reward server's. ServerLost when the job ends while it loads."""
        if self.kept is None:
            job = self.new_job()
            job.job_dir.mkdir(parents=True, exist_ok=True)
            request_step(job.job_dir, "reward")  # read by the batch script at its start
            job.start()
            self.kept = job
            self.swaps.append({"job_id": job.job_id, "swap_started_at": time.time(), "generator_stop_s": 0.0,
                               "generator_held_s": 0.0})
        job, seen = self.kept, ["not running yet"]
        clients: dict[str, object] = {}

        def check():
            if (dead := job.dead_reason()) is not None:
                self.release()  # a retry starts a new job, whose first step is the reward server's
                raise ServerLost(f"the reward server {self.step.server!r} ended before it was ready: {dead}")
            url = reward_url(job)
            if url is None:
                seen[0] = job.status()
                return None
            if url not in clients:
                clients[url] = client_for(url)
            client = clients[url]
            why = client.ready(probe_timeout=min(30.0, self.ready_timeout_s))
            seen[0] = why or "ready"
            return client if why is None else None

        client = poll_until(check, deadline=Deadline(self.ready_timeout_s), interval=self.poll_s,
                            what=f"the reward server {self.step.server!r} in Slurm job {job.job_id} to be ready",
                            describe_last=lambda: seen[0])
        swap = self.swaps[-1]
        swap.setdefault("ready_at", time.time())
        swap.setdefault("swap_s", round(swap["ready_at"] - swap["swap_started_at"], 3))
        return client

    def hand_back(self, generator_ready_s: float) -> SlurmBackend | None:
        """The kept job given back to generation (a generating stage reads a reward stage): the
        generator's step asked for again and the reward step stopped, as the swap did the other way;
        the caller's pool waits (its deadline) for the generator to answer. None, the job released,
        when there is none to give or it is lost: the pool then submits a new job (a queue wait)."""
        job = self.kept
        if job is None:
            return None
        if (dead := job.dead_reason()) is not None or job.scheduled_end() is not None:
            log.warning("Slurm job %s is not given back to the generator (%s); a new job is submitted", job.job_id,
                        dead or "its time limit is near")
            self.release()
            return None
        t0 = time.time()
        try:
            request_step(job.job_dir, "generator")
            stopped = stop_steps(job, "reward", kill_wait_s(job.client) + job.settings.slurm.release_margin_s)
        except Exception as exc:  # noqa: BLE001 - the job is released; the pool starts a new one
            log.warning("Slurm job %s: the generator's step could not be asked for again (%s); a new job is submitted",
                        job.job_id, exc)
            self.release()
            return None
        self.kept = None
        now = time.time()
        self._back_at[job.job_id] = now
        self.swaps[-1] |= {"released_at": now, "back_s": round(stopped, 3), "back_at": t0}
        log.info("Slurm job %s: reward step stopped in %.1f s; generator step %s asked for again (ready within %.0f s)",
                 job.job_id, stopped, step_name("generator"), generator_ready_s)
        return job

    def ended(self, backend) -> None:
        """A job given back to generation, released by that pool (no reward stage after it): its record
        ends there (a resident reward server's nodes were held until then; a swapped one's ended at the hand-back)."""
        if self.swaps and self.swaps[-1]["job_id"] == backend.job_id:
            self.swaps[-1].setdefault("released_at", time.time())

    def claim(self, stage: str) -> None:
        """The jobs the reward server ran in since the last claim are `stage`'s (its manifest entry's
        allocation): a reward stage claims at its start and its end, so none is counted twice."""
        for s in self.swaps:
            s.setdefault("stage", stage)

    def release(self) -> None:
        if self.kept is None:
            return
        job, self.kept = self.kept, None
        try:
            self._release(job)
        finally:
            self.swaps[-1]["released_at"] = time.time()

    def report(self, stage: str | None = None) -> dict:
        """What the manifest says of the swap: per job (the ones `stage` claimed), the generator's time
        before it, the swap's seconds (generator stopped, reward server loaded and answering), the
        reward server's GPU-hours, the seconds to stop it when the job went back to the generator
        (`back_s`); and the totals."""
        jobs = []
        for s in self.swaps:
            if stage is not None and s.get("stage") != stage:
                continue
            end = s.get("released_at") or time.time()
            held = end - s["swap_started_at"]
            jobs.append({"job_id": s["job_id"], "generator_held_s": s["generator_held_s"],
                         "generator_gpu_hours": round(self.gpus * s["generator_held_s"] / 3600, 4),
                         "generator_stop_s": s["generator_stop_s"], "swap_s": s.get("swap_s"),
                         "reward_held_s": round(held, 3), "reward_gpu_hours": round(self.gpus * held / 3600, 4),
                         **({"back_s": s["back_s"]} if "back_s" in s else {})})
        total = {k: round(sum(j[k] for j in jobs), 4) for k in ("generator_gpu_hours", "reward_gpu_hours")}
        return {"mode": "swap", "server": self.step.server, "jobs": jobs, **total,
                "swap_s": round(sum(j["swap_s"] or 0.0 for j in jobs), 3),
                "split": "generator: from its job's start (or its step's return) to the swap; reward: from the swap to "
                         "the job's release, or to the generator's step asked for again"}


def check_swap(settings, profile, step: RewardStep, run_id: str) -> SbatchSpec:
    """The job's spec with its reward step, built (and so validated) as the backend would build it,
    before anything is submitted; `nemotron-sdg render --pipeline` prints it."""
    job = SbatchSpec.from_settings(settings, profile, job_name=job_name_for(None, run_id), comment=job_comment(run_id, None),
                                   job_dir=Path(settings.slurm.job_root).expanduser() / run_id)
    return step.job_for(job)


def swap_step(settings, servers: dict, generator: str, run_id: str) -> RewardStep | None:
    """The reward step of the pipeline's `servers` (a pipeline file's entries: `swap_with` or
    `resident`, `profile`, `model_path`, `port`), checked whole with the generator's job; None when
    no reward server is started in it."""
    placed = [(n, s) for n, s in servers.items() if getattr(s, "swap_with", None) is not None or getattr(s, "resident", False)]
    if not placed:
        return None
    if len(placed) > 1:
        raise ConfigError(f"servers: {', '.join(n for n, _ in placed)} are all started in the generator's job "
                          "(swap_with or resident); one reward server can be: give the others a url")
    (name, server), gen = placed[0], servers[generator]
    how = "resident" if server.resident else "swap_with"
    prof = settings.profile(gen.profile)
    if prof.backend != "slurm":
        raise ConfigError(f"servers.{name}.{how}: {generator} runs on profile {gen.profile} (backend {prof.backend}); "
                          f"a reward server is {'started in' if server.resident else 'swapped into'} a Slurm job only: "
                          "give it a slurm profile, or run the reward "
                          "server yourself and give its url")
    shape = settings.profile(server.profile) if server.profile else prof
    if server.resident and shape.backend != "slurm":
        raise ConfigError(f"servers.{name}.profile: {server.profile} is a {shape.backend} profile; a resident reward "
                          "server gets nodes of the generator's Slurm job: give a slurm profile (its nodes and GPUs)")
    if server.resident and shape.gpus_per_node != prof.gpus_per_node:
        raise ConfigError(f"servers.{name}.profile: {server.profile} has {shape.gpus_per_node} GPUs per node, the job of "
                          f"{generator} ({gen.profile}) {prof.gpus_per_node}: one job asks one number of GPUs per node; "
                          "give a profile with as many")
    if not server.resident and (shape.nodes, shape.gpus_per_node) != (prof.nodes, prof.gpus_per_node):
        raise ConfigError(f"servers.{name}.profile: {server.profile} is {shape.nodes} x {shape.gpus_per_node} GPUs, the "
                          f"job of {generator} ({gen.profile}) {prof.nodes} x {prof.gpus_per_node}: a swapped server runs "
                          "on the generator's nodes; give a profile of that shape, or drop it")
    srv, slurm = settings.server, settings.slurm
    step = RewardStep(server=name, tensor_parallel=shape.tensor_parallel, pipeline_parallel=shape.pipeline_parallel,
                      model_path=server.model_path, port=server.port, script=srv.reward_script,
                      image=image_for(REWARD_ENGINE, slurm.container_image, slurm.images),
                      command=tuple(srv.reward_command) if srv.reward_command else None,
                      resident=server.resident, nodes=shape.nodes if server.resident else None)
    check_swap(settings, prof, step, run_id)
    return step


def pipeline_job(settings, servers: dict, generator: str, run_id: str = "dry-run",
                 later: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """The scripts of a pipeline's job (`nemotron-sdg render --pipeline`): its generation server's,
    with the reward server's step when one is swapped in (and, for the generating stages `later`
    that read a reward stage, the way back said in it). Nothing is written or submitted."""
    from infra.slurm.render import render_node_launcher, render_sbatch

    step = swap_step(settings, servers, generator, run_id)
    prof = settings.profile(servers[generator].profile)
    if step is not None:
        spec = check_swap(settings, prof, step, run_id)
    else:
        spec = SbatchSpec.from_settings(settings, prof, job_name=job_name_for(None, run_id),
                                        comment=job_comment(run_id, None),
                                        job_dir=Path(settings.slurm.job_root).expanduser() / run_id)
    sbatch = render_sbatch(spec)
    if later and spec.reward is not None:
        back = "the generator's step stays, used" if spec.resident else "then the generator's step again (request 2),"
        note = (f"# Going back: after the reward stage(s), {back} in THIS job for stage(s) {', '.join(later)}; "
                "the job is released after the last of them.\n")
        at = max(sbatch.find("# Steps: "), sbatch.find("# Resident: "))
        sbatch = sbatch[:at] + note + sbatch[at:] if at >= 0 else sbatch + note
    files = [("sbatch.sh", sbatch), ("node-launcher.sh", render_node_launcher(spec))]
    return files + ([("reward-launcher.sh", render_node_launcher(spec.reward))] if spec.reward is not None else [])
