"""A shard's spill (infra/storage/spill.py): the finished requests of an unfinished shard, kept for
its next try. On real files and, for a shard cut off by a lost server, the real simulated server
over both APIs: the next try asks only for the requests the spill lacks, and the part it publishes
is the uninterrupted run's byte for byte. The kill -9 through the CLI: tests/test_shard_resume.py."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest

from infra.engines.batch import GeneratedText, result_from_json, result_to_json
from infra.engines.completion import Completion
from infra.engines.nemo import NemoClient
from infra.engines.openai import OpenAIClient
from infra.errors import BadRequest, ReplyMismatch, RequestRejected, ServerError, ValidationRejected
from infra.generation import ShardJob, run_shard
from infra.prompting.dataset import Record, Shard
from infra.prompting.sampling import SamplingParams
from infra.run.layout import spill_name, state_name
from infra.storage import open_output_store
from infra.storage.local import LocalOutputStore
from infra.storage.s3_output import S3OutputStore
from infra.storage.s3_settings import S3Settings
from infra.storage.spill import Spill, discard_spills
from tests.localserver import running_server

HEADER = {"config_hash": "abc", "part": "/out/r/part-00000.jsonl", "records": 3, "first_line": 1, "last_line": 3,
          "samples": 1}
SIM = ("--engine", "simulated")


def test_results_kept_come_back_and_a_torn_last_line_is_cut_off_and_asked_again(tmp_path):
    with Spill.open(tmp_path, "part-00000.jsonl", HEADER) as spill:
        assert spill.kept == {}
        spill.append([(0, {"a": 1}), (2, {"a": 3})])
    path = tmp_path / spill_name("part-00000.jsonl")
    with open(path, "a") as f:
        f.write(json.dumps({"results": [[1, {"a": "torn"}]]}))  # whole JSON, but no newline: torn
    with Spill.open(tmp_path, "part-00000.jsonl", HEADER) as spill:
        assert spill.kept == {0: {"a": 1}, 2: {"a": 3}}
        spill.append([(1, {"a": 2})])  # starts on a line of its own: the torn bytes were cut off
    with Spill.open(tmp_path, "part-00000.jsonl", HEADER) as spill:
        assert spill.kept == {0: {"a": 1}, 1: {"a": 2}, 2: {"a": 3}}
        spill.remove()
    assert not path.exists()


def test_a_spill_names_the_jobs_of_the_tries_whose_results_it_keeps(tmp_path):
    """A part finished by a later job (a requeue, a rollover, a lost node) still names the job that made
    its first rows: each try's first line names its jobs, and only kept lines count."""
    with Spill.open(tmp_path, "part-00000.jsonl", HEADER, jobs=("7",)) as spill:
        assert spill.kept_jobs == ()
        spill.append([(0, {"a": 1})])
        spill.append([(1, {"a": 2})])  # once a try: one line per request stays one line per request
    path = tmp_path / spill_name("part-00000.jsonl")
    assert [("jobs" in json.loads(x)) for x in path.read_text().splitlines()[1:]] == [True, False]
    with Spill.open(tmp_path, "part-00000.jsonl", HEADER, jobs=("8",)) as spill:
        assert spill.kept_jobs == ("7",)
    with open(path, "a") as f:  # a try on job 9 whose only line was torn by the kill: it made nothing kept
        f.write(json.dumps({"results": [[2, {"a": 3}]], "jobs": ["9"]}))
    with Spill.open(tmp_path, "part-00000.jsonl", HEADER, jobs=("10",)) as spill:
        assert spill.kept_jobs == ("7",)
        spill.append([(2, {"a": 3})])
    with Spill.open(tmp_path, "part-00000.jsonl", HEADER) as spill:
        assert spill.kept_jobs == ("7", "10") and len(spill.kept) == 3
        assert [(t["job_ids"], t["results"]) for t in spill.kept_by] == [(["7"], 2), (["10"], 1)]
        spill.restart()  # generated again from nothing: no job made what it keeps
        assert spill.kept_jobs == () and spill.kept == {} and spill.kept_by == ()


