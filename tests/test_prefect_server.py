"""The repo's prefect.yaml against a real Prefect server and `process` worker
(tests/fixtures_prefect.py), and teardown on every exit path of a worker-run deployment on
the local Slurm cluster: `prefect flow-run cancel`, SIGKILL of the flow process (on_crashed),
the worker and the flow both killed (the job's dead-man switch), and the reaper.

Timings are measured and printed (run with -s to see them); the asserts are generous.
"""

from __future__ import annotations

import hashlib
import json
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from zoneinfo import ZoneInfo

import psutil
import requests
import pytest

from flows import zombies
from flows.reap import NO_ANSWER, UNKNOWN_RUN, flow_run_id_of, jobs_of_flow_runs, judge
from infra.system.commands import run_command
from infra.system.paths import is_under
from infra.deadline import Deadline, poll_until
from infra.errors import ConfigError
from infra.slurm.client import SlurmClient
from infra.slurm.parse import JobSummary
from prefect.client.schemas.objects import StateType
from tests.fixtures_prefect import (
    FLOW_HEARTBEAT_S, HEARTBEAT_INTERVAL_S, HEARTBEAT_TIMEOUT_S, POOL, REPO, flow_run_processes, run_deployment, run_dir_of,
    start_deployment,
)

MID_RUN_S = 180.0  # queue + readiness + the first published shard, on a 2-core machine


# --- the reaper's rules (pure) ---------------------------------------------------------------


def _job(name: str, job_id: str = "7", work_dir: str | None = None) -> JobSummary:
    return JobSummary(job_id=job_id, name=name, state="RUNNING", comment=None, work_dir=work_dir)


def test_reaper_reads_flow_run_ids_only_from_nsdg_uuid_names():
    run = uuid.uuid4()
    assert flow_run_id_of(f"nsdg-{run}") == run
    for name in ("nsdg-20260101-000000-abcd1234", "nsdg-", f"other-{run}", f"xnsdg-{run}", str(run)):
        assert flow_run_id_of(name) is None


def test_reaper_cancels_only_over_or_unknown_runs():
    job = _job(f"nsdg-{uuid.uuid4()}")
    for state in (StateType.COMPLETED, StateType.FAILED, StateType.CANCELLED, StateType.CRASHED, UNKNOWN_RUN):
        assert judge(job, state).cancel, state
    for state in (StateType.RUNNING, StateType.PENDING, StateType.SCHEDULED, StateType.CANCELLING,
                  StateType.PAUSED, NO_ANSWER):
        assert not judge(job, state).cancel, state


def test_reaper_scope_is_nsdg_jobs_under_the_job_root(tmp_path):
    root = (tmp_path / "jobs").resolve()
    a, b, c, d = (str(uuid.uuid4()) for _ in range(4))
    jobs = [_job(f"nsdg-{a}", "1", f"{root}/r/1"), _job(f"nsdg-{b}", "2", f"{tmp_path}/elsewhere"),
            _job("nsdg-run-7", "3", f"{root}/r/3"), _job(f"slurm-{c}", "4", f"{root}/r/4"),
            _job(f"nsdg-{d}", "5", f"{root}/../jobs/r/5"), _job(f"nsdg-{a}", "6", None)]
    assert [j.job_id for j in jobs_of_flow_runs(jobs, root)] == ["1", "5"]
    assert not is_under(f"{root}-other/x", root) and not is_under("", Path.cwd()) and not is_under(None, root)


# --- the zombie-run automation ------------------------------------------------------------------


def test_zombie_automation_is_scoped_to_our_tag_and_never_shorter_than_three_heartbeats():
    automation = zombies.zombie_automation(90, 30)
    trigger = automation.trigger
    assert trigger.after == {"prefect.flow-run.heartbeat"}
    assert trigger.expect >= {"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Crashed"}
    assert trigger.match_related.root == {"prefect.resource.id": "prefect.tag.nemotron-sdg"}
    assert trigger.within.total_seconds() == 90 and automation.actions[0].state == StateType.CRASHED
    with pytest.raises(ConfigError, match="shorter than 3 heartbeats of 30 s"):
        zombies.zombie_automation(89, 30)
    with pytest.raises(ConfigError, match="shorter than 3 heartbeats of 30 s"):
        zombies.zombie_automation(60, 10)  # Prefect heartbeats every 30 s at the least


