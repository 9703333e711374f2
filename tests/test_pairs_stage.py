"""A pipeline's `pairs` stage (infra/pipeline/pairs_stage.py): `check --pipeline` refuses a pairs
stage over fewer than 2 samples per prompt in one line; the stage pairs its parent's published kept
rows with no server, and a new margin re-pairs them (only the stage's kept hash changes); through
the CLI, a generating stage with 3 samples and a pairs stage end with trainer files and a card, and
a rerun with another margin starts no server."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks.faults import local_env
from infra.errors import ConfigError
from infra.pipeline.files import load_pipeline
from infra.pipeline.hashes import stage_hashes
from infra.pipeline.pairs_stage import run_pairs, stage_store
from infra.settings import Settings

PIPELINE = """\
input: topics.jsonl
servers:
  main: {profile: local}
defaults:
  prompt_format: raw
  sampling: {temperature: 0.9, random_seed: 3, tokens_to_generate: 12, end_strings: [" e"]}
stages:
  - name: answers
    recipe: {prompt_template: "Tell me about {{ topic }}:", samples_per_prompt: 3}
  - name: prefs
    kind: pairs
    from: answers
    pairs: {score: generation.generated_tokens, min_margin: 1}
"""


def cli(workdir, env, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=300)


def jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write(workdir, text: str = PIPELINE) -> None:
    (workdir / "topics.jsonl").write_text("".join(json.dumps({"id": f"t{i}", "topic": f"topic {i}"}) + "\n"
                                                  for i in range(6)))
    (workdir / "pipeline.yaml").write_text(text)


def test_check_refuses_a_pairs_stage_without_samples_in_one_line(workdir):
    env = {**os.environ, **local_env(workdir)}
    write(workdir, PIPELINE.replace("samples_per_prompt: 3", "samples_per_prompt: 1"))
    bad = cli(workdir, env, "check", "--pipeline", "pipeline.yaml")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert ("stage 'prefs': pairs needs at least 2 responses per prompt, but stage 'answers' has "
            "recipe.samples_per_prompt 1; set it to 2 or more") in bad.stderr
    for change, said in ((("score: generation.generated_tokens", "score: judge.score"), "stage 'answers' has no judge"),
                         (("    kind: pairs\n", ""), "pairs: set only on a stage of kind pairs"),
                         (("    pairs: {score: generation.generated_tokens, min_margin: 1}\n", ""), "needs pairs: {score"),
                         (("min_margin: 1}", "min_margin: 1}\n  - name: more\n    from: prefs\n    recipe: "
                                             "{prompt_template: x}"), "'prefs' is a pairs stage")):
        write(workdir, PIPELINE.replace(*change))
        bad = cli(workdir, env, "check", "--pipeline", "pipeline.yaml")
        assert bad.returncode == 2 and said in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    write(workdir)
    ok = cli(workdir, env, "check", "--pipeline", "pipeline.yaml")
    assert ok.returncode == 0, ok.stderr
    assert "prefs    answers" in ok.stdout and "pairs best_vs_worst by generation.generated_tokens" in ok.stdout


def test_pairs_are_made_from_the_parents_published_rows_and_a_new_margin_repairs_them(workdir):
    settings = Settings(work_dir=str(workdir / "work"))
    write(workdir)
    parent = stage_store(str(workdir / "out"), "p1", "answers", settings)
    rows = [{"id": f"t{i}", "sample": s, "prompt": f"q{i}", "completion": f"a{i}{s}",
             "generation": {"generated_tokens": [5, 9, 7][s] + i % 2 * (s == 2) * 2}} for i in range(4) for s in range(3)]
    parent.write_bytes("part-00000.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    parent.write_bytes("manifest.json", json.dumps({"parts": [{"name": "part-00000.jsonl"}]}).encode())
    the = load_pipeline("pipeline.yaml", settings)
    stage = the.stage("prefs")
    got = run_pairs(the, stage, str(workdir / "out"), "p1", settings, None, stage_hashes(the)["prefs"])
    pairs = jsonl(workdir / "out" / "p1" / "stages" / "prefs" / "pairs.jsonl")
    assert got["pairs"] == len(pairs) == 4 and got["records_in"] == 12
    assert [(p["prompt_id"], p["chosen_sample"], p["rejected_sample"]) for p in pairs] == [(f"t{i}", 1, 0) for i in range(4)]
    # t1 and t3 have samples 1 and 2 both at 9: a tie at the top, the lower sample chosen. A margin of 4.5
    # leaves no pair (9 - 5 = 4); it changes only the stage's kept hash, so a rerun of the same run is not refused.
    wider = PIPELINE.replace("min_margin: 1", "min_margin: 4.5")
    (workdir / "pipeline.yaml").write_text(wider)
    the2 = load_pipeline("pipeline.yaml", settings)
    h1, h2 = stage_hashes(the)["prefs"], stage_hashes(the2)["prefs"]
    assert h1.generation == h2.generation and h1.kept != h2.kept
    again = run_pairs(the2, the2.stage("prefs"), str(workdir / "out"), "p1", settings, None, h2)
    assert again["pairs"] == 0 and again["filtered"] == {"pairs_margin": 4}
    assert json.loads((workdir / "out" / "p1" / "stages" / "prefs" / "manifest.json").read_text())["pairs"] == 0
    # a score no row has: one line naming the field and what the rows have
    (workdir / "pipeline.yaml").write_text(PIPELINE.replace("generation.generated_tokens", "reward.helpfulness"))
    the3 = load_pipeline("pipeline.yaml", settings)
    with pytest.raises(Exception, match=r"pairs.score 'reward.helpfulness': none of the 12 rows of stage 'answers'"):
        run_pairs(the3, the3.stage("prefs"), str(workdir / "out"), "p1", settings, None, stage_hashes(the3)["prefs"])
    with pytest.raises(ConfigError):
        load_pipeline("missing.yaml", settings)


@pytest.mark.integration
def test_a_pipeline_ends_with_pairs_trainer_files_and_a_card_and_a_new_margin_needs_no_server(prefect_server, workdir):
    datasets = pytest.importorskip("datasets")
    # The simulated server's replies carry no score (random words, the same token count), so the pairs
    # are picked by a field that differs per sample: `sample` itself (2 beats 0 by 2).
    write(workdir, PIPELINE.replace("generation.generated_tokens", "sample"))
    env = {**os.environ, **local_env(workdir), **prefect_server.client_env(), "PREFECT_HOME": str(workdir / "prefect")}
    flags = ["run", "--pipeline", "pipeline.yaml", "--run-id", "p1", "--output-uri", str(workdir / "out")]
    done = cli(workdir, env, *flags)
    assert done.returncode == 0, done.stderr[-4000:]
    run_dir = workdir / "out" / "p1"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["server_launches"] == 1
    answers = [r for p in json.loads((run_dir / "stages/answers/manifest.json").read_text())["parts"]
               for r in jsonl(run_dir / "stages/answers" / p["name"])]
    assert len(answers) == 18
    pairs = jsonl(run_dir / "stages/prefs/pairs.jsonl")
    info = manifest["stages"][1]
    assert info["stage"] == "prefs" and info["pairs"] == len(pairs) and info["prompts"] == 6
    assert [(p["prompt_id"], p["chosen_sample"], p["rejected_sample"], p["margin"]) for p in pairs] == [
        (f"t{i}", 2, 0, 2.0) for i in range(6)]
    assert [p["chosen"] for p in pairs] == [r["completion"] for r in answers if r["sample"] == 2]
    exports = {e["config"]: e for e in manifest["dataset"]["exports"]}
    assert exports["sft"]["rows"] == 18 and exports["dpo_trl"]["rows"] == len(pairs)
    sft = datasets.load_dataset(str(run_dir), split="train", cache_dir=str(workdir / "hf"))
    assert len(sft) == 18 and "stage" in (run_dir / "README.md").read_text()
    dpo = datasets.load_dataset("json", data_files=str(run_dir / "data/dpo-nemo-aligner.jsonl"), split="train",
                                cache_dir=str(workdir / "hf"))
    assert [(r["chosen_reward"], r["rejected_reward"]) for r in dpo] == [(2.0, 0.0)] * 6
    trl = datasets.load_dataset(str(run_dir), "dpo_trl", split="train", cache_dir=str(workdir / "hf"))
    assert [r["chosen"][0]["content"] for r in trl] == [p["chosen"] for p in pairs]

    (workdir / "pipeline.yaml").write_text(PIPELINE.replace("generation.generated_tokens", "sample")
                                           .replace("min_margin: 1", "min_margin: 3"))
    again = cli(workdir, env, *flags, "--export")  # accepted: a pipeline always exports
    assert again.returncode == 0, again.stderr[-4000:]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["server_launches"] == 0 and manifest["stages"][1]["pairs"] == 0
    assert manifest["stages"][1]["filtered"] == {"pairs_margin": 6}
    assert not (run_dir / "data/dpo-trl.jsonl").exists() and (run_dir / "data/sft.parquet").exists()
