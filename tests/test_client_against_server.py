"""The client's handling of each row of the server contract, against the real local server and
NeMo's own server code."""

import re

import pytest

from infra.errors import BadRequest, ServerFailure, ServerHung, TransientServerError, ValidationRejected
from infra.engines.nemo import NemoClient
from infra.prompting.sampling import SamplingParams
from tests.localserver import running_server

pytestmark = pytest.mark.integration
SIM = ("--engine", "simulated")
GREEDY = SamplingParams(tokens_to_generate=8, greedy=True, end_strings=["<|endoftext|>"])


# Tests taking `contract_server` run against the local server and against NeMo's own
# text_generation_server.py (tests/fixtures_nemo.py); both must pass.


def test_generate_strips_prompt_and_end_string(contract_server):
    client = NemoClient(contract_server.url)
    assert client.port_open() and client.ready()
    out = client.generate(["Hello there", "Second prompt"], GREEDY)
    assert [o.prompt for o in out] == ["Hello there", "Second prompt"]
    for o in out:
        assert o.completion.prompt_match == "exact"
        assert o.completion.text and "<|endoftext|>" not in o.completion.text


@pytest.mark.parametrize("sampling", [
    SamplingParams(),
    GREEDY,
    SamplingParams(greedy=True, temperature=0, top_k=0, top_p=0.0, end_strings=["\n", "###"]),
    SamplingParams(temperature=100, top_k=50, top_p=1.0, random_seed=2**24 - 1, add_BOS=True,
                   min_tokens_to_generate=2, tokens_to_generate=3),
], ids=["defaults", "greedy", "greedy-t0-text-ends", "extremes"])
def test_request_fields_pass_nemo_validation(contract_server, sampling):
    # Whatever the client's own checks let through, the server must accept: a rejection would
    # be a batch lost at run time.
    resp = contract_server.put({"sentences": ["Hello"], **sampling.request_fields()})
    assert resp.status_code == 200 and isinstance(resp.json(), dict), resp.text


def test_validation_string_from_the_server_is_rejected(contract_server):
    client = NemoClient(contract_server.url)
    resp = contract_server.put({"sentences": ["x"], **GREEDY.request_fields(), "top_p": 2})
    with pytest.raises(ValidationRejected) as exc:
        client._parse(resp, 1)
    assert exc.value.status == 200 and exc.value.body == "top_p must be a positive number less than or equal to 1.0"


def test_missing_sentences_is_server_failure(contract_server):
    resp = contract_server.put(GREEDY.request_fields())
    with pytest.raises(ServerFailure) as exc:
        NemoClient(contract_server.url)._parse(resp, 1)
    assert exc.value.status == 500 and exc.value.body == {"message": "Internal Server Error"}


def test_400_above_128_is_bad_request(contract_server):
    resp = contract_server.put({"sentences": ["x"] * 129, **GREEDY.request_fields()})
    with pytest.raises(BadRequest) as exc:
        NemoClient(contract_server.url)._parse(resp, 129)
    assert exc.value.body == "Maximum number of sentences is 128"


# NeMo steps every row of a batch to its longest prompt + tokens_to_generate: a short prompt's row
# runs past tokens_to_generate. The client cuts each row to the cap (newcomer trial F2).
LONG = "The quick brown fox jumps over the lazy dog, and then it runs on through the field. " * 3


def test_every_row_is_cut_to_tokens_to_generate_without_a_tokenizer(contract_server):
    """No tokenizer on the client's side: the cut is on the server's own token offsets (the
    simulated engine generates " word", "." and "," tokens, so they can be counted here too)."""
    def tokens(text: str) -> int:
        return len(re.findall(r" \w+|[.,]", text))

    sampling = SamplingParams(tokens_to_generate=5, greedy=True, end_strings=["<|endoftext|>"])
    short, long_ = NemoClient(contract_server.url).generate(["Hi", LONG], sampling)
    raw = contract_server.put({"sentences": ["Hi", LONG], **sampling.request_fields()}).json()["sentences"][0]
    assert tokens(raw[len("Hi"):]) > 5  # the server ran the short row past the cap
    assert tokens(short.completion.text) == 5 and raw.startswith("Hi" + short.completion.text)
    assert (short.generated_tokens, short.completion.finish_reason) == (5, "length") and short.server_tokens > 5
    assert (long_.generated_tokens, long_.server_tokens) == (5, None)  # the longest prompt's row: at the cap, not cut


def test_generation_and_judge_replies_honour_tokens_to_generate_in_the_runs_tokens(tmp_path, tiny_model_dir):
    """The run's client (make_client, the tokenizer the plan counted with) on the real tiny model:
    every row and every judge reply is at most tokens_to_generate tokens of that tokenizer."""
    from infra.backends.ready import make_client
    from infra.prompting.prompt_format import RAW
    from infra.recipes.judge import load_judge
    from infra.recipes.params import JudgeParams
    from infra.settings import Settings
    from infra.prompting.tokens import token_counter

    settings = Settings(local={"model_dir": str(tiny_model_dir)})
    tokenizer = str(tiny_model_dir / "tokenizer.json")
    counter = token_counter(tokenizer)
    prompts = ["Hi", "Why is the sky blue?", "Question: Why is the sky blue? Answer:"]
    sampling = SamplingParams(tokens_to_generate=6, greedy=True, end_strings=["<|endoftext|>"])
    judge = load_judge(JudgeParams(template="Rate 1-5: {{ completion }}\nRating:", tokens_to_generate=3),
                       settings, RAW, counter=counter)
    rows = [{"id": f"r{i}", "sample": 0, "prompt": "q", "completion": c} for i, c in enumerate(["ok", *prompts])]
    with running_server(tmp_path, "--model-dir", str(tiny_model_dir)) as (url, _):
        client = make_client(settings, url, counter)
        gens = client.generate(prompts, sampling)
        judged = judge.judge_rows(client, rows, batch_size=4)
    assert all(counter.count(g.completion.text) <= g.generated_tokens <= 6 for g in gens)
    cut = [g for g in gens if g.server_tokens is not None]
    assert len(cut) == 2 and all(g.server_tokens > 6 and g.completion.finish_reason == "length" for g in cut)
    replies = [j["reply"] for j in judged]
    assert all(counter.count(r) <= 3 for r in replies), [(r, counter.count(r)) for r in replies]


