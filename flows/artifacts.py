"""The run's Prefect UI artifacts (progress bar, summary table), sent best-effort.

They are the only calls to the Prefect API in the pool's loop. Sent from that loop, an API
outage blocked it for the client's retries (about 76 s, servers idle) and then failed the run.
Here one daemon thread sends them: the loop only drops the latest value in a slot (latest value
wins, so the queue is bounded at one progress value and one table), an API error is logged once
per outage, and `close()` waits a bounded time at the end of the run and then gives up.
"""

from __future__ import annotations

import contextvars
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable

from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact

log = logging.getLogger(__name__)
SAMPLE_ROWS = 5  # finished rows shown on the run page (a glance at the data, not a view of it)
CELL_CHARS = 240  # a cell longer than this is cut: a wide table is cut off in the UI anyway
RETRY_S = 5.0  # pause between tries while the API is away (each try has the client's own retries)


def flush_s() -> float:
    """How long the run's end waits for the last updates before giving up on them
    (NSDG_ARTIFACTS_FLUSH_S): read when it waits, so a test of an outage can wait less."""
    from infra.settings import load_settings

    return load_settings().artifacts_flush_s


class ApiOutage:
    """When the current outage of the Prefect API began (None: the API answers), logged once when
    it begins and once when it ends."""

    def __init__(self) -> None:
        self._since: float | None = None
        self._lock = threading.Lock()

    @property
    def known(self) -> bool:
        return self._since is not None

    def went_down(self, what: str) -> None:
        with self._lock:
            if self._since is not None:
                return
            self._since = time.monotonic()
        log.warning("Prefect API unreachable for the run's artifacts (%s); generation goes on and the UI's "
                    "progress/summary catch up when the API answers again", what)

    def came_back(self) -> None:
        with self._lock:
            since, self._since = self._since, None
        if since is not None:
            log.info("Prefect API answers again after %.0f s; artifacts updated", time.monotonic() - since)


# Process-wide on purpose: every sender of the process talks to the same API, so an outage is
# logged once, not once per artifact, and the summary table sent after the progress sender saw
# the outage does not wait for it again.
API_OUTAGE = ApiOutage()


class Artifacts:
    """`progress(pct)` and `table(rows, description)` never block and never raise."""

    def __init__(self, key: str, description: str = "", outage: ApiOutage = API_OUTAGE, table_kind: str = "summary"):
        self.key, self.description = key, description  # the run's key; the progress bar's description
        self.table_kind = table_kind  # the table's key is `{table_kind}-{key}`
        self._outage = outage
        self._context = contextvars.copy_context()  # the flow run's, so artifacts link to it
        self._wake = threading.Condition()
        self._progress: tuple[float, str | None] | None = None
        self._table: tuple[list[dict], str] | None = None
        self._progress_id = None
        self._closed = False
        self._sending = False
        self._thread = threading.Thread(target=self._run, name=f"artifacts-{key}", daemon=True)
        self._thread.start()

    def progress(self, percent: float, description: str | None = None) -> None:
        """The bar at `percent`; `description` (records, rate, ETA) after the run's own description."""
        with self._wake:
            self._progress = (percent, description)
            self._wake.notify()

    def table(self, rows: list[dict], description: str) -> None:
        with self._wake:
            self._table = (rows, description)
            self._wake.notify()

    def close(self, timeout: float | None = None) -> None:
        """Wait (bounded: `timeout`, else flush_s()) for what is queued to go out; what is left then is
        dropped, logged. During a known outage there is no wait: the run's end is not held up once per artifact."""
        timeout = flush_s() if timeout is None else timeout
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(0.0 if self._outage.known else timeout)
        if self._thread.is_alive():
            self._outage.went_down(f"its last updates not taken within {timeout:.0f} s; dropped")

    # --- the sender thread ------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while self._progress is None and self._table is None and not self._closed:
                    self._wake.wait()
                if self._progress is None and self._table is None:
                    return  # closed and nothing left
                progress, self._progress = self._progress, None
                table, self._table = self._table, None
            if progress is not None and not self._send(lambda: self._send_progress(*progress)):
                self._keep(progress=progress)
            if table is not None and not self._send(lambda: self._send_table(*table)):
                self._keep(table=table)

    def _keep(self, progress: tuple[float, str | None] | None = None, table=None) -> None:
        """Put back what failed unless something newer came meanwhile, and pause before the next
        try; once closed, what fails is dropped (close() has logged it)."""
        with self._wake:
            if self._closed:
                return
            if progress is not None and self._progress is None:
                self._progress = progress
            if table is not None and self._table is None:
                self._table = table
            self._wake.wait(RETRY_S)

    def _send_progress(self, percent: float, figures: str | None) -> None:
        description = f"{self.description}: {figures}" if figures else self.description
        if self._progress_id is None:
            self._progress_id = create_progress_artifact(percent, key=f"progress-{self.key}", description=description)
        else:
            update_progress_artifact(self._progress_id, percent, description=description)

    def _send_table(self, rows: list[dict], description: str) -> None:
        create_table_artifact(rows, key=f"{self.table_kind}-{self.key}", description=description)

    def _send(self, call: Callable[[], object]) -> bool:
        try:
            self._context.run(call)
        except Exception as exc:  # the API is away: the run goes on without the UI
            self._outage.went_down(f"{type(exc).__name__}: {str(exc)[:200]}")
            return False
        self._outage.came_back()
        return True


