"""The NeMo-compatible local server, as a real subprocess, against the 24.05 `/generate` contract.

Every server here is `python -m infra.local_server serve-local ...` on a free port; nothing
is mocked. The simulated engine (zero cost) covers the HTTP contract; the transformers engine
runs on a tiny random-weight model built offline into a temp dir. The tests that describe the
contract (routes, validation, status codes, the reply's shape and echo) take `contract_server`
or `tiny`, and run against NeMo's own server code too (tests/nemo_reference.py); the rest
(engine semantics, lock, startup, ranks, faults) are this server's own.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from infra.deadline import Deadline, poll_until
from tests.fixtures_nemo import ContractServer
from tests.localserver import running_nemo_reference
from tests.ports import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = (2, 30)  # (connect, read) for every request in this file
START_TIMEOUT_S = 60.0  # the transformers engine imports torch: seconds on 2 cores


class ServerProcess:
    """One `serve-local` subprocess, its stderr in a file, stopped with a signal."""

    def __init__(self, workdir: Path, *args: str, port: int = 0, env: dict[str, str] | None = None):
        workdir.mkdir(parents=True, exist_ok=True)
        self.port_file = workdir / "port"
        self.stderr_path = workdir / "stderr.log"
        argv = [sys.executable, "-m", "infra.local_server", "serve-local",
                "--port", str(port), "--port-file", str(self.port_file), *args]
        child_env = {**os.environ, "PYTHONPATH": str(ROOT)}
        child_env.pop("SLURM_PROCID", None)  # tests may themselves run inside a Slurm job
        child_env.update(env or {})
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(argv, cwd=ROOT, env=child_env, stdout=subprocess.DEVNULL, stderr=err)
        self.port: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_listening(self, timeout: float = START_TIMEOUT_S) -> "ServerProcess":
        def port_written() -> int | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.stderr()[-3000:]}")
            text = self.port_file.read_text() if self.port_file.exists() else ""
            return int(text) if text.strip() else None

        self.port = poll_until(port_written, deadline=Deadline(timeout), interval=0.05,
                               what="the local server's port file", describe_last=lambda: self.stderr()[-500:])
        return self

    def put(self, body: object, **kwargs) -> requests.Response:
        return requests.put(f"{self.url}/generate", json=body, timeout=kwargs.pop("timeout", TIMEOUT), **kwargs)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
            raise AssertionError(f"server ignored {signal.Signals(sig).name} for {timeout} s:\n{self.stderr()[-2000:]}")


@pytest.fixture
def start_server(tmp_path):
    """Start servers for one test; any still running at the end are killed."""
    started: list[ServerProcess] = []

    def start(*args: str, port: int = 0, env: dict[str, str] | None = None) -> ServerProcess:
        server = ServerProcess(tmp_path / f"server{len(started)}", *args, port=port, env=env)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(timeout=5)


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    server = ServerProcess(tmp_path_factory.mktemp("sim"), "--engine", "simulated").wait_listening()
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def sim_finishing(tmp_path_factory):
    """Every row emits its end string early (--sim-finish-fraction 1)."""
    workdir = tmp_path_factory.mktemp("sim-finishing")
    server = ServerProcess(workdir, "--engine", "simulated", "--sim-finish-fraction", "1").wait_listening()
    yield server
    assert server.stop() == 0


def port_refuses(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def rows(reply: dict) -> list[tuple[str, list[str], list[int], list[int]]]:
    return list(zip(reply["sentences"], reply["tokens"], reply["token_ids"], reply["offsets"]))


# --------------------------------------------------------------------------- routes and methods


# The contract tests take `contract_server` (tests/fixtures_nemo.py): each runs against this
# server and against NeMo's own text_generation_server.py on the same engine, and both must pass.
ALLOW_GENERATE = {"GET", "HEAD", "OPTIONS", "PUT"}  # the resource's PUT + Flask's static route
ALLOW_STATIC = {"GET", "HEAD", "OPTIONS"}


def allowed(resp: requests.Response) -> set[str]:
    # Werkzeug writes the methods from a set: their order is not fixed.
    return {m.strip() for m in resp.headers["Allow"].split(",")}


@pytest.mark.parametrize("method", ["POST", "DELETE", "PATCH"])
def test_generate_answers_405_to_other_methods(contract_server, method):
    resp = requests.request(method, contract_server.generate_url, json={"sentences": ["x"]}, timeout=TIMEOUT)
    assert resp.status_code == 405
    # flask_restful's JSON, or Flask's HTML when Werkzeug lists a static-route method first
    # (set order: it changes with PYTHONHASHSEED); see tests/test_nemo_reference.py.
    if resp.headers["Content-Type"] == "application/json":
        assert resp.json() == {"message": "The method is not allowed for the requested URL."}
    else:
        assert "<title>405 Method Not Allowed</title>" in resp.text
    assert allowed(resp) == ALLOW_GENERATE
    resp = requests.options(contract_server.generate_url, timeout=TIMEOUT)
    assert resp.status_code == 200 and allowed(resp) == ALLOW_GENERATE


@pytest.mark.parametrize("path", ["/", "/generate", "/health", "/generate/", "/v1/completions"])
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_get_answers_flask_html_404_on_every_path(contract_server, method, path):
    # Flask(static_url_path='') routes GET/HEAD on every path to a static folder that is not there.
    resp = requests.request(method, contract_server.url + path, timeout=TIMEOUT)
    assert resp.status_code == 404
    assert resp.headers["Content-Type"].startswith("text/html")
    assert method == "HEAD" or "<title>404 Not Found</title>" in resp.text


@pytest.mark.parametrize("method", ["PUT", "POST", "OPTIONS"])
def test_root_answers_flask_html_404(contract_server, method):
    resp = requests.request(method, contract_server.url + "/", timeout=TIMEOUT)
    assert resp.status_code == 404
    assert resp.headers["Content-Type"].startswith("text/html")
    assert "<title>404 Not Found</title>" in resp.text


@pytest.mark.parametrize("path", ["/health", "/generate/", "/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("method", ["PUT", "POST"])
def test_other_paths_answer_html_405_from_the_static_route(contract_server, method, path):
    resp = requests.request(method, contract_server.url + path, json={"sentences": ["x"]}, timeout=TIMEOUT)
    assert resp.status_code == 405
    assert resp.headers["Content-Type"].startswith("text/html")
    assert "<title>405 Method Not Allowed</title>" in resp.text
    assert allowed(resp) == ALLOW_STATIC


def test_every_reply_closes_the_connection(contract_server):
    # Werkzeug >= 2.1 never keeps a connection alive.
    assert contract_server.put({"sentences": ["x"], "tokens_to_generate": 1}).headers["Connection"] == "close"
    assert requests.get(contract_server.url + "/", timeout=TIMEOUT).headers["Connection"] == "close"


def test_body_that_is_not_json_is_400_and_wrong_content_type_is_415(contract_server):
    url = contract_server.generate_url
    resp = requests.put(url, data=b"{not json", headers={"Content-Type": "application/json"}, timeout=TIMEOUT)
    assert resp.status_code == 400
    assert "message" in resp.json()
    resp = requests.put(url, data=json.dumps({"sentences": ["x"]}),
                        headers={"Content-Type": "text/plain"}, timeout=TIMEOUT)
    assert resp.status_code == 415


# --------------------------------------------------------------------------- validation


VALIDATION_CASES = [
    ({"task_ids": [0]}, "Input at 'sentences' must by a tuple of two tensors like:"
                        "                    (context_tokens_tensor, context_length_tensor) if task ids are given"),
    ({"tokens_to_generate": 0}, "tokens_to_generate must be an integer greater than 0"),
    ({"tokens_to_generate": 2.0}, "tokens_to_generate must be an integer greater than 0"),
    ({"all_probs": 1}, "all_probs must be a boolean value"),
    ({"temperature": 0}, "temperature must be a positive number less than or equal to 100.0"),
    ({"temperature": 100.5}, "temperature must be a positive number less than or equal to 100.0"),
    ({"temperature": True}, "temperature must be a positive number less than or equal to 100.0"),
    ({"temperature": "1"}, "temperature must be a positive number less than or equal to 100.0"),
    ({"add_BOS": "yes"}, "add_BOS must be a boolean value"),
    ({"greedy": 1}, "greedy must be a boolean value"),
    ({"top_k": -1}, "top_k must be a positive integer number"),
    ({"top_k": None}, "top_k must be a positive integer number"),
    ({"top_p": 1.5}, "top_p must be a positive number less than or equal to 1.0"),
    ({"top_p": -0.1}, "top_p must be a positive number less than or equal to 1.0"),
    ({"repetition_penalty": 0.9}, "repetition_penalty must be a positive number no less than 1.0"),
    ({"end_strings": "\n"}, "expect end_strings to be a list of strings"),
    ({"end_strings": ["ok", 1]}, "expect end_strings to be a list of strings"),
    ({"min_tokens_to_generate": -1}, "min_tokens_to_generate must be an integer no less than 0"),
    ({"neighbors": -1}, "num of neighbors must be an integer no less than 0"),
    ({"compute_logprob": "true"}, "compute_logprob must be a boolean value"),
    ({"random_seed": -1}, "random_seed must be a positive integer number or None"),
    ({"random_seed": 1.5}, "random_seed must be a positive integer number or None"),
]


@pytest.mark.parametrize("fields,message", VALIDATION_CASES, ids=[str(f) for f, _ in VALIDATION_CASES])
def test_validation_failure_is_http_200_with_a_json_string(contract_server, fields, message):
    resp = contract_server.put({"sentences": ["Hello"], **fields})
    assert resp.status_code == 200
    assert resp.json() == message


@pytest.mark.parametrize("fields,message", [
    ({"temperature": 0, "tokens_to_generate": 0}, "tokens_to_generate must be an integer greater than 0"),
    ({"temperature": 0, "all_probs": "x"}, "all_probs must be a boolean value"),
    ({"random_seed": -1, "top_p": 2}, "top_p must be a positive number less than or equal to 1.0"),
    ({"end_strings": 3, "repetition_penalty": 0}, "repetition_penalty must be a positive number no less than 1.0"),
])
def test_validation_runs_in_tgs_order(contract_server, fields, message):
    assert contract_server.put({"sentences": ["Hello"], **fields}).json() == message


def test_more_than_128_sentences_is_400_before_other_checks(contract_server):
    resp = contract_server.put({"sentences": ["x"] * 129, "temperature": 0})
    assert resp.status_code == 400
    assert resp.json() == "Maximum number of sentences is 128"
    resp = contract_server.put({"sentences": ["x"] * 128, "tokens_to_generate": 1})
    assert resp.status_code == 200
    assert len(resp.json()["sentences"]) == 128


@pytest.mark.parametrize("body", [
    {"tokens_to_generate": 4},  # missing sentences: KeyError
    ["Hello"],  # not an object
    {"sentences": []},  # NeMo's pad_batch: max([])
    {"sentences": ["ok", 3]},  # a non-string prompt
    {"sentences": None},
    {"sentences": ["ok"], "all_probs": True},  # all_probs without compute_logprob
], ids=["missing-sentences", "list-body", "empty", "non-string", "null", "all-probs-alone"])
def test_exceptions_are_500_internal_server_error(contract_server, body):
    resp = contract_server.put(body)
    assert resp.status_code == 500
    assert resp.json() == {"message": "Internal Server Error"}


def test_unknown_keys_are_ignored(contract_server):
    resp = contract_server.put({"sentences": ["Hello"], "tokens_to_generate": 2, "stream": True, "max_tokens": 9})
    assert resp.status_code == 200
    assert resp.json()["sentences"][0].startswith("Hello")


# --------------------------------------------------------------------------- the reply


def test_reply_echoes_prompt_with_nemo_fields(contract_server):
    prompts = ["Hello world", "  A prompt with leading spaces,\nnewlines and café!"]
    reply = contract_server.put({"sentences": prompts, "tokens_to_generate": 6}).json()
    assert set(reply) == {"sentences", "tokens", "token_ids", "offsets", "logprob"}
    assert reply["logprob"] is None
    widths = {len(ids) for ids in reply["token_ids"]}
    assert len(widths) == 1, "NeMo returns every row padded to the batch's final length"
    for prompt, (sentence, tokens, ids, offsets) in zip(prompts, rows(reply)):
        assert sentence.startswith(prompt) and len(sentence) > len(prompt)
        assert len(tokens) == len(ids) == len(offsets)
        assert offsets[0] == 0 and offsets == sorted(offsets)


def test_defaults_generate_64_tokens(contract_server):
    reply = contract_server.put({"sentences": ["Hello world"]}).json()  # 3 pseudo-tokens
    assert len(reply["token_ids"][0]) == 3 + 64


def test_short_rows_step_to_longest_prompt_plus_tokens_to_generate(sim):
    # NeMo's batch runs to max_prompt_len + tokens_to_generate: not a per-row cap.
    reply = sim.put({"sentences": ["Hi", "one two three"], "tokens_to_generate": 4}).json()
    short, long_ = reply["token_ids"]
    assert len(short) == len(long_) == 5 + 4
    assert 0 not in short, "the short row generated 8 tokens, no EOS fill"


def test_same_request_same_reply_and_seed_changes_it(sim):
    body = {"sentences": ["Tell me a story"], "tokens_to_generate": 12}
    first = sim.put(body).json()["sentences"]
    assert sim.put(body).json()["sentences"] == first
    assert sim.put({**body, "random_seed": 7}).json()["sentences"] != first


def test_string_sentences_become_one_prompt_per_character(contract_server):
    reply = contract_server.put({"sentences": "ab", "tokens_to_generate": 1}).json()
    assert [s[0] for s in reply["sentences"]] == ["a", "b"]


def test_logprob_and_full_logprob_shapes(contract_server):
    reply = contract_server.put({"sentences": ["Hello world"], "tokens_to_generate": 3, "compute_logprob": True}).json()
    assert len(reply["logprob"][0]) == len(reply["token_ids"][0]) - 1
    assert "full_logprob" not in reply
    reply = contract_server.put({"sentences": ["Hello"], "tokens_to_generate": 2, "compute_logprob": True,
                     "all_probs": True}).json()
    assert len(reply["full_logprob"][0]) == len(reply["token_ids"][0]) - 1


def test_text_end_string_stays_in_the_reply(sim_finishing):
    prompts = ["Question: why?", "Another, somewhat longer question: how and when?"]
    reply = sim_finishing.put({"sentences": prompts, "tokens_to_generate": 20,
                               "end_strings": ["<|endoftext|>", "###"]}).json()
    for prompt, sentence in zip(prompts, reply["sentences"]):
        assert sentence.startswith(prompt)
        assert sentence.endswith("###")
        assert sentence.count("###") == 1


def test_eos_ends_rows_and_fills_the_batch(sim_finishing):
    prompts = ["Hi", "A much longer prompt than the first one, with many words in it"]
    reply = sim_finishing.put({"sentences": prompts, "tokens_to_generate": 10}).json()
    for prompt, (sentence, tokens, ids, _) in zip(prompts, rows(reply)):
        assert sentence.startswith(prompt)
        assert "<|endoftext|>" not in sentence, "special tokens are dropped from the text"
        assert "<|endoftext|>" in tokens, "but the EOS token is in tokens/token_ids"
    assert len({len(ids) for ids in reply["token_ids"]}) == 1


# --------------------------------------------------------------------------- lock, startup, ranks


def test_requests_are_served_one_at_a_time(start_server, tmp_path):
    stats = tmp_path / "stats.jsonl"
    server = start_server("--engine", "simulated", "--extra-latency", "0.4", "--stats-file", str(stats),
                          env={"SLURM_PROCID": "0"}).wait_listening()
    bodies = [{"sentences": ["first"] * 3, "tokens_to_generate": 2}, {"sentences": ["second"], "tokens_to_generate": 2}]
    with ThreadPoolExecutor(2) as pool:
        replies = list(pool.map(server.put, bodies))
    assert [r.status_code for r in replies] == [200, 200]
    lines = [json.loads(line) for line in stats.read_text().splitlines()]
    assert len(lines) == 2
    first, second = sorted(lines, key=lambda s: s["start"])
    assert second["start"] >= first["end"], "the busy intervals must not overlap"
    assert all(s["end"] - s["start"] >= 0.4 for s in lines)
    assert sorted(s["batch"] for s in lines) == [1, 3]
    assert all(s["generated_tokens"] > 0 and s["prompt_tokens"] > 0 for s in lines)
    assert server.stop() == 0


def test_simulated_cost_model_sets_the_busy_time(start_server, tmp_path):
    stats = tmp_path / "stats.jsonl"
    server = start_server("--engine", "simulated", "--stats-file", str(stats), "--sim-prefill-s-per-token", "0.01",
                          "--sim-decode-step-s", "0.01", "--sim-decode-batch-slope", "0.5").wait_listening()
    reply = server.put({"sentences": ["one two three", "x"], "tokens_to_generate": 10}).json()
    assert [len(ids) for ids in reply["token_ids"]] == [15, 15]
    # prefill 0.01 x 5 (longest prompt) x 2 rows = 0.1 s; decode from the shortest prompt (1 token)
    # to 15: 14 steps x 0.01 x (1 + 0.5 x 2) = 0.28 s.
    (line,) = [json.loads(text) for text in stats.read_text().splitlines()]
    assert line["end"] - line["start"] >= 0.38
    assert (line["batch"], line["prompt_tokens"], line["generated_tokens"]) == (2, 6, 10 + 14)
    assert server.stop() == 0


def test_port_refuses_connections_until_the_engine_has_loaded(start_server):
    port = free_port()
    server = start_server("--engine", "simulated", "--load-delay", "2", port=port)
    poll_until(lambda: "simulating model load" in server.stderr() or None, deadline=Deadline(20), interval=0.05,
               what="the server to start loading")
    assert port_refuses(port)
    assert not server.port_file.exists()
    server.wait_listening()
    assert server.port == port
    assert not port_refuses(port)
    assert f"Running on http://127.0.0.1:{port}" in server.stderr()
    assert server.stop(signal.SIGINT) == 0


def test_sigterm_while_loading_exits_0(start_server):
    server = start_server("--engine", "simulated", "--load-delay", "30")
    poll_until(lambda: "simulating model load" in server.stderr() or None, deadline=Deadline(20), interval=0.05,
               what="the server to start loading")
    assert server.stop(timeout=5) == 0


def test_non_zero_slurm_rank_idles_without_loading_or_binding(start_server):
    port = free_port()
    # A model dir that does not exist: loading it would fail, so exit 0 proves nothing was loaded.
    server = start_server("--model-dir", "/nonexistent/model", port=port, env={"SLURM_PROCID": "3"})
    poll_until(lambda: "idling until SIGTERM" in server.stderr() or None, deadline=Deadline(20), interval=0.05,
               what="rank 3 to start idling")
    assert server.proc.poll() is None
    assert port_refuses(port)
    assert not server.port_file.exists()
    assert server.stop() == 0


def test_port_in_use_exits_non_zero(start_server):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = start_server("--engine", "simulated", port=taken.getsockname()[1])
        assert server.proc.wait(timeout=20) == 1
    assert "Address already in use" in server.stderr()


# --------------------------------------------------------------------------- faults


def test_fault_crash_after(start_server):
    server = start_server("--engine", "simulated", "--fault-crash-after", "1").wait_listening()
    assert server.put({"sentences": ["ok"], "tokens_to_generate": 1}).status_code == 200
    with pytest.raises(requests.ConnectionError):
        server.put({"sentences": ["ok"], "tokens_to_generate": 1})
    assert server.proc.wait(timeout=10) == 1


def test_fault_hang_after_holds_the_lock(start_server):
    server = start_server("--engine", "simulated", "--fault-hang-after", "1").wait_listening()
    assert server.put({"sentences": ["ok"], "tokens_to_generate": 1}).status_code == 200
    for _ in range(2):  # the hung request, then one queued behind it
        with pytest.raises(requests.ReadTimeout):
            server.put({"sentences": ["ok"], "tokens_to_generate": 1}, timeout=(2, 1))
    assert server.proc.poll() is None
    assert server.stop(timeout=5) == 0


def test_fault_500_and_reject_on_substring(start_server):
    server = start_server("--engine", "simulated", "--fault-500-on", "BOOM", "--fault-reject-on", "NOPE").wait_listening()
    resp = server.put({"sentences": ["fine", "this one goes BOOM"], "tokens_to_generate": 1})
    assert resp.status_code == 500
    assert resp.json() == {"message": "Internal Server Error"}
    resp = server.put({"sentences": ["NOPE"], "tokens_to_generate": 1})
    assert resp.status_code == 200 and isinstance(resp.json(), str)
    resp = server.put({"sentences": ["fine"], "tokens_to_generate": 1})
    assert resp.status_code == 200 and resp.json()["sentences"][0].startswith("fine")
    assert server.stop() == 0


# --------------------------------------------------------------------------- transformers engine


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("models") / "tiny"
    argv = [sys.executable, "-m", "infra.local_server", "make-tiny-model", str(target)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return target


@pytest.fixture(scope="module", params=["local", "nemo"])
def tiny(request, tiny_model_dir, tmp_path_factory):
    """The tiny model behind this server, and behind NeMo's own server code (tests/nemo_reference.py)."""
    workdir = tmp_path_factory.mktemp(f"tiny-{request.param}")
    model = ("--model-dir", str(tiny_model_dir), "--torch-threads", "1")
    if request.param == "nemo":
        with running_nemo_reference(workdir, "--engine", "transformers", *model) as (url, _):
            yield ContractServer("nemo", url)
        return
    server = ServerProcess(workdir, *model).wait_listening()
    yield server
    assert server.stop() == 0