def test_the_dead_run_window_is_never_sized_below_a_deployments_heartbeat():
    """Issue 27 defect 1: `--heartbeat-s 60` against runs heartbeating at Prefect's default 180 s marked
    healthy runs Crashed at 3 minutes. The deployments' own setting decides; a shorter one is refused."""
    assert zombies.choose_heartbeat(None, {"generate/a": 30.0, "reap/reap": 30.0}, None)[0] == 30
    with pytest.raises(ConfigError, match="'generate/nightly': its flow runs send one every 180 s"):
        zombies.choose_heartbeat(60, {"generate/a": 30.0, "generate/nightly": 180.0}, 60)
    assert zombies.choose_heartbeat(240, {"generate/a": 180.0}, None)[0] == 240  # longer is only slower to notice
    assert zombies.choose_heartbeat(None, {}, 45)[0] == 45  # nothing deployed yet: this environment's
    with pytest.raises(ConfigError, match="deploy --all` first"):
        zombies.choose_heartbeat(None, {}, None)


def test_prefect_yaml_gives_every_deployment_the_heartbeat_the_automation_reads():
    """One value, in prefect.yaml's site block, reaches every deployment's flow runs."""
    import yaml

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    for deployment in spec["deployments"]:
        env = deployment["work_pool"]["job_variables"]["env"]
        assert env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == spec["definitions"]["site"]["flow_heartbeat_s"], deployment["name"]
    assert int(spec["definitions"]["site"]["flow_heartbeat_s"]) == FLOW_HEARTBEAT_S  # what the tests' runs send


def test_the_pipeline_deployment_runs_the_worked_example_and_its_parameters_fit_the_flow(monkeypatch):
    """pipeline-example (issue 24): its entrypoint loads, its parameters are valid for the flow's own
    signature (what `prefect deploy` and the UI form check), and its file checks clean, every
    template rendered, from the clone's root (where the deployment's pull step runs it)."""
    import yaml
    from prefect.flows import load_flow_from_entrypoint

    from infra.pipeline.check import check_file
    from infra.settings import load_settings

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    [dep] = [d for d in spec["deployments"] if d["name"] == "pipeline-example"]
    monkeypatch.chdir(REPO)
    flow = load_flow_from_entrypoint(dep["entrypoint"])
    assert flow.name == "pipeline" and flow.validate_parameters(dep["parameters"])["pipeline"] == dep["parameters"]["pipeline"]
    assert dep["work_pool"]["name"] == POOL and "nemotron-sdg" in dep["tags"]
    graph = "\n".join(check_file(dep["parameters"]["pipeline"], load_settings()))
    assert all(stage in graph for stage in ("subtopics", "questions", "answers")), graph


