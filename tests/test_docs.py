"""The docs stay true to the code: the settings reference is generated from the settings model
(tools/gen_settings_doc.py), the README stays a five-minute read, and every relative link in the
README and docs/ leads to a file that exists."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_settings_reference_is_generated_from_the_settings_model():
    result = subprocess.run([sys.executable, "tools/gen_settings_doc.py", "--check"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_every_setting_is_in_the_reference():
    from infra.settings import Settings

    text = (ROOT / "docs" / "settings.md").read_text(encoding="utf-8")
    for name, field in Settings.model_fields.items():
        section = getattr(field.annotation, "model_fields", None)
        names = [f"NSDG_{name.upper()}__{sub.upper()}" for sub in section] if section else [f"NSDG_{name.upper()}"]
        for env in names:
            assert f"`{env}`" in text, env


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 220, f"README.md has {len(lines)} lines: move detail into docs/"


def test_relative_links_lead_to_files():
    broken = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):
                continue  # http://, mailto: ...
            path = (doc.parent / target).resolve()
            if not path.exists():
                broken.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert not broken, broken
