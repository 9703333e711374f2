"""A pairs stage's order-swap check (`pairs.check`, infra/recipes/pair_check.py, flows/pairs.py): each
pair asked twice of the generator, chosen as A then as B, kept only when both answers pick the chosen
response. The pipeline's server asked while the pool still holds it, started again only when no pool
ran (the local simulated server: fast, no choices in its words), the answers checkpointed, so a rerun
with another margin asks nothing and starts no server; the real SmolLM2-135M (llama.cpp's server, given by url and used as
is) answering, each pair kept or dropped for the reason its two answers give."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from benchmarks.faults import local_env, local_servers
from infra.recipes.pair_check import PairCheck, read_choice, verdict

PIPELINE = """\
input: topics.jsonl
servers:
  main: {profile: PROFILE}
defaults:
  sampling: {temperature: 0.9, random_seed: 3, tokens_to_generate: 12}
  batch_size: 8
stages:
  - name: answers
    recipe: {prompt_template: "In one short sentence, what is {{ topic }}?", samples_per_prompt: 2}
  - name: prefs
    kind: pairs
    from: answers
    pairs:
      score: sample
      min_margin: 1
      check: {seed: 5CHECK}
"""
TOPICS = ["the sun", "a cat", "rain"]


def write(workdir, profile: str = "local", check: str = "") -> None:
    (workdir / "topics.jsonl").write_text("".join(json.dumps({"id": f"t{i}", "topic": t}) + "\n" for i, t in enumerate(TOPICS)))
    (workdir / "pipeline.yaml").write_text(PIPELINE.replace("PROFILE", profile).replace("CHECK", check))


def jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_a_pair_is_kept_only_when_both_orders_pick_the_chosen_response():
    pattern = PairCheck().pattern()
    assert [read_choice(r, pattern) for r in ("A", " B.", "Response A is better", "a", "AB", "", None)] == [
        "A", "B", "A", None, None, None, None]
    a, b, junk = {"reply": "A"}, {"reply": "B"}, {"reply": "both"}
    assert verdict(a, b, pattern) is None  # chosen as A picked A, chosen as B picked B
    assert verdict(a, a, pattern) == "pair_order_disagrees"  # always A: position bias
    assert verdict(b, b, pattern) == "pair_order_disagrees"
    assert verdict(b, a, pattern) == "pair_check_prefers_rejected"
    assert verdict(a, junk, pattern) == "pair_check_unparsed"
    assert verdict({"error": "too long"}, b, pattern) == "pair_check_error"


def test_check_refuses_a_bad_check_template_in_one_line_before_any_server(workdir):
    env = {**os.environ, **local_env(workdir)}
    for check, said in ((", template: '{{ prompt '", "pairs.check.template (inline) line 1"),
                        (", template: '{{ prompt.x.y }}'", "pairs.check.template cannot render a pair of stage 'answers'"),
                        (", choice_pattern: '(A'", "pairs.check.choice_pattern '(A' is not a valid regex"),
                        (", colour: red", "colour")):
        write(workdir, check=check)
        bad = subprocess.run([sys.executable, "-m", "flows.cli", "check", "--pipeline", "pipeline.yaml"], cwd=workdir,
                             env=env, capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and said in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    write(workdir)
    ok = subprocess.run([sys.executable, "-m", "flows.cli", "check", "--pipeline", "pipeline.yaml"], cwd=workdir,
                        env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "A/B, both orders" in ok.stdout, ok.stdout + ok.stderr


def checked(run_dir) -> tuple[list[dict], dict[str, str], dict]:
    """The stage's pairs, its checkpointed answers by pair and order, and its manifest entry's check."""
    answers = {a["pair"]: a["reply"] for a in jsonl(run_dir / "stages/prefs/pair-check.jsonl")}
    entry = next(s for s in json.loads((run_dir / "manifest.json").read_text())["stages"] if s["stage"] == "prefs")
    return jsonl(run_dir / "stages/prefs/pairs.jsonl"), answers, entry


def agree(answers: dict[str, str], pair_id: str) -> bool:
    pattern = PairCheck().pattern()
    return (read_choice(answers[f"{pair_id} chosen_a"], pattern), read_choice(answers[f"{pair_id} chosen_b"], pattern)) == ("A", "B")


@pytest.mark.integration
def test_the_check_asks_the_pipelines_server_before_its_release_asks_twice_per_pair_and_a_new_margin_reuses_its_answers(
        prefect_harness, workdir, monkeypatch):
    """On the local simulated server (random words: no reply holds a choice): asked while the pool
    still holds it (one server start for generation and check), started again only when there is no
    pool; the real model's choices are the next test's."""
    from flows.pipeline import pipeline
    from infra.backends.local import LocalBackend

    for k, v in local_env(workdir).items():
        monkeypatch.setenv(k, v)
    starts = []
    start = LocalBackend.start
    monkeypatch.setattr(LocalBackend, "start", lambda self: (starts.append(self.dir), start(self))[1])
    write(workdir)
    pipeline("pipeline.yaml", run_id="chk", output_uri=str(workdir / "out"))
    run_dir = workdir / "out" / "chk"
    pairs, answers, entry = checked(run_dir)
    check = entry["check"]
    # One candidate pair per topic (sample 1 over sample 0), each asked in both orders.
    assert check["pairs_checked"] == 3 and check["answers_asked"] == 6 and len(answers) == 6
    assert sorted(answers) == sorted(f"t{i}/pair.1-0 chosen_{x}" for i in range(3) for x in "ab")
    # The generating stage's server, kept past the pool's release: one model load for both.
    assert len(starts) == 1 and check["server"] == "held" and "kept from the generating stages" in check["said"]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["server_launches"] == 1 and check["allocation"]["held_s"] > 0
    assert entry["held_s"] == check["allocation"]["held_s"]
    assert all(agree(answers, p["id"]) for p in pairs) and len(pairs) + sum(check["dropped"].values()) == 3
    assert {k: v for k, v in entry["filtered"].items() if k.startswith("pair_")} == check["dropped"]
    assert "checked in both orders by" in (run_dir / "README.md").read_text()
    assert local_servers(workdir) == 0

    # Another margin: the same candidate pairs, every answer checkpointed: nothing asked, no server.
    (workdir / "pipeline.yaml").write_text((workdir / "pipeline.yaml").read_text().replace("min_margin: 1", "min_margin: 0.5"))
    pipeline("pipeline.yaml", run_id="chk", output_uri=str(workdir / "out"))
    again, answers2, entry2 = checked(run_dir)
    assert entry2["check"]["answers_asked"] == 0 and entry2["check"]["answers_reused"] == 6
    assert entry2["check"]["server"].startswith("none") and entry2["check"]["model"] == check["model"]
    assert json.loads((run_dir / "manifest.json").read_text())["server_launches"] == 0
    assert answers2 == answers and [p["id"] for p in again] == [p["id"] for p in pairs]
    assert local_servers(workdir) == 0 and len(starts) == 1

    # Another check template: answers are missing and the generating stage is done (no pool): started for the check.
    (workdir / "pipeline.yaml").write_text((workdir / "pipeline.yaml").read_text().replace(
        "check: {seed: 5", "check: {template: 'Q: {{ prompt }} A: {{ response_a }} B: {{ response_b }} Better:', seed: 5"))
    pipeline("pipeline.yaml", run_id="chk", output_uri=str(workdir / "out"))
    _, _, entry3 = checked(run_dir)
    assert entry3["check"]["answers_asked"] == 6 and entry3["check"]["server"] == "started" and len(starts) == 2
    assert "started for the check" in entry3["check"]["said"] and local_servers(workdir) == 0


@pytest.mark.integration
def test_the_real_model_is_asked_twice_per_pair_at_a_url_used_as_is_and_kept_pairs_agree(prefect_harness, workdir,
                                                                                        llama_server, local_model_dir,
                                                                                        monkeypatch):
    """SmolLM2-135M under llama.cpp's server generates the answers and, given by url, checks them."""
    from flows.pipeline import pipeline

    monkeypatch.setenv("NSDG_WORK_DIR", str(workdir / "work"))
    monkeypatch.setenv("NSDG_MODEL__TOKENIZER", str(local_model_dir / "tokenizer.json"))  # its chat template beside it
    monkeypatch.setenv("NSDG_SERVER__URL", llama_server)
    monkeypatch.setenv("NSDG_EXTRA_PROFILES", json.dumps({"llama": {"backend": "attach", "engine": "vllm"}}))
    write(workdir, profile="llama", check=f", url: '{llama_server}'")
    (workdir / "pipeline.yaml").write_text((workdir / "pipeline.yaml").read_text().replace(
        "defaults:\n", "defaults:\n  prompt_format: chat\n"))
    pipeline("pipeline.yaml", run_id="url", output_uri=str(workdir / "out"))
    run_dir = workdir / "out" / "url"
    pairs, answers, entry = checked(run_dir)
    check = entry["check"]
    assert check["server"] == "url" and llama_server in check["said"] and check["answers_asked"] == 6 and len(answers) == 6
    pattern = PairCheck().pattern()
    choices = {k: read_choice(v, pattern) for k, v in answers.items()}
    assert any(c is not None for c in choices.values()), answers  # the real model answers with a letter
    assert all(agree(answers, p["id"]) for p in pairs)  # every kept pair: A first, B swapped
    wants = []
    for i in range(3):  # every pair kept, or dropped for the reason its two answers give
        got = (choices[f"t{i}/pair.1-0 chosen_a"], choices[f"t{i}/pair.1-0 chosen_b"])
        want = None if got == ("A", "B") else "pair_check_unparsed" if None in got else \
            "pair_check_prefers_rejected" if got == ("B", "A") else "pair_order_disagrees"
        assert (want is None) == any(p["prompt_id"] == f"t{i}" for p in pairs)
        wants.append(want)
    assert dict(Counter(w for w in wants if w)) == check["dropped"] and len(pairs) + sum(check["dropped"].values()) == 3