def test_a_spill_names_the_invocation_and_replica_of_each_try_it_keeps_results_of(tmp_path):
    """A part finished by a later invocation of the run (a resume after kill -9) names the one that made
    its first rows, and how many: each try's first line names its maker, with or without Slurm jobs; a
    try that does not know its maker still starts a try of its own, so none is counted as another's."""
    first = {"invocation": "flow-a", "replica": 1}
    with Spill.open(tmp_path, "part-00000.jsonl", HEADER, by=first) as spill:
        spill.append([(0, {"a": 1}), (1, {"a": 2})])
        spill.append([(2, {"a": 3})])
    with Spill.open(tmp_path, "part-00000.jsonl", HEADER) as spill:  # a try that names no maker
        assert spill.kept_by == ({**first, "job_ids": [], "results": 3},)
        spill.append([(3, {"a": 4})])
    with Spill.open(tmp_path, "part-00000.jsonl", HEADER, jobs=("9",), by={"invocation": "flow-b", "replica": 0}) as spill:
        assert spill.kept_by == ({**first, "job_ids": [], "results": 3},
                                 {"invocation": None, "replica": None, "job_ids": [], "results": 1})
        spill.append([(4, {"a": 5})])
    with Spill.open(tmp_path, "part-00000.jsonl", HEADER) as spill:
        assert spill.kept_by[2] == {"invocation": "flow-b", "replica": 0, "job_ids": ["9"], "results": 1}
        assert sum(t["results"] for t in spill.kept_by) == len(spill.kept) == 5


def test_appends_are_synced_at_most_once_a_second_and_a_kill_loses_none(tmp_path, monkeypatch):
    """One fsync per request cost the openai-completions flow a sync per record; a line written and
    not yet synced is in the page cache, which a kill -9 of the process does not lose."""
    import os

    from infra.storage import spill as spill_module

    synced = []
    real = os.fsync
    monkeypatch.setattr(spill_module.os, "fsync", lambda fd: synced.append(fd) or real(fd))
    monkeypatch.setattr(spill_module.time, "monotonic", lambda: 100.0)  # no second passes between appends
    spill = Spill.open(tmp_path, "part-00000.jsonl", HEADER)
    for i in range(200):
        spill.append([(i, {"a": i})])
    assert len(synced) == 1  # the header's, when the spill starts
    with Spill.open(tmp_path, "part-00000.jsonl", HEADER) as other:  # the next try, as after a kill -9: no close ran
        assert other.kept == {}  # still held by the first writer: read by no one
    os.close(spill._fd)  # the writer dies (its flock goes with its descriptor) without closing its spill
    with Spill.open(tmp_path, "part-00000.jsonl", HEADER) as again:
        assert again.kept == {i: {"a": i} for i in range(200)}
    with Spill.open(tmp_path, "part-00001.jsonl", HEADER) as later:
        later.append([(0, {"a": 0})])
        assert len(synced) == 2  # its header's
        monkeypatch.setattr(spill_module.time, "monotonic", lambda: 101.5)  # a second on: the next append syncs
        later.append([(1, {"a": 1})])
        assert len(synced) == 3
        later.append([(2, {"a": 2})])
    assert len(synced) == 4  # a try that ends leaves its last lines synced


def test_the_lease_is_checked_before_the_first_append_and_then_once_a_second(tmp_path, monkeypatch):
    """A lease check per request read the lease object every time (a tenth of nemo-generate's
    per-request cost on a fast server); a run that lost its lease still stops keeping results within
    a second, and the first append of a try is always checked."""
    from infra.errors import LeaseLost
    from infra.storage import spill as spill_module

    now, checks, lost = [100.0], [], []

    def fence() -> None:
        checks.append(now[0])
        if lost:
            raise LeaseLost("taken over")

    monkeypatch.setattr(spill_module.time, "monotonic", lambda: now[0])
    with Spill.open(tmp_path, "part-00000.jsonl", HEADER, fence) as spill:
        for i in range(50):
            spill.append([(i, {"a": i})])
        assert checks == [100.0]  # the first append only: no second passed
        lost.append(True)
        now[0] = 100.5
        spill.append([(50, {"a": 50})])  # within the second: kept, unchecked
        now[0] = 101.0
        with pytest.raises(LeaseLost):
            spill.append([(51, {"a": 51})])
        assert checks == [100.0, 101.0]
    with Spill.open(tmp_path, "part-00000.jsonl", HEADER) as again:
        assert sorted(again.kept) == list(range(51))  # the lost try's lines stop at the check


