"""Setup shared by the tests that run a reward server in the generator's Slurm job on the local
cluster (swap, swap back, resident, resident back): the PyTriton stand-in as the reward command,
the topics file and the pipeline file; squeue sampled while a run goes on; and the check that
nothing is left afterwards (no job, step, stand-in process or port)."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

from infra.deadline import Deadline, poll_until
from infra.slurm.client import SlurmClient
from tests.fixtures_reward import REPO, _libdir
from tests.fixtures_slurm import slurm_test_env
from tests.ports import free_port
from tests.test_slurm_flow import our_jobs
from tests.test_slurm_pipeline import job_record


def set_up_reward_run(workdir: Path, monkeypatch, pytriton_env, pipeline: str, *server_args: str,
                      topics: int = 4, reward_command: list[str] | None = None) -> tuple[int, Path]:
    """The cluster's environment with the reward stand-in (or `reward_command`) as the reward step's
    command, `topics` topics and `pipeline` (its RM_PORT filled in): (the reward port, the stand-in's log
    of what it scored)."""
    rm_port, scored_log = free_port(), workdir / "scored.jsonl"
    standin = reward_command or ["env", "PYTHONPATH=", f"LD_LIBRARY_PATH={_libdir(pytriton_env)}", pytriton_env,
                                 str(REPO / "tests" / "reward_standin.py"), "{port}", str(scored_log)]
    for name, value in {**slurm_test_env(workdir, free_port(span=4), *server_args),
                        "NSDG_SERVER__REWARD_COMMAND": json.dumps(standin)}.items():
        monkeypatch.setenv(name, value)
    (workdir / "topics.jsonl").write_text("".join(json.dumps({"id": f"t{i}", "topic": f"topic {i}"}) + "\n"
                                                  for i in range(topics)))
    (workdir / "pipeline.yaml").write_text(pipeline.replace("RM_PORT", str(rm_port)))
    return rm_port, scored_log


def sampled_jobs(run_id: str, run: Callable[[], object], sample: Callable[[str], None], interval: float = 0.3) -> set[str]:
    """`run()` while the run's jobs are listed every `interval` s, `sample(job_id)` called for each: its jobs."""
    jobs: set[str] = set()
    stop = threading.Event()

    def watch():
        while not stop.wait(interval):
            for job in our_jobs(run_id):
                jobs.add(job.job_id)
                sample(job.job_id)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        run()
    finally:
        stop.set()
        watcher.join(10)
    return jobs


def steps_seen(client: SlurmClient, run_id: str, run: Callable[[], object]) -> tuple[set[str], list[tuple[str, str]]]:
    """`run()` while squeue is sampled: the run's jobs, and its steps (id, name) in the order first listed."""
    steps: list[tuple[str, str]] = []

    def sample(job_id: str) -> None:
        steps.extend(s for s in client.steps(job_id) if s[1].startswith("nsdg-") and s not in steps)

    return sampled_jobs(run_id, run, sample, interval=0.2), steps


def standin_processes(marker: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True, timeout=30, check=False).stdout
    return [line for line in out.splitlines() if marker in line and "ps -eo" not in line]


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def nothing_left(client: SlurmClient, job_id: str, scored_log, port: int, run_id: str = "swap") -> None:
    """No job, no step, no stand-in process (its Python, by the log it writes; Triton's server, by its port)."""
    assert not our_jobs(run_id) and not client.steps(job_id)
    assert job_record(job_id)["state"].startswith("CANCELLED")

    def left() -> list[str]:
        return standin_processes(str(scored_log)) + [p for p in standin_processes("tritonserver") if str(port) in p]

    poll_until(lambda: True if not left() else None, deadline=Deadline(30), interval=0.5,
               what="the reward stand-in's processes to end", describe_last=lambda: str(left()))
    # Nothing listens on the reward port either: Triton's server can outlive the stand-in's Python for a
    # moment under a name without the port, and a rerun's reward step would then find its port taken.
    poll_until(lambda: True if not listening(port) else None, deadline=Deadline(30), interval=0.5,
               what=f"the reward port {port} to be free", describe_last=lambda: f"port {port} still answers")
