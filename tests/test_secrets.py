"""A secret scan: a worker-run deployment on the local Slurm cluster, with the worker's S3
credentials set to marker strings (tests/fixtures_prefect.py SECRET_MARKERS) and the Prefect
server's password as one more. No marker may show up in any file the run wrote (output, job
directory with its rendered scripts and logs, the work directory), in what the Prefect API holds
for the run (the flow run with its parameters, its task runs, logs and artifacts) or in any
process's arguments as `ps` shows them while the run goes on."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import psutil
import pytest

from tests.fixtures_prefect import SECRET_MARKERS, run_deployment, run_dir_of

pytestmark = [pytest.mark.slurm, pytest.mark.prefect_server, pytest.mark.integration]


def markers(prefect_server) -> list[str]:
    password = prefect_server.basic_auth[1]
    return [*SECRET_MARKERS.values(), password, prefect_server.auth_string]


class ArgvWatch(threading.Thread):
    """Every distinct command line on the machine while it runs (what `ps -eo args` shows)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.seen: set[str] = set()
        self.flow_env_had_markers = False  # proof the run really held the credentials
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.2):
            for proc in psutil.process_iter(["cmdline"]):
                argv = " ".join(proc.info["cmdline"] or [])
                self.seen.add(argv)
                if "prefect.engine" in argv and not self.flow_env_had_markers:
                    try:
                        env = proc.environ()
                    except psutil.Error:
                        continue
                    self.flow_env_had_markers = all(env.get(k) == v for k, v in SECRET_MARKERS.items())


def files_with(root: Path, needles: list[str]) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            found += [f"{path}: {n[:12]}…" for n in needles if n.encode() in data]
    return found


@pytest.mark.usefixtures("slurm_cluster")
def test_no_secret_in_files_api_or_process_arguments(prefect_server, prefect_worker, deployed, tmp_path):
    secrets = markers(prefect_server)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": f"s{i}", "prompt": f"secret scan prompt {i}"}) + "\n" for i in range(12)))
    out = tmp_path / "out"
    watch = ArgvWatch()
    watch.start()
    try:
        run = run_deployment(prefect_server, "generate/on-demand", "--param", f"input_uri={src}",
                             "--param", f"output_uri={out}", "--param", "profile=test2x8",
                             "--param", "shard_size=5", "--param", "batch_size=4", timeout=300)
    finally:
        watch.done.set()
        watch.join(timeout=10)
    assert run.returncode == 0, f"{run.output[-3000:]}\n--- worker ---\n{prefect_worker.log_tail()}"
    run_dir = run_dir_of(prefect_worker, run.flow_run_id, out)
    assert (run_dir / "manifest.json").is_file()
    job_dirs = [p for p in prefect_worker.jobs_dir.rglob("sbatch.sh") if run.flow_run_id in p.read_text()]
    assert job_dirs, f"no job directory of flow run {run.flow_run_id} under {prefect_worker.jobs_dir}"

    leaks = files_with(out, secrets) + files_with(prefect_worker.jobs_dir, secrets)
    leaks += files_with(Path(prefect_worker.env["NSDG_WORK_DIR"]), secrets) if Path(prefect_worker.env["NSDG_WORK_DIR"]).exists() else []
    api = {
        "flow run": prefect_server.flow_run(run.flow_run_id),
        "task runs": prefect_server.post("/task_runs/filter", {"flow_runs": {"id": {"any_": [run.flow_run_id]}}}),
        "logs": prefect_server.logs(run.flow_run_id),
        "artifacts": prefect_server.artifacts(run.flow_run_id),
        "deployment": prefect_server.get(f"/deployments/{run_flow_deployment(prefect_server, run.flow_run_id)}"),
    }
    for what, body in api.items():
        text = json.dumps(body)
        leaks += [f"Prefect API {what}: {s[:12]}…" for s in secrets if s in text]
    assert len(api["logs"]) > 5 and api["artifacts"]  # there was something to scan
    leaks += [f"argv: {argv[:200]}" for argv in watch.seen for s in secrets if s in argv]
    assert len(watch.seen) > 20  # the watch saw the run's processes (srun, the ranks, the server)
    assert watch.flow_env_had_markers, "the flow run never held the marker credentials: the scan proves nothing"
    assert not leaks, "\n".join(leaks)


def run_flow_deployment(server, flow_run_id: str) -> str:
    return server.flow_run(flow_run_id)["deployment_id"]
