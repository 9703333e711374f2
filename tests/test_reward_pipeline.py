"""A reward stage in the pipeline file (infra/pipeline/model.py kind reward, a reward server in
`servers:`), checked by `nemotron-sdg check --pipeline` without a server, each problem one line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from infra.pipeline.check import check_file
from infra.pipeline.hashes import stage_hashes
from infra.pipeline.files import load_pipeline
from infra.settings import load_settings
from tests.test_pipeline_check import REPO, refused, write

HEAD = ("input: in.jsonl\nservers:\n  main: {profile: local}\n"
        "  rm: {engine: nemo-aligner, url: 'http://127.0.0.1:1424'}\n")
STAGES = """
  - name: answers
    recipe: {prompt_template: "Answer about {{ topic }}:", samples_per_prompt: 2}
  - name: rm
    from: answers
    kind: reward
    reward: {system_prompt: "", weights: {helpfulness: 0.3, correctness: 0.74}, keep_if: {helpfulness: 3, reward: {min: 1.5}}}
"""


def test_check_builds_each_conversation_and_shows_the_reward_server(tmp_path):
    lines = check_file(str(write(tmp_path, STAGES, head=HEAD)), load_settings(), show_prompts=True)
    assert "reward server 'rm' (nemo-aligner at http://127.0.0.1:1424)" in lines[0]
    rm = next(line.split() for line in lines[1:4] if line.split()[0] == "rm")
    assert rm[1:3] == ["answers", "(reward)"] and "helpfulness>=3,reward" in rm
    assert ("<extra_id_0>System\n\n<extra_id_1>User\nAnswer about tides:\n<extra_id_1>Assistant\n<answers completion>\n"
            "<extra_id_2>") in lines


def test_a_new_threshold_or_reward_model_changes_only_the_kept_hash(tmp_path):
    settings = load_settings()
    before = stage_hashes(load_pipeline(str(write(tmp_path, STAGES, head=HEAD)), settings))
    after = stage_hashes(load_pipeline(str(write(tmp_path, STAGES.replace("helpfulness: 3,", "helpfulness: 3.5,"),
                                                   head=HEAD.replace("1424'}", "1424', model: rm2}"))), settings))
    assert before["rm"].generation == after["rm"].generation and before["rm"].kept != after["rm"].kept
    assert before["answers"] == after["answers"]
    moved = stage_hashes(load_pipeline(str(write(tmp_path, STAGES, head=HEAD.replace("1424", "1425"))), settings))
    assert moved["rm"] == before["rm"]  # the same model at a new address: nothing rescored


@pytest.mark.parametrize("stages, head, expected", [
    (STAGES, HEAD.replace("  rm: {engine: nemo-aligner, url: 'http://127.0.0.1:1424'}\n", ""),
     "stage 'rm': server: a reward stage needs a reward server (none in servers"),
    (STAGES, HEAD.replace(", url: 'http://127.0.0.1:1424'", ""),
     "servers.rm: engine nemo-aligner: give url (a reward server already running), swap_with"),
    (STAGES.replace("kind: reward", "kind: reward\n    server: main"), HEAD,
     "stage 'rm': server: 'main' is not a reward server of this pipeline (reward servers: rm)"),
    (STAGES.replace("kind: reward", "kind: reward\n    split: {parser: lines, into: x}"), HEAD,
     "a reward stage generates nothing, so it takes no split"),
    (STAGES.replace("keep_if: {helpfulness: 3,", "keep_if: {helpfulnes: 3,"), HEAD,
     "keep_if: helpfulnes is not one of attributes (helpfulness, correctness, coherence, complexity, verbosity)"),
    (STAGES.replace("weights: {helpfulness: 0.3, correctness: 0.74}, ", ""), HEAD, "`reward`, the scalar, needs weights"),
    (STAGES.replace("samples_per_prompt: 2}", "samples_per_prompt: 2}\n    reward: {}"), HEAD,
     "stage 'answers': reward: set only on a stage of kind reward; add kind: reward"),
    (STAGES.replace("    reward: {system_prompt: \"\",", "    reward: {completion_field: answer,"), HEAD,
     "stage 'rm': reward: the rows of stage 'answers' give no conversation to score: the row has neither messages "
     "nor text prompt and answer"),
    # Going back to generation after a reward stage is built (flows/pipeline.py levels); a cycle through one is not.
    (STAGES.replace("from: answers", "from: revised") + '  - name: revised\n    from: rm\n    recipe: {prompt_template: '
     '"Revise {{ completion }}"}\n', HEAD, "from: the stages read each other in a cycle"),
])
def test_refusals_are_one_line_naming_the_stage_and_field(tmp_path, stages, head, expected):
    assert expected in refused(write(tmp_path, stages, head=head))


def test_the_cli_refuses_a_reward_stage_without_a_server_in_one_line_exit_2(tmp_path):
    path = write(tmp_path, STAGES, head=HEAD.replace("  rm: {engine: nemo-aligner, url: 'http://127.0.0.1:1424'}\n", ""))
    out = subprocess.run([sys.executable, "-m", "flows.cli", "check", "--pipeline", str(path)], capture_output=True,
                         text=True, timeout=120, cwd=REPO)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "a reward stage needs a reward server" in (out.stdout + out.stderr)
