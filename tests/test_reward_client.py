"""The reward clients against a real PyTriton/Triton server with NeMo-Aligner's contract, and
against crafted replies for the adapters whose servers are not run here."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from infra.errors import BadRequest, ReplyMismatch, ServerThrottled, TransientServerError
from infra.reward.client import reward_client
from tests.reward_standin import rewards_of

pytestmark = pytest.mark.integration

TEXTS = ["<extra_id_0>System\n\n<extra_id_1>User\nHi\n<extra_id_1>Assistant\nHello [helpfulness=3.5]\n<extra_id_2>",
         "<extra_id_0>System\n\n<extra_id_1>User\nÜber?\n<extra_id_1>Assistant\nJa. 日本\n<extra_id_2>"]
MESSAGES = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]] * 2


def test_nemo_aligner_client_scores_through_a_real_triton_server(reward_server):
    client = reward_client("nemo-aligner", reward_server.url)
    assert client.ready() is None
    got = client.score(TEXTS, MESSAGES)
    assert [len(r["rewards"]) for r in got] == [9, 9]  # the 340B reward head: 9 values per row, not shape [1]
    for reply, text in zip(got, TEXTS):
        assert reply["rewards"] == pytest.approx(rewards_of(text), abs=1e-5)
    assert got[0]["rewards"][4] == 3.5
    assert reward_server.scored()[-2:] == TEXTS  # the bytes arrived as sent (UTF-8)


def test_nemo_aligner_client_names_a_wrong_model_and_a_lost_server(reward_server):
    wrong = reward_client("nemo-aligner", reward_server.url, model="reward")
    assert "not ready, or not served there" in wrong.ready()
    with pytest.raises(BadRequest, match="model name"):
        wrong.score(TEXTS, MESSAGES)
    reward_server.stop()
    client = reward_client("nemo-aligner", reward_server.url)
    assert "refuses connections" in client.ready()
    with pytest.raises(TransientServerError, match="could not reach the reward server"):
        client.score(TEXTS, MESSAGES)


class _Canned(BaseHTTPRequestHandler):
    replies: dict = {}

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.seen.append((self.path, body))
        reply = self.replies[self.path](body)
        status, reply = reply if isinstance(reply, tuple) else (200, reply)
        data = json.dumps(reply).encode()
        self.send_response(status)
        if status == 429:
            self.send_header("Retry-After", "0")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def canned():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Canned)
    server.seen = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_openai_reward_reads_the_hosted_models_logprobs_and_text(canned):
    names = ["helpfulness", "correctness", "coherence", "complexity", "verbosity"]
    _Canned.replies = {"/v1/chat/completions": lambda body: {"choices": [{
        "message": {"role": "assistant", "content": ",".join(f"{n}:{i}.5" for i, n in enumerate(names))},
        "logprobs": {"content": [{"token": n, "logprob": i + 0.25} for i, n in enumerate(names)]
                     if body["messages"][0]["content"] == "Hi" else None}}]}}
    url = f"http://127.0.0.1:{canned.server_address[1]}"
    got = reward_client("openai-reward", url).score(TEXTS, [MESSAGES[0], [{"role": "user", "content": "x"}]])
    assert got[0] == {"attributes": {n: i + 0.25 for i, n in enumerate(names)}}
    assert got[1] == {"attributes": {n: i + 0.5 for i, n in enumerate(names)}}  # no logprobs: the text
    assert canned.seen[0][1] == {"model": "nvidia/nemotron-4-340b-reward", "messages": MESSAGES[0]}


def test_vllm_pooling_and_classify_keep_the_input_order(canned):
    _Canned.replies = {
        "/pooling": lambda body: {"data": [{"index": i, "data": [[0.0], [float(len(t))]]}
                                           for i, t in reversed(list(enumerate(body["input"])))]},
        "/classify": lambda body: {"data": [{"index": i, "label": "x", "probs": [0.25, 0.75]} for i in range(len(body["input"]))]},
    }
    url = f"http://127.0.0.1:{canned.server_address[1]}"
    assert reward_client("vllm-pooling", url, model="rm").score(TEXTS, MESSAGES) == \
        [{"rewards": [float(len(t))]} for t in TEXTS]  # per-token vectors: the last token's
    assert reward_client("vllm-classify", url, model="rm").score(TEXTS, MESSAGES) == [{"rewards": [0.25, 0.75]}] * 2
    _Canned.replies["/pooling"] = lambda body: {"data": [{"index": 0, "data": ["x"]}]}
    with pytest.raises(ReplyMismatch, match="1 results"):
        reward_client("vllm-pooling", url, model="rm").score(TEXTS, MESSAGES)


def test_a_busy_endpoint_is_waited_for_not_replaced(canned):
    """429 with Retry-After: sent again, at most throttle_tries times; then ServerThrottled (busy, not lost)."""
    busy = {"left": 2}

    def pooling(body):
        if busy["left"]:
            busy["left"] -= 1
            return 429, {"error": "rate limited"}
        return {"data": [{"index": 0, "data": [1.5]}]}

    _Canned.replies = {"/pooling": pooling}
    url = f"http://127.0.0.1:{canned.server_address[1]}"
    assert reward_client("vllm-pooling", url, model="rm").score(TEXTS[:1], MESSAGES[:1]) == [{"rewards": [1.5]}]
    assert len(canned.seen) == 3
    busy["left"] = 5
    with pytest.raises(ServerThrottled, match="busy \\(HTTP 429\\) for a batch of 1 conversations through 2 tries"):
        reward_client("vllm-pooling", url, model="rm", throttle_tries=2).score(TEXTS[:1], MESSAGES[:1])