def test_make_tiny_model_is_idempotent(tiny_model_dir):
    before = {p.name: p.stat().st_mtime_ns for p in tiny_model_dir.iterdir()}
    assert {"config.json", "tokenizer.json", "model.safetensors"} <= set(before)
    argv = [sys.executable, "-m", "infra.local_server", "make-tiny-model", str(tiny_model_dir)]
    assert subprocess.run(argv, cwd=ROOT, capture_output=True, timeout=60).returncode == 0
    assert {p.name: p.stat().st_mtime_ns for p in tiny_model_dir.iterdir()} == before


def test_tiny_model_echoes_prompts_exactly(tiny):
    prompts = ["Hello world!", "  two leading spaces", "The capital of France is", "naïve café, 日本\n\tend"]
    reply = tiny.put({"sentences": prompts, "tokens_to_generate": 5, "greedy": True}).json()
    for prompt, (sentence, tokens, ids, offsets) in zip(prompts, rows(reply)):
        assert sentence.startswith(prompt)
        assert len(tokens) == len(ids) == len(offsets)
    assert len({len(ids) for ids in reply["token_ids"]}) == 1


def test_tiny_model_greedy_is_deterministic_and_seed_reproduces_sampling(tiny):
    greedy = {"sentences": ["Once upon a time"], "tokens_to_generate": 8, "greedy": True}
    assert tiny.put(greedy).json()["sentences"] == tiny.put(greedy).json()["sentences"]
    sampled = {"sentences": ["Once upon a time"] * 2, "tokens_to_generate": 8, "random_seed": 42,
               "temperature": 1.0, "top_k": 50, "top_p": 0.95}
    assert tiny.put(sampled).json()["sentences"] == tiny.put(sampled).json()["sentences"]


