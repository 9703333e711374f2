"""The NeMo-compatible local server: NeMo 24.05's `/generate` contract, quirks included, and on the
same port OpenAI's `/v1/completions`, `/v1/models`, `/health` as vLLM answers them; backed by a small
transformers model or a timed simulation (continuous batching behind /v1/completions). No GPU, no internet.

    python -m infra.local_server make-tiny-model .cache/tiny-model
    python -m infra.local_server serve-local --model-dir .cache/tiny-model --port 0 --port-file port.txt
    python -m infra.local_server serve-local --engine simulated --port 1424

Modules: `serve` (process lifecycle: load, bind, signals), `handler` (the HTTP contract and Flask's
routing quirks), `service` (PUT /generate without HTTP: FIFO lock, faults, stats), `nemo_validation`
(TGS's request checks), `openai_api` (the OpenAI routes and the continuous-batching scheduler),
`nemo_generation` (NeMo's generation semantics, the `Engine` protocol), `transformers_model` and
`simulated_model` (the two engines), `tiny_model` (offline random-weight model),
`cli` (argparse subcommands, `register(subparsers)` for the project's CLI).
"""
