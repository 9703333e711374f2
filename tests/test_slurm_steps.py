"""The reward server swapped into the generator's job, without a cluster (infra/slurm/steps.py): what the
pipeline file may say (`swap_with`, one line per mistake, before anything is submitted), and the job
it renders (`nemotron-sdg render --pipeline`): the generator's step, then NeMo-Aligner's
serve_reward_model.py with TP8/PP2 as the reward step, quoted like the generator's launch."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest

from infra.errors import ConfigError
from infra.pipeline.check import check_file
from infra.pipeline.files import load_pipeline
from infra.settings import load_settings
from infra.slurm.steps import pipeline_job, swap_step
from tests.test_pipeline_check import REPO, refused, write

HEAD = "input: in.jsonl\nservers:\n  main: {profile: PROFILE}\n  rm: {engine: nemo-aligner, RM}\n"
MODEL = "model_path: /lustre/models/Nemotron-4-340B-Reward"
RM = "swap_with: main, " + MODEL
STAGES = """
  - name: answers
    recipe: {prompt_template: "Answer about {{ topic }}:", samples_per_prompt: 2}
  - name: rm
    from: answers
    kind: reward
    reward: {keep_if: {helpfulness: 3}}
"""


def head(profile: str = "h100x16", rm: str = RM) -> str:
    return HEAD.replace("PROFILE", profile).replace("RM", rm)


def render_cli(path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", "render", "--pipeline", str(path), *extra],
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def test_the_rendered_job_runs_the_generator_then_nemo_aligner_as_a_second_step(tmp_path):
    out = render_cli(write(tmp_path, STAGES, head=head()))
    assert out.returncode == 0, out.stderr[-2000:]
    files = dict(part.split(" =====\n", 1) for part in out.stdout.split("# ===== ")[1:])
    assert set(files) == {"sbatch.sh", "node-launcher.sh", "reward-launcher.sh"}
    sbatch = files["sbatch.sh"]
    assert "#SBATCH -N 2" in sbatch and sbatch.count("\n#SBATCH -N ") == 1  # one allocation, one queue wait
    assert "srun --job-name=nsdg-generator" in sbatch and "srun --job-name=nsdg-reward" in sbatch
    assert 'bash "$JOB_DIR/reward-launcher.sh"' in sbatch and "step-request" in sbatch
    assert subprocess.run(["bash", "-n"], input=sbatch, text=True, timeout=30).returncode == 0
    line = next(x for x in files["reward-launcher.sh"].splitlines() if x.startswith("SERVER_CMD="))
    assert shlex.split(line[len("SERVER_CMD=("):-1]) == [
        "python3", "/opt/NeMo-Aligner/examples/nlp/gpt/serve_reward_model.py",
        "rm_model_file=/lustre/models/Nemotron-4-340B-Reward", "trainer.num_nodes=2", "trainer.devices=8",
        "++model.tensor_model_parallel_size=8", "++model.pipeline_model_parallel_size=2", "inference.micro_batch_size=2",
        "inference.port=1424"]
    assert "PREFLIGHT_MODEL=/lustre/models/Nemotron-4-340B-Reward" in files["reward-launcher.sh"]
    assert "megatron_gpt_eval.py" in files["node-launcher.sh"]  # the generator's launch is the one it was
    # Without a swap, the same command renders the generator's job alone, as before.
    plain = render_cli(write(tmp_path, STAGES, head=head(rm="url: 'http://rm:1424'")))
    assert plain.returncode == 0 and "reward-launcher.sh" not in plain.stdout and "nsdg-reward" not in plain.stdout


@pytest.mark.parametrize("rm, stages, expected", [
    ("swap_with: gen, " + MODEL, STAGES, "servers.rm.swap_with: 'gen' is not the generation server of this pipeline ('main')"),
    ("resident: true, url: 'http://x:1'", STAGES, "resident and url: a reward server is started on nodes of its own"),
    ("url: 'http://x:1', " + RM, STAGES, "url and swap_with: the server is either already running (url) or started"),
])
def test_pipeline_file_mistakes_are_one_line(tmp_path, rm, stages, expected):
    assert expected in refused(write(tmp_path, stages, head=head(rm=rm)))


def test_a_swap_server_no_stage_uses_and_an_engine_that_cannot_be_started_are_refused(tmp_path):
    unused = STAGES.split("  - name: rm")[0]
    assert "no reward stage uses 'rm', so it would hold the job for nothing" in refused(write(tmp_path, unused, head=head()))
    other = head().replace("engine: nemo-aligner", "engine: vllm-pooling")
    assert "swap_with: only a nemo-aligner reward server" in refused(write(tmp_path, STAGES, head=other))


@pytest.mark.parametrize("profile, rm, expected", [
    ("local", RM, "servers.rm.swap_with: main runs on profile local (backend local); a reward server is swapped into "
                  "a Slurm job only"),
    ("h100x16", RM + ", profile: h200x8", "servers.rm.profile: h200x8 is 1 x 8 GPUs, the job of main (h100x16) 2 x 8"),
    ("h100x16", "swap_with: main, port: 2000", "servers.rm.model_path: give the reward checkpoint's directory on the cluster"),
    ("h100x16", "swap_with: main, model_path: '/models/rm x'", "servers.rm (started in the generator's job): "),
])
def test_the_swap_is_checked_whole_before_any_job(tmp_path, profile, rm, expected):
    settings = load_settings()
    the = load_pipeline(str(write(tmp_path, STAGES, head=head(profile, rm))), settings)
    with pytest.raises(ConfigError) as caught:
        swap_step(settings, the.servers, the.server[0], "r1")
    assert expected in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("command", ["render", "check", "run"])
def test_the_cli_refuses_a_swap_on_a_local_generator_in_one_line_exit_2(tmp_path, command):
    path = write(tmp_path, STAGES, head=head("local"))
    out = subprocess.run([sys.executable, "-m", "flows.cli", command, "--pipeline", str(path)], capture_output=True,
                         text=True, timeout=120, cwd=REPO)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    said = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    assert len(said) == 1 and "a reward server is swapped into a Slurm job only" in said[0], said


def test_check_shows_where_the_reward_server_runs(tmp_path):
    lines = check_file(str(write(tmp_path, STAGES, head=head())), load_settings())
    assert "reward server 'rm' (nemo-aligner swapped into the job of 'main')" in lines[0]


def test_a_test_profile_names_the_stand_in_command(tmp_path, monkeypatch):
    monkeypatch.setenv("NSDG_SERVER__REWARD_COMMAND", '["python3", "standin.py", "{port}"]')
    settings = load_settings()
    the = load_pipeline(str(write(tmp_path, STAGES, head=head(rm="swap_with: main, port: 2001"))), settings)
    files = dict(pipeline_job(settings, the.servers, the.server[0]))
    assert "SERVER_CMD=(python3 standin.py 2001)" in files["reward-launcher.sh"]
    assert "PREFLIGHT_MODEL=''" in files["reward-launcher.sh"]  # a command of one's own brings its own model
