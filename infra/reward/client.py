"""The HTTP clients of a reward server, one per engine, each scoring a batch of conversations.

- `nemo-aligner`: NeMo-Aligner's reward server (`serve_reward_model.py`, nemo_aligner/algorithms/
  reward_server.py in nemo-aligner 0.7.0) is PyTriton, so it speaks Triton's KServe v2 HTTP API:
  readiness `GET /v2/models/{model}/ready`, inference `POST /v2/models/{model}/infer`. Its model
  (`reward_model` by default) takes `sentences` (BYTES, shape [-1], optional; or `tokens` and
  `sequence_lengths`, INT64) and gives `rewards` (FP32). The server declares `rewards` as shape [1],
  but a regression reward model that does not merge its attributes (Nemotron-4-340B-Reward: 9 values,
  HelpSteer2's five at indices 4-8) returns all of them per row: the reply is read as [rows, k].
  We send `sentences`: the server tokenizes them with the model's own tokenizer.
- `openai-reward`: an OpenAI-compatible reward endpoint (NVIDIA's hosted Nemotron-4-340B-Reward):
  `POST /v1/chat/completions` with the user and assistant turns; the attributes come back as
  `logprobs.content[i] = {token: <attribute>, logprob: <score>}` (and as `name:value` text).
- `vllm-pooling` / `vllm-classify`: a vLLM server run with `--runner pooling` (an HF reward model):
  `POST /pooling` (the last pooled vector of each input) or `POST /classify` (its `probs`).

Every client gives one reply per conversation, in order: `{"rewards": [floats]}` (what the model
returned, unnamed) or `{"attributes": {name: float}}` (already named). The reply is checkpointed as
it came (infra/reward/stage.py) and read into attributes later (infra/reward/scores.py), so a new
attribute map or threshold needs no server.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import Literal

import requests

from infra.deadline import Deadline
from infra.errors import BadRequest, ReplyMismatch, ServerFailure, ServerHung, ServerThrottled, TransientServerError

RewardEngine = Literal["nemo-aligner", "openai-reward", "vllm-pooling", "vllm-classify"]
REWARD_ENGINES: tuple[str, ...] = RewardEngine.__args__
DEFAULT_MODEL = {"nemo-aligner": "reward_model", "openai-reward": "nvidia/nemotron-4-340b-reward"}
# The readiness probe: one real score, as the generator's readiness is one real token.
PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
PROBE_TEXT = "<extra_id_0>System\n\n<extra_id_1>User\nHi\n<extra_id_1>Assistant\nHello\n<extra_id_2>"
_PAIR = re.compile(r"([A-Za-z_]+)\s*:\s*(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)")


class RewardClient:
    """One reward server. `score` sends one batch; `ready` answers None when ready, else what it saw."""

    engine: str = ""

    def __init__(self, base_url: str, *, model: str | None = None, connect_timeout: float = 5.0,
                 read_timeout: float = 600.0, session: requests.Session | None = None, throttle_tries: int = 10,
                 throttle_wait_s: float = 600.0):
        self.base_url = base_url.rstrip("/")
        self.model = model or DEFAULT_MODEL.get(self.engine, "")
        if session is None:
            session = requests.Session()
            session.trust_env = False  # a cluster-internal server: no proxy or .netrc lookups
        self.session = session
        self.timeout = (connect_timeout, read_timeout)
        # A busy server (429/503: a hosted endpoint's rate limit) is waited for, not replaced: its
        # Retry-After, else a doubling backoff, at most `throttle_tries` sends within `throttle_wait_s`.
        self.throttle_tries, self.throttle_wait_s = throttle_tries, throttle_wait_s

    def close(self) -> None:
        self.session.close()

    def score(self, texts: Sequence[str], messages: Sequence[list[dict]]) -> list[dict]:
        """One reply per conversation: `texts` in the reward model's format, `messages` the same turns
        as role/content (an endpoint that formats them itself takes these)."""
        raise NotImplementedError

    def ready(self, probe_timeout: float = 30.0) -> str | None:
        kept = self.timeout, self.throttle_tries
        self.timeout, self.throttle_tries = (self.timeout[0], probe_timeout), 1  # a probe waits less than a batch
        try:
            self.score([PROBE_TEXT], [PROBE])
        except (TransientServerError, ServerThrottled, ServerHung) as exc:
            return f"{self.base_url}: a 1-row score did not answer ({exc})"
        finally:
            self.timeout, self.throttle_tries = kept
        return None

    def post(self, path: str, body: dict, what: str) -> object:
        """One request, its JSON reply; a transport failure or 5xx is transient, a 4xx the request's fault."""
        url = f"{self.base_url}{path}"
        deadline = Deadline(self.throttle_wait_s)
        for attempt in range(1, self.throttle_tries + 1):
            reply = self._send(url, body, what)
            if reply.status_code not in (429, 503):
                break
            wait = _retry_after(reply.headers.get("Retry-After"), default=min(30.0, 0.5 * 2 ** attempt))
            if attempt == self.throttle_tries or wait > deadline.remaining():
                raise ServerThrottled(f"the reward server {url} was busy (HTTP {reply.status_code}) for {what} through "
                                      f"{attempt} tries in {deadline.elapsed():.0f} s; it is not lost: rerun later, or "
                                      "raise NSDG_SERVER__THROTTLE_TRIES / NSDG_SERVER__THROTTLE_WAIT_S")
            time.sleep(wait)
        return self._reply(url, reply, what)

    def _send(self, url: str, body: dict, what: str) -> requests.Response:
        try:
            return self.session.post(url, json=body, timeout=self.timeout)
        except requests.ConnectTimeout as exc:
            raise TransientServerError(f"connecting to the reward server {url} timed out after {self.timeout[0]:.0f} s") from exc
        except requests.Timeout as exc:
            raise ServerHung(f"no reply from the reward server {url} within {self.timeout[1]:.0f} s for {what}; "
                             "release and restart it") from exc
        except requests.RequestException as exc:
            raise TransientServerError(f"could not reach the reward server {url}: {type(exc).__name__}; check that "
                                       "its job is still running") from exc

    def _reply(self, url: str, reply: requests.Response, what: str) -> object:
        if reply.status_code >= 500:
            raise TransientServerError(f"the reward server {url} failed {what}: HTTP {reply.status_code}: {reply.text[:300]}")
        if reply.status_code != 200:
            raise BadRequest(f"the reward server {url} refused {what}: HTTP {reply.status_code}: {reply.text[:300]}; "
                             f"check the server's model name ({self.model!r}) and engine ({self.engine})")
        try:
            return reply.json()
        except ValueError as exc:
            raise ServerFailure(f"the reward server {url} answered {what} with no JSON: {reply.text[:200]!r}") from exc

    def mismatch(self, what: str, seen: object) -> ReplyMismatch:
        return ReplyMismatch(f"the reward server {self.base_url} ({self.engine}) answered {what}: {str(seen)[:300]}; "
                             "check the engine named for it in the pipeline file")