@pytest.mark.prefect_server
@pytest.mark.integration
def test_install_automations_reads_the_deployments_heartbeat(prefect_server, deployed):
    cmd = [sys.executable, "-m", "flows.cli", "install-automations"]
    out = run_command(cmd, timeout=120, env=prefect_server.env(), cwd=str(REPO))
    assert f"no heartbeat for {3 * FLOW_HEARTBEAT_S} s" in out.stdout and "deployments' flow runs heartbeat" in out.stdout
    env = {**prefect_server.env(), "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "200"}  # this shell's value does not decide
    out = run_command(cmd, timeout=120, env=env, cwd=str(REPO))
    assert f"no heartbeat for {3 * FLOW_HEARTBEAT_S} s" in out.stdout


@pytest.mark.prefect_server
@pytest.mark.integration
def test_install_automations_twice_leaves_one(prefect_server, deployed):
    cmd = [sys.executable, "-m", "flows.cli", "install-automations", "--heartbeat-s", str(FLOW_HEARTBEAT_S)]
    again = run_command(cmd, timeout=120, env=prefect_server.env(), cwd=str(REPO))
    assert again.stdout.startswith("updated automation")  # the `deployed` fixture created it
    ours = [a for a in prefect_server.post("/automations/filter") if a["name"] == zombies.NAME]
    assert len(ours) == 1 and ours[0]["enabled"]
    assert ours[0]["trigger"]["within"] == 3 * FLOW_HEARTBEAT_S
    no_api = run_command(cmd, timeout=60, env={k: v for k, v in prefect_server.env().items() if k != "PREFECT_API_URL"},
                         cwd=str(REPO), check=False)
    assert no_api.returncode == 2 and "PREFECT_API_URL is not set" in no_api.stderr


# --- authentication ----------------------------------------------------------------------------

OPEN_ROUTES = {("GET", "/health"), ("GET", "/ready")}  # Prefect leaves the probes open, exact paths only


def api_routes(server) -> list[tuple[str, str]]:
    """Every (method, path) of the server's own API, path parameters filled with a fresh uuid."""
    spec = server.get("/openapi.json")
    return [(method.upper(), re.sub(r"\{[^}]+\}", str(uuid.uuid4()), path.removeprefix("/api")))
            for path, ops in spec["paths"].items() for method in ops if method in ("get", "post", "put", "patch", "delete")]


@pytest.mark.prefect_server
@pytest.mark.integration
def test_api_refuses_every_route_without_the_password(prefect_server, deployed):
    routes = [r for r in api_routes(prefect_server) if r not in OPEN_ROUTES]
    assert len(routes) > 100 and ("POST", "/flow_runs/filter") in routes
    nightly = deployed["nightly"]["id"]
    ours = [("POST", f"/deployments/{nightly}/create_flow_run"), ("GET", f"/deployments/{nightly}"),
            ("POST", "/flow_runs/filter"), ("POST", "/logs/filter"), ("POST", "/artifacts/filter"),
            ("POST", "/automations/filter"), ("POST", f"/work_pools/{POOL}/get_scheduled_flow_runs"),
            ("GET", "/csrf-token?client=x"), ("GET", "/openapi.json")]
    user, password = prefect_server.basic_auth
    knocks = {"no credentials": None, "a wrong password": (user, password + "x"), "another user": ("admin", password),
              "an empty password": (user, "")}
    runs_before = len(prefect_server.post("/flow_runs/filter", {"limit": 200}))
    for what, auth in knocks.items():
        let_in = []
        for method, path in [*ours, *routes]:
            reply = requests.request(method, f"{prefect_server.api_url}{path}", json={}, auth=auth, timeout=10)
            if reply.status_code != 401:
                let_in.append((method, path, reply.status_code))
        assert not let_in, (what, let_in[:20])
    garbled = requests.post(f"{prefect_server.api_url}/flow_runs/filter", json={}, timeout=10,
                            headers={"Authorization": "Bearer " + password})
    assert garbled.status_code == 401
    assert len(prefect_server.post("/flow_runs/filter", {"limit": 200})) == runs_before  # nothing was started


@pytest.mark.prefect_server
@pytest.mark.integration
def test_clients_without_the_password_are_refused(prefect_server, deployed):
    """The CLI with a wrong PREFECT_API_AUTH_STRING starts nothing; the events websocket (what the
    worker watches cancellations on) closes on a wrong token."""
    from websockets.exceptions import ConnectionClosed, InvalidStatus
    from websockets.sync.client import connect

    wrong = {**prefect_server.env(), "PREFECT_API_AUTH_STRING": prefect_server.basic_auth[0] + ":guess"}
    runs_before = len(prefect_server.post("/flow_runs/filter", {"limit": 200}))
    for argv in (["deployment", "run", "generate/nightly"], ["flow-run", "ls"], ["deployment", "ls"]):
        out = run_command([sys.executable, "-m", "prefect", *argv], timeout=120, env=wrong, cwd=str(REPO), check=False)
        assert out.returncode != 0 and "nightly" not in out.stdout, (argv, out.stdout[-2000:], out.stderr[-2000:])
    assert len(prefect_server.post("/flow_runs/filter", {"limit": 200})) == runs_before
    ws_url = prefect_server.api_url.replace("http://", "ws://") + "/events/out"
    with pytest.raises(InvalidStatus):  # no 'prefect' subprotocol: no websocket at all while auth is on
        connect(ws_url, open_timeout=10).close()
    for token in (None, "", prefect_server.basic_auth[0] + ":guess"):
        with connect(ws_url, open_timeout=10, subprotocols=["prefect"]) as ws:
            ws.send(json.dumps({"type": "auth", "token": token}))
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008, token


# --- deploy ------------------------------------------------------------------------------------


@pytest.mark.prefect_server
@pytest.mark.integration
def test_deploy_all_from_the_repo(deployed):
    for name, dep in deployed.items():
        assert dep["work_pool_name"] == POOL, name
        assert dep["pull_steps"] == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO.resolve())}}], name
    nightly = deployed["nightly"]
    assert nightly["entrypoint"] == "flows/generate.py:generate"
    [schedule] = nightly["schedules"]
    # Off: the unedited site's CHANGE-ME placeholders (flows/deploy_checks.py); on once the site is edited.
    assert schedule["schedule"]["cron"] == "0 2 * * *" and schedule["active"] is False
    ZoneInfo(schedule["schedule"]["timezone"])  # set, and a real IANA name
    assert nightly["global_concurrency_limit"]["limit"] == 1
    assert nightly["concurrency_options"]["collision_strategy"] == "CANCEL_NEW"
    assert nightly["parameters"]["profile"] == "h100x16"
    assert nightly["parameters"]["input_uri"].startswith("s3://") and nightly["parameters"]["output_uri"].startswith("s3://")
    assert deployed["on-demand"]["schedules"] == [] and deployed["on-demand"]["parameters"]["profile"] == "h100x16"
    smoke = deployed["local-smoke"]
    assert smoke["schedules"] == []
    assert smoke["parameters"]["profile"] == "local" and smoke["parameters"]["input_uri"] == "examples/prompts.jsonl"
    reap = deployed["reap"]
    assert reap["entrypoint"] == "flows/reap.py:reap"
    [schedule] = reap["schedules"]
    assert schedule["schedule"]["cron"] == "*/10 * * * *" and schedule["schedule"]["timezone"]
    assert reap["global_concurrency_limit"]["limit"] == 1


