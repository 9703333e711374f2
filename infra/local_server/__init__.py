"""The NeMo-compatible local server: NeMo 24.05's `/generate` contract, quirks included,
backed by a small transformers model or a timed simulation. No GPU, no internet.

    python -m infra.local_server make-tiny-model .cache/tiny-model
    python -m infra.local_server serve-local --model-dir .cache/tiny-model --port 0 --port-file port.txt
    python -m infra.local_server serve-local --engine simulated --port 1424

Modules: `server` (HTTP contract, lock, faults, lifecycle), `engines` (transformers and
simulated engines, NeMo's generation semantics), `tiny_model` (offline random-weight model),
`cli` (argparse subcommands, `register(subparsers)` for the project's CLI).
"""
