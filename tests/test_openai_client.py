"""The OpenAI `/v1/completions` client: its field mapping, against the local server's OpenAI side
(a real subprocess, vLLM's answers), readiness per engine kind, and a whole flow run over that API."""

from __future__ import annotations

import concurrent.futures
import json

import pytest
import requests

from infra.backends.local import LocalBackend
from infra.backends.ready import make_client, wait_until_ready
from infra.deadline import Deadline, poll_until
from infra.engines.openai import OpenAIClient, error_message, request_body, split_usage
from infra.engines.throttle import Backoff, InFlightLimit, retry_after_s
from infra.errors import (BadRequest, DeadlineExceeded, RequestRejected, ServerHung, ServerLost, ServerNotReady,
                          ServerThrottled, TransientServerError)
from infra.prompting.sampling import SamplingParams
from infra.settings import Profile, load_settings
from tests.localserver import running_server
from tests.ports import free_port

SIM = ("--engine", "simulated")
MODEL = "nemotron-4-340b-base"


@pytest.fixture(scope="module")
def oai(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("oai"), *SIM, "--sim-finish-fraction", "0.5") as (url, _):
        yield url


def client(url: str, **kw) -> OpenAIClient:
    return OpenAIClient(url, model=MODEL, read_timeout=kw.pop("read_timeout", 30), **kw)


# --- the request body ---------------------------------------------------------------------------


def test_body_always_sends_max_tokens_stop_and_seed():
    body = request_body(MODEL, "Hi", SamplingParams(tokens_to_generate=16, end_strings=["\n\n"], random_seed=7), n=3)
    assert body["max_tokens"] == 16 and body["stop"] == ["\n\n"] and body["seed"] == 7 and body["n"] == 3
    assert body["model"] == MODEL and body["prompt"] == "Hi" and "end_strings" not in body  # trtllm refuses unknown keys
    assert request_body(MODEL, "Hi", SamplingParams(random_seed=7), seed=99)["seed"] == 99  # the derived seed wins
    assert "seed" not in request_body(MODEL, "Hi", SamplingParams())


def test_body_greedy_top_p_top_k_and_nemo_end_strings():
    greedy = request_body(MODEL, "Hi", SamplingParams(greedy=True, top_k=5))
    assert greedy["temperature"] == 0.0 and greedy["top_p"] == 1.0 and "top_k" not in greedy
    sampled = request_body(MODEL, "Hi", SamplingParams(temperature=0.7, top_p=0.0, top_k=5, min_tokens_to_generate=2))
    assert sampled["temperature"] == 0.7 and sampled["top_p"] == 1.0 and sampled["top_k"] == 5 and sampled["min_tokens"] == 2
    assert request_body(MODEL, "Hi", SamplingParams(end_strings=["X"]), end_strings_field=True)["end_strings"] == ["X"]
    # BOS as add_BOS says, not the server's default (vLLM and trtllm add it unless told): audit S1.
    assert request_body(MODEL, "Hi", SamplingParams())["add_special_tokens"] is False
    assert request_body(MODEL, "Hi", SamplingParams(add_BOS=True))["add_special_tokens"] is True
    assert "add_special_tokens" not in request_body(MODEL, "Hi", SamplingParams(), end_strings_field=True)


def test_error_message_reads_both_vllm_shapes_and_trtllm():
    msg = "This model's maximum context length is 4096 tokens."
    assert error_message({"object": "error", "message": msg, "type": "BadRequestError", "code": 400}) == msg
    assert error_message({"error": {"message": msg, "type": "BadRequestError", "code": 400}}) == msg
    assert error_message({"error": msg}) == msg


