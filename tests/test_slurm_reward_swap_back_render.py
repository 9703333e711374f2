"""Going back to generation after a reward stage, without a cluster: the pipeline file may say it (a
generating stage reading a reward stage), the run order is level by level, `check` and `render
--pipeline` show the way back in the same job, and what stays refused is refused in one line, exit 2."""

from __future__ import annotations

import subprocess
import sys

from infra.pipeline.check import check_file
from infra.pipeline.files import load_pipeline
from infra.settings import load_settings
from tests.test_pipeline_check import REPO, refused, write
from tests.test_slurm_steps import MODEL, STAGES, head, render_cli

BACK = STAGES + """  - name: followups
    from: rm
    recipe: {prompt_template: "Ask a follow-up to {{ completion }} (helpfulness {{ reward.helpfulness }}):"}
  - name: more
    from: followups
    recipe: {prompt_template: "Answer {{ completion }}"}
"""


def test_a_generating_stage_reads_a_reward_stage_and_runs_a_level_later(tmp_path):
    from flows.reward import run_order

    the = load_pipeline(str(write(tmp_path, BACK, head=head())), load_settings())
    assert [(s.name, the.level(s)) for s in run_order(the)] == [("answers", 0), ("rm", 0), ("followups", 1), ("more", 1)]
    lines = check_file(str(write(tmp_path, BACK, head=head())), load_settings())
    assert "then back to 'main' in the same job for followups, more (after the reward stage(s) they read)" in lines[0]


def test_render_shows_the_way_back_in_the_same_job(tmp_path):
    out = render_cli(write(tmp_path, BACK, head=head()))
    assert out.returncode == 0, out.stderr[-2000:]
    files = dict(part.split(" =====\n", 1) for part in out.stdout.split("# ===== ")[1:])
    sbatch = files["sbatch.sh"]
    assert ("# Going back: after the reward stage(s), then the generator's step again (request 2), in THIS job for "
            "stage(s) followups, more") in sbatch
    assert sbatch.count("\n#SBATCH -N ") == 1 and subprocess.run(["bash", "-n"], input=sbatch, text=True,
                                                                  timeout=30).returncode == 0
    resident = render_cli(write(tmp_path, BACK, head=head(rm="resident: true, profile: h100x16, " + MODEL)))
    assert "the generator's step stays, used in THIS job for stage(s) followups, more" in resident.stdout
    plain = render_cli(write(tmp_path, STAGES, head=head()))  # nothing after the reward stage: nothing said
    assert plain.returncode == 0 and "Going back" not in plain.stdout


def test_what_stays_refused_a_cycle_through_a_reward_stage_or_a_stage_reading_itself(tmp_path):
    cycle = STAGES.replace("from: answers", "from: followups") + """  - name: followups
    from: rm
    recipe: {prompt_template: "Ask about {{ completion }}"}
"""
    assert "from: the stages read each other in a cycle" in refused(write(tmp_path, cycle, head=head()))
    out = subprocess.run([sys.executable, "-m", "flows.cli", "check", "--pipeline", str(write(tmp_path, cycle, head=head()))],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 2 and "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    itself = STAGES + """  - name: loop
    from: loop
    recipe: {prompt_template: "{{ completion }}"}
"""
    assert "cycle (loop reads loop)" in refused(write(tmp_path, itself, head=head()))
