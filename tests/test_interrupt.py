"""Ctrl-C and SIGTERM during `nemotron-sdg run` with Prefect's temporary API server (no
PREFECT_API_URL), as a user's terminal and `timeout` send them: to the whole process group, once a part
is published. The CLI ends within seconds, with no traceback, the lease and the server released, the
temporary server stopped, and one line naming the command that resumes the run (issue 27, defect 4:
the signal also stopped the temporary server, and the CLI retried it for minutes)."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from flows.cli import _print_interrupted, _RunSoFar, build_parser, resume_command, run_parameters
from infra.deadline import Deadline, poll_until
from infra.run.layout import LEASE_NAME
from tests.conftest import marked_processes

pytestmark = pytest.mark.integration

EXIT_DEADLINE_S = 60  # a bound, not a timing: the defect took minutes
MARK = "NEMOTRON_SDG_TEST_INTERRUPT"  # this test's processes, whichever session they put themselves in


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory) -> Path:
    """One PREFECT_HOME for both cases: the second temporary server finds its database migrated."""
    return tmp_path_factory.mktemp("prefect-home")


@pytest.mark.parametrize("sig, run_id", [(signal.SIGINT, "ctrl-c"), (signal.SIGTERM, None)], ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_the_group_ends_the_run_at_once_with_the_resume_command(sig, run_id, prefect_home, tmp_path,
                                                                              monkeypatch):
    monkeypatch.setenv(MARK, uuid.uuid4().hex)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"prompt {i}"}) + "\n" for i in range(200)))
    out_dir = tmp_path / "out"
    argv = ["run", "--input-uri", str(src), "--output-uri", str(out_dir), "--tokens-to-generate", "4",
            "--batch-size", "2", "--shard-size", "4", *(["--run-id", run_id] if run_id else [])]
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env |= {"PREFECT_HOME": str(prefect_home), "NSDG_LOCAL__ENGINE": "simulated", "NSDG_WORK_DIR": str(tmp_path / "work"),
            "NSDG_LOCAL__EXTRA_ARGS": json.dumps(["--extra-latency", "0.5"])}
    # A group of its own, as a shell gives a command: the signal goes to the group, as a terminal's does.
    cli = subprocess.Popen([sys.executable, "-m", "flows.cli", *argv], cwd=tmp_path, env=env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        poll_until(lambda: next(out_dir.glob("*/part-*.state.json"), None), deadline=Deadline(240), interval=0.2,
                   what="the run's first published part", describe_last=lambda: f"CLI exit code {cli.poll()}")
        os.killpg(cli.pid, sig)
        if sig == signal.SIGINT:  # pressed again and again, as people do: no press may cut the teardown short,
            deadline = Deadline(EXIT_DEADLINE_S)  # nor kill the process on its way out (it did: exit -2)
            while cli.poll() is None and not deadline.expired():
                time.sleep(0.25)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(cli.pid, sig)
        stdout, stderr = cli.communicate(timeout=EXIT_DEADLINE_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the CLI was still running {EXIT_DEADLINE_S} s after {sig.name}")
    finally:
        if cli.poll() is None:
            os.killpg(cli.pid, signal.SIGKILL)
            cli.communicate()

    assert cli.returncode == 128 + sig, stderr[-3000:]
    assert "Traceback" not in stderr and "Error logging to API" not in stderr, stderr[-3000:]
    [line] = [ln for ln in stderr.splitlines() if ln.startswith("nemotron-sdg run: ")]
    assert f"interrupted by {sig.name}" in line and "records published" in line, line
    [run_dir] = [p for p in out_dir.iterdir() if p.is_dir()]
    assert run_id is None or run_dir.name == run_id
    # The command it names resumes this run: same input and output, this run id.
    resume = shlex.split(line.split("resume it with: ", 1)[1])
    assert resume[:2] == ["nemotron-sdg", "run"], line
    params = run_parameters(build_parser().parse_args(resume[1:]))
    assert (params["run_id"], params["input_uri"], params["output_uri"]) == (run_dir.name, str(src), str(out_dir))
    assert not (run_dir / LEASE_NAME).exists()  # given back by the crash hook
    # The temporary server and the local server, in sessions of their own, are gone too.
    poll_until(lambda: None if marked_processes(MARK) else True, deadline=Deadline(20), interval=0.3,
               what="no process of the run left", describe_last=lambda: str(marked_processes(MARK)))


def test_the_resume_command_keeps_the_run_and_drops_new_run():
    """--new-run would start yet another run: dropped (also abbreviated); the run id is named last."""
    assert resume_command(["-v", "run", "--input-uri", "a b.txt", "--new"], None, "r-1") == [
        "nemotron-sdg", "-v", "run", "--input-uri", "a b.txt", "--run-id", "r-1"]
    assert resume_command(["run", "--run-id", "old", "--new-run"], "old", "r-2")[-2:] == ["--run-id", "r-2"]
    assert resume_command(["run", "--run-id", "r-3"], "r-3", "r-3") == ["nemotron-sdg", "run", "--run-id", "r-3"]
    assert resume_command(["run", "--near-threshold", "0.9"], None, "r-4")[2:4] == ["--near-threshold", "0.9"]


def test_an_interrupted_pipeline_says_its_shards_are_kept_not_that_it_had_no_plan(capsys):
    # A pipeline has no one records total (its progress is by stage): it was said to stop "before its plan".
    args = build_parser().parse_args(["run", "--pipeline", "p.yaml", "--run-id", "qa"])
    args.argv = ["run", "--pipeline", "p.yaml", "--run-id", "qa"]
    _print_interrupted(args, _RunSoFar(run_id="qa"), signal.SIGTERM)
    line = capsys.readouterr().err.strip()
    assert line == ("nemotron-sdg run: run qa interrupted by SIGTERM: each stage's published shards are kept; resume it "
                    "with: nemotron-sdg run --pipeline p.yaml --run-id qa"), line
