"""A reward server resident beside the generator in ONE Slurm job (issue 29, "Allocation";
docs/pipelines.md): a pipeline's `servers.<rm>.resident: true`.

Where the two servers fit on the job's nodes together (4 x 8 H100 for Nemotron-4-340B and its reward
model), the swap (infra/slurm/steps.py) would only waste the reward model's load time: the job asks
for the generator's nodes plus the reward server's (its own profile's), and the batch script starts
both steps at once, each on its own nodes (sbatch-resident.sh.tmpl, srun --nodes/--relative). The
reward server loads while the generator generates, nothing is stopped or swapped, and the job is
released after the last score. `ResidentKeeper` is the flow's side, the same calls as `SwapKeeper`'s:
the pool's release of the generator's job keeps it (no step change); `connect` waits, with its
deadline, for the reward step's `/v2/models/<model>/ready`; a rerun with nothing to generate submits
a job of the reward server's nodes alone whose only step is the reward server's (flows/reward.py).
"""

from __future__ import annotations

import logging
import time

from infra.slurm.steps import SwapKeeper

log = logging.getLogger(__name__)


def unused_reward_servers(step, replicas: int) -> str | None:
    """The warning for `--replicas` > 1 with a resident reward server: every replica's job loads one
    (its nodes asked for at submission), and only the job the pool releases last scores."""
    if step is None or not step.resident or replicas <= 1:
        return None
    return (f"--replicas {replicas} with the resident reward server {step.server!r}: each of the {replicas} jobs holds "
            f"its {step.nodes} node(s) and loads it, and only the job released last scores; the other {replicas - 1} "
            "are counted as unused (reward.allocation.jobs). Use --replicas 1 unless generation needs the others")


class ResidentKeeper(SwapKeeper):
    """The job both servers are resident in, from the pool's release to the last score."""

    def __init__(self, step, *, gpus: int, reward_gpus: int, **kwargs):
        super().__init__(step, gpus=gpus, **kwargs)
        self.reward_gpus = reward_gpus

    def keep(self, backend) -> None:
        reward = getattr(getattr(backend, "spec", None), "reward", None)
        # The job given back to a later level's generation (hand_back: its record open, generation not done).
        last = next((s for s in reversed(self.swaps) if s["job_id"] == backend.job_id and "released_at" not in s
                     and s.get("generated_until", 0.0) is None), None)
        if last is not None:
            # Released by its pool again: kept only as a first keep would be (near its time limit,
            # the scoring would be cut short).
            if backend.dead_reason() is not None or backend.scheduled_end() is not None:
                self._release(backend)
                last["released_at"] = time.time()
                return
            if self.kept is not None:
                self.release()  # another replica's job, released before it: the last one released is kept
            self.swaps.remove(last)
            self.swaps.append(last)  # the kept job's record last, where connect and release find it
            self.kept, last["generated_until"] = backend, time.time()
            last["generator_held_s"] = round(last["generated_until"] - last["running_at"] - last.get("kept_before_s", 0.0), 3)
            log.info("Slurm job %s: generation done again; kept for its resident reward step", backend.job_id)
            return
        if reward is None or backend.dead_reason() is not None or backend.scheduled_end() is not None:
            started, now = getattr(backend, "running_at", lambda: None)(), time.time()
            self._release(backend)
            if reward is not None and started is not None:
                # Its reward server held its nodes too (another replica's, or a lost job's), unused: counted.
                # Before the kept job's record, which SwapKeeper's connect and release find last.
                at = len(self.swaps) - (self.kept is not None)
                self.swaps.insert(at, {"job_id": backend.job_id, "swap_started_at": now, "generated_until": now,
                                   "running_at": started, "released_at": time.time(), "generator_stop_s": 0.0,
                                   "generator_held_s": round(now - started, 3), "unused": True})
            return
        if self.kept is not None:
            self.release()
        self.kept = backend
        now = time.time()
        # Nothing to stop: the reward step runs since the job's start, on its own nodes.
        self.swaps.append({"job_id": backend.job_id, "swap_started_at": now, "generated_until": now,
                           "running_at": backend.running_at() or now, "generator_stop_s": 0.0,
                           "generator_held_s": round(now - (backend.running_at() or now), 3)})
        log.info("Slurm job %s: generation done; kept for its resident reward step %s", backend.job_id,
                 self.step.server)

    def hand_back(self, generator_ready_s: float):
        """The kept job to a later level's generation: its generator step never stopped, so nothing is
        asked of the batch script; its nodes' kept time so far is noted."""
        job = self.kept
        if job is None:
            return None
        if (dead := job.dead_reason()) is not None or job.scheduled_end() is not None:
            log.warning("Slurm job %s is not given back to the generator (%s); a new job is submitted", job.job_id,
                        dead or "its time limit is near")
            self.release()
            return None
        self.kept, rec, now = None, self.swaps[-1], time.time()
        rec["kept_before_s"] = round(rec.get("kept_before_s", 0.0) + now - (rec.get("generated_until") or now), 3)
        rec["generated_until"] = None
        log.info("Slurm job %s: its resident generator serves a later stage", job.job_id)
        return job

    def release(self) -> None:
        job = self.kept
        if job is not None and self.swaps and "running_at" not in self.swaps[-1]:
            # A job submitted for the reward step alone: its GPUs are held from its start.
            self.swaps[-1]["running_at"] = job.running_at() or self.swaps[-1]["swap_started_at"]
        super().release()

    def report(self, stage: str | None = None) -> dict:
        """Per job: the reward server's GPU-hours from the job's start to its release (it was resident
        all along), how long it took to answer, and the generator's GPU-hours after generation (its
        nodes are held until the job's release; the pool's share ends at generation's end). A job the
        pool released otherwise (another replica's, one lost) is listed `unused`: its reward server's
        nodes were held all the same."""
        jobs = []
        for s in self.swaps:
            if stage is not None and s.get("stage") != stage:
                continue
            end = s.get("released_at") or time.time()
            start = s.get("running_at") or s["swap_started_at"]
            until = s.get("generated_until", end)
            held, kept = end - start, s.get("kept_before_s", 0.0) + (end - until if until is not None else 0.0)
            ready = s.get("ready_at")
            jobs.append({"job_id": s["job_id"], "generator_held_s": s["generator_held_s"],
                         "generator_gpu_hours": round(self.gpus * s["generator_held_s"] / 3600, 4),
                         "generator_kept_s": round(kept, 3),
                         "generator_kept_gpu_hours": round(self.gpus * kept / 3600, 4),
                         "reward_ready_s": round(ready - start, 3) if ready else None,
                         "reward_held_s": round(held, 3), "reward_gpu_hours": round(self.reward_gpus * held / 3600, 4),
                         **({"unused": True} if s.get("unused") else {})})
        total = {k: round(sum(j[k] for j in jobs), 4)
                 for k in ("generator_gpu_hours", "generator_kept_gpu_hours", "reward_gpu_hours")}
        return {"mode": "resident", "server": self.step.server, "jobs": jobs, **total, "swap_s": 0.0,
                "split": "generator: its nodes from the job's start (the pool's share to generation's end, then "
                         "generator_kept_* to the release); reward: its own nodes from the job's start to the release"}