def test_tiny_model_rows_stop_at_end_strings_eos_or_budget(tiny):
    ends = list("etaoinshr ")  # common characters: most rows stop early
    prompts = ["Question: why is the sky blue? Answer:", "Write a story", "1, 2, 3,"]
    tokens_to_generate = 12
    reply = tiny.put({"sentences": prompts, "tokens_to_generate": tokens_to_generate, "random_seed": 3,
                      "end_strings": ends, "compute_logprob": True}).json()
    prompt_lengths = [len(tiny.put({"sentences": [p], "tokens_to_generate": 1, "greedy": True}).json()["token_ids"][0]) - 1
                      for p in prompts]
    budget_end = max(prompt_lengths) + tokens_to_generate
    stopped_on_text = 0
    for prompt, n, (sentence, tokens, ids, _) in zip(prompts, prompt_lengths, rows(reply)):
        assert sentence.startswith(prompt)
        # Rows that stop early are filled with EOS up to the batch's width; keep the row's own tokens.
        own = tokens[n:tokens.index("<|endoftext|>", n) + 1] if "<|endoftext|>" in tokens[n:] else tokens[n:]
        if any(sentence.endswith(e) for e in ends):
            stopped_on_text += 1
        elif own and own[-1] != "<|endoftext|>":
            assert n + len(own) == budget_end, "a row that did not stop ran to the batch's budget"
    assert stopped_on_text >= 1
    assert len(reply["logprob"][0]) == len(reply["token_ids"][0]) - 1
