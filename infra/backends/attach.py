"""The `attach` backend: a server someone else runs (NSDG_SERVER__URL or NSDG_SERVER__URLS)."""

from __future__ import annotations

import time

from infra.backends.unscheduled import NoScheduledEnd
from infra.errors import ConfigError
from infra.settings import Settings


class AttachBackend(NoScheduledEnd):
    """A server someone else runs: nothing to allocate, nothing to stop. `replica` picks its URL.

    A replacement for a lost attached replica attaches to the same URL again and waits (under
    the readiness deadline) until it answers: its owner may restart it, and there is no other."""

    name = "attach"

    def __init__(self, settings: Settings, replica: int = 0):
        urls = attach_urls(settings)
        if not urls:
            raise ConfigError("The attach profile needs the server's URL: set NSDG_SERVER__URL=http://host:port "
                              "or NSDG_SERVER__URLS='[\"http://a:1424\", \"http://b:1424\"]'")
        if replica >= len(urls):
            raise ConfigError(f"replica {replica} has no URL: NSDG_SERVER__URLS lists {len(urls)}; ask for at most that many replicas")
        self._url = urls[replica]
        self.settings = settings
        self.job_ids: list[str] = []
        self._released = False

    def start(self) -> None:
        self._started_at = time.time()

    def url(self) -> str | None:
        return self._url

    def dead_reason(self) -> str | None:
        # Released = the run no longer uses it: a readiness wait still polling it ends.
        return f"the run detached from {self._url}" if self._released else None

    def release(self) -> None:
        self._released = True

    def ready_timeout(self) -> float:
        return self.settings.server.ready_timeout_s

    def status(self) -> str:
        return f"attached to {self._url}"


def attach_urls(settings: Settings) -> list[str]:
    return list(settings.server.urls) or ([settings.server.url] if settings.server.url else [])
