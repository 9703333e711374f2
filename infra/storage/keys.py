"""Names that become storage keys or paths: run ids and object names.

A module of its own so that both stores (`infra.storage`, `infra.storage.s3`) can use it without
importing each other.
"""

from __future__ import annotations

import re

from infra.errors import ConfigError

# Run ids and object names: letters, digits, '.', '_', '-'; no leading dot, no '..'.
KEY_COMPONENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def validate_key_component(value: str, what: str) -> str:
    if not isinstance(value, str) or not KEY_COMPONENT.match(value) or ".." in value:
        raise ConfigError(
            f"{what} {value!r} is not allowed: use 1–128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, with no '..'"
        )
    return value
