"""What a first-time user meets (issue 27's friction list), through the CLI as they run it."""

import json
import os
import shutil
import subprocess
import sys

from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


REPO = Path(__file__).resolve().parents[1]


def cli(*args, cwd, env=None, timeout=300, umask=None):
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})},
                          preexec_fn=None if umask is None else (lambda: os.umask(umask)))


def one_line_refusal(out) -> str:
    """Exit 2, one line of the CLI's own, no traceback."""
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    mine = [line for line in out.stderr.splitlines() if line.startswith("nemotron-sdg run: ")]
    assert len(mine) == 1, out.stderr[-3000:]
    return mine[0]


@pytest.fixture
def served(prefect_server, tmp_path):
    """The CLI against a running Prefect server, with a fake sbatch on PATH that records any call."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("sbatch", "salloc", "srun"):
        (bin_dir / tool).write_text(f'#!/bin/sh\necho "$0 $*" >> {tmp_path}/slurm-calls\nexit 1\n')
        (bin_dir / tool).chmod(0o755)
    return {**prefect_server.client_env(), "NSDG_LOCAL__ENGINE": "simulated", "PREFECT_HOME": str(tmp_path / "ph"),
            "NSDG_WORK_DIR": str(tmp_path / "work"), "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "NSDG_SLURM__JOB_ROOT": str(tmp_path / "jobs"), "NSDG_SLURM__ACCOUNT": "acct", "NSDG_SLURM__PARTITION": "batch",
            "NSDG_MODEL__PATH": str(tmp_path / "model"), "NSDG_SLURM__CONTAINER_IMAGE": str(tmp_path / "image.sqsh")}


def test_cluster_defaults_that_cannot_work_are_refused_before_any_sbatch(tmp_path, served):
    """A cluster profile without its own input (the demo prompts were its default: one click on the
    on-demand form from a 16-GPU job), and a placeholder left in a parameter or a setting."""
    (tmp_path / "examples").mkdir()  # the demo prompts where a clone has them: before, the run went on to sbatch
    shutil.copy(REPO / "examples" / "prompts.jsonl", tmp_path / "examples" / "prompts.jsonl")
    (tmp_path / "model").mkdir()
    (tmp_path / "image.sqsh").write_bytes(b"sqsh")
    mine = tmp_path / "mine.jsonl"
    mine.write_text('{"prompt": "hi"}\n')
    out = str(tmp_path / "out")
    cases = {
        "no input on a cluster": ((), {}, "no input_uri was given"),
        "the demo input on a cluster": (("--input-uri", "examples/prompts.jsonl"), {}, "the demo prompts"),
        "a placeholder parameter": (("--input-uri", "s3://CHANGE-ME-bucket/p.jsonl"), {}, "Parameter input_uri is"),
        "a placeholder setting": (("--input-uri", str(mine)), {"NSDG_SLURM__ACCOUNT": "CHANGE-ME"},
                                  "Setting NSDG_SLURM__ACCOUNT is 'CHANGE-ME'"),
    }
    for what, (args, env, needle) in cases.items():
        line = one_line_refusal(cli("run", "--profile", "h100x16", "--output-uri", out, *args, cwd=tmp_path,
                                    env={**served, **env}))
        assert needle in line, (what, line)
    assert not (tmp_path / "slurm-calls").exists()
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_the_output_folder_is_a_dataset_a_team_can_read(tmp_path, served):
    """A refused run leaves no folder, a finished one no lock file; files follow the umask (they were
    0600: teammates could not read a shared training set); an output_uri that is itself a run's
    folder is refused in one line instead of nesting a run inside that dataset."""
    good = tmp_path / "in.txt"
    good.write_text("first prompt\nsecond prompt\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{broken\n')
    out = tmp_path / "out"
    refused = one_line_refusal(cli("run", "--input-uri", str(bad), "--output-uri", str(out), "--run-id", "r0",
                                   cwd=tmp_path, env=served))
    assert "1 unusable line" in refused
    assert not (out / "r0").exists()  # the plan failed after taking the lease: the folder went with it
    ok = cli("run", "--input-uri", str(good), "--output-uri", str(out), "--run-id", "r1", "--tokens-to-generate", "4",
             cwd=tmp_path, env=served, umask=0o027)
    assert ok.returncode == 0, ok.stderr[-3000:]
    run_dir = out / "r1"
    assert [p.name for p in run_dir.iterdir() if p.name.startswith(".")] == []  # no .run.lease.lock
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in run_dir.iterdir()}
    assert set(modes.values()) == {"0o640"}, modes  # 0666 less the umask 027
    nested = one_line_refusal(cli("run", "--input-uri", str(good), "--output-uri", str(run_dir), "--run-id", "r2",
                                  cwd=tmp_path, env=served))
    assert f"Output location {run_dir} already holds another run" in nested and f"give its parent ({out})" in nested
    assert not (run_dir / "r2").exists()


def test_progress_moves_within_a_shard_in_the_cli_and_the_ui(tmp_path, served, prefect_server):
    """One shard of 6 records in batches of 2: the CLI's lines and the UI's progress artifact count
    records as batches come back (before: 0/6 until the shard was published, then 6/6; the
    artifact held a bare percentage of shards)."""
    src = tmp_path / "in.txt"
    src.write_text("".join(f"prompt {i}\n" for i in range(6)))
    out = cli("run", "--input-uri", str(src), "--output-uri", str(tmp_path / "out"), "--run-id", "moving-1",
              "--batch-size", "2", "--tokens-to-generate", "4", "--progress-every-s", "0", cwd=tmp_path, env=served)
    assert out.returncode == 0, out.stderr[-3000:]
    counts = [int(line.split()[1].split("/")[0]) for line in out.stderr.splitlines() if line.startswith("progress: ")]
    assert counts[0] == 0 and counts[-1] == 6 and any(0 < n < 6 for n in counts), counts
    assert counts == sorted(counts), counts  # a shard's rows never leave the count before they are published
    found = prefect_server.post("/artifacts/filter", {"artifacts": {"key": {"any_": ["progress-moving-1"]}}})
    assert found, "no progress artifact"
    latest = max(found, key=lambda a: a["updated"])
    assert latest["data"] == 100.0
    assert "6/6 records (100 %)" in latest["description"] and "records/s" in latest["description"], latest


BLOCK_TORCH = """
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "accelerate", "gguf"):
            raise ImportError(name + " imported: a login node installs the orchestrator alone, without torch")
