"""The Prefect UI (the V2 React SPA under /v2) in headless Debian Chromium, behind the
server's basic authentication: the `nightly` deployment with its schedule, the finished
local-smoke run with its summary artifact, and no data at all without the password.

Chromium is driven over the DevTools protocol (`--remote-debugging-port`, one websocket, no
driver): the UI keeps the password its login form was given as base64 in localStorage
(`prefect-password`) and sends it as `Authorization: Basic` on every API call, so a test that
logs in puts it there before the page's own scripts run; one that does not, leaves it out.
`--screenshot`-like PNGs of what the page looks like land under the test's tmp folder.
"""

from __future__ import annotations

import base64
import html
import itertools
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from websockets.sync.client import connect

from infra.deadline import Deadline, poll_until
from infra.system.process import start_process_group, stop_process_group
from tests.fixtures_prefect import run_dir_of

pytestmark = [pytest.mark.browser, pytest.mark.prefect_server, pytest.mark.integration]

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
    "--disable-dev-shm-usage", "--hide-scrollbars", "--window-size=1400,1000", "--remote-debugging-port=0",
]
PAGE_S = 150.0  # a slow first render on a busy machine
START_S = 60.0
_profiles = itertools.count()


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("Debian chromium is not installed (`make browser-deps`)")
    return path


def page_text(dom: str) -> str:
    dom = re.sub(r"<(style|script)\b.*?</\1>", " ", dom, flags=re.S | re.I)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom))).strip()