def test_a_spill_of_another_config_or_part_is_discarded_whole(tmp_path):
    with Spill.open(tmp_path, "part-00000.jsonl", HEADER) as spill:
        spill.append([(0, {"a": 1})])
    for other in ({**HEADER, "config_hash": "def"}, {**HEADER, "part": "s3://b/other/r/part-00000.jsonl"},
                  {**HEADER, "records": 4}):
        with Spill.open(tmp_path, "part-00000.jsonl", other) as spill:
            assert spill.kept == {}
    (tmp_path / spill_name("part-00000.jsonl")).write_text("garbage\n" + json.dumps({"results": [[0, {}]]}) + "\n")
    with Spill.open(tmp_path, "part-00000.jsonl", HEADER) as spill:
        assert spill.kept == {}
    assert (tmp_path / spill_name("part-00000.jsonl")).read_text() == json.dumps(HEADER) + "\n"


def test_a_spill_held_by_another_writer_is_neither_read_nor_written_nor_discarded(tmp_path):
    with Spill.open(tmp_path, "part-00000.jsonl", HEADER) as first:
        first.append([(0, {"a": 1})])
        # Another process (a second writer) finds it held: it keeps no spill and touches nothing.
        probe = ("import sys; from pathlib import Path; from infra.storage.spill import Spill, discard_spills\n"
                 f"s = Spill.open(Path({str(tmp_path)!r}), 'part-00000.jsonl', {HEADER!r})\n"
                 "s.append([(1, {'a': 2})]); s.remove(); discard_spills(Path(" + repr(str(tmp_path)) + "))\n"
                 "print(len(s.kept))")
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and out.stdout.strip() == "0", out.stderr
        first.append([(2, {"a": 3})])
    with Spill.open(tmp_path, "part-00000.jsonl", HEADER) as spill:
        assert spill.kept == {0: {"a": 1}, 2: {"a": 3}}
    discard_spills(tmp_path)
    assert not list(tmp_path.iterdir())


def test_a_spill_that_cannot_be_written_stops_keeping_and_the_shard_goes_on(tmp_path):
    # A file size limit stands in for a full disk: the write past it fails (EFBIG), mid-line.
    probe = ("import resource, signal; from pathlib import Path; from infra.storage.spill import Spill\n"
             "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); resource.setrlimit(resource.RLIMIT_FSIZE, (400, 400))\n"
             f"s = Spill.open(Path({str(tmp_path)!r}), 'part-00000.jsonl', {HEADER!r})\n"
             "s.append([(0, {'a': 1})]); s.append([(1, {'a': 'x' * 1000})]); s.append([(2, {'a': 3})]); s.close()")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "cannot keep a request's results" in out.stderr, out.stderr
    with Spill.open(tmp_path, "part-00000.jsonl", HEADER) as spill:
        assert spill.kept == {0: {"a": 1}}  # what was cut off is a torn tail: asked again


@pytest.mark.parametrize("result", [
    GeneratedText("p", Completion("text ü", "heuristic", "end_string", 3), 7, "words", 9),
    GeneratedText("p", Completion("", "exact", "length", 0), 0),
    ValidationRejected("prompt too long", status=200, body="prompt too long"),
    BadRequest("bad", status=400, body={"error": {"message": "bad"}}),
    ReplyMismatch("swapped", status=None, body=None),
    RequestRejected("odd", status=500, body=object()),
])
def test_a_result_comes_back_from_its_spilled_json_as_the_reject_and_row_read_it(result):
    back = result_from_json(json.loads(json.dumps(result_to_json(result))))
    if isinstance(result, GeneratedText):
        assert back == result
    else:
        assert type(back) is type(result) and str(back) == str(result) and back.status == result.status
        assert str(back.body) == str(result.body)


def test_an_unknown_reject_kind_comes_back_as_a_plain_rejection():
    back = result_from_json({"rejected": "ServerError", "message": "m", "status": 1, "body": None})
    assert type(back) is RequestRejected and not isinstance(back, ValidationRejected)
    assert issubclass(RequestRejected, ServerError)


def make_client(api: str, url: str):
    return NemoClient(url) if api == "nemo" else OpenAIClient(url, model="nemotron-4-340b-base", max_in_flight=1)


def requests_answered(log_path, api: str) -> int:
    text = log_path.read_text()
    return text.count("tokens generated, seed") if api == "nemo" else text.count('"POST /v1/completions')


