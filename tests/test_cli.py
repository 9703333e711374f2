"""The console script, as a user runs it."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def cli(*args, cwd, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("command", [[], ["run"], ["serve-local"], ["make-tiny-model"], ["render"], ["check"]])
def test_help_on_every_command(command, tmp_path):
    out = cli(*command, "--help", cwd=tmp_path)
    assert out.returncode == 0 and "usage:" in out.stdout


def test_run_prints_manifest_last_and_params_file(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("first prompt\nsecond prompt\n")
    params = tmp_path / "p.json"
    params.write_text(json.dumps({"input_uri": str(src), "sampling": {"tokens_to_generate": 4}, "run_id": "cli-1"}))
    out = cli("run", "--params", str(params), "--output-uri", str(tmp_path / "out"), "--greedy", cwd=tmp_path,
              env={"NSDG_LOCAL__ENGINE": "simulated", "PREFECT_HOME": str(tmp_path / "ph")})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == str(tmp_path / "out" / "cli-1" / "manifest.json")
    assert "Stopping temporary server" in out.stderr  # Prefect's own exit log came before it
    data = json.loads((tmp_path / "out" / "cli-1" / "manifest.json").read_text())
    assert data["records_written"] == 2 and data["config"]["sampling"]["greedy"] is True


def test_bad_input_is_a_clear_error_with_exit_code_2(tmp_path, prefect_server):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "ok"}\n{broken\n')
    out = cli("run", "--input-uri", str(src), "--output-uri", "out", cwd=tmp_path,
              env={**prefect_server.client_env(), "NSDG_LOCAL__ENGINE": "simulated", "PREFECT_HOME": str(tmp_path / "ph")})
    assert out.returncode == 2
    assert "line 2: invalid JSON" in out.stderr and "on_bad_input='skip'" in out.stderr
    assert not (tmp_path / ".nemotron-sdg" / "servers").exists()  # nothing was started


def test_render_prints_seed_topology(tmp_path):
    out = cli("render", "--profile", "h100x16", "--model-path", "/models/n340b", "--account", "acct", "--partition", "batch", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for needle in ("#SBATCH -N 2", "--ntasks-per-node=8", "--gpus-per-node=8", "tensor_model_parallel_size=8",
                   "pipeline_model_parallel_size=2", "gpt_model_file=/models/n340b", "#SBATCH -A acct", "#SBATCH -p batch"):
        assert needle in out.stdout


def user_error(out) -> str:
    """The CLI's own message for a user's mistake: exit 2, one message, no Python traceback."""
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    mine = [line for line in out.stderr.splitlines() if line.startswith("nemotron-sdg run: ")]
    assert len(mine) == 1, out.stderr[-3000:]
    return out.stderr[out.stderr.index(mine[0]):]


def test_a_time_limit_shorter_than_the_assumed_load_is_refused_before_any_sbatch(tmp_path, prefect_server):
    """Issue 26: a fresh run has measured no load, so a limit too short for it was submitted and every
    job loaded and was dropped. The profile's expected_load_s (600 s here) refuses it before a job."""
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "ok"}\n')
    profile = {"slow1x1": {"backend": "slurm", "nodes": 1, "gpus_per_node": 1, "expected_load_s": 600}}
    env = {**prefect_server.client_env(), "PREFECT_HOME": str(tmp_path / "ph"), "NSDG_EXTRA_PROFILES": json.dumps(profile),
           "NSDG_SLURM__TIME_LIMIT": "00:05:00", "NSDG_SLURM__CONTAINER_RUNTIME": "none",
           "NSDG_SLURM__JOB_ROOT": str(tmp_path / "jobs"), "NSDG_SERVER__COMMAND": json.dumps(["true"])}
    out = cli("run", "--input-uri", str(src), "--output-uri", "out", "--profile", "slow1x1", cwd=tmp_path, env=env)
    message = user_error(out)
    assert "(300 s) is too short" in message and "load 600 s assumed" in message, message
    assert "NSDG_SLURM__TIME_LIMIT=00:13:00" in message, message  # 1.25 x 600 s = 750 s
    assert not (tmp_path / "jobs").exists()  # no job directory: nothing was submitted