def test_only_the_pools_last_replica_is_kept_for_the_checks_and_released_after_the_last_one(prefect_harness, monkeypatch):
    """flows/pairs.py HeldServer stands for the pool's release: a replica released while another still
    serves (done first, rolled over) goes at once, so no job is held longer for the check than the
    pool's last; the last one is kept until the last checking stage is done."""
    from flows.pairs import HeldServer
    from infra.backends.attach import AttachBackend
    from infra.settings import Settings

    monkeypatch.setenv("NSDG_SERVER__URLS", json.dumps(["http://127.0.0.1:9", "http://127.0.0.1:10"]))
    a, b = AttachBackend(Settings(), 0), AttachBackend(Settings(), 1)
    held = HeldServer(["prefs", "prefs2"], gpus=8)
    serving = {a, b}
    held.others_serve = lambda backend: bool(serving - {backend})
    held.keep(a)  # released while b still serves: not kept
    serving.discard(a)
    assert held.kept is None and a.dead_reason() is not None
    held.keep(b)  # the last one: kept
    assert held.kept is b and b.dead_reason() is None
    held.done("prefs")
    assert held.kept is b  # prefs2 still to check
    held.done("prefs2")
    assert held.kept is None and b.dead_reason() is not None
    first = held.report()
    assert first["held_s"] >= 0 and held.report() == {"held_s": 0.0, "gpu_hours": 0.0}  # each second reported once


