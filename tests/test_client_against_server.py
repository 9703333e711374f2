"""The client's handling of each row of the server contract, against the real local server."""

import pytest
import requests

from infra.errors import BadRequest, ServerFailure, ServerHung, TransientServerError, ValidationRejected
from infra.nemo_client import NemoClient
from infra.sampling import SamplingParams
from tests.localserver import running_server

pytestmark = pytest.mark.integration
SIM = ("--engine", "simulated")
GREEDY = SamplingParams(tokens_to_generate=8, greedy=True, end_strings=["<|endoftext|>"])


def test_generate_strips_prompt_and_end_string(tmp_path):
    with running_server(tmp_path, *SIM) as (url, _):
        client = NemoClient(url)
        assert client.port_open() and client.ready()
        out = client.generate(["Hello there", "Second prompt"], GREEDY)
        assert [o.prompt for o in out] == ["Hello there", "Second prompt"]
        for o in out:
            assert o.completion.prompt_match == "exact"
            assert o.completion.text and "<|endoftext|>" not in o.completion.text


def test_validation_string_is_rejected_not_retried(tmp_path):
    with running_server(tmp_path, *SIM, "--fault-reject-on", "POISON") as (url, _):
        with pytest.raises(ValidationRejected) as exc:
            NemoClient(url).generate(["fine", "POISON here"], GREEDY)
        assert exc.value.status == 200 and isinstance(exc.value.body, str)


def test_500_is_server_failure(tmp_path):
    with running_server(tmp_path, *SIM, "--fault-500-on", "BOOM") as (url, _):
        with pytest.raises(ServerFailure) as exc:
            NemoClient(url).generate(["BOOM"], GREEDY)
        assert exc.value.status == 500


def test_400_above_128_is_bad_request(tmp_path):
    with running_server(tmp_path, *SIM) as (url, _):
        client = NemoClient(url)
        resp = requests.put(client.generate_url, json={"sentences": ["x"] * 129, **GREEDY.request_fields()}, timeout=10)
        with pytest.raises(BadRequest):
            client._parse(resp, 129)


def test_hung_server_is_lost_not_retried(tmp_path):
    with running_server(tmp_path, *SIM, "--fault-hang-after", "0") as (url, _):
        with pytest.raises(ServerHung, match="hung"):
            NemoClient(url, read_timeout=1.0).generate(["hi"], GREEDY)


def test_crashed_server_is_transient_and_port_closed(tmp_path):
    with running_server(tmp_path, *SIM, "--fault-crash-after", "0") as (url, proc):
        client = NemoClient(url, connect_timeout=1.0)
        with pytest.raises(TransientServerError):
            client.generate(["hi"], GREEDY)
        proc.wait(timeout=10)
        assert not client.port_open()
