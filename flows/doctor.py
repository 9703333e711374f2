"""`nemotron-sdg doctor`: the CLI side of infra/doctor.py. It reads Prefect's own settings (the API
URL and its credentials), which infra/ may not import, and prints one line per check."""

from __future__ import annotations

import argparse
import base64
import json

from infra.doctor import PrefectApi, exit_code, run_checks
from infra.engines import ENGINES


def register(sub) -> None:
    p = sub.add_parser(
        "doctor", help="check a profile's setup from this host, without submitting a job",
        description="Check the settings, Slurm (commands, partition, account), the image, model and tokenizer, the "
                    "output location, the server port and the Prefect API for one profile. One line per check: ok, "
                    "problem (with what to do) or skip (cannot be checked here). Exit 0 when no check is a problem, "
                    "2 otherwise.")
    p.add_argument("--profile", default="h100x16", help="the profile to check (default h100x16)")
    p.add_argument("--engine", choices=tuple(ENGINES), help="check the profile with this serving engine")
    p.add_argument("--json", action="store_true", help="print the checks as one JSON list instead")
    p.set_defaults(func=_doctor)


def prefect_api() -> PrefectApi:
    """PREFECT_API_URL and the headers Prefect's client would send: basic auth from
    PREFECT_API_AUTH_STRING (a self-hosted server), a bearer PREFECT_API_KEY (Prefect Cloud)."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_KEY, PREFECT_API_URL

    headers = {}
    if auth := PREFECT_API_AUTH_STRING.value():
        auth = auth.get_secret_value() if hasattr(auth, "get_secret_value") else auth
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    elif key := PREFECT_API_KEY.value():
        key = key.get_secret_value() if hasattr(key, "get_secret_value") else key
        headers["Authorization"] = f"Bearer {key}"
    return PrefectApi(PREFECT_API_URL.value(), headers)


def _doctor(args: argparse.Namespace) -> int:
    checks = run_checks(args.profile, args.engine, prefect_api())
    if args.json:
        print(json.dumps([c.as_dict() for c in checks], indent=1))
    else:
        for check in checks:
            print(check.line(), flush=True)
    return exit_code(checks)
