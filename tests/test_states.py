"""One rule for every state (infra/run/states.py): a part's state, a judgement's, a verdict is trusted only
while the files it describes hold the sha256 it names, and a rerun removes a state before rewriting
what it describes. Each test is a finding of reliability review 2 replayed on a real local store and,
where a server is needed, the real simulated server; a kill -9 at one storage write is `Killed`
raised right after that write, which nothing in the product catches."""

from __future__ import annotations

import hashlib
import json

import pytest

from infra.prompting.dataset import Record, Shard
from infra.engines.nemo import NemoClient
from infra.errors import TransientServerError
from infra.generation import ShardJob, run_shard
from infra.run.layout import FILTERED, judge_name, state_name
from infra.planning import load_published
from infra.recipes.curate import Curation, CurationError, curate
from infra.recipes.judge import judge_part, judged_current
from infra.recipes.params import FilterParams, JudgeParams
from infra.prompting.sampling import SamplingParams
from infra.storage.local import LocalOutputStore
from tests.localserver import running_server
from tests.test_curation import CHASH, judge, kept_ids, lines, row, write_parts

SIM = ("--engine", "simulated")


class Killed(BaseException):
    """The process died here: no except clause of the product catches a BaseException it does not name."""


class KilledAfter(LocalOutputStore):
    """The run's real local store, killed right after the write of `target` lands."""

    def __init__(self, root, target: str):
        super().__init__(root)
        self.target = target

    def publish_file(self, name, path, sha256):
        super().publish_file(name, path, sha256)
        if name == self.target:
            raise Killed(name)

    def write_bytes(self, name, data):
        super().write_bytes(name, data)
        if name == self.target:
            raise Killed(name)


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("killed_after", ["kept-00002.jsonl", "filtered-00002.jsonl"])
def test_d1_a_killed_stage_rerun_then_the_first_filters_again_keeps_what_one_pass_keeps(tmp_path, killed_after):
    shards = [[row(f"r{s}{i}", f"answer {s} {i % 3}", tokens=1 + (s * 5 + i) % 12) for i in range(5)] for s in range(6)]
    f1, f2 = Curation(filters=FilterParams(min_completion_tokens=4)), Curation(filters=FilterParams(min_completion_tokens=9, dedup_exact=True))
    ref = LocalOutputStore(tmp_path / "ref")
    curate(ref, write_parts(ref, shards), f1, CHASH)
    store = LocalOutputStore(tmp_path / "run")
    parts = write_parts(store, shards)
    curate(store, parts, f1, CHASH)
    with pytest.raises(Killed):  # the operator tries stricter filters; the run is killed mid-stage
        curate(KilledAfter(tmp_path / "run", killed_after), parts, f2, CHASH)
    result = curate(store, parts, f1, CHASH)  # and goes back to the first filters
    assert kept_ids(store, parts) == kept_ids(ref, parts)
    assert lines(store, FILTERED) == lines(ref, FILTERED)
    for kept in result.kept_parts:  # the manifest's kept_parts describe the files as they are
        assert kept["sha256"] == sha(tmp_path / "run" / kept["name"]), kept["name"]
        assert kept["records"] == len(lines(store, kept["name"]))


