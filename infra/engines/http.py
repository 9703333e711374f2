"""What the two API clients (nemo.py, openai.py) share: one session with explicit connect and read
timeouts, one way to send a request and read a transport failure, and the 1-token readiness probe."""

from __future__ import annotations

from collections.abc import Callable

import requests
from requests.adapters import HTTPAdapter

from infra.engines.batch import OnRequest, OnResult, PromptBatch, Result
from infra.errors import ServerHung, ServerLost, ServerThrottled, TransientServerError
from infra.prompting.tokens import estimate_tokens


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

    def send(self, method: str, url: str, body: dict, *, read_timeout: float | None, what: str,
             hung: str) -> requests.Response:
        """One request; a transport failure becomes transient, no reply in the read timeout a hung server (`hung` says why)."""
        timeout = (self.connect_timeout, read_timeout if read_timeout is not None else self.read_timeout)
        try:
            return self.session.request(method, url, json=body, timeout=timeout)
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