@pytest.mark.prefect_server
@pytest.mark.integration
def test_parameter_form_shows_every_description(deployed):
    """The UI's run form is built from parameter_openapi_schema: every field needs its text."""
    for name in ("on-demand", "reap"):
        properties = deployed[name]["parameter_openapi_schema"]["properties"]
        missing = sorted(p for p, spec in properties.items() if not spec.get("description"))
        assert not missing, f"{name}: parameters without a description in the UI form: {missing}"
    sampling = deployed["on-demand"]["parameter_openapi_schema"]["definitions"]["SamplingParams"]["properties"]
    assert sampling["tokens_to_generate"]["description"]


# --- a deployment run end to end ------------------------------------------------------------


@pytest.mark.prefect_server
@pytest.mark.integration
def test_local_smoke_run_publishes_and_shows_artifacts(smoke_run, prefect_server, prefect_worker, deployed):
    run = prefect_server.flow_run(smoke_run.flow_run_id)
    assert run["state"]["type"] == "COMPLETED" and run["deployment_id"] == deployed["local-smoke"]["id"]
    run_dir = run_dir_of(prefect_worker, smoke_run.flow_run_id)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    inputs = [json.loads(line) for line in (REPO / "examples" / "prompts.jsonl").read_text().splitlines()]
    assert manifest["records_in"] == manifest["records_written"] == len(inputs)
    assert manifest["profile"] == "local" and manifest["run_id"] == run_dir.name
    records = []
    for part in manifest["parts"]:
        data = (run_dir / part["name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == part["sha256"]
        lines = [json.loads(line) for line in data.decode().splitlines()]
        assert len(lines) == part["records"]
        records += lines
    assert [r["id"] for r in records] == [i["id"] for i in inputs]
    assert all(r["completion"] for r in records)

    key = "".join(c if c.isalnum() else "-" for c in run_dir.name.lower())[:60]
    artifacts = {a["key"]: a for a in prefect_server.artifacts(smoke_run.flow_run_id)}
    assert {f"progress-{key}", f"summary-{key}"} <= set(artifacts), sorted(artifacts)
    assert artifacts[f"progress-{key}"]["type"] == "progress" and float(artifacts[f"progress-{key}"]["data"]) == 100.0
    table = artifacts[f"summary-{key}"]
    rows = json.loads(table["data"]) if isinstance(table["data"], str) else table["data"]
    figures = {row["figure"]: row["value"] for row in rows}  # one row per figure
    assert table["type"] == "table" and figures["manifest"] == str(run_dir / "manifest.json")
    assert figures["written"] == str(len(inputs)) and "generation (s)" in figures and "GPU-hours held" in figures
    print(f"\nlocal-smoke: `prefect deployment run --watch` took {smoke_run.seconds:.1f} s")


# --- teardown of a Slurm-backed deployment run -------------------------------------------------


def write_prompts(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"deployment prompt {i}"}) + "\n" for i in range(n)))
    return path