def test_a_long_check_rewrites_its_checkpoint_a_bounded_number_of_times_and_keeps_every_answer(tmp_path):
    """pair-check.jsonl is rewritten whole: once per batch, a check of n pairs wrote O(n^2) bytes. Against
    the local simulated server, 20 batches write it once (at most every CHECKPOINT_S), every answer kept."""
    from infra.backends.ready import make_client
    from infra.pipeline.pairs_stage import CheckServer, check_pairs
    from infra.recipes.pairs import Pair
    from infra.run.layout import STAGE_PAIR_CHECK
    from infra.settings import Settings
    from infra.storage.local import LocalOutputStore
    from tests.localserver import running_server

    class Counted(LocalOutputStore):
        writes = 0

        def write_bytes(self, name, data):
            Counted.writes += name == STAGE_PAIR_CHECK
            super().write_bytes(name, data)

    pairs = [Pair(f"t{i}", {"prompt": f"q{i}", "completion": "good"}, {"prompt": f"q{i}", "completion": "bad"}, 2.0, 1.0)
             for i in range(20)]
    own = Counted(tmp_path / "prefs")
    with running_server(tmp_path, "--engine", "simulated") as (url, _):
        client = make_client(Settings(), url)
        server = CheckServer(lambda: client, "sim", batch_size=2)
        kept, dropped, counts = check_pairs(pairs, PairCheck(), own, server, Settings())
    assert counts["answers_asked"] == 40 and Counted.writes == 1
    assert len(jsonl(tmp_path / "prefs" / STAGE_PAIR_CHECK)) == 40 and len(kept) + sum(dropped.values()) == 20