def publish_table(key: str, rows: list[dict], description: str, timeout: float | None = None, kind: str = "summary") -> None:
    """A table at the end of a run (its summary, a few of its rows): best-effort, waits at most `timeout`."""
    sender = Artifacts(key, table_kind=kind)
    sender.table(rows, description)
    sender.close(timeout)


def sample_rows(lines: Iterable[str | bytes], n: int = SAMPLE_ROWS, width: int = CELL_CHARS) -> list[dict]:
    """The first `n` rows of a part as table rows a person reads: the id, the prompt's END (a few-shot
    prompt differs from the next one only in its last lines), the reply's start, and the judge's
    score and the split's item when the row has them. Lines that are not rows are skipped."""
    out: list[dict] = []
    for line in lines:
        if len(out) >= n:
            break
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if not isinstance(row, dict):
            continue
        shown = {"id": str(row.get("id")), "prompt (end)": _cut(str(row.get("prompt", "")), width // 2, tail=True),
                 "completion": _cut(str(row.get("completion", "")), width)}
        if isinstance(row.get("judge"), dict) and "score" in row["judge"]:
            shown["score"] = str(row["judge"]["score"])
        out.append(shown)
    return out


def publish_sample_rows(key: str, lines: Iterable[str | bytes], description: str, timeout: float | None = None) -> int:
    """A few finished rows of a run (or of a pipeline's stage) as the `rows-{key}` table, so a user
    sees the data on the run page without opening a file; how many were shown (none: no table)."""
    rows = sample_rows(lines)
    if rows:
        publish_table(key, rows, description, timeout, kind="rows")
    return len(rows)


def _cut(text: str, width: int, tail: bool = False) -> str:
    if len(text) <= width:
        return text
    return "…" + text[-(width - 1):] if tail else text[: width - 1] + "…"


def artifact_key(run_id: str) -> str:
    """A run's artifact keys' stem: Prefect allows lowercase letters, digits and dashes."""
    return "".join(c if c.isalnum() else "-" for c in run_id.lower())[:60]


def publish_stage_counts(run_id: str, stages: list[dict], names: list[str], timeout: float | None = None) -> None:
    """A pipeline's progress by stage as the `stages-{run}` table: each finished stage's counts (from
    the pipeline manifest's entries), the others listed as waiting. Sent after every stage."""
    done = {s["stage"]: s for s in stages}
    rows = []
    for name in names:
        s = done.get(name)
        rows.append({"stage": name, "state": "done" if s else "waiting", "from": (s or {}).get("from") or "—",
                     **({"records in": s["records_in"], "rows out": s["rows_out"], "kept": s["kept"],
                         "filtered": ", ".join(f"{k} {v}" for k, v in s["filtered"].items()) or "—",
                         "split dropped": ", ".join(f"{k} {v}" for k, v in s["split_dropped"].items()) or "—",
                         "rows passed on": s["rows"]} if s else {})})
    publish_table(artifact_key(run_id), [{k: str(v) for k, v in r.items()} for r in rows],
                  f"pipeline run {run_id}: {len(done)} of {len(names)} stages done", timeout, kind="stages")
