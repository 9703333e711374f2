"""A shard resumed from its spill under another batch plan (infra/prompting/plan_identity.py,
infra/generation.py run_shard): a seeded request's seed follows its batch, so a resumed shard must
not mix two make-ups. On the real simulated server: a spill written with one length window and
resumed with another is finished with the spill's window (the part is the uninterrupted run's byte
for byte); one whose plan cannot be made again here is generated again from nothing, and says so."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import pytest

from infra.errors import ServerError
from infra.generation import ShardJob, run_shard, spill_header
from infra.prompting.dataset import Record, Shard
from infra.prompting.plan_identity import plan_identity, resume_plan
from infra.prompting.sampling import SamplingParams
from infra.run.layout import spill_name
from infra.storage.local import LocalOutputStore
from tests.localserver import running_server
from tests.test_spill import SIM, make_client, requests_answered

# Lengths that a sorting window regroups: with a window of one batch they go as they come.
SHARD = Shard(0, [Record(f"q{i}", "Write about " + "a long topic " * (i * 7 % 5) + f"number {i:02d}:", i + 1)
                  for i in range(12)])
WRITTEN = ShardJob("r", "m", "chash", SamplingParams(tokens_to_generate=8, temperature=0.8, top_k=50, random_seed=5),
                   batch_size=4, samples=2, length_window=1)
RESUMED = replace(WRITTEN, length_window=3)  # another version's window: not in the config hash


def test_a_spill_of_another_window_is_finished_with_its_own_and_one_of_another_cut_is_generated_again(
        tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="infra.generation")
    stores = {n: LocalOutputStore(tmp_path / n) for n in ("as_written", "as_resumed", "cut")}
    for name in ("a", "b", "c", "d"):
        (tmp_path / name).mkdir()
    with running_server(tmp_path / "a", *SIM) as (url, _):
        run_shard(make_client("nemo", url), SHARD, WRITTEN, stores["as_written"])
        run_shard(make_client("nemo", url), SHARD, RESUMED, stores["as_resumed"])
    assert stores["as_written"].read_bytes(SHARD.name) != stores["as_resumed"].read_bytes(SHARD.name)  # two make-ups
    resumed_requests = requests_answered(tmp_path / "a" / "server.log", "nemo") - 6  # 3 batches x 2 samples written
    with running_server(tmp_path / "b", *SIM, "--fault-crash-after", "3") as (url, _):
        with pytest.raises(ServerError):
            run_shard(make_client("nemo", url), SHARD, WRITTEN, stores["cut"])
    spill = stores["cut"].staging_dir() / spill_name(SHARD.name)
    lines = spill.read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[0])["plan"]["window"] == 1
    (tmp_path / "cut_other").mkdir()  # a local run's spill is in its run directory
    stores["cut_other"] = LocalOutputStore(tmp_path / "cut_other")
    header = json.loads(lines[0]) | {"plan": {**json.loads(lines[0])["plan"], "version": 1},  # an older cut's
                                     "part": stores["cut_other"].uri(SHARD.name)}
    (tmp_path / "cut_other" / spill_name(SHARD.name)).write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")

    with running_server(tmp_path / "c", *SIM) as (url, _):
        run_shard(make_client("nemo", url), SHARD, RESUMED, stores["cut"])
    assert requests_answered(tmp_path / "c" / "server.log", "nemo") == 6 - 3  # the spill's 3 not asked again
    assert stores["cut"].read_bytes(SHARD.name) == stores["as_written"].read_bytes(SHARD.name)
    said = [r.getMessage() for r in caplog.records if "unlike this version's plan" in r.getMessage()]
    assert len(said) == 1 and "window 1" in said[0] and "planned with the spill's batch_size 4 and window 1" in said[0]

    caplog.clear()
    with running_server(tmp_path / "d", *SIM) as (url, _):
        run_shard(make_client("nemo", url), SHARD, RESUMED, stores["cut_other"])
    assert requests_answered(tmp_path / "d" / "server.log", "nemo") == resumed_requests  # the whole shard again
    assert stores["cut_other"].read_bytes(SHARD.name) == stores["as_resumed"].read_bytes(SHARD.name)
    said = [r.getMessage() for r in caplog.records if "unlike this version's plan" in r.getMessage()]
    assert len(said) == 1 and "shard 0 is generated again from nothing" in said[0] and "version 1" in said[0]


def test_unseeded_results_are_kept_whatever_the_plan_and_an_unrecorded_plan_is_not_guessed():
    ours = plan_identity(4, 3)
    plan, line = resume_plan(plan_identity(4, 1), ours, seeded=False, shard=2)
    assert plan is ours and "results are kept" in line
    plan, line = resume_plan(None, ours, seeded=True, shard=2)  # a spill from before plans were recorded
    assert plan is None and "unrecorded plan" in line and "shard 2 is generated again" in line


def test_openai_results_are_kept_under_another_plan_their_seeds_follow_no_batch(tmp_path, caplog):
    """One prompt a request, seeded from (seed, shard, prompt, sample): a plan changes none of them."""
    caplog.set_level(logging.INFO, logger="infra.generation")
    clean, cut = LocalOutputStore(tmp_path / "clean"), LocalOutputStore(tmp_path / "cut")
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
    with running_server(tmp_path / "a", *SIM) as (url, _):
        run_shard(make_client("openai", url), SHARD, WRITTEN, clean)
    with running_server(tmp_path / "b", *SIM, "--fault-crash-after", "3") as (url, _):
        with pytest.raises(ServerError):
            run_shard(make_client("openai", url), SHARD, WRITTEN, cut)
    path = tmp_path / "cut" / spill_name(SHARD.name)
    header, *rest = path.read_text().splitlines()
    header = json.loads(header) | {"plan": {**json.loads(header)["plan"], "version": 1}}  # even another cut
    path.write_text("\n".join([json.dumps(header), *rest]) + "\n")
    with running_server(tmp_path / "c", *SIM) as (url, _):
        run_shard(make_client("openai", url), SHARD, RESUMED, cut)
    assert requests_answered(tmp_path / "c" / "server.log", "openai") == 12 - 3
    assert cut.read_bytes(SHARD.name) == clean.read_bytes(SHARD.name)
    said = [r.getMessage() for r in caplog.records if "unlike this version's plan" in r.getMessage()]
    assert len(said) == 1 and "results are kept" in said[0]


def test_a_spill_of_another_plan_with_no_results_yet_gets_this_tries_plan_in_its_header(tmp_path):
    """Else the results this try appends would be read by the next as made under the old plan."""
    store = LocalOutputStore(tmp_path / "cut")
    (tmp_path / "cut").mkdir()
    old = spill_header(store, SHARD, WRITTEN)
    path = tmp_path / "cut" / spill_name(SHARD.name)
    path.write_text(json.dumps(old) + "\n")  # killed before its first request came back
    (tmp_path / "b").mkdir()
    with running_server(tmp_path / "b", *SIM, "--fault-crash-after", "3") as (url, _):
        with pytest.raises(ServerError):
            run_shard(make_client("nemo", url), SHARD, RESUMED, store)
    header, *results = path.read_text().splitlines()
    assert len(results) == 3 and json.loads(header) == spill_header(store, SHARD, RESUMED)