class KServeRewardClient(RewardClient):
    """NeMo-Aligner's PyTriton reward server over Triton's KServe v2 HTTP API."""

    engine = "nemo-aligner"

    def ready(self, probe_timeout: float = 30.0) -> str | None:
        url = f"{self.base_url}/v2/models/{self.model}/ready"
        try:
            got = self.session.get(url, timeout=(self.timeout[0], probe_timeout))
        except requests.RequestException:
            return f"{self.base_url} refuses connections (reward model still loading)"
        if got.status_code != 200:
            return f"{url} answered HTTP {got.status_code} (model {self.model!r} not ready, or not served there)"
        return super().ready(probe_timeout)

    def score(self, texts: Sequence[str], messages: Sequence[list[dict]]) -> list[dict]:
        body = {"inputs": [{"name": "sentences", "shape": [len(texts), 1], "datatype": "BYTES", "data": list(texts)}],
                "outputs": [{"name": "rewards"}]}
        what = f"a batch of {len(texts)} conversations"
        reply = self.post(f"/v2/models/{self.model}/infer", body, what)
        out = next((o for o in (reply.get("outputs") or []) if isinstance(o, dict) and o.get("name") == "rewards"), None) \
            if isinstance(reply, dict) else None
        if out is None:
            raise self.mismatch(f"{what} with no `rewards` output", reply)
        values = _flat(out.get("data"))
        if not values or len(values) % len(texts):
            raise self.mismatch(f"{what} with {len(values)} reward values (shape {out.get('shape')})", reply)
        k = len(values) // len(texts)
        return [{"rewards": values[i * k:(i + 1) * k]} for i in range(len(texts))]


