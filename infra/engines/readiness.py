"""Is the server ready? One step of the readiness wait, per engine kind (infra.engines.Readiness).

Connection refused always means "still loading". Then:
- `nemo-probe`: a 1-token PUT /generate (NeMo 24.05 has no health route; its port answers 404 on `/`);
- `health` (vLLM, trtllm-serve): GET /health 200, then the served model listed by GET /v1/models,
  then a 1-token completion (vLLM's HTTP side can answer while its engine is still starting or dead);
- `probe` (NeMo >= 2.1): the 1-token completion alone: it has neither /health nor /v1/models.

`step` answers None when ready, else what it saw (for the wait's last-seen line); a server that
will not become ready by waiting (it refused the probe, it serves another model) raises
ServerNotReady. The loop, its single deadline and the dead-job watch are backends/ready.py's wait_until_ready's.
"""

from __future__ import annotations

import requests

from infra.errors import RequestRejected, ServerNotReady


def step(client, kind: str, probe_timeout: float, context: str = "") -> str | None:
    """`context` ends a ServerNotReady message (which replica, its state)."""
    url = client.base_url
    if kind == "health":
        try:
            health = client.get("/health", probe_timeout)
        except requests.RequestException:
            return f"{url} refuses connections (model still loading)"
        if health.status_code != 200:
            return f"{url}/health answered HTTP {health.status_code} (engine not up yet)"
        try:
            models = client.get("/v1/models", probe_timeout)
            listed = [m.get("id") for m in models.json().get("data", []) if isinstance(m, dict)]
        except (requests.RequestException, ValueError, AttributeError):
            return f"{url}/v1/models gave no model list yet"
        if not listed:
            return f"{url}/v1/models lists no model yet"
        if client.model not in listed:
            raise ServerNotReady(f"The server at {url} serves {listed}, not {client.model!r}: requests for it would "
                                 f"be refused. Set NSDG_MODEL__NAME to the served name (vllm serves it as --served-model-name; trtllm-serve lists the model directory's basename). {context}".rstrip())
    elif not client.port_open():
        return f"{url} refuses connections (model still loading)"
    try:
        answered = client.ready(timeout=probe_timeout)
    except RequestRejected as exc:  # an HTTP 4xx/500 or a validation reply to "Hello": waiting will not fix it
        raise ServerNotReady(f"The server at {url} refused the 1-token readiness probe: {exc} {context}".rstrip()) from exc
    return None if answered else f"{url} listens but a 1-token generation did not answer"
