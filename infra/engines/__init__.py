"""Serving engines: which program a profile launches, which HTTP API the client speaks to it, and
how readiness is judged. The seed's NeMo 24.05 `megatron_gpt_eval.py` (engine `nemo`, API
`nemo-generate`: PUT /generate, one batch per request behind a lock) stays the default; the others
speak OpenAI's `/v1/completions`, one prompt per request with many in flight (continuous batching).

This module is the contract the rest of the tree reads; it does no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Api = Literal["nemo-generate", "openai-completions"]
EngineName = Literal["nemo", "vllm", "trtllm", "nemo-openai", "custom"]
# How readiness is judged once the port listens (connection refused always means "still loading"):
#   nemo-probe:  a 1-token PUT /generate (today's path);
#   health:      GET /health 200, then the served model in GET /v1/models, then a 1-token completion;
#   probe:       the 1-token completion alone (NeMo >= 2.1 has no health route).
Readiness = Literal["nemo-probe", "health", "probe"]


@dataclass(frozen=True)
class Engine:
    name: EngineName
    api: Api
    readiness: Readiness
    description: str


# Requests kept open per replica when server.max_in_flight is not set, per API (server.api may
# override an engine's): NeMo's server computes one request at a time (one computing, one queued);
# vLLM's maintainers say to give the scheduler everything.
DEFAULT_IN_FLIGHT: dict[str, int] = {"nemo-generate": 2, "openai-completions": 256}
# Engines that speak an API whose default does not fit them: NeMo >= 2.1's /v1/completions holds one
# lock per request, batch of 1 (engine-launch-audit L6): 256 queued would outlast the read timeout.
SERIAL_ENGINES = ("nemo-openai",)


def engine_in_flight(name: str, api: str) -> int:
    """Requests kept open per replica by default for engine `name` speaking `api`."""
    return DEFAULT_IN_FLIGHT["nemo-generate"] if name in SERIAL_ENGINES else DEFAULT_IN_FLIGHT[api]


ENGINES: dict[str, Engine] = {
    "nemo": Engine("nemo", "nemo-generate", "nemo-probe", "NeMo 24.05 megatron_gpt_eval.py (the model card's server)"),
    "vllm": Engine("vllm", "openai-completions", "health", "vllm serve; multi-node through a Ray head on the first node"),
    "trtllm": Engine("trtllm", "openai-completions", "health", "trtllm-serve; multi-node as one MPI world under srun"),
    "nemo-openai": Engine("nemo-openai", "openai-completions", "probe", "NeMo >= 2.1's own /v1/completions"),
    # A command template (server.command); it speaks server.api, NeMo's by default as today.
    "custom": Engine("custom", "nemo-generate", "nemo-probe", "server.command, speaking server.api"),
}


def engine(name: str) -> Engine:
    return ENGINES[name]  # Profile.engine is a Literal: pydantic has refused any other name already