# The local server's fault switches: NeMo's code has none.


def test_validation_string_is_rejected_not_retried(tmp_path):
    with running_server(tmp_path, *SIM, "--fault-reject-on", "POISON") as (url, _):
        with pytest.raises(ValidationRejected) as exc:
            NemoClient(url).generate(["fine", "POISON here"], GREEDY)
        assert exc.value.status == 200 and isinstance(exc.value.body, str)


def test_500_is_server_failure(tmp_path):
    with running_server(tmp_path, *SIM, "--fault-500-on", "BOOM") as (url, _):
        with pytest.raises(ServerFailure) as exc:
            NemoClient(url).generate(["BOOM"], GREEDY)
        assert exc.value.status == 500


def test_hung_server_is_lost_not_retried(tmp_path):
    with running_server(tmp_path, *SIM, "--fault-hang-after", "0") as (url, _):
        with pytest.raises(ServerHung, match="hung"):
            NemoClient(url, read_timeout=1.0).generate(["hi"], GREEDY)


def test_crashed_server_is_transient_and_port_closed(tmp_path):
    with running_server(tmp_path, *SIM, "--fault-crash-after", "0") as (url, proc):
        client = NemoClient(url, connect_timeout=1.0)
        with pytest.raises(TransientServerError):
            client.generate(["hi"], GREEDY)
        proc.wait(timeout=10)
        assert not client.port_open()


def test_the_replicas_requests_in_flight_are_bounded_whichever_shard_threads_send_them(tmp_path):
    """The flow runs one shard task more than `in_flight` (flows/generate.py shard_tasks_per_replica):
    the spare one waits for a slot, so at most `max_in_flight` requests are open at the server."""
    import concurrent.futures
    import threading

    client = NemoClient("http://unused", max_in_flight=2)
    open_now, most, lock = [0], [0], threading.Lock()
    send = client.send

    def counted(*a, **kw):  # the transport, counted around: the server is the real local one
        with lock:
            open_now[0] += 1
            most[0] = max(most[0], open_now[0])
        try:
            return send(*a, **kw)
        finally:
            with lock:
                open_now[0] -= 1

    client.send = counted
    with running_server(tmp_path, *SIM, "--extra-latency", "0.2") as (url, _):
        client.base_url = url
        with concurrent.futures.ThreadPoolExecutor(3) as shards:  # three shard tasks, one request each at a time
            replies = list(shards.map(lambda i: client.generate([f"Prompt {i}"], GREEDY), range(6)))
    assert [r[0].prompt for r in replies] == [f"Prompt {i}" for i in range(6)]
    assert most[0] == 2


def test_a_request_is_built_before_it_waits_for_a_slot(tmp_path):
    """Its JSON body is encoded while another request holds the slot, so when that one's reply is in,
    the server's next request goes out at once (issue 28's ceiling: the slot covers the send and the
    read only)."""
    import threading

    from infra.errors import ServerLost

    client = NemoClient("http://127.0.0.1:9", max_in_flight=1)
    built, prepare, lost = threading.Event(), client.prepare, []
    client.prepare = lambda *a: (built.set(), prepare(*a))[1]

    def waiting() -> None:
        try:
            client.generate(["Hello"], GREEDY)
        except ServerLost as exc:
            lost.append(exc)

    with client.limit.slot(60):  # the one slot is held by a request open elsewhere
        sender = threading.Thread(target=waiting)
        sender.start()
        assert built.wait(10), "the request was not built while it waited for the slot"
        client.close()
    sender.join(10)
    assert lost and not sender.is_alive()


def test_a_request_waiting_for_a_slot_of_a_released_replica_is_lost_not_sent(tmp_path):
    from infra.errors import ServerLost

    client = NemoClient("http://127.0.0.1:9", max_in_flight=1)
    with client.limit.slot(60):  # the one slot is held by a request open elsewhere
        client.close()  # the replica is released
        with pytest.raises(ServerLost, match="released"):
            client.generate(["Hello"], GREEDY)


def test_a_reply_reads_as_json_reads_it_where_orjson_refuses():
    """reply_json: orjson for speed, json where orjson refuses what json takes (a log-prob written as
    -Infinity or NaN by Python's JSON writer, an integer past 64 bits, a BOM), ValueError for neither."""
    import math

    import requests

    from infra.engines.http import reply_json

    def reply(body: bytes) -> requests.Response:
        resp = requests.Response()
        resp._content, resp.status_code, resp.encoding = body, 200, None
        return resp

    assert reply_json(reply(b'{"sentences": ["a\\u00e9"], "offsets": [[0, 1]]}')) == {"sentences": ["a\u00e9"], "offsets": [[0, 1]]}
    odd = reply_json(reply(b'{"logprob": [[-Infinity, NaN]], "big": 123456789012345678901234567890}'))
    assert odd["logprob"][0][0] == -math.inf and math.isnan(odd["logprob"][0][1]) and odd["big"] == 123456789012345678901234567890
    assert reply_json(reply('\ufeff{"a": 1}'.encode("utf-8"))) == {"a": 1}
    with pytest.raises(ValueError):
        reply_json(reply(b"<html>Bad Gateway</html>"))