def jobs_named(name: str) -> list[str]:
    return SlurmClient().find_jobs(name)


class ExitWatch(threading.Thread):
    """Notes (monotonic clock) when the flow process exits and when its job leaves squeue."""

    def __init__(self, proc: psutil.Process, job_name: str):
        super().__init__(daemon=True)
        self.proc, self.job_name = proc, job_name
        self.exit_at: float | None = None
        self.gone_at: float | None = None
        self.stop = threading.Event()

    def exited(self) -> bool:
        try:
            return self.proc.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    def run(self) -> None:
        deadline = Deadline(240)
        while not self.stop.is_set() and not deadline.expired() and (self.exit_at is None or self.gone_at is None):
            if self.exit_at is None and self.exited():
                self.exit_at = time.monotonic()
            if self.gone_at is None and not jobs_named(self.job_name):
                self.gone_at = time.monotonic()
            time.sleep(0.1)

    def wait(self, seconds: float) -> None:
        poll_until(lambda: True if self.exit_at is not None and self.gone_at is not None else None,
                   deadline=Deadline(seconds), interval=0.2,
                   what=f"the flow process to exit and job {self.job_name} to leave squeue",
                   describe_last=lambda: f"exit_at={self.exit_at} gone_at={self.gone_at}")


def start_slurm_run(server, worker, tmp_path: Path, n: int = 400) -> tuple[str, Path]:
    src = write_prompts(tmp_path / "in.jsonl", n)
    out = tmp_path / "out"
    run_id = start_deployment(server, "generate/on-demand", "--param", f"input_uri={src}",
                              "--param", f"output_uri={out}", "--param", "profile=test2x8",
                              "--param", "shard_size=10", "--param", "batch_size=5")
    return run_id, out


def wait_mid_generation(server, worker, run_id: str, out: Path) -> psutil.Process:
    """Until the run has a running job and a published shard; returns the flow process."""
    name = f"nsdg-{run_id}"

    def mid_run():
        state = server.state_type(run_id)
        if state not in ("SCHEDULED", "PENDING", "RUNNING"):
            raise AssertionError(f"flow run {run_id} ended {state} before mid-generation:\n{worker.log_tail()}")
        if not list(run_dir_of(worker, run_id, out).glob("part-*.state.json")) or not jobs_named(name):
            return None
        return next((proc for proc, fr in flow_run_processes(server.api_url) if fr == run_id), None)

    return poll_until(mid_run, deadline=Deadline(MID_RUN_S), interval=0.3,
                      what=f"flow run {run_id} to publish its first shard",
                      describe_last=lambda: f"state {server.state_type(run_id)}; worker log:\n{worker.log_tail(20)}")