sys.meta_path.insert(0, NoTorch())
import flows.cli, flows.generate, flows.reap, tasks.steps
sys.exit(flows.cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("command", [["--help"], ["run", "--help"], ["install-automations", "--help"],
                                     ["render", "--profile", "h100x16", "--account", "a", "--partition", "p"]])
def test_the_cli_and_the_flow_import_without_torch(command, tmp_path):
    """`pip install -e .` without the `local` extra (a login node, docs/operators.md §1): the CLI,
    the flows' orchestration and `render` never import torch or transformers (a regression guard:
    it passed before too)."""
    out = subprocess.run([sys.executable, "-c", BLOCK_TORCH, *command], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "imported: a login node" not in out.stderr


def test_messages_say_what_is_wrong_and_what_to_do(tmp_path, served):
    """A template every line fails the same way is reported once as the template's fault, with the
    records' fields (before: one line per record, then advice to skip them all); a judge whose
    replies mostly carry no score ends with a warning naming score_pattern and a reply (before:
    "0 of N kept", exit 0, nothing else)."""
    topics = tmp_path / "topics.jsonl"
    topics.write_text("".join(f'{{"id": "t{i}", "topic": "topic {i}"}}\n' for i in range(5)))
    run = ("run", "--input-uri", str(topics), "--output-uri", str(tmp_path / "out"), "--tokens-to-generate", "4")
    folder = one_line_refusal(cli("run", "--input-uri", str(tmp_path), cwd=tmp_path, env=served))
    assert f"Input {str(tmp_path)!r} is a directory" in folder, folder  # was: "not found"
    line = one_line_refusal(cli(*run, "--prompt-template", "Ask about {{ topik }}", cwd=tmp_path, env=served))
    assert "recipe.prompt_template fails on every one of the 5 line(s)" in line, line
    assert "'topik' is undefined" in line and "the fields id, topic" in line, line
    judged = cli(*run, "--prompt-template", "Ask about {{ topic }}", "--judge-template", "Rate: {{ completion }}",
                 "--score-pattern", r"SCORE=(\d)", cwd=tmp_path, env=served)
    assert judged.returncode == 0, judged.stderr[-3000:]
    warning = next((x for x in judged.stderr.splitlines() if "the judge's reply had no score" in x), None)
    assert warning and "for 5 of 5 rows" in warning and "'SCORE=(\\\\d)'" in warning and "replies like '" in warning, \
        judged.stderr[-3000:]


def test_a_judge_system_prompt_without_a_system_turn_is_refused_before_any_server(tmp_path, served):
    """--judge-system-prompt over the raw format (the judge's own or the run's) has nowhere to go:
    one line naming the field and the fix, exit 2, before a server is started or a file written."""
    src = tmp_path / "in.txt"
    src.write_text("first prompt\n")
    refused = one_line_refusal(cli("run", "--input-uri", str(src), "--output-uri", str(tmp_path / "out"), "--run-id", "s1",
                                   "--prompt-format", "raw", "--judge-template", "Rate: {{ completion }}",
                                   "--judge-system-prompt", "You grade answers from 1 to 5.", cwd=tmp_path, env=served))
    assert "judge.system_prompt is set but the prompt format is raw" in refused and "--judge-format" in refused
    assert not (tmp_path / "out" / "s1").exists()


def runs_on(prefect_server, run_id: str) -> int:
    runs = prefect_server.post("/flow_runs/filter", {"limit": 200})
    return sum(1 for run in runs if (run.get("parameters") or {}).get("run_id") == run_id)


def test_a_team_server_in_dot_env_is_named_and_local_prefect_keeps_a_run_off_it(tmp_path, served, prefect_server):
    """Issue 27: a clone's .env holding the team's PREFECT_API_URL sent every local run to the team's
    run list, silently. The run now says where it is recorded; --local-prefect records it on a
    temporary server of its own instead."""
    team = {k: v for k, v in served.items() if k != "PREFECT_API_URL"}
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    (tmp_path / ".env").write_text(f"PREFECT_API_URL={served['PREFECT_API_URL']}\n")
    src = tmp_path / "in.txt"
    src.write_text("first prompt\n")
    run = ("run", "--input-uri", str(src), "--output-uri", str(tmp_path / "out"), "--tokens-to-generate", "4")
    shared = subprocess.run([sys.executable, "-m", "flows.cli", *run, "--run-id", "team1"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, env={**env, **team})
    assert shared.returncode == 0, shared.stderr[-3000:]
    assert (f"note: this run is recorded on the Prefect server at {served['PREFECT_API_URL']} (PREFECT_API_URL, from the "
            "environment or .env); --local-prefect keeps this run on a temporary local server") in shared.stderr
    assert runs_on(prefect_server, "team1") == 1
    local = subprocess.run([sys.executable, "-m", "flows.cli", *run, "--run-id", "mine1", "--local-prefect"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300, env={**env, **team})
    assert local.returncode == 0, local.stderr[-3000:]
    assert "recorded on the Prefect server" not in local.stderr and "Starting temporary server" in local.stderr
    assert runs_on(prefect_server, "mine1") == 0 and (tmp_path / "out" / "mine1" / "manifest.json").exists()


def test_the_judge_sets_its_own_prompt_format(tmp_path, served):
    """judge.prompt_format (--judge-format): an instruction judge over a base model's raw completions.
    Changing it alone re-judges the published parts (what the judge is sent changed) and
    regenerates nothing; the same again judges nothing."""
    src = tmp_path / "in.txt"
    src.write_text("first prompt\nsecond prompt\n")
    run = ("run", "--input-uri", str(src), "--output-uri", str(tmp_path / "out"), "--run-id", "j1", "--prompt-format",
           "raw", "--tokens-to-generate", "4", "--judge-template", "Rate: {{ completion }}")
    first = cli(*run, cwd=tmp_path, env=served)
    assert first.returncode == 0, first.stderr[-3000:]
    state = tmp_path / "out" / "j1" / "part-00000.jsonl.judge.json"
    raw_hash = json.loads(state.read_text())["judge_hash"]
    other = cli(*run, "--judge-format", "nemotron-instruct", cwd=tmp_path, env=served)
    assert other.returncode == 0, other.stderr[-3000:]
    assert "1 published part(s) to judge" in other.stderr and "no regeneration" in other.stderr, other.stderr[-3000:]
    assert json.loads(state.read_text())["judge_hash"] != raw_hash
    again = cli(*run, "--judge-format", "nemotron-instruct", cwd=tmp_path, env=served)
    assert again.returncode == 0 and "nothing to allocate" in again.stderr, again.stderr[-3000:]