class OpenAIRewardClient(RewardClient):
    """An OpenAI-compatible reward endpoint (NVIDIA's hosted reward model): one request per conversation."""

    engine = "openai-reward"

    def score(self, texts: Sequence[str], messages: Sequence[list[dict]]) -> list[dict]:
        out = []
        for turns in messages:
            reply = self.post("/v1/chat/completions", {"model": self.model, "messages": turns}, "a conversation")
            out.append({"attributes": self._attributes(reply)})
        return out

    def _attributes(self, reply: object) -> dict[str, float]:
        try:
            choice = reply["choices"][0]
        except (KeyError, IndexError, TypeError):
            raise self.mismatch("with no choices", reply) from None
        content = ((choice.get("logprobs") or {}).get("content")) or []
        got = {c["token"]: float(c["logprob"]) for c in content
               if isinstance(c, dict) and isinstance(c.get("token"), str) and isinstance(c.get("logprob"), (int, float))}
        if not got:  # the same scores as text: "helpfulness:3.1,correctness:3.2,..."
            got = {k: float(v) for k, v in _PAIR.findall(str((choice.get("message") or {}).get("content") or ""))}
        if not got:
            raise self.mismatch("with no attribute scores in logprobs or content", reply)
        return got


class VllmPoolingClient(RewardClient):
    """A vLLM pooling server: `/pooling` (the last pooled vector) or `/classify` (the class probabilities)."""

    engine = "vllm-pooling"
    route = "/pooling"

    def score(self, texts: Sequence[str], messages: Sequence[list[dict]]) -> list[dict]:
        what = f"a batch of {len(texts)} conversations"
        reply = self.post(self.route, {"model": self.model, "input": list(texts)}, what)
        data = reply.get("data") if isinstance(reply, dict) else None
        if not isinstance(data, list) or len(data) != len(texts):
            raise self.mismatch(f"{what} with {len(data) if isinstance(data, list) else 'no'} results", reply)
        out: list[dict] = [{} for _ in texts]
        for pos, item in enumerate(data):
            index = item.get("index", pos) if isinstance(item, dict) else pos
            vector = self._vector(item)
            if not isinstance(index, int) or not 0 <= index < len(texts) or not vector:
                raise self.mismatch(f"{what} with an unreadable result", item)
            out[index] = {"rewards": vector}
        return out

    def _vector(self, item: object) -> list[float]:
        data = item.get("data") if isinstance(item, dict) else None
        while isinstance(data, list) and data and isinstance(data[-1], list):  # per-token vectors: the last token's
            data = data[-1]
        return _flat(data)


class VllmClassifyClient(VllmPoolingClient):
    engine = "vllm-classify"
    route = "/classify"

    def _vector(self, item: object) -> list[float]:
        return _flat(item.get("probs") if isinstance(item, dict) else None)


CLIENTS: dict[str, type[RewardClient]] = {c.engine: c for c in (KServeRewardClient, OpenAIRewardClient, VllmPoolingClient,
                                                                  VllmClassifyClient)}


def reward_client(engine: str, url: str, model: str | None = None, **kwargs) -> RewardClient:
    return CLIENTS[engine](url, model=model, **kwargs)


def wait_reward_ready(client: RewardClient, timeout_s: float, poll_s: float = 0.5) -> RewardClient:
    """The client once its server answers a 1-row score; DeadlineExceeded naming the last thing seen."""
    from infra.deadline import poll_until

    seen: list[str] = ["nothing yet"]

    def check() -> RewardClient | None:
        why = client.ready(probe_timeout=min(30.0, timeout_s))
        if why is None:
            return client
        seen[0] = why
        return None

    return poll_until(check, deadline=Deadline(timeout_s), interval=poll_s,
                      what=f"the {client.engine} reward server at {client.base_url} to score a row",
                      describe_last=lambda: seen[0])


def _retry_after(value: str | None, default: float) -> float:
    try:
        return max(0.0, min(float(value), 300.0)) if value is not None else default
    except ValueError:  # an HTTP date: not worth parsing for a wait this short
        return default


def _flat(data: object) -> list[float]:
    """Numbers, nested or not, as one flat list (KServe v2 allows either); [] when any is not a number."""
    out: list[float] = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        elif isinstance(item, (int, float)) and not isinstance(item, bool):
            out.append(float(item))
        else:
            return []
    return out