# Runs of one id in one bucket: no prefix, plain ones, ones that differ only in a character the
# directory name cannot hold, a '..' inside a component, look-alike text, one of 1,000 bytes.
PREFIXES = ["", "out", "out/x", "out_x", "out x", "out/stages", "night/r/stages", "a..b/c", "ü/ß", "x" * 1000,
            "x" * 1000 + "y"]


def test_runs_of_one_id_under_other_prefixes_of_one_bucket_have_their_own_staging_directory(tmp_path):
    """Every pipeline's stage `answers` is run id `answers` under its own prefix: sharing one staging
    directory, two pipelines in one bucket would share the stage's spill (the lock keeps it exact,
    but the second gets none)."""
    staging = tmp_path / "staging"
    dirs = [S3OutputStore(object(), "bkt", prefix, "answers", S3Settings(), staging).staging_dir()
            for prefix in PREFIXES]
    assert len(set(dirs)) == len(PREFIXES)
    for path in dirs:
        assert path.resolve().is_relative_to((staging / "bkt").resolve()) and path.name == "answers" and path.is_dir()
        named = path.relative_to(staging / "bkt").parts
        assert len(named) <= 2 and all(len(part.encode()) <= 255 and part[0] not in "./" for part in named)
    # A prefix's directory is never taken for a run's (no run id starts with '_').
    assert [p.parent.name[0] for p in dirs[1:]] == ["_"] * (len(PREFIXES) - 1) and dirs[0].parent.name == "bkt"


def stores(request, tmp_path, output: str):
    """(clean, cut): a local run directory each, or an S3 prefix each on moto (the spill then in
    the local staging directory)."""
    if output == "local":
        return LocalOutputStore(tmp_path / "clean"), LocalOutputStore(tmp_path / "cut")
    bucket, settings = request.getfixturevalue("s3_bucket"), request.getfixturevalue("s3_settings")
    return tuple(open_output_store(f"s3://{bucket}/{name}", "r", settings.s3, settings.work_path("staging"))
                 for name in ("clean", "cut"))


@pytest.mark.parametrize("api,output", [("nemo", "local"), ("openai", "local"), ("nemo", "s3")])
def test_a_shard_cut_by_a_lost_server_asks_only_for_what_its_spill_lacks_and_publishes_the_same_part(
        request, tmp_path, api, output):
    shard = Shard(0, [Record(f"q{i}", f"Write about topic number {i:02d}:", i + 1) for i in range(12)])
    job = ShardJob("r", "m", "chash", SamplingParams(tokens_to_generate=8, temperature=0.8, top_k=50, random_seed=5),
                   batch_size=4, samples=2)
    requests_total = 3 * 2 if api == "nemo" else 12  # NeMo: 3 batches x 2 samples; OpenAI: a prompt, its samples as n
    clean, cut = stores(request, tmp_path, output)
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
    with running_server(tmp_path / "a", *SIM) as (url, _):
        run_shard(make_client(api, url), shard, job, clean)
    with running_server(tmp_path / "b", *SIM, "--fault-crash-after", "3") as (url, _):
        with pytest.raises(ServerError):  # the server died on its 4th request
            run_shard(make_client(api, url), shard, replace(job, job_ids=("101",), invocation="flow-a", replica=0), cut)
    spill = cut.staging_dir() / spill_name(shard.name)
    kept_requests = len(spill.read_text().splitlines()) - 1
    kept_results = sum(len(json.loads(x)["results"]) for x in spill.read_text().splitlines()[1:])
    assert kept_requests == 3 and cut.read_bytes(shard.name) is None
    with running_server(tmp_path / "c", *SIM) as (url, _):
        run_shard(make_client(api, url), shard, replace(job, job_ids=("102",), invocation="flow-b", replica=1), cut)
    # The part names both jobs that made its rows, the one cut off first, and the try (invocation, replica) whose rows it kept.
    state = json.loads(cut.read_bytes(state_name(shard.name)))
    assert state["job_ids"] == ["101", "102"] and state["invocation"] == "flow-b"
    assert state["kept_from"] == [{"invocation": "flow-a", "replica": 0, "job_ids": ["101"], "results": kept_results}]
    assert requests_answered(tmp_path / "c" / "server.log", api) == requests_total - kept_requests
    assert cut.read_bytes(shard.name) == clean.read_bytes(shard.name) is not None
    assert cut.sha256(shard.name) == json.loads(cut.read_bytes(state_name(shard.name)))["sha256"]
    assert not spill.exists()
