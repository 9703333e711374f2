"""What the two API clients (nemo.py, openai.py) share: one session with explicit connect and read
timeouts, one way to send a request and read a transport failure, and the 1-token readiness probe."""

from __future__ import annotations

from collections.abc import Callable

import orjson
import requests
from requests.adapters import HTTPAdapter

from infra.engines.batch import OnRequest, OnResult, PromptBatch, Result
from infra.errors import ServerHung, ServerLost, ServerThrottled, TransientServerError
from infra.prompting.tokens import estimate_tokens


def reply_json(resp: requests.Response) -> object:
    """A reply's JSON body. orjson first: a NeMo /generate reply of 32 rows (~47 KB of sentences,
    tokens, offsets and log-probs) parses in ~0.25 ms against json's ~0.7, a CPU cost the flow pays
    per batch (issue 28's ceiling). json where orjson refuses what json takes (NaN or Infinity, which
    Python's own JSON writers emit for a log-prob; integers past 64 bits; a BOM), so every reply reads
    as before. ValueError when neither can read it."""
    try:
        return orjson.loads(resp.content)
    except orjson.JSONDecodeError:
        return resp.json()


class HttpClient:
    # The served model as GET /v1/models named it when the readiness wait ended (infra/engines/served_model.py).
    served: dict | None = None

    def __init__(
        self,
        base_url: str,
        *,
        session: requests.Session | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 1800.0,
        context_length: int = 4096,
        count_tokens: Callable[[str], int] = estimate_tokens,
        connections: int = 10,
    ):
        self.base_url = base_url.rstrip("/")
        if session is None:
            session = requests.Session()
            # The server is cluster-internal: skip requests' per-call proxy/.netrc lookups.
            session.trust_env = False
            # One pooled connection per request in flight, so none reconnects (NeMo closes every one anyway).
            adapter = HTTPAdapter(pool_connections=1, pool_maxsize=connections)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
        self.session = session
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.context_length = context_length
        self.count_tokens = count_tokens

    def prepare(self, method: str, url: str, body: dict) -> requests.PreparedRequest:
        """A request built, its JSON body encoded, before it waits for one of the replica's slots
        (infra/engines/throttle.py): a slot then covers only the connect, the send and the reply's
        read, so the server's next request goes out the moment one frees."""
        return self.session.prepare_request(requests.Request(method, url, json=body))

    def send(self, request: requests.PreparedRequest, *, read_timeout: float | None, what: str,
             hung: str) -> requests.Response:
        """One request; a transport failure becomes transient, no reply in the read timeout a hung server (`hung` says why)."""
        url = request.url
        timeout = (self.connect_timeout, read_timeout if read_timeout is not None else self.read_timeout)
        try:
            return self.session.send(request, timeout=timeout)
        except requests.ConnectTimeout as exc:
            raise TransientServerError(f"Connecting to {url} timed out after {timeout[0]:.0f} s.") from exc
        except requests.Timeout as exc:
            raise ServerHung(f"No reply from {url} within {timeout[1]:.0f} s for {what}: {hung}; release and restart it.") from exc
        except requests.ConnectionError as exc:
            raise TransientServerError(
                f"Could not reach {url}: {exc.__class__.__name__}. Check that the server job is still running.") from exc
        except requests.RequestException as exc:  # e.g. the reply cut off mid-body: the server died
            raise TransientServerError(f"The reply from {url} broke off: {exc.__class__.__name__}: {exc}. "
                                       "Check that the server job is still running.") from exc

    def ready(self, timeout: float | None = None) -> bool:
        """One real 1-token generation: proves the engine answers, not only the port. False when
        it gets no answer (not yet, or no longer) or only 429/503 (busy); a refused probe (an HTTP
        4xx/500, a validation reply) raises RequestRejected: that server will not become ready by waiting."""
        try:
            self.keep_alive(timeout)
        except (TransientServerError, ServerLost, ServerThrottled):
            return False
        return True

    def keep_alive(self, timeout: float | None = None) -> None:
        raise NotImplementedError

    def generate_batch(self, batch: PromptBatch, on_result: OnResult | None = None,
                       on_request: OnRequest | None = None) -> list[Result]:
        """A shard's (or a part's judging) prompts, sent the way this API is fed (infra/engines/batch.py),
        but for those in `batch.done`; `on_request` is told of each request's results once all are in."""
        raise NotImplementedError