class Page:
    """One headless Chromium (its own --user-data-dir) and its first tab, over DevTools."""

    def __init__(self, chromium: str, tmp_path: Path):
        self.profile = tmp_path / f"chromium-profile-{next(_profiles)}"
        self.proc = start_process_group([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                                        log_path=tmp_path / f"{self.profile.name}.log")
        port_file = self.profile / "DevToolsActivePort"

        def port():
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with code {self.proc.returncode}")
            lines = port_file.read_text().split() if port_file.exists() else []
            return lines[0] if lines else None

        base = f"http://127.0.0.1:{poll_until(port, deadline=Deadline(START_S), interval=0.2, what='chromium DevTools')}"
        tab = next(t for t in requests.get(f"{base}/json/list", timeout=10).json() if t["type"] == "page")
        self.ws = connect(tab["webSocketDebuggerUrl"], max_size=None, open_timeout=10)
        self._ids = itertools.count(1)
        self.call("Page.enable")  # without it, scripts added for new documents may not run

    def call(self, method: str, **params) -> dict:
        n = next(self._ids)
        self.ws.send(json.dumps({"id": n, "method": method, "params": params}))
        while True:  # events come in between; the reply carries our id
            message = json.loads(self.ws.recv(timeout=60))
            if message.get("id") == n:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def log_in(self, auth_string: str) -> None:
        """What the UI's login form does with a password, before any page script runs."""
        token = base64.b64encode(auth_string.encode()).decode()
        self.call("Page.addScriptToEvaluateOnNewDocument",
                  source=f"localStorage.setItem('prefect-password', {json.dumps(token)});")

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def text(self) -> str:
        """The text of the DOM as rendered so far (tags, scripts and styles stripped)."""
        value = self.call("Runtime.evaluate", expression="document.documentElement.outerHTML", returnByValue=True)
        return page_text(value.get("result", {}).get("value") or "")

    def render(self, url: str, needles: list[str], patterns: tuple[str, ...] = ()) -> str:
        """Open `url`; the page's text once every needle and regex pattern shows."""
        self.open(url)
        seen = {"text": ""}

        def rendered():
            seen["text"] = text = self.text()
            shown = all(n in text for n in needles) and all(re.search(p, text) for p in patterns)
            return text if shown else None

        return poll_until(rendered, deadline=Deadline(PAGE_S), interval=0.5, what=f"{url} to show {needles}",
                          describe_last=lambda: f"page text: {seen['text'][:1500]}")

    def screenshot(self, path: Path) -> Path:
        data = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        assert data.startswith(b"\x89PNG") and len(data) > 20_000, f"{path}: {len(data)} bytes"
        path.write_bytes(data)
        return path

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            stop_process_group(self.proc, grace=5.0)
            shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture
def page(chromium, prefect_server, tmp_path) -> Iterator[Page]:
    """A browser logged in to the test server with its password."""
    browser = Page(chromium, tmp_path)
    browser.log_in(prefect_server.auth_string)
    try:
        yield browser
    finally:
        browser.close()


@pytest.fixture
def stranger(chromium, tmp_path) -> Iterator[Page]:
    """A browser that reaches the server but has no password (or a wrong one)."""
    browser = Page(chromium, tmp_path)
    try:
        yield browser
    finally:
        browser.close()


def test_ui_talks_to_this_server_and_asks_for_a_password(prefect_server):
    """The UI sends every API call to /ui-settings' api_url: it must be this server's port. The
    settings (public: the UI reads them before login) say BASIC, so the UI shows its login form."""
    settings = requests.get(f"{prefect_server.url}/ui-settings", timeout=10).json()
    assert settings["api_url"] == prefect_server.api_url
    assert settings.get("default_ui") == "v2"
    assert settings["auth"] == "BASIC"


def test_without_the_password_the_ui_shows_no_data(stranger, prefect_server, deployed, smoke_run):
    """A browser without the password (then with a wrong one) gets the login prompt and nothing
    from the API: no deployment, no run, no artifact."""
    secrets_of_the_server = ["nightly", "on-demand", "local-smoke", smoke_run.flow_run_id[:8]]
    for attempt in ("no password", "wrong password"):
        if attempt == "wrong password":
            stranger.log_in(f"{prefect_server.basic_auth[0]}:not-the-password")
        for url in (f"{prefect_server.url}/v2/deployments", f"{prefect_server.url}/v2/runs/flow-run/{smoke_run.flow_run_id}"):
            text = stranger.render(url, [], patterns=(r"(?i)password|log ?in|sign ?in",))
            leaked = [s for s in secrets_of_the_server if s in text]
            assert not leaked, (attempt, url, leaked, text[:1500])


def test_nightly_deployment_shows_its_schedule(page, prefect_server, prefect_worker, deployed, tmp_path):
    # Each page fills in as its API calls return: wait for every piece the test looks at.
    page.render(f"{prefect_server.url}/v2/deployments", ["nightly", "on-demand", "local-smoke", "reap", "generate"])
    nightly = deployed["nightly"]
    url = f"{prefect_server.url}/v2/deployments/deployment/{nightly['id']}"
    # Status Ready: a worker polls the deployment's work pool.
    page.render(url, ["nightly", "Schedules", "At 02:00 AM", "flows/generate.py:generate", "nemotron-sdg"],
                patterns=(r"Concurrency Limit\s*1\b", r"Status\s*Ready\b"))
    shot = page.screenshot(tmp_path / "nightly-deployment.png")
    print(f"\nscreenshot: {shot}")


def test_finished_run_shows_its_summary_artifact(page, prefect_server, prefect_worker, smoke_run, tmp_path):
    run_id = smoke_run.flow_run_id
    run_dir = run_dir_of(prefect_worker, run_id)
    key = "".join(c if c.isalnum() else "-" for c in run_dir.name.lower())[:60]
    run_url = f"{prefect_server.url}/v2/runs/flow-run/{run_id}?tab=Artifacts"
    page.render(run_url, ["Completed", f"summary-{key}", f"progress-{key}", "local-smoke"])
    shots = [page.screenshot(tmp_path / "run-artifacts.png")]
    summary = next(a for a in prefect_server.artifacts(run_id) if a["key"] == f"summary-{key}")
    artifact_url = f"{prefect_server.url}/v2/artifacts/artifact/{summary['id']}"
    manifest = str(run_dir / "manifest.json")
    page.render(artifact_url, [f"summary-{key}", "records in", "manifest", manifest, "written"])
    shots.append(page.screenshot(tmp_path / "summary-artifact.png"))
    print(f"\nscreenshots: {', '.join(map(str, shots))}")


# --- recipes (issue 14): the nested `recipe` group in the run form -------------------------------


def test_run_form_shows_the_recipe_group(page, prefect_server, deployed, tmp_path):
    """The custom-run form of the recipe-example deployment shows the `recipe` group, its fields
    and their descriptions (from infra/recipes/params.py, through the flow's schema)."""
    recipe = prefect_server.deployment("generate", "recipe-example")
    schema = recipe["parameter_openapi_schema"]
    fields = schema["definitions"]["RecipeParams"]["properties"]
    assert all(f.get("description") for f in fields.values()), fields  # every field explained
    url = f"{prefect_server.url}/v2/deployments/deployment/{recipe['id']}/run"
    # Top-level parameters show by name, a nested model's fields by title.
    text = page.render(url, ["recipe (Optional)", "Samples Per Prompt", "Examples Per Prompt",
                             fields["samples_per_prompt"]["description"][:40]])
    assert "Prompt Template" in text and fields["examples_uri"]["description"][:30] in text
    # Recipes part 2: the judge and filters groups, every field explained, shown in the same form.
    judge, filters = (schema["definitions"][m]["properties"] for m in ("JudgeParams", "FilterParams"))
    assert all(f.get("description") for f in [*judge.values(), *filters.values()])
    text = page.render(url, ["judge (Optional)", "filters (Optional)", "Score Pattern", "Dedup Exact"])
    assert judge["min_score"]["description"][:30] in text and filters["dedup_near"]["description"][:30] in text
