"""The judge and filters through the real flow and the local server: stage reruns checked with the
server's own request log (its log is appended to by every start), dedup's kept set the same after
kill -9 and resume, and the judge on the real local model."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys

import pytest

from benchmarks.faults import _wait, local_env
from flows.generate import generate
from tests.test_recipe_flow import cli_env, start_cli_run
from infra.recipes.params import FilterParams, JudgeParams
from infra.prompting.sampling import SamplingParams

pytestmark = pytest.mark.integration
REQUEST = re.compile(r"request (\d+): (\d+) sentences, (\d+) tokens generated")


def write_input(workdir, n: int, distinct: int):
    src = workdir / "in.jsonl"
    src.write_text("".join(json.dumps({"id": f"r{i:03d}", "prompt": f"Tell me about thing {i % distinct}."}) + "\n"
                           for i in range(n)))
    return src


def requests(workdir, run_id: str) -> list[tuple[int, int]]:
    """(sentences, tokens generated) per PUT /generate the run's local servers answered, from their logs."""
    out = []
    for log in sorted((workdir / "work" / "servers" / run_id).glob("replica-*/server.log")):
        out += [(int(m[2]), int(m[3])) for m in REQUEST.finditer(log.read_text())]
    return out


def files(run_dir, pattern: str) -> dict[str, tuple[str, int]]:
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in sorted(run_dir.glob(pattern))}


def kept(run_dir) -> list[tuple[str, int]]:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    return [(r["id"], r["sample"]) for p in manifest["curation"]["kept_parts"]
            for r in map(json.loads, (run_dir / p["name"]).read_text().splitlines())]


@pytest.fixture
def simulated(monkeypatch, workdir):
    for k, v in local_env(workdir).items():
        monkeypatch.setenv(k, v)


def test_stages_rerun_alone_filters_without_a_server_and_a_new_judge_without_regenerating(prefect_harness, workdir, simulated):
    src = write_input(workdir, 12, distinct=5)  # 5 distinct prompts: the simulated engine answers each the same
    run_dir = workdir / "out" / "stages"
    args = dict(input_uri=str(src), output_uri=str(workdir / "out"), run_id="stages", shard_size=4, batch_size=4,
                sampling=SamplingParams(tokens_to_generate=12), prompt_format="raw")  # unseeded: one prompt, one answer
    first = generate(**args, filters=FilterParams(dedup_exact=True))
    assert first["records_kept"] == 5 and first["filtered"] == {"exact_duplicate": 7}
    assert kept(run_dir) == [(f"r{i:03d}", 0) for i in range(5)]  # the first of each, in input order
    served, parts = len(requests(workdir, "stages")), files(run_dir, "part-?????.jsonl")
    assert served > 0

    # A filter changed: no server, the parts untouched; the kept and filtered parts and the manifest rewritten.
    kept_before, manifest_before = files(run_dir, "kept-*.jsonl"), (run_dir / "manifest.json").read_bytes()
    second = generate(**args, filters=FilterParams(dedup_exact=True, max_completion_tokens=3))
    assert len(requests(workdir, "stages")) == served and files(run_dir, "part-?????.jsonl") == parts
    assert second["records_kept"] == 0 and second["filtered"] == {"max_completion_tokens": 12}
    assert files(run_dir, "kept-*.jsonl") != kept_before and (run_dir / "manifest.json").read_bytes() != manifest_before
    dropped = [json.loads(x) for x in (run_dir / "filtered.jsonl").read_text().splitlines()]
    assert {(d["filter"], d["value"], d["limit"]) for d in dropped} == {("max_completion_tokens", 12, 3)}
    assert len({(d["id"], d["sample"]) for d in dropped}) == 12

    # A judge added, then its template changed: judged anew each time (one request per part row, the
    # judge's short replies), never regenerated.
    for n, template in enumerate(["Judge: {{ completion }}\nScore:", "Rate this answer: {{ completion }}\nRating:"]):
        before = len(requests(workdir, "stages"))
        judge = JudgeParams(template=template, tokens_to_generate=2)
        third = generate(**args, judge=judge, filters=FilterParams(dedup_exact=True))
        judged = requests(workdir, "stages")[before:]
        assert sum(s for s, _ in judged) == 12 + 1, judged  # every row once, plus the readiness probe's one sentence
        # Short judge replies (NeMo's per-row budget lets rows with shorter prompts run longer), not 12 rows x 12 tokens again.
        assert sum(t for _, t in judged) < 12 * 12 / 2, judged
        assert files(run_dir, "part-?????.jsonl") == parts
        assert third["records_kept"] == 0 and third["filtered"] == {"judge_unparsed": 12}  # words, no score in them
        judgement = json.loads((run_dir / "part-00000.jsonl.judge.jsonl").read_text().splitlines()[0])
        assert judgement["id"] == "r000" and judgement["reply"]

    # The judge's threshold and score pattern changed: read from the stored replies, no server.
    before = len(requests(workdir, "stages"))
    fourth = generate(**args, judge=judge.model_copy(update={"score_pattern": r"(\d)", "min_score": 1.0}),
                      filters=FilterParams(dedup_exact=True))
    assert len(requests(workdir, "stages")) == before and files(run_dir, "part-?????.jsonl") == parts
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["curation"]["filtered"] == fourth["filtered"] == {"judge_unparsed": 12}
    assert manifest["curation"]["config"]["judge"]["score_pattern"] == r"(\d)"
    assert manifest["records_written"] == 12 and sum(p["records"] for p in manifest["curation"]["kept_parts"]) == 0


