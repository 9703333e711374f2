"""The two servers the `/generate` contract tests run against, both real processes on 127.0.0.1:

- `local`: the project's NeMo-compatible server (`serve-local --engine simulated`);
- `nemo`: NeMo 24.05's own text_generation_server.py on the same simulated engine
  (tests/nemo_reference.py).

A test that takes `contract_server` runs once against each; both must pass it. Where they
differ, NeMo's code is the reference and the local server is the one to fix.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import requests

from tests.localserver import running_nemo_reference, running_server

SIM = ("--engine", "simulated")
NEMO_ONLY = ("--no-openai",)  # NeMo 24.05's routes only: GET /health and POST /v1/completions as NeMo answers them
TIMEOUT = (2, 30)  # (connect, read)


@dataclass(frozen=True)
class ContractServer:
    name: str  # "local" or "nemo"
    url: str

    @property
    def generate_url(self) -> str:
        return f"{self.url}/generate"

    def put(self, body: object, **kwargs) -> requests.Response:
        return requests.put(self.generate_url, json=body, timeout=kwargs.pop("timeout", TIMEOUT), **kwargs)


@pytest.fixture(scope="session")
def local_contract_server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("local-contract"), *SIM, *NEMO_ONLY) as (url, _):
        yield ContractServer("local", url)


@pytest.fixture(scope="session")
def nemo_contract_server(tmp_path_factory):
    with running_nemo_reference(tmp_path_factory.mktemp("nemo-contract"), *SIM) as (url, _):
        yield ContractServer("nemo", url)


@pytest.fixture(scope="session", params=["local", "nemo"])
def contract_server(request) -> ContractServer:
    return request.getfixturevalue(f"{request.param}_contract_server")