def test_finish_reasons_map_to_the_output_ones():
    end = ["<|endoftext|>", "\n\n"]
    assert OpenAIClient._choice({"text": "a", "finish_reason": "stop"}, end).finish_reason == "end_string"
    assert OpenAIClient._choice({"text": "a", "finish_reason": "length"}, end).finish_reason == "length"
    assert OpenAIClient._choice({"text": "a", "finish_reason": "abort"}, end).finish_reason == "abort"
    # NeMo >= 2.1: always "", the end string left in the text: trimmed, and the reason inferred.
    nemo = OpenAIClient._choice({"text": "an answer\n\nmore", "finish_reason": ""}, end)
    assert (nemo.text, nemo.finish_reason) == ("an answer", "end_string")
    assert OpenAIClient._choice({"text": "an answer", "finish_reason": ""}, end).finish_reason == "length"


def test_usage_is_split_over_choices_and_sums_to_the_servers_total():
    assert split_usage(7, ["abc"], len) == [7]
    shares = split_usage(10, ["a", "abcd", "ab"], len)
    assert sum(shares) == 10 and shares[1] == max(shares)
    assert split_usage(None, ["abc", "a"], len) == [3, 1]


def test_a_sample_that_hit_the_cap_counts_exactly_max_tokens():
    """Issue 25's real vLLM run: n=2 with max_tokens 16 gave a row 17 tokens, the total shared by
    text length. A `length` finish is exactly max_tokens; the rest goes to the others, none above it."""
    assert split_usage(26, ["a long capped sample", "short one"], len, [True, False], 16) == [16, 10]
    assert split_usage(32, ["x" * 30, "y"], len, [True, True], 16) == [16, 16]
    assert split_usage(20, ["aaaa", "bbbbbbbbbbbb"], len, [False, False], 16) == [5, 15]
    assert max(split_usage(40, ["a", "b"], len, [False, False], 16)) <= 16  # a server over-counting: capped


def test_a_total_of_one_choice_is_not_shared_out_over_all():
    """llama-server answers n > 1 with one choice's usage (seen: n=3, each capped at 6, usage 6). A
    total below the capped choices' tokens plus one for each other cannot be a sum: the others are
    counted by their text (they had 0 before)."""
    assert split_usage(6, ["x" * 6, "abc"], len, [True, False], 6) == [6, 3]
    assert split_usage(6, ["x" * 6, "x" * 6, "x" * 6], len, [True, True, True], 6) == [6, 6, 6]
    assert split_usage(7, ["x" * 6, "abc"], len, [True, False], 6) == [6, 1]  # possible as a sum: kept


# --- against the local server's OpenAI side -----------------------------------------------------


def test_completion_maps_text_finish_reason_and_usage(oai):
    c = client(oai)
    sampling = SamplingParams(tokens_to_generate=12, end_strings=["."], random_seed=3)
    raw = c.complete_raw("Say something short", sampling, n=4, seed=3)
    gens = c.complete("Say something short", sampling, n=4, seed=3)
    assert [g.completion.text for g in gens] == [ch["text"] for ch in raw["choices"]]  # same seed, same text
    assert sum(g.generated_tokens for g in gens) == raw["usage"]["completion_tokens"]
    reasons = set()
    for prompt in [f"Say something short {i}" for i in range(8)]:
        raw = c.complete_raw(prompt, sampling, n=2)
        for g, ch in zip(c.complete(prompt, sampling, n=2), raw["choices"]):
            assert "." not in g.completion.text  # vLLM drops the stop string; so does /generate's path
            assert g.completion.finish_reason == {"stop": "end_string", "length": "length"}[ch["finish_reason"]]
            reasons.add(g.completion.finish_reason)
    assert reasons == {"end_string", "length"}
    ones = [c.complete(f"Say more {i}", SamplingParams(tokens_to_generate=5, end_strings=[]), n=1)[0] for i in range(6)]
    full = [g for g in ones if g.completion.finish_reason == "length"]
    assert full and all(g.generated_tokens == 5 and g.tokens_unit == "tokens" for g in full)  # usage, exact for n=1
    assert all(1 <= g.generated_tokens <= 5 for g in ones)  # the EOS it stopped on counts, as vLLM counts it


