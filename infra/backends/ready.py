"""A backend's server made usable: the client for the API it speaks, and the wait until it answers."""

from __future__ import annotations

from infra.backends import PROBE_TIMEOUT_S, Backend
from infra.deadline import Deadline, poll_until
from infra.engines import readiness, served_model
from infra.engines.nemo import NemoClient
from infra.engines.openai import OpenAIClient
from infra.engines.throttle import Backoff
from infra.errors import ServerNotReady
from infra.prompting.tokens import ByteEstimate, TokenCounter
from infra.settings import Profile, Settings


def make_client(settings: Settings, url: str, counter: TokenCounter = ByteEstimate(), profile: Profile | None = None):
    """The client for the API `settings.api(profile)` speaks (no profile: the default engine's).
    `counter` must be the one the plan counted with (the run's, RunConfig.counter), or the client
    could refuse what the plan accepted."""
    s = settings.server
    profile = profile or Profile(backend="attach")
    if settings.api(profile) == "openai-completions":
        return OpenAIClient(url, model=settings.served_name(profile), connect_timeout=s.connect_timeout_s,
                            read_timeout=s.read_timeout_s, context_length=settings.model.context_length,
                            count_tokens=counter.count, max_in_flight=settings.in_flight(profile),
                            nemo_openai=profile.engine == "nemo-openai", engine=settings.engine(profile).name,
                            backoff=Backoff(tries=s.throttle_tries, wait_s=s.throttle_wait_s))
    return NemoClient(url, connect_timeout=s.connect_timeout_s, read_timeout=s.read_timeout_s,
                      context_length=settings.model.context_length, count_tokens=counter.count,
                      echo=counter.round_trip, keep_first=counter.keep_first if counter.exact else None,
                      max_in_flight=settings.in_flight(profile))


def wait_until_ready(backend: Backend, settings: Settings, *, timeout: float | None = None,
                     counter: TokenCounter = ByteEstimate(), profile: Profile | None = None):
    """Poll the backend and the server in one loop under one deadline: a dead job/process ends
    the wait at once with its log tail; a listening server is judged ready the way its engine
    kind says (infra/engines/readiness.py), ending in one real 1-token generation."""
    deadline = Deadline(timeout if timeout is not None else backend.ready_timeout())
    kind = settings.engine(profile).readiness if profile is not None else "nemo-probe"
    if profile is not None and settings.server.api is not None and settings.server.api != settings.engine(profile).api:
        kind = "nemo-probe" if settings.server.api == "nemo-generate" else "probe"  # an override: the probe both APIs have
    seen = {"last": "nothing yet"}

    def check():
        if (reason := backend.dead_reason()) is not None:
            raise ServerNotReady(f"The {backend.name} server died before it was ready: {reason}")
        url = backend.url()
        if url is None:
            seen["last"] = "no server address yet"
            return None
        client = make_client(settings, url, counter, profile)
        not_yet = readiness.step(client, kind, max(1.0, deadline.cap(min(settings.server.read_timeout_s, PROBE_TIMEOUT_S))),
                                 f"This {backend.name} replica counts as never ready ({backend.status()}).")
        if not_yet is not None:
            seen["last"] = not_yet
            return None
        # What answers, as the server names it: the rows' model, checked against the run's (infra/engines/served_model.py).
        client.served = served_model.reported(client, max(1.0, deadline.cap(served_model.MODELS_TIMEOUT_S)))
        return client

    return poll_until(check, deadline=deadline, interval=settings.server.ready_poll_s,
                      what=f"the {backend.name} server to answer a 1-token generation",
                      describe_last=lambda: f"{seen['last']}; {backend.status()}")
