"""The Prefect UI (the V2 React SPA under /v2) in headless Debian Chromium: the `nightly`
deployment with its schedule, and the finished local-smoke run with its summary artifact.

Chromium's own command line is enough, no driver: `--dump-dom` prints the DOM once the
page's JavaScript has run, and `--virtual-time-budget` lets the SPA fetch from the API and
render first (virtual time stands still while network fetches are pending). `--screenshot`
saves what the page looks like under the test's tmp folder.
"""

from __future__ import annotations

import html
import itertools
import re
import shutil
from pathlib import Path

import pytest
import requests

from infra.commands import run_command
from infra.deadline import Deadline, poll_until
from infra.errors import CommandError
from tests.fixtures_prefect import run_dir_of

pytestmark = [pytest.mark.browser, pytest.mark.prefect_server, pytest.mark.integration]

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
    "--disable-dev-shm-usage", "--hide-scrollbars", "--window-size=1400,1000",
]
BUDGET_MS = 20_000
PAGE_S = 150.0  # a few renders, if the first came too early on a busy machine
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


def chromium_run(chromium: str, tmp_path: Path, url: str, *action: str) -> str:
    """One fresh headless Chromium (its own --user-data-dir) on `url`; returns stdout."""
    profile = tmp_path / f"chromium-profile-{next(_profiles)}"
    argv = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={BUDGET_MS}", *action, url]
    try:
        return run_command(argv, timeout=90).stdout
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def render(chromium: str, tmp_path: Path, url: str, needles: list[str], patterns: tuple[str, ...] = ()) -> str:
    """The page's text once every needle and regex pattern shows (a render is retried until
    the deadline)."""
    seen = {"text": ""}

    def rendered():
        try:
            text = page_text(chromium_run(chromium, tmp_path, url, "--dump-dom"))
        except CommandError as exc:  # a crashed or hung Chromium: try again until the deadline
            seen["text"] = str(exc)
            return None
        seen["text"] = text
        shown = all(n in text for n in needles) and all(re.search(p, text) for p in patterns)
        return text if shown else None

    return poll_until(rendered, deadline=Deadline(PAGE_S), interval=1.0, what=f"{url} to show {needles}",
                      describe_last=lambda: f"page text: {seen['text'][:1500]}")


def screenshot(chromium: str, tmp_path: Path, url: str, name: str) -> Path:
    path = tmp_path / name
    chromium_run(chromium, tmp_path, url, f"--screenshot={path}")
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 20_000, f"{path}: {len(data)} bytes"
    return path


def test_ui_talks_to_this_server(prefect_server):
    """The UI sends every API call to /ui-settings' api_url: it must be this server's port."""
    settings = requests.get(f"{prefect_server.url}/ui-settings", timeout=10).json()
    assert settings["api_url"] == prefect_server.api_url
    assert settings.get("default_ui") == "v2"


def test_nightly_deployment_shows_its_schedule(chromium, prefect_server, prefect_worker, deployed, tmp_path):
    listing = render(chromium, tmp_path, f"{prefect_server.url}/v2/deployments",
                     ["nightly", "on-demand", "local-smoke", "reap"])
    assert "generate" in listing
    nightly = deployed["nightly"]
    url = f"{prefect_server.url}/v2/deployments/deployment/{nightly['id']}"
    # Status Ready: a worker polls the deployment's work pool.
    text = render(chromium, tmp_path, url, ["nightly", "Schedules", "At 02:00 AM"],
                  patterns=(r"Concurrency Limit\s*1\b", r"Status\s*Ready\b"))
    assert "flows/generate.py:generate" in text and "nemotron-sdg" in text
    shot = screenshot(chromium, tmp_path, url, "nightly-deployment.png")
    print(f"\nscreenshot: {shot}")


def test_finished_run_shows_its_summary_artifact(chromium, prefect_server, prefect_worker, smoke_run, tmp_path):
    run_id = smoke_run.flow_run_id
    run_dir = run_dir_of(prefect_worker, run_id)
    key = "".join(c if c.isalnum() else "-" for c in run_dir.name.lower())[:60]
    run_url = f"{prefect_server.url}/v2/runs/flow-run/{run_id}?tab=Artifacts"
    text = render(chromium, tmp_path, run_url, ["Completed", f"summary-{key}", f"progress-{key}"])
    assert "local-smoke" in text
    summary = next(a for a in prefect_server.artifacts(run_id) if a["key"] == f"summary-{key}")
    artifact_url = f"{prefect_server.url}/v2/artifacts/artifact/{summary['id']}"
    manifest = str(run_dir / "manifest.json")
    text = render(chromium, tmp_path, artifact_url, [f"summary-{key}", "records in", "manifest", manifest])
    assert "written" in text
    shots = [screenshot(chromium, tmp_path, run_url, "run-artifacts.png"),
             screenshot(chromium, tmp_path, artifact_url, "summary-artifact.png")]
    print(f"\nscreenshots: {', '.join(map(str, shots))}")


# --- recipes (issue 14): the nested `recipe` group in the run form -------------------------------


def test_run_form_shows_the_recipe_group(chromium, prefect_server, deployed, tmp_path):
    """The custom-run form of the recipe-example deployment shows the `recipe` group, its fields
    and their descriptions (from infra/recipes/params.py, through the flow's schema)."""
    recipe = prefect_server.deployment("generate", "recipe-example")
    schema = recipe["parameter_openapi_schema"]
    fields = schema["definitions"]["RecipeParams"]["properties"]
    assert all(f.get("description") for f in fields.values()), fields  # every field explained
    url = f"{prefect_server.url}/v2/deployments/deployment/{recipe['id']}/run"
    # Top-level parameters show by name, a nested model's fields by title.
    text = render(chromium, tmp_path, url, ["recipe (Optional)", "Samples Per Prompt", "Examples Per Prompt",
                                            fields["samples_per_prompt"]["description"][:40]])
    assert "Prompt Template" in text and fields["examples_uri"]["description"][:30] in text