def test_bos_is_added_only_as_add_bos_says(tmp_path):
    """Audit S1: the stand-in adds BOS unless told, as vLLM and trtllm-serve do; the client's
    add_special_tokens (add_BOS) decides, so a prompt counts the same tokens as on the NeMo path."""
    with running_server(tmp_path, *SIM) as (url, _):
        def prompt_tokens(**extra) -> int:
            body = {"prompt": "Count these words", "max_tokens": 1, **extra}
            return requests.post(url + "/v1/completions", json=body, timeout=10).json()["usage"]["prompt_tokens"]

        default, without, with_bos = prompt_tokens(), prompt_tokens(add_special_tokens=False), prompt_tokens(add_special_tokens=True)
        assert default == with_bos == without + 1
        sent = request_body("nemotron-4-340b-base", "Count these words", SamplingParams(tokens_to_generate=1))
        sent.pop("model")
        assert prompt_tokens(**sent) == without  # add_BOS false (the recipes' default): no BOS
        assert requests.post(url + "/v1/completions", json={"prompt": "x", "add_special_tokens": "yes"},
                             timeout=10).status_code == 400


@pytest.mark.parametrize("shape", ["nested", "flat"])
def test_context_length_400_rejects_the_record_with_the_servers_message(tmp_path, shape):
    with running_server(tmp_path, *SIM, "--max-model-len", "64", "--openai-error-shape", shape) as (url, _):
        c = client(url, context_length=4096)  # the client's limit is larger: the server's 400 decides
        with pytest.raises(BadRequest) as exc:
            c.complete("word " * 40, SamplingParams(tokens_to_generate=32))
        assert exc.value.status == 400 and exc.value.body.startswith("This model's maximum context length is 64 tokens")
        body = requests.post(url + "/v1/completions", json={"prompt": "word " * 40, "max_tokens": 32}, timeout=10).json()
        assert ("error" in body) == (shape == "nested")  # the server really answered that shape


def test_5xx_and_refused_connections_are_transient_and_a_silent_server_is_hung(tmp_path):
    with running_server(tmp_path, *SIM, "--fault-500-on", "BOOM", "--fault-hang-after", "1") as (url, _):
        c = client(url, read_timeout=1.0)
        with pytest.raises(TransientServerError, match="HTTP 500"):
            c.complete("BOOM here", SamplingParams(tokens_to_generate=2))
        with pytest.raises(ServerHung, match="No reply"):
            c.complete("fine", SamplingParams(tokens_to_generate=2))
    with pytest.raises(TransientServerError, match="Could not reach"):
        client(f"http://127.0.0.1:{free_port()}").complete("Hi", SamplingParams(tokens_to_generate=2))


def test_wrong_model_is_rejected_not_retried(oai):
    with pytest.raises(RequestRejected, match="404.*does not exist") as exc:
        OpenAIClient(oai, model="other").complete("Hi", SamplingParams(tokens_to_generate=2))
    assert not isinstance(exc.value, TransientServerError)


# --- readiness per engine kind ------------------------------------------------------------------


