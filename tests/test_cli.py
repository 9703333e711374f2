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


@pytest.mark.parametrize("command", [[], ["run"], ["serve-local"], ["make-tiny-model"], ["render"]])
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


def test_bad_input_is_a_clear_error_with_exit_code_2(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "ok"}\n{broken\n')
    out = cli("run", "--input-uri", str(src), "--output-uri", "out", cwd=tmp_path,
              env={"NSDG_LOCAL__ENGINE": "simulated", "PREFECT_HOME": str(tmp_path / "ph")})
    assert out.returncode == 2
    assert "line 2: invalid JSON" in out.stderr and "on_bad_input='skip'" in out.stderr
    assert not (tmp_path / ".nemotron-sdg" / "servers").exists()  # nothing was started


def test_render_prints_seed_topology(tmp_path):
    out = cli("render", "--profile", "h100x16", "--model-path", "/models/n340b", "--account", "acct", "--partition", "batch", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for needle in ("#SBATCH -N 2", "--ntasks-per-node=8", "--gpus-per-node=8", "tensor_model_parallel_size=8",
                   "pipeline_model_parallel_size=2", "gpt_model_file=/models/n340b", "#SBATCH -A acct", "#SBATCH -p batch"):
        assert needle in out.stdout