def test_d2_a_killed_rejudge_then_the_first_judge_again_judges_anew_and_curation_refuses_a_stray_judgement(tmp_path):
    shards = [[row(f"r{s}{i}", f"answer number {s * 4 + i}") for i in range(4)] for s in range(3)]
    store = LocalOutputStore(tmp_path / "run")
    parts = write_parts(store, shards)
    j1 = judge(JudgeParams(template="Judge this: {{ completion }}\nRating:"))
    j2 = judge(JudgeParams(template="Score the answer {{ completion }} from 1 to 5.\nScore:"))
    with running_server(tmp_path, *SIM) as (url, _):
        client = NemoClient(url)
        for p in parts:
            judge_part(client, store, j1, p, batch_size=8)
        first = {p.name: lines(store, judge_name(p.name)) for p in parts}
        with pytest.raises(Killed):  # a second judge, killed right after shard 2's judgement is published
            for p in parts:
                judge_part(client, KilledAfter(tmp_path / "run", judge_name(parts[2].name)), j2, p, batch_size=8)
        second = lines(store, judge_name(parts[2].name))
        assert second != first[parts[2].name]  # the two judges answer differently: the test can tell them apart
        # The first judge again: what the flow re-judges is every part whose judgement is not the first judge's.
        to_judge = [p for p in parts if not judged_current(store, j1, p)]
        assert to_judge == parts
        for p in to_judge:
            judge_part(client, store, j1, p, batch_size=8)
    assert {p.name: lines(store, judge_name(p.name)) for p in parts} == first
    # A judgement that is not the one its state names (the kill's leftover) is never applied.
    (tmp_path / "run" / judge_name(parts[2].name)).write_text("".join(json.dumps(j) + "\n" for j in second))
    with pytest.raises(CurationError, match="part-00002.jsonl has no judgement by this judge"):
        curate(store, parts, Curation(judge_params=j1.params, judge=j1), CHASH)


PROMPTS = [f"Write about topic number {i}:" for i in range(5)]
JUDGE = judge(JudgeParams(template="Judge: {{ completion }}\nRating:", tokens_to_generate=2))


def shard_job(**kw) -> ShardJob:
    return ShardJob("r", "m", CHASH, SamplingParams(tokens_to_generate=8, greedy=True), batch_size=8, **kw)


def test_d5_a_published_part_whose_judging_failed_is_judged_alone_on_the_retry(tmp_path):
    shard = Shard(0, [Record(f"q{i}", p, i + 1) for i, p in enumerate(PROMPTS)])
    store, job = LocalOutputStore(tmp_path / "run"), shard_job(judge=JUDGE)
    part = tmp_path / "run" / shard.name
    # Each server dies on its 2nd request: the first one while judging the part it has just generated.
    with running_server(tmp_path, *SIM, "--fault-crash-after", "1") as (url, _):
        with pytest.raises(TransientServerError):
            run_shard(NemoClient(url), shard, job, store)
    assert (tmp_path / "run" / state_name(shard.name)).exists() and not (tmp_path / "run" / judge_name(shard.name)).exists()
    published = (sha(part), part.stat().st_mtime_ns)
    # The task's retry (or the requeue on a new replica) sends the judging alone: one request, which
    # this server answers; generating the shard again would be its 2nd request, and kill it.
    with running_server(tmp_path, *SIM, "--fault-crash-after", "1") as (url, _):
        result = run_shard(NemoClient(url), shard, job, store)
    assert (sha(part), part.stat().st_mtime_ns) == published
    assert result.part.sha256 == published[0] and not result.judged_only
    assert judged_current(store, JUDGE, result.part) and len(lines(store, judge_name(shard.name))) == 5


def test_d6_a_part_rewritten_after_its_state_is_not_trusted_and_a_rewrite_removes_the_state_first(tmp_path):
    shard = Shard(0, [Record(f"q{i}", p, i + 1) for i, p in enumerate(PROMPTS)])
    store, root = LocalOutputStore(tmp_path / "run"), tmp_path / "run"
    with running_server(tmp_path, *SIM) as (url, _):
        run_shard(NemoClient(url), shard, shard_job(), store)
        assert set(load_published(store, CHASH)) == {0}
        # A regeneration killed between the new part and its new state (review 2, D6): other bytes, the old state.
        other = [dict(r, completion=r["completion"] + " (again)") for r in lines(store, shard.name)]
        (root / shard.name).write_text("".join(json.dumps(r) + "\n" for r in other))
        assert load_published(store, CHASH) == {}  # the state names bytes the part no longer has: generated again
        # A rewrite removes the state before the part it describes: killed right after the part, no state is left.
        with pytest.raises(Killed):
            run_shard(NemoClient(url), shard, shard_job(), KilledAfter(root, shard.name))
        assert not (root / state_name(shard.name)).exists()
        result = run_shard(NemoClient(url), shard, shard_job(), store)
    assert load_published(store, CHASH)[0] == result.part and result.part.sha256 == sha(root / shard.name)