@pytest.fixture
def served(prefect_server, tmp_path):
    """The CLI against a running Prefect server (no temporary one per call), with the simulated engine."""
    return {**prefect_server.client_env(), "NSDG_LOCAL__ENGINE": "simulated",
            "PREFECT_HOME": str(tmp_path / "ph"), "NSDG_WORK_DIR": str(tmp_path / "work")}


def test_user_errors_are_one_message_and_exit_code_2(tmp_path, served):
    good = tmp_path / "in.txt"
    good.write_text("first prompt\nsecond prompt\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{broken\n')
    run = ("run", "--output-uri", str(tmp_path / "out"))
    cases = {
        "a bad parameter": ((*run, "--input-uri", str(good), "--batch-size", "500"), "batch_size"),
        "an unusable input": ((*run, "--input-uri", str(bad)), "line 2: invalid JSON"),
        "a config error": ((*run, "--input-uri", str(good), "--profile", "nope"), "Unknown profile 'nope'"),
        "tokens_to_generate over the context": ((*run, "--input-uri", str(good), "--tokens-to-generate", "4096"),
                                                "leaves no room for a prompt"),
        # Issue 27 defect 2: the lease was written first (an 83-line PermissionError traceback, exit 1).
        # Root ignores permission bits, so the unwritable outputs are a path under a file and one in /proc.
        "an output under a file": (("run", "--input-uri", str(good), "--output-uri", str(good / "out")),
                                   f"Output directory {good / 'out'}/"),
        "an output nowhere writable": (("run", "--input-uri", str(good), "--output-uri", "/proc/nsdg-out"),
                                       "Output directory /proc/nsdg-out/"),
    }
    for what, (args, needle) in cases.items():
        message = user_error(cli(*args, cwd=tmp_path, env=served))
        assert needle in message, (what, message)
    ok = cli(*run, "--input-uri", str(good), "--run-id", "r1", "--tokens-to-generate", "4", cwd=tmp_path, env=served)
    assert ok.returncode == 0, ok.stderr[-3000:]
    refused = user_error(cli(*run, "--input-uri", str(good), "--run-id", "r1", "--tokens-to-generate", "5", cwd=tmp_path, env=served))
    assert "different configuration" in refused and "tokens_to_generate" in refused and "--new-run" in refused


def test_progress_is_plain_lines_off_a_terminal(tmp_path, served):
    src = tmp_path / "in.txt"
    src.write_text("".join(f"prompt {i}\n" for i in range(7)))
    out = cli("run", "--input-uri", str(src), "--output-uri", str(tmp_path / "out"), "--shard-size", "3",
              "--tokens-to-generate", "4", cwd=tmp_path, env=served)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if line.startswith("progress: ")]
    assert lines[0].startswith("progress: 0/7 records") and lines[-1].startswith("progress: 7/7 records (100 %)")
    assert "records/s" in lines[-1] and "server restarts 0" in lines[-1] and "\x1b[" not in out.stderr


def test_progress_is_a_bar_on_a_terminal(tmp_path, served):
    src = tmp_path / "in.txt"
    src.write_text("".join(f"prompt {i}\n" for i in range(5)))
    command = " ".join([sys.executable, "-m", "flows.cli", "run", "--input-uri", str(src), "--output-uri",
                        str(tmp_path / "out"), "--tokens-to-generate", "4"])
    # script(1) gives the command a pseudo-terminal, as a user's shell would.
    out = subprocess.run(["script", "-qec", command, "/dev/null"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env={**os.environ, **served})
    assert out.returncode == 0, out.stdout[-3000:]
    assert "5/5" in out.stdout and "records/s" in out.stdout and "restarts 0" in out.stdout
    assert "━" in out.stdout and "progress: " not in out.stdout  # rich's bar, not the plain lines


def test_no_prefect_telemetry_error_without_the_makefiles_environment(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("one prompt\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "HF_", "TRANSFORMERS_"))}
    out = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--input-uri", str(src), "--output-uri",
                          str(tmp_path / "out"), "--tokens-to-generate", "4"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300,
                         env={**env, "NSDG_LOCAL__ENGINE": "simulated", "PREFECT_HOME": str(tmp_path / "ph")})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "send_telemetry" not in out.stderr and "Failed to send telemetry" not in out.stderr
    assert "Traceback" not in out.stderr and "ERROR" not in out.stderr