def assert_published_shards_intact(run_dir: Path) -> int:
    states = list(run_dir.glob("part-*.state.json"))
    assert states, f"no shard was published under {run_dir}"
    for state in states:
        info = json.loads(state.read_text())
        assert hashlib.sha256((run_dir / info["name"]).read_bytes()).hexdigest() == info["sha256"], info["name"]
    assert not (run_dir / "manifest.json").exists()
    return len(states)


@pytest.mark.usefixtures("slurm_cluster")
@pytest.mark.slurm
@pytest.mark.prefect_server
@pytest.mark.integration
def test_cancel_mid_generation_releases_the_job(prefect_server, prefect_worker, deployed, tmp_path):
    run_id, out = start_slurm_run(prefect_server, prefect_worker, tmp_path)
    proc = wait_mid_generation(prefect_server, prefect_worker, run_id, out)
    watch = ExitWatch(proc, f"nsdg-{run_id}")
    watch.start()
    t_cancel = time.monotonic()
    prefect_server.cli("flow-run", "cancel", run_id)
    t_cli = time.monotonic()
    prefect_server.wait_state(run_id, {"CANCELLED"}, 120)
    watch.wait(60)
    # The worker runs on_cancellation in a helper process after the flow process exits.
    prefect_server.wait_log(run_id, "teardown after Cancelling", 60)
    shards = assert_published_shards_intact(run_dir_of(prefect_worker, run_id, out))
    after_exit = watch.gone_at - watch.exit_at
    print(f"\ncancel: CLI returned after {t_cli - t_cancel:.1f} s; job gone {watch.gone_at - t_cancel:.1f} s after "
          f"the CLI call, {after_exit:+.1f} s after the flow process exited ({watch.exit_at - t_cancel:.1f} s "
          f"after the call); {shards} shards published and intact")
    assert after_exit <= 10.0
    assert not jobs_named(f"nsdg-{run_id}")


@pytest.mark.usefixtures("slurm_cluster")
@pytest.mark.slurm
@pytest.mark.prefect_server
@pytest.mark.integration
def test_sigkill_of_the_flow_process_runs_on_crashed(prefect_server, prefect_worker, deployed, tmp_path):
    run_id, out = start_slurm_run(prefect_server, prefect_worker, tmp_path)
    proc = wait_mid_generation(prefect_server, prefect_worker, run_id, out)
    watch = ExitWatch(proc, f"nsdg-{run_id}")
    watch.start()
    t_kill = time.monotonic()
    proc.send_signal(signal.SIGKILL)
    prefect_server.wait_state(run_id, {"CRASHED"}, 60)
    watch.wait(60)
    line = prefect_server.wait_log(run_id, "teardown after Crashed", 60)
    assert "released Slurm job" in line, line  # the hook cancelled it, not the dead-man switch
    shards = assert_published_shards_intact(run_dir_of(prefect_worker, run_id, out))
    print(f"\nSIGKILL: job gone {watch.gone_at - t_kill:.1f} s after the kill "
          f"({watch.gone_at - watch.exit_at:+.1f} s after exit); {shards} shards intact; hook said: {line!r}")
    assert watch.gone_at - t_kill < HEARTBEAT_TIMEOUT_S
    assert not list(prefect_worker.jobs_dir.glob(f"*-{run_id[:8]}/*/cancel-reason"))


DEPLOY_SLEEPER = """
import sys, yaml
from prefect import flow
site = yaml.safe_load(open("prefect.yaml"))["definitions"]["work_pools"]["process"]
flow.from_source(source=".", entrypoint="tests/heartbeat_flow.py:sleeper").deploy(
    name="heartbeat", work_pool_name=site["name"], job_variables=site["job_variables"], tags=[sys.argv[1]], build=False)
"""


