"""A reward server resident beside the generator in one Slurm job, without a cluster
(infra/slurm/resident.py): what the pipeline file may say (`resident: true`, one line per mistake,
exit 2, before anything is submitted, by run/check/render), and the job `nemotron-sdg render
--pipeline` shows: the generator's nodes plus the reward server's in one allocation, both steps
started at once on disjoint nodes (srun --nodes/--relative)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from infra.errors import ConfigError
from infra.pipeline.check import check_file
from infra.pipeline.files import load_pipeline
from infra.settings import load_settings
from infra.slurm.steps import swap_step
from tests.test_pipeline_check import REPO, refused, write
from tests.test_slurm_steps import MODEL, STAGES, head, render_cli

RESIDENT = "resident: true, profile: h100x16, " + MODEL


def test_the_rendered_job_holds_both_servers_nodes_and_starts_both_steps_at_once(tmp_path):
    out = render_cli(write(tmp_path, STAGES, head=head(rm=RESIDENT)))
    assert out.returncode == 0, out.stderr[-2000:]
    files = dict(part.split(" =====\n", 1) for part in out.stdout.split("# ===== ")[1:])
    assert set(files) == {"sbatch.sh", "node-launcher.sh", "reward-launcher.sh"}
    sbatch = files["sbatch.sh"]
    assert "#SBATCH -N 4" in sbatch and sbatch.count("\n#SBATCH -N ") == 1  # 2 + 2 nodes, one queue wait
    assert "GENERATOR_NODES=2" in sbatch and "REWARD_NODES=2" in sbatch
    gen = sbatch.index('srun --job-name=nsdg-generator --nodes="$GENERATOR_NODES" --relative=0')
    rm = sbatch.index('srun --job-name=nsdg-reward --nodes="$REWARD_NODES" --relative="$GENERATOR_NODES"')
    assert gen < rm and "wait -n" in sbatch[rm:]  # both in the background, then waited on together
    assert "at once on 2 node(s) of its own" in sbatch
    assert subprocess.run(["bash", "-n"], input=sbatch, text=True, timeout=30).returncode == 0
    assert "trainer.num_nodes=2" in files["reward-launcher.sh"] and "megatron_gpt_eval.py" in files["node-launcher.sh"]
    # The swap's job is the one it was: the generator's 2 nodes, the reward step after it on them.
    swapped = render_cli(write(tmp_path, STAGES, head=head()))
    assert "#SBATCH -N 2" in swapped.stdout and "--relative" not in swapped.stdout


def test_a_one_node_reward_server_beside_a_two_node_generator_asks_three_nodes(tmp_path):
    out = render_cli(write(tmp_path, STAGES, head=head(rm="resident: true, profile: h200x8, " + MODEL)))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "#SBATCH -N 3" in out.stdout and "REWARD_NODES=1" in out.stdout and "trainer.num_nodes=1" in out.stdout


@pytest.mark.parametrize("rm, expected", [
    ("resident: true, swap_with: main, profile: h100x16, " + MODEL, "resident and swap_with: a reward server is started on "
     "nodes of its own beside the generator (resident), on the generator's nodes after it (swap_with), or already running"),
    ("resident: true, url: 'http://x:1'", "resident and url: "),
    ("resident: true, " + MODEL, "resident: give the reward server's profile (its own nodes in the generator's job"),
])
def test_pipeline_file_mistakes_are_one_line(tmp_path, rm, expected):
    assert expected in refused(write(tmp_path, STAGES, head=head(rm=rm)))


def test_a_resident_server_no_stage_uses_and_an_engine_that_cannot_be_started_are_refused(tmp_path):
    unused = STAGES.split("  - name: rm")[0]
    assert "servers.rm.resident: no reward stage uses 'rm', so its nodes would be held for nothing" in \
        refused(write(tmp_path, unused, head=head(rm=RESIDENT)))
    other = head(rm=RESIDENT).replace("engine: nemo-aligner", "engine: vllm-pooling")
    assert "resident: only a nemo-aligner reward server" in refused(write(tmp_path, STAGES, head=other))


@pytest.mark.parametrize("profile, rm, expected", [
    ("local", RESIDENT, "servers.rm.resident: main runs on profile local (backend local); a reward server is started in "
                        "a Slurm job only"),
    ("h100x16", "resident: true, profile: local, " + MODEL, "servers.rm.profile: local is a local profile; a resident"),
    ("h100x16", "resident: true, profile: test1x4, " + MODEL, "servers.rm.profile: test1x4 has 4 GPUs per node, the job "
                                                              "of main (h100x16) 8"),
])
def test_the_resident_job_is_checked_whole_before_any_job(tmp_path, monkeypatch, profile, rm, expected):
    monkeypatch.setenv("NSDG_EXTRA_PROFILES", '{"test1x4": {"backend": "slurm", "nodes": 1, "gpus_per_node": 4, '
                                              '"tensor_parallel": 4, "pipeline_parallel": 1}}')
    settings = load_settings()
    the = load_pipeline(str(write(tmp_path, STAGES, head=head(profile, rm))), settings)
    with pytest.raises(ConfigError) as caught:
        swap_step(settings, the.servers, the.server[0], "r1")
    assert expected in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("command", ["render", "check", "run"])
def test_the_cli_refuses_a_resident_server_beside_a_local_generator_in_one_line_exit_2(tmp_path, command):
    path = write(tmp_path, STAGES, head=head("local", RESIDENT))
    out = subprocess.run([sys.executable, "-m", "flows.cli", command, "--pipeline", str(path)], capture_output=True,
                         text=True, timeout=120, cwd=REPO)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    said = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    assert len(said) == 1 and "a reward server is started in a Slurm job only" in said[0], said


def test_check_shows_where_the_reward_server_runs(tmp_path):
    lines = check_file(str(write(tmp_path, STAGES, head=head(rm=RESIDENT))), load_settings())
    assert "reward server 'rm' (nemo-aligner resident in the job of 'main' on its own nodes)" in lines[0]


def test_every_released_job_s_resident_reward_server_is_counted_and_the_kept_one_scores(tmp_path):
    """Replicas > 1 (or a lost job): each job the pool releases carried a loaded reward server. The
    4-node shape does not fit the 2-node test cluster, so its jobs are stood in for by their state."""
    import time
    from types import SimpleNamespace

    from infra.slurm.resident import ResidentKeeper
    from infra.slurm.steps import RewardStep

    def job(job_id, dead=None, hours_ago=1.0):
        return SimpleNamespace(job_id=job_id, spec=SimpleNamespace(reward=object()), dead_reason=lambda: dead,
                               scheduled_end=lambda: None, running_at=lambda: time.time() - 3600 * hours_ago)

    released = []
    step = RewardStep(server="rm", tensor_parallel=8, pipeline_parallel=1, model_path="/m", port=None, script="s",
                      image="i", resident=True, nodes=1)
    keeper = ResidentKeeper(step, gpus=8, reward_gpus=8, new_job=None, release=released.append, ready_timeout_s=1,
                            poll_s=1)
    kept, lost = job("11"), job("12", dead="Slurm job 12 ended FAILED")
    keeper.keep(kept)  # the last healthy replica: kept, nothing stopped
    keeper.keep(lost)  # another replica, lost meanwhile: released at once
    assert keeper.kept is kept and released == [lost]
    keeper.release()
    report = keeper.report()
    assert released == [lost, kept] and [j["job_id"] for j in report["jobs"]] == ["12", "11"]
    assert report["jobs"][0]["unused"] and "unused" not in report["jobs"][1]
    assert report["reward_gpu_hours"] == pytest.approx(16, abs=0.01)  # 8 GPUs x 1 h, twice


def test_more_than_one_replica_with_a_resident_reward_server_is_warned_of(tmp_path):
    from infra.slurm.resident import unused_reward_servers

    settings = load_settings()
    the = load_pipeline(str(write(tmp_path, STAGES, head=head(rm=RESIDENT))), settings)
    step = swap_step(settings, the.servers, the.server[0], "dry-run")
    assert unused_reward_servers(step, 1) is None and unused_reward_servers(None, 3) is None
    assert unused_reward_servers(step, 3) == (
        "--replicas 3 with the resident reward server 'rm': each of the 3 jobs holds its 2 node(s) and loads it, and "
        "only the job released last scores; the other 2 are counted as unused (reward.allocation.jobs). Use --replicas 1 "
        "unless generation needs the others")
    swapped = load_pipeline(str(write(tmp_path, STAGES, head=head())), settings)
    assert unused_reward_servers(swap_step(settings, swapped.servers, swapped.server[0], "dry-run"), 3) is None
