"""NeMo's own server code (tests/nemo_reference.py) as the reference for the local server.

The loader is checked in-process; then the same requests go to both servers over HTTP and
their answers must match: status, content type, the Allow and Connection headers, and the
body (a reply's token ids excepted: the simulated engine numbers its pieces as it meets them,
so ids depend on what each process was asked before).
"""

from __future__ import annotations

import json
import importlib.util
import sys
from pathlib import Path

import pytest
import requests

import tests
from tests import nemo_reference
from tests.fixtures_nemo import TIMEOUT

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]


def test_the_project_tests_package_is_not_shadowed():
    # The nemo_toolkit wheel ships a top-level `tests` package: it is downloaded, never installed.
    assert Path(tests.__file__).resolve().parent == REPO / "tests"
    assert importlib.util.find_spec("nemo") is None


def test_loads_the_wheels_server_module_and_leaves_no_stand_in_behind():
    before = {name: sys.modules.get(name) for name in ("torch", "nemo.utils", f"{nemo_reference._COMMON}.text_generation_utils")}
    tgs = nemo_reference.load_tgs()
    assert Path(tgs.__file__) == nemo_reference.tgs_path()
    assert tgs.__file__.endswith("nemo-2.0.0/nemo/collections/nlp/modules/common/text_generation_server.py")
    assert tgs.API_ALLOWED_KEYS >= {"sentences", "tokens_to_generate", "end_strings", "random_seed"}
    assert {name: sys.modules.get(name) for name in before} == before


def test_generate_needs_the_do_generate_broadcast():
    from infra.local_server.simulated_model import SimulatedEngine

    broadcasts = nemo_reference.Broadcasts()
    generate = nemo_reference.EngineGenerate(broadcasts)
    with pytest.raises(RuntimeError, match="broadcast"):
        generate(SimulatedEngine(), ["Hello"], tokens_to_generate=1)
    broadcasts.broadcast([nemo_reference.GENERATE_NUM], 0)
    out = generate(SimulatedEngine(), ["Hello"], tokens_to_generate=1)
    assert set(out) == {"sentences", "tokens", "logprob", "full_logprob", "token_ids", "offsets"}


def _answer(resp: requests.Response) -> dict:
    seen = {
        "status": resp.status_code,
        "type": resp.headers.get("Content-Type"),
        "allow": sorted(m.strip() for m in resp.headers.get("Allow", "").split(",") if m.strip()),
        "connection": resp.headers.get("Connection"),
    }
    if seen["type"] == "application/json":
        body = resp.json()
        if isinstance(body, dict) and "token_ids" in body:
            body["token_ids"] = [len(ids) for ids in body["token_ids"]]
        seen["body"] = body
    else:
        seen["body"] = resp.text
    return seen


ROUTES = [(method, path) for path in ("/", "/generate", "/generate?x=1", "/health", "/generate/", "/gen%65rate")
          for method in ("GET", "HEAD", "OPTIONS", "PUT", "POST", "DELETE", "PATCH")]


# A 405 on /generate comes from flask_restful (JSON) or from Flask (HTML): flask_restful
# claims the error only when the first method in Werkzeug's `valid_methods` (a set, so in
# PYTHONHASHSEED order) routes to its resource. The local server always answers the JSON one.
GENERATE_405_BODIES = (
    {"message": "The method is not allowed for the requested URL."},
    "<!doctype html>\n<html lang=en>\n<title>405 Method Not Allowed</title>\n<h1>Method Not Allowed</h1>\n"
    "<p>The method is not allowed for the requested URL.</p>\n",
)


@pytest.mark.parametrize("method,path", ROUTES, ids=[f"{m} {p}" for m, p in ROUTES])
def test_routes_answer_as_nemo_does(local_contract_server, nemo_contract_server, method, path):
    body = {"sentences": ["Hello"], "tokens_to_generate": 2}
    local, nemo = (_answer(requests.request(method, server.url + path, json=body, timeout=TIMEOUT))
                   for server in (local_contract_server, nemo_contract_server))
    if nemo["status"] == 405 and "PUT" in nemo["allow"]:
        assert local["body"] in GENERATE_405_BODIES and nemo["body"] in GENERATE_405_BODIES
        del local["body"], local["type"], nemo["body"], nemo["type"]
    assert local == nemo


BODIES = {
    "valid": {"sentences": ["Hello world", "  two spaces, café"], "tokens_to_generate": 3},
    "defaults": {"sentences": ["Hi"]},
    "logprob": {"sentences": ["Hi there"], "tokens_to_generate": 2, "compute_logprob": True},
    "all-probs": {"sentences": ["Hi"], "tokens_to_generate": 1, "compute_logprob": True, "all_probs": True},
    "all-probs-alone": {"sentences": ["Hi"], "all_probs": True},
    "unknown-key": {"sentences": ["Hi"], "tokens_to_generate": 1, "stream": True},
    "string-sentences": {"sentences": "ab", "tokens_to_generate": 1},
    "bool-tokens": {"sentences": ["Hi"], "tokens_to_generate": True},
    "float-top-k": {"sentences": ["Hi"], "tokens_to_generate": 1, "top_k": 2.5},
    "int-top-p": {"sentences": ["Hi"], "tokens_to_generate": 1, "top_p": 1},
    "seed-null": {"sentences": ["Hi"], "tokens_to_generate": 1, "random_seed": None},
    "seed-bool": {"sentences": ["Hi"], "tokens_to_generate": 1, "random_seed": True},
    "neighbors": {"sentences": ["Hi"], "tokens_to_generate": 1, "neighbors": 2},
    "empty-end-strings": {"sentences": ["Hi"], "tokens_to_generate": 2, "end_strings": []},
    "task-ids": {"sentences": ["Hi"], "task_ids": [1]},
    "128": {"sentences": ["x"] * 128, "tokens_to_generate": 1},
    "129-and-invalid": {"sentences": ["x"] * 129, "temperature": 0},
    "sentences-dict": {"sentences": {"a": 1}},
    "sentences-number": {"sentences": 3},
    "sentences-null": {"sentences": None},
    "sentences-empty": {"sentences": []},
    "sentences-non-string": {"sentences": ["ok", 3]},
    "no-sentences": {"tokens_to_generate": 1},
    "list-body": ["Hello"],
    "null-body": None,
    "number-body": 3,
}


@pytest.mark.parametrize("name", list(BODIES))
def test_bodies_answer_as_nemo_does(local_contract_server, nemo_contract_server, name):
    data = json.dumps(BODIES[name])
    local, nemo = (server.put(None, data=data, headers={"Content-Type": "application/json"})
                   for server in (local_contract_server, nemo_contract_server))
    assert _answer(local) == _answer(nemo)


@pytest.mark.parametrize("data,content_type", [
    (b"{not json", "application/json"),
    (b"", "application/json"),
    (b'{"sentences": ["x"]}', "text/plain"),
    (b'{"sentences": ["x"]}', "application/problem+json"),
    (b'{"sentences": ["x"]}', None),
])
def test_non_json_bodies_answer_as_nemo_does(local_contract_server, nemo_contract_server, data, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    local, nemo = (requests.put(server.generate_url, data=data, headers=headers, timeout=TIMEOUT)
                   for server in (local_contract_server, nemo_contract_server))
    assert _answer(local) == _answer(nemo)