def test_dedup_keeps_the_same_set_after_kill_9_and_resume(prefect_harness, prefect_server, workdir):
    src = write_input(workdir, 40, distinct=9)
    flags = ["--dedup-exact", "--dedup-near", "--samples-per-prompt", "2", "--tokens-to-generate", "8",
             "--shard-size", "4", "--batch-size", "4", "--output-uri", str(workdir / "out"), "--input-uri", str(src),
             "--prompt-format", "raw"]
    env, killed_dir = cli_env(workdir, prefect_server), workdir / "out" / "killed"
    proc = start_cli_run(workdir, env, "killed", flags)
    try:
        _wait(lambda: len(list(killed_dir.glob("part-*.state.json"))) >= 3, 180, "three parts of the run to be killed")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert not (killed_dir / "manifest.json").exists()
    for run_id in ("killed", "one-go"):
        done = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--run-id", run_id, *flags], cwd=workdir, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        closing = done.stderr.strip().splitlines()[-1]
        assert re.fullmatch(rf"run {run_id}: \d+ of 80 records kept; filtered: exact_duplicate \d+.*", closing), closing
    assert kept(killed_dir) == kept(workdir / "out" / "one-go")
    # Unseeded, the simulated engine answers a prompt the same every time: at most one row per distinct prompt.
    assert 1 < len(kept(killed_dir)) <= 9 and all(sample == 0 for _, sample in kept(killed_dir))


JUDGE = ("{% if id == 'q3' %}Write the word green, in lower case, and nothing else.{% else %}"
         "Here is a question and an answer.\nQuestion: {{ prompt }}\nAnswer:{{ completion }}\n"
         "How good is the answer, from 1 (bad) to 5 (good)? Reply with the number only.{% endif %}")


def test_the_judge_on_the_real_local_model_parses_scores_and_counts_a_reply_without_one(prefect_harness, workdir,
                                                                                       local_model_dir, monkeypatch):
    monkeypatch.setenv("NSDG_LOCAL__MODEL_DIR", str(local_model_dir))
    monkeypatch.setenv("NSDG_WORK_DIR", str(workdir / "work"))
    src = workdir / "in.jsonl"
    src.write_text("".join(json.dumps({"id": f"q{i}", "prompt": p}) + "\n" for i, p in enumerate(
        ["What is the capital of France?", "What is 2 + 2?", "Name a colour of the sky.", "Say hello."])))
    result = generate(input_uri=str(src), output_uri=str(workdir / "out"), run_id="real-judge", batch_size=4,
                      sampling=SamplingParams(tokens_to_generate=8, greedy=True), prompt_format="chat",
                      judge=JudgeParams(template=JUDGE, tokens_to_generate=6, min_score=1))
    run_dir = workdir / "out" / "real-judge"
    judged = {j["id"]: j["reply"] for j in map(json.loads, (run_dir / "part-00000.jsonl.judge.jsonl").read_text().splitlines())}
    assert set(judged) == {"q0", "q1", "q2", "q3"}
    scored = {i for i, reply in judged.items() if re.search(r"-?\d", reply)}
    assert scored and "q3" not in scored, judged  # real scores from the judge; the colour word has none
    kept_rows = [json.loads(x) for p in json.loads((run_dir / "manifest.json").read_text())["curation"]["kept_parts"]
                 for x in (run_dir / p["name"]).read_text().splitlines()]
    assert {r["id"] for r in kept_rows} == {i for i in scored if float(re.search(r"-?\d+(?:\.\d+)?", judged[i])[0]) >= 1}
    for r in kept_rows:
        assert isinstance(r["judge"]["score"], float) and r["judge"]["reply"] == judged[r["id"]]
    assert result["filtered"].get("judge_unparsed") == 4 - len(scored)
    assert result["records_kept"] + sum(result["filtered"].values()) == result["records_written"] == 4


def test_a_rerun_with_curation_off_removes_the_earlier_stage_files(prefect_harness, workdir, simulated):
    """Review 2, D12: the undone stage's kept-*.jsonl (the training set), filtered files and verdicts
    must not stay beside a manifest without `curation`."""
    src = write_input(workdir, 8, distinct=3)
    run_dir = workdir / "out" / "off"
    args = dict(input_uri=str(src), output_uri=str(workdir / "out"), run_id="off", shard_size=4, batch_size=4,
                sampling=SamplingParams(tokens_to_generate=6), prompt_format="raw")
    assert generate(**args, filters=FilterParams(dedup_exact=True))["filtered"] == {"exact_duplicate": 5}
    assert list(run_dir.glob("kept-*.jsonl")) and (run_dir / "filtered.jsonl").exists()
    parts = files(run_dir, "part-*")
    result = generate(**args)
    assert result["records_written"] == 8 and "records_kept" not in result
    assert json.loads((run_dir / "manifest.json").read_text())["curation"] is None
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(("kept-", "filtered"))) == []
    assert files(run_dir, "part-*") == parts  # the parts (and their states) are not the stage's: untouched