def local_settings(monkeypatch, tmp_path, *extra: str, api: str | None = None):
    monkeypatch.setenv("NSDG_WORK_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("NSDG_LOCAL__ENGINE", "simulated")
    monkeypatch.setenv("NSDG_LOCAL__EXTRA_ARGS", json.dumps(list(extra)))
    if api:
        monkeypatch.setenv("NSDG_SERVER__API", api)
    return load_settings()


@pytest.mark.parametrize("engine", ["vllm", "nemo-openai"])
def test_readiness_waits_through_loading_and_returns_an_openai_client(monkeypatch, tmp_path, engine):
    settings = local_settings(monkeypatch, tmp_path, "--load-delay", "1.0")
    profile = Profile(backend="local", engine=engine)
    backend = LocalBackend(settings, "ready")
    backend.start()
    try:
        c = wait_until_ready(backend, settings, timeout=60, profile=profile)
        assert isinstance(c, OpenAIClient) and c.nemo_openai == (engine == "nemo-openai")
        assert c.max_in_flight == (2 if engine == "nemo-openai" else 256)  # NeMo >= 2.1 serves one at a time
        assert c.complete("Hello", SamplingParams(tokens_to_generate=3))[0].generated_tokens == 3
    finally:
        backend.release()


def test_health_readiness_refuses_a_server_that_serves_another_model(monkeypatch, tmp_path):
    settings = local_settings(monkeypatch, tmp_path)
    monkeypatch.setenv("NSDG_MODEL__NAME", "some-other-model")
    settings = load_settings()
    backend = LocalBackend(settings, "wrong-model", extra_args=["--served-model-name", "nemotron-4-340b-base"])
    backend.start()
    try:
        with pytest.raises(ServerNotReady, match=r"serves \['nemotron-4-340b-base'\], not 'some-other-model'"):
            wait_until_ready(backend, settings, timeout=60, profile=Profile(backend="local", engine="vllm"))
    finally:
        backend.release()


def test_health_readiness_on_a_nemo_only_server_times_out_with_what_it_saw(monkeypatch, tmp_path):
    settings = local_settings(monkeypatch, tmp_path, "--no-openai")
    backend = LocalBackend(settings, "nemo-only")
    backend.start()
    try:
        with pytest.raises(DeadlineExceeded, match="health answered HTTP 404"):
            wait_until_ready(backend, settings, timeout=4, profile=Profile(backend="local", engine="vllm"))
    finally:
        backend.release()


def test_make_client_picks_the_client_by_api(monkeypatch, tmp_path):
    settings = local_settings(monkeypatch, tmp_path)
    assert make_client(settings, "http://x", profile=Profile(backend="local")).api == "nemo-generate"
    assert make_client(settings, "http://x", profile=Profile(backend="local", engine="trtllm")).api == "openai-completions"
    overridden = local_settings(monkeypatch, tmp_path, api="openai-completions")
    assert make_client(overridden, "http://x", profile=Profile(backend="local")).api == "openai-completions"


# --- the whole flow over the OpenAI API ---------------------------------------------------------


@pytest.mark.integration
def test_flow_over_openai_api_publishes_every_record_once_with_samples_as_n(prefect_harness, workdir, monkeypatch):
    from flows.generate import generate

    monkeypatch.setenv("NSDG_LOCAL__ENGINE", "simulated")
    monkeypatch.setenv("NSDG_LOCAL__EXTRA_ARGS", json.dumps(["--max-model-len", "60", "--sim-finish-fraction", "0.5"]))
    monkeypatch.setenv("NSDG_EXTRA_PROFILES", json.dumps({"local-vllm": {"backend": "local", "engine": "vllm"}}))
    monkeypatch.setenv("NSDG_SERVER__MAX_IN_FLIGHT", "8")
    src = workdir / "in.jsonl"
    lines = [{"id": f"r{i}", "prompt": f"Prompt {i}: say something."} for i in range(9)]
    lines[4]["prompt"] = "long " * 50  # over the server's 60-token context with 12 to generate: its 400
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    generate(input_uri=str(src), output_uri=str(workdir / "out"), run_id="oai", profile="local-vllm",
             sampling=SamplingParams(tokens_to_generate=12, end_strings=["."], random_seed=5),
             recipe={"samples_per_prompt": 2}, shard_size=4)
    run = workdir / "out" / "oai"
    manifest = json.loads((run / "manifest.json").read_text())
    rows = [json.loads(x) for p in manifest["parts"] for x in (run / p["name"]).read_text().splitlines()]
    assert [(r["id"], r["sample"]) for r in rows] == [(f"r{i}", s) for i in range(9) if i != 4 for s in (0, 1)]
    assert all("." not in r["completion"] and r["generation"]["finish_reason"] in ("end_string", "length") for r in rows)
    assert sum(r["generation"]["generated_tokens"] for r in rows) == sum(p["generated_tokens"] for p in manifest["parts"]) > 0
    rejects = [json.loads(x) for f in run.glob("*reject*.jsonl") for x in f.read_text().splitlines()]
    assert {(r["id"], r["sample"]) for r in rejects} == {("r4", 0), ("r4", 1)}
    assert all(r["status"] == 400 and "maximum context length is 60" in r["reason"] for r in rejects)
    # A rerun with the same seed republishes nothing and the seeded samples are reproducible.
    again = workdir / "again"
    generate(input_uri=str(src), output_uri=str(again), run_id="oai", profile="local-vllm",
             sampling=SamplingParams(tokens_to_generate=12, end_strings=["."], random_seed=5),
             recipe={"samples_per_prompt": 2}, shard_size=4)
    rows2 = [json.loads(x) for p in manifest["parts"] for x in (again / "oai" / p["name"]).read_text().splitlines()]
    assert [r["completion"] for r in rows2] == [r["completion"] for r in rows]


def test_continuous_batching_engine_fills_fixed_slots_and_reports_occupancy(tmp_path):
    """The simulated engine with a cost model batches requests continuously: never more sequences
    than slots in a step, every generated token one busy slot-step, sequences overlapping."""
    with running_server(tmp_path, *SIM, "--sim-decode-step-s", "0.005", "--sim-slots", "4") as (url, _):
        c = client(url, max_in_flight=12)
        sampling = SamplingParams(tokens_to_generate=10, end_strings=[])
        futures = [c.submit(c.complete, f"Prompt {i}", sampling, n=2) for i in range(6)]
        tokens = sum(g.generated_tokens for f in futures for g in f.result())
        stats = requests.get(url + "/sim/stats", timeout=10).json()
    assert stats["sequences"] == 12 and stats["busy_slot_steps"] == stats["generated_tokens"] == tokens
    assert stats["busy_slot_steps"] <= stats["slots"] * stats["steps"]  # 4 slots, never more
    assert stats["steps"] < tokens  # sequences shared steps: one at a time would take one step per token
    assert 0 < stats["occupancy"] <= 1 and 0 < stats["occupancy_while_work_remains"] <= 1


def test_shard_tasks_per_replica_keep_the_request_pool_fed(monkeypatch, tmp_path):
    from flows.generate import shard_tasks_per_replica

    settings = local_settings(monkeypatch, tmp_path)
    nemo, vllm = Profile(backend="local"), Profile(backend="local", engine="vllm")
    # Two requests open (one computing, one queued; the client bounds them), and one shard task more waiting for a slot.
    assert shard_tasks_per_replica(settings, nemo, 4000, 1) == 3
    assert shard_tasks_per_replica(settings, vllm, 4000, 1) == 2  # one shard fills 256; one more for its tail
    assert shard_tasks_per_replica(settings, vllm, 100, 1) == 4  # 256 requests need 3 shards of 100, plus one
    assert shard_tasks_per_replica(settings, vllm, 10, 2) == 6  # capped: the flow's task runner has 8 threads


def test_the_real_model_serves_the_same_openai_endpoints(tmp_path, tiny_model_dir):
    with running_server(tmp_path, "--model-dir", str(tiny_model_dir), "--torch-threads", "1") as (url, _):
        assert requests.get(url + "/health", timeout=10).status_code == 200
        assert [m["id"] for m in requests.get(url + "/v1/models", timeout=10).json()["data"]] == [MODEL]
        raw = client(url).complete_raw("Hello there", SamplingParams(tokens_to_generate=4, greedy=True, end_strings=[]), n=2)
        assert len(raw["choices"]) == 2 and raw["usage"]["completion_tokens"] <= 8
        assert all(c["finish_reason"] in ("stop", "length") for c in raw["choices"])


def test_the_judge_speaks_the_openai_api_one_request_per_row(oai, monkeypatch):
    """The judge runs on the run's own client: over openai-completions, one request per row
    through the replica's pool (no `generate` batch call exists there), replies in row order."""
    from infra.prompting.prompt_format import RAW
    from infra.recipes.judge import load_judge
    from infra.recipes.params import JudgeParams

    monkeypatch.setenv("NSDG_MODEL__CONTEXT_LENGTH", "4096")
    judge = load_judge(JudgeParams(template="Rate this answer 1-5: {{ completion }}\nRating:", tokens_to_generate=4),
                       load_settings(), RAW)
    rows = [{"id": f"r{i}", "sample": 0, "prompt": "q", "completion": f"answer {i}"} for i in range(5)]
    c = client(oai, max_in_flight=3)
    try:
        judged = judge.judge_rows(c, rows, batch_size=2)
    finally:
        c.close()
    assert [j["id"] for j in judged] == [r["id"] for r in rows]
    assert all(isinstance(j.get("reply"), str) and "error" not in j for j in judged), judged


def completions_answered(log, status: int = 200) -> int:
    """POST /v1/completions the server answered with `status`, from its access log."""
    return sum(1 for line in log.read_text().splitlines() if f'"POST /v1/completions HTTP/1.1" {status}' in line)


def test_a_retired_replica_fails_the_requests_still_queued_in_its_pool_as_lost(tmp_path):
    """Releasing a replica closes its client's pool: what was queued behind the requests in
    flight is never sent to a server that is going away, and fails as ServerLost (the pool
    requeues its shard), not as a bare CancelledError, which failed the run (review 2, D7)."""
    import threading

    from flows.replica import Replica
    from flows.replicas import LOST, Pool
    from infra.backends.attach import AttachBackend
    from infra.settings import Settings

    def never(*_):
        raise AssertionError("no launch or shard expected")

    p = Pool(make_backend=never, start=never, submit=never, release=lambda backend: None,
             shards=iter(()), replicas=1, max_in_flight=1, restarts_allowed=0, keep_alive_s=3600.0)
    with running_server(tmp_path, *SIM) as (url, _):
        rep = Replica(0, AttachBackend(Settings(server={"url": url})))
        rep.client = c = client(url, max_in_flight=1)
        gate = threading.Event()
        busy = c.submit(gate.wait, 30)  # holds the pool's one worker
        queued = [c.submit(c.complete, "q", SamplingParams(tokens_to_generate=1)) for _ in range(3)]
        p._retire(rep, "test")
        gate.set()
        busy.result(timeout=30)
        for fut in queued:
            with pytest.raises(ServerLost, match="released before this request was sent") as exc:
                fut.result(timeout=30)
            assert isinstance(exc.value, LOST)
        with pytest.raises(ServerLost):  # a shard task that starts after the release sends nothing either
            c.submit(c.complete, "q", SamplingParams(tokens_to_generate=1))
    assert completions_answered(tmp_path / "server.log") == 0  # none was sent


def test_a_shard_whose_requests_wait_in_a_released_replicas_pool_is_lost_not_cancelled(oai):
    """The shape of review 2's D7: a shard's requests queue behind others in the replica's pool;
    the replica is released (its client closed): the shard raises ServerLost, which the pool
    requeues, never CancelledError."""
    import threading

    from infra.prompting.dataset import Record, Shard
    from infra.generation import ShardJob, generate_shard_results

    c = client(oai, max_in_flight=2)
    gate = threading.Event()
    held = [c.submit(gate.wait, 30) for _ in range(2)]  # both pool threads busy, as with hung requests
    shard = Shard(1, [Record(f"r{i}", f"Prompt {i}", i + 1) for i in range(5)])
    job = ShardJob("run", MODEL, "cfg", SamplingParams(tokens_to_generate=2), batch_size=5)
    with concurrent.futures.ThreadPoolExecutor(1) as one:
        waiting = one.submit(generate_shard_results, c, shard, job)
        poll_until(lambda: True if c._pool._work_queue.qsize() == 5 else None, deadline=Deadline(30), interval=0.01,
                   what="the shard's requests to queue")
        c.close()
        gate.set()
        with pytest.raises(ServerLost, match="released before this request was sent"):
            waiting.result(timeout=30)
    assert all(f.result(timeout=30) for f in held)


# --- back-pressure: 429/503 (review 2, D8) -------------------------------------------------------


FAST = Backoff(tries=10, wait_s=60.0, first_s=0.01, max_s=0.05)


def test_retry_after_is_read_as_seconds_or_a_date_and_honoured():
    assert retry_after_s("7") == 7.0 and retry_after_s(None) is None and retry_after_s("soon") is None
    assert retry_after_s("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0
    assert Backoff().delay(1, 12.0) == 12.0  # the server knows when it will have room
    waits = [Backoff(first_s=1.0, max_s=8.0).delay(a, None) for a in range(1, 7)]
    assert all(0.5 * min(8.0, 2 ** (a - 1)) <= w <= min(8.0, 2 ** (a - 1)) for a, w in zip(range(1, 7), waits))


def test_the_in_flight_limit_halves_once_per_round_and_grows_back():
    limit = InFlightLimit(8, "http://x")
    with limit.slot(5) as first, limit.slot(5) as second:
        assert first == second == 0
    limit.throttled(first, 429)
    limit.throttled(second, 429)  # sent before the cut: does not cut again
    assert limit.limit == 4
    with limit.slot(5) as third:
        limit.throttled(third, 503)
    assert limit.limit == 2
    for _ in range(2 + 3):  # a round of answers (the limit's count) grows it by one
        limit.answered()
    assert limit.limit == 4
    limit.close()
    with pytest.raises(ServerLost, match="released"), limit.slot(5):
        pass


def test_a_throttling_server_gets_each_request_again_with_fewer_in_flight(tmp_path):
    """Every 3rd request answered 503 or 429: each prompt is answered in the end, the throttled
    ones sent again alone (not their shard), and the replica keeps fewer requests in flight."""
    with running_server(tmp_path, *SIM, "--fault-throttle-every", "3") as (url, _):
        c = client(url, max_in_flight=8, backoff=FAST)
        sampling = SamplingParams(tokens_to_generate=3, end_strings=[])
        try:
            futures = [c.submit(c.complete, f"Prompt {i}", sampling, n=2) for i in range(30)]
            results = [f.result(timeout=60) for f in futures]
        finally:
            c.close()
    assert all(len(r) == 2 and r[0].prompt == f"Prompt {i}" for i, r in enumerate(results))
    log = tmp_path / "server.log"
    assert completions_answered(log) == 30  # no answered request was sent again (as its shard would be)
    assert completions_answered(log, 429) > 0 and completions_answered(log, 503) > 0
    assert c.limit.round >= 1 and c.limit.limit < 8


@pytest.mark.parametrize("backoff, seen", [
    (Backoff(tries=3, wait_s=60.0, first_s=0.01, max_s=0.05), "3 tries of one prompt .* with HTTP 503, 429, 503:"),
    (Backoff(tries=100, wait_s=0.3, first_s=0.2, max_s=0.2), "would pass its deadline"),
])
def test_a_server_that_only_throttles_stops_the_request_with_what_was_seen(tmp_path, backoff, seen):
    """Bounded by tries and by a deadline; the error says what was seen and what to do, and is
    neither transient (the shard retried whole) nor lost (a healthy server released)."""
    with running_server(tmp_path, *SIM, "--fault-throttle-every", "1") as (url, _):
        c = client(url, backoff=backoff)
        with pytest.raises(ServerThrottled, match=seen) as exc:
            c.complete("Hi", SamplingParams(tokens_to_generate=2))
    assert "busy (throttling), not lost" in str(exc.value) and "NSDG_SERVER__MAX_IN_FLIGHT" in str(exc.value)
    assert not isinstance(exc.value, (TransientServerError, ServerLost))