def start_healthy_sleeper(server, seconds: float) -> str:
    """Deploy tests/heartbeat_flow.py as prefect.yaml's job variables say, tagged for the dead-run
    automation, and start a run of it that sleeps `seconds`; returns its flow-run id."""
    deploy = subprocess.run([sys.executable, "-c", DEPLOY_SLEEPER, zombies.TAG], cwd=REPO, capture_output=True,
                            text=True, timeout=180, env=server.env())
    assert deploy.returncode == 0, deploy.stderr[-3000:]
    return start_deployment(server, "healthy-sleeper/heartbeat", "--param", f"seconds={seconds}")


@pytest.mark.usefixtures("slurm_cluster")
@pytest.mark.slurm
@pytest.mark.prefect_server
@pytest.mark.integration
def test_worker_and_flow_killed_dead_man_switch_ends_the_job_and_a_healthy_run_is_not_crashed(
        prefect_server, prefect_worker, deployed, tmp_path):
    """The dead-man switch ends the job of a run whose worker and flow were both killed, and the
    zombie automation sets that run Crashed. Beside it, issue 27 defect 1's test: under the documented
    setup (prefect.yaml's job variables, then `install-automations`, done by the `deployed` fixture),
    a healthy run tagged for the automation that lasts longer than its window (3 heartbeats of 30 s,
    the shortest Prefect allows) ends Completed and was never Crashed; before the fix the window
    equalled the flows' 180 s heartbeat. One test, since both wait out the same window (90 s): the
    healthy run's process lives in its own session, so it outlives the worker's kill as it would a
    worker restart."""
    window_s = zombies.MISSED_HEARTBEATS * FLOW_HEARTBEAT_S
    healthy = start_healthy_sleeper(prefect_server, window_s + 20)
    run_id, out = start_slurm_run(prefect_server, prefect_worker, tmp_path)
    proc = wait_mid_generation(prefect_server, prefect_worker, run_id, out)
    # Taken by the worker before it is killed (on a slow machine it may even have finished by now).
    prefect_server.wait_state(healthy, {"RUNNING", "COMPLETED", "FAILED", "CRASHED", "CANCELLED"}, 120)
    name = f"nsdg-{run_id}"
    try:
        prefect_worker.kill()  # no worker left to notice the crash or to run on_crashed
        proc.send_signal(signal.SIGKILL)
        t_kill = time.monotonic()
        limit = HEARTBEAT_TIMEOUT_S + 4 * HEARTBEAT_INTERVAL_S + 30
        poll_until(lambda: True if not jobs_named(name) else None, deadline=Deadline(limit), interval=0.2,
                   what=f"the dead-man switch to end job {name}")
        gone_after = time.monotonic() - t_kill
    finally:
        prefect_worker.start()
    [reason_file] = prefect_worker.jobs_dir.glob(f"*-{run_id[:8]}/*/cancel-reason")
    reason = reason_file.read_text()
    assert "heartbeat" in reason
    assert HEARTBEAT_TIMEOUT_S - HEARTBEAT_INTERVAL_S <= gone_after <= limit
    assert_published_shards_intact(run_dir_of(prefect_worker, run_id, out))
    # Nobody is left to report the run; the zombie automation sets it Crashed once three flow
    # heartbeats are missed (plus one heartbeat of phase and the server's trigger evaluation).
    assert prefect_server.state_type(run_id) == "RUNNING"
    within = window_s
    run = prefect_server.wait_state(run_id, {"CRASHED"}, within + FLOW_HEARTBEAT_S + 60)
    crashed_after = time.monotonic() - t_kill
    assert "No heartbeat" in run["state"]["message"], run["state"]
    print(f"\ndead-man switch: job gone {gone_after:.1f} s after worker and flow were killed "
          f"(timeout {HEARTBEAT_TIMEOUT_S} s, check every {HEARTBEAT_INTERVAL_S} s): {reason.strip()}; "
          f"the run was set Crashed by the automation {crashed_after:.0f} s after the kill (no heartbeat for {within} s)")
    assert crashed_after >= within - FLOW_HEARTBEAT_S  # not before the heartbeats were really missed
    ended = prefect_server.wait_state(healthy, {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}, window_s + 120)
    states = prefect_server.get(f"/flow_run_states/?flow_run_id={healthy}")
    assert ended["state"]["type"] == "COMPLETED", ended["state"]
    assert "CRASHED" not in {s["type"] for s in states}, states


def submit_sleeper(name: str, chdir: Path) -> str:
    chdir.mkdir(parents=True, exist_ok=True)
    result = run_command(["sbatch", "--parsable", "-J", name, f"--chdir={chdir}", "-N", "1", "-n", "1",
                          "--time=5", "-o", "/dev/null", "--wrap", "sleep 600"], timeout=30)
    return result.stdout.strip().split(";")[0]


def reap_attempt(server, worker, smoke_run, tmp_path: Path, attempt: int) -> tuple[dict, set, str, float]:
    """Leave six jobs behind, run the reap deployment; returns the jobs, the ids squeue lists
    right after, the reap run's log and how long it took."""
    root = worker.jobs_dir / f"left-behind-{attempt}"
    flow = server.post("/flows/", {"name": "reap-test-owner"})
    running = server.post("/flow_runs/", {"flow_id": flow["id"], "state": {"type": "RUNNING"}})["id"]
    jobs = {
        "over": submit_sleeper(f"nsdg-{smoke_run.flow_run_id}", root / "over"),  # its run Completed
        "unknown": submit_sleeper(f"nsdg-{uuid.uuid4()}", root / "unknown"),
        "running": submit_sleeper(f"nsdg-{running}", root / "running"),
        "not-a-flow-run": submit_sleeper("nsdg-cli-run-20260101", root / "cli"),
        "other-name": submit_sleeper(f"other-{uuid.uuid4()}", root / "other"),
        "outside-root": submit_sleeper(f"nsdg-{uuid.uuid4()}", tmp_path / f"another-installation-{attempt}"),
    }
    try:
        run = run_deployment(server, "reap/reap", timeout=120)
        assert run.returncode == 0, f"{run.output[-3000:]}\n--- worker ---\n{worker.log_tail()}"
        active = {job.job_id for job in SlurmClient().active_jobs()}
        return jobs, active, "\n".join(server.logs(run.flow_run_id)), run.seconds
    finally:
        run_command(["scancel", *jobs.values()], timeout=30, check=False)


@pytest.mark.usefixtures("slurm_cluster")
@pytest.mark.slurm
@pytest.mark.prefect_server
@pytest.mark.integration
def test_reap_cancels_jobs_of_runs_that_are_over(prefect_server, prefect_worker, deployed, smoke_run, tmp_path):
    # Another test session on the same cluster may cancel every nsdg-* job as it ends (its
    # slurm_cluster fixture does): if the reaper found none of ours, that happened; try again.
    for attempt in range(3):
        jobs, active, logs, seconds = reap_attempt(prefect_server, prefect_worker, smoke_run, tmp_path, attempt)
        if f"job {jobs['over']} " in logs:
            break
    assert f"cancelled job {jobs['over']} " in logs and "is COMPLETED" in logs, logs
    assert f"cancelled job {jobs['unknown']} " in logs and "is unknown to the API" in logs, logs
    assert re.search(rf"job {jobs['running']} \(nsdg-[0-9a-f-]+\): flow run \S+ is RUNNING; kept", logs), logs
    for name in ("not-a-flow-run", "other-name", "outside-root"):  # never even looked at
        assert f"job {jobs[name]} " not in logs, (name, logs)
    assert "2 cancelled" in logs, logs
    assert jobs["over"] not in active and jobs["unknown"] not in active
    assert jobs["other-name"] in active  # (the nsdg-* ones may fall to another session's cleanup)
    print(f"\nreap: the run took {seconds:.1f} s (attempt {attempt + 1}); cancelled the jobs of a Completed run "
          f"and of an unknown run, kept the Running run's job and the jobs out of its scope")
