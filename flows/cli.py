"""`nemotron-sdg`: run the flow in-process, serve the local NeMo-compatible server, build a tiny
model, render Slurm scripts. Every command has --help."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

# What the Makefile sets, so a plain `nemotron-sdg run` behaves the same: no telemetry from
# Prefect's temporary server (there is no network to send it to), no hub lookups, infra/ logs shown,
# and more than Prefect's 20 s for that server to start on a busy login node.
# Before any Prefect import: Prefect reads its settings from the environment when first used.
for _name, _value in {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_EXTRA_LOGGERS": "infra",
                      "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
                      "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}.items():
    os.environ.setdefault(_name, _value)

from flows.params import RunParams, parameters, resolve_run_id  # noqa: E402
from infra.engines import ENGINES  # noqa: E402
from infra.errors import ConfigError, SdgError  # noqa: E402

ENGINE_NAMES = tuple(ENGINES)
# The run command's own flags (argparse dests): how to run, not parameters of a run; every other
# flag of `run` is a RunParams field (tests/test_parameters.py holds the two lists equal).
RUN_COMMAND_FLAGS = ("help", "params", "pipeline", "new_run", "progress_every_s", "local_prefect")

def _add_run(sub) -> None:
    p = sub.add_parser("run", help="run the generate flow in this process",
                       description="Run the generate flow in-process. Flags override --params FILE.json.")
    p.add_argument("--params", type=Path, help="JSON file of flow parameters: the flags' names with _ (e.g. tokens_to_generate), or nested "
                        "groups as in the UI form (sampling, recipe, judge, filters); every parameter: docs/parameters.md")
    p.add_argument("--pipeline", help="run every stage of this pipeline file (docs/pipelines.md) on one allocation; "
                   "with it, only --run-id, --new-run, --output-uri, --replicas and --max-server-restarts apply")
    p.add_argument("--new-run", action="store_true",
                   help="start over under a new run id (e.g. after changing parameters of a published run)")
    p.add_argument("--progress-every-s", type=float, default=10.0, metavar="S",
                   help="off a terminal: a progress line (records, rate, ETA) at most every S seconds, also within "
                        "a shard, as its batches come back (default 10)")
    p.add_argument("--local-prefect", action="store_true",
                   help="record this run on a temporary local Prefect server even where PREFECT_API_URL (the "
                        "environment or .env) names a team's server")
    for param in parameters():  # every parameter of the flow; None: not given, the file's or the flow's default
        shown = f"{param.path}: {param.field.description or ''}".replace("%", "%%")
        if (default := param.shown_default()) is not None:
            shown += f" (default {default})".replace("%", "%%")
        if param.value_type is bool:
            p.add_argument(param.option, action=argparse.BooleanOptionalAction, default=None, help=shown)
        elif param.repeated:
            p.add_argument(param.option, action="append", help=shown + "; repeat the flag for several")
        elif param.json:
            p.add_argument(param.option, type=json_object_text, metavar="JSON", help=shown)
        else:
            p.add_argument(param.option, type=None if param.choices else param.value_type, choices=param.choices,
                           help=shown)
    p.set_defaults(func=_run)


def json_object_text(text: str) -> str:
    """A flag's JSON object (--output-schema '{"type": "object", ...}'), kept as its text: the form
    it is handed to the flow in (run_parameters)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc}); give a JSON object") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"a JSON {type(value).__name__}, not an object")
    return text


def run_parameters(args: argparse.Namespace) -> dict:
    params = load_params_file(args.params) if args.params else {}
    for param in parameters():
        if (value := getattr(args, param.flag)) is None:
            continue
        if param.group is None:
            params[param.name] = value
        else:  # the group from --params, with the flags given on top
            params[param.group] = {**(params.get(param.group) or {}), param.name: value}
    if args.new_run:
        params["run_id"] = resolve_run_id(None)
    for param in parameters():  # an object parameter goes as JSON text (infra/recipes/structured.py schema_from_text)
        if param.json and isinstance(params.get(param.name), dict):
            params[param.name] = json.dumps(params[param.name])
    return params


def nested_names() -> dict[str, tuple[str, str]]:
    """Every name a --params file may use at its top level for a nested field -> (group, field): its
    flag's name (`tokens_to_generate`, `judge_template`, `add_bos`) and its own name (`add_BOS`),
    where two groups share a name, the first group's; never a top-level parameter's name."""
    nested = [param for param in parameters() if param.group is not None]
    names = {param.flag: (param.group, param.name) for param in nested}
    for param in nested:
        if param.name not in RunParams.model_fields:  # judge.prompt_format: by its flag's name only
            names.setdefault(param.name, (param.group, param.name))
    return names


def load_params_file(path: Path) -> dict:
    """A --params file: the flow's parameters, with nested fields either in their group
    (`{"sampling": {"temperature": 0.7}}`) or under their flag's name at the top
    (`{"temperature": 0.7}`), as `--help` says. Anything else is refused in one line naming the key."""
    import difflib

    where = f"--params {path}"
    try:
        params = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file; give the path of a JSON object of flow parameters") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{where}: not readable as JSON ({exc}); it must hold one JSON object of flow parameters") from None
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: holds a JSON {type(params).__name__}, not an object of flow parameters")
    flow_names = list(RunParams.model_fields)
    nested = nested_names()
    for key in [k for k in params if k not in flow_names]:
        if key not in nested:
            close = difflib.get_close_matches(key, [*flow_names, *nested], n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"{where}: unknown parameter {key!r}; {hint}the flow takes {', '.join(flow_names)} "
                              "(nested fields also by their flag's name, e.g. tokens_to_generate)")
        group, field = nested[key]
        value = params.pop(key)
        inner = params.setdefault(group, {})
        if not isinstance(inner, dict):
            raise ConfigError(f"{where}: {group!r} must be an object of its fields, not {inner!r}")
        if field in inner and inner[field] != value:
            raise ConfigError(f"{where}: {key!r} ({value!r}) and {group}.{field} ({inner[field]!r}) disagree; keep one")
        inner[field] = value
    return params


@dataclass
class _RunSoFar:
    """What an interrupted run's last line reports."""
    run_id: str | None = None
    progress: object | None = None  # the progress listener: records published of the total


def _run(args: argparse.Namespace) -> int:
    from flows.interrupts import FirstSignalStops

    stop = FirstSignalStops("already stopping: releasing the server and the run's lease")
    so_far = _RunSoFar()
    with stop.installed():  # from here on, Ctrl-C and SIGTERM end the run cleanly, also while it starts
        try:
            from flows import api_server

            try:
                return _run_flow(args, so_far)
            finally:
                api_server.stop_temporary_server()  # a later signal is only noted: this runs to its end
        except BaseException as exc:
            if (signum := stop.seen(exc)) is None:
                raise
            _print_interrupted(args, so_far, signum)
            stop.exiting()
            return 128 + signum


def _run_flow(args: argparse.Namespace, so_far: _RunSoFar) -> int:
    from prefect.exceptions import ParameterTypeError

    from flows import api_server, progress
    from flows.generate import generate

    params = run_parameters(args)
    if args.pipeline:
        flow, params = pipeline_flow(args, params)
    else:
        flow = generate
    try:  # the checks Prefect makes before the flow starts, here, without its error log
        flow.validate_parameters(params)
    except ParameterTypeError as exc:
        raise ConfigError(f"Invalid flow parameters: {exc}") from None
    # Named here, not by the flow, so an interrupted run's resume command can name it.
    so_far.run_id = params["run_id"] = params.get("run_id") or resolve_run_id(None)
    _quiet_user_errors()
    with api_server.chosen_server(args.local_prefect):
        # In a session of its own: a terminal's Ctrl-C must not stop the API the run reports its crash to.
        api_server.start_temporary_server()
        so_far.progress = progress.for_stream(sys.stderr, every_s=args.progress_every_s)
        with progress.listening(so_far.progress):
            result = flow(**params)
        api_server.stop_temporary_server()  # Prefect's log of it comes before our last lines
    if "records_kept" in result:  # the counts that make the training set, just above the manifest's line
        reasons = ", ".join(f"{reason} {n}" for reason, n in result["filtered"].items()) or "none"
        print(f"run {result['run_id']}: {result['records_kept']} of {result['records_written']} records kept; "
              f"filtered: {reasons}", file=sys.stderr, flush=True)
    print(result["manifest"], flush=True)  # the last line, for scripts: `... | tail -n 1`
    return 0


PIPELINE_FLAGS = ("run_id", "output_uri", "replicas", "max_server_restarts", "shard_size")


def pipeline_flow(args: argparse.Namespace, params: dict):
    """`run --pipeline FILE`: the pipeline flow and its parameters; a stage's settings are the file's,
    so any other flag or --params key is refused (one line) rather than silently ignored."""
    from flows.pipeline import pipeline

    if args.params:
        raise ConfigError("--params and --pipeline: a pipeline's settings are in its file; give one of them")
    params = {k: v for k, v in params.items() if k != "export"}  # a pipeline always writes its trainer files
    if others := [k for k in params if k not in PIPELINE_FLAGS]:
        raise ConfigError(f"--pipeline: {others[0]!r} is set per stage in the pipeline file (docs/pipelines.md), not "
                          f"on the command line; only {', '.join(PIPELINE_FLAGS)} apply to a pipeline run")
    from infra.pipeline.check import check_pipeline
    from infra.pipeline.files import load_pipeline
    from infra.settings import load_settings

    settings = load_settings()  # the file checked here too, before Prefect's API server starts: a bad one costs nothing
    check_pipeline(load_pipeline(args.pipeline, settings), settings, args.pipeline)
    return pipeline, {"pipeline": args.pipeline, **params}


def _print_interrupted(args: argparse.Namespace, so_far: _RunSoFar, signum: int) -> None:
    """One line: what the run got to, and the command that finishes it (the same run id)."""
    import shlex
    import signal

    name = signal.Signals(signum).name
    run_id, listener = so_far.run_id, so_far.progress
    if run_id is None:  # stopped before it had a run id: nothing to resume
        print(f"nemotron-sdg run: interrupted by {name} before the run started", file=sys.stderr, flush=True)
        return
    done = (f": {listener.done} of {listener.total} records published" if listener is not None and listener.total
            # A pipeline counts by stage, on its run page: no one total to give here.
            else ": each stage's published shards are kept" if getattr(args, "pipeline", None) else " before its plan")
    print(f"nemotron-sdg run: run {run_id} interrupted by {name}{done}; resume it with: "
          f"{shlex.join(resume_command(args.argv, args.run_id, run_id))}", file=sys.stderr, flush=True)


def resume_command(argv: list[str], given_run_id: str | None, run_id: str) -> list[str]:
    """The command line that resumes run `run_id`: the same one, without --new-run (it would start
    another run), with --run-id unless it already named this run (the last --run-id wins)."""
    kept = [a for a in argv if not (len(a) >= len("--new") and "--new-run".startswith(a))]
    return ["nemotron-sdg", *kept, *([] if given_run_id == run_id else ["--run-id", run_id])]


class _UserErrorFilter(logging.Filter):
    """Prefect logs a failed flow's exception with its traceback. For a user's mistake (a
    ConfigError) the CLI prints one line itself: drop Prefect's copies. A bug keeps its traceback."""

    names = tuple(cls.__name__ for cls in (ConfigError, *ConfigError.__subclasses__()))

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], ConfigError):
            return False
        return not (record.name.startswith("prefect") and any(f"{n}(" in record.getMessage() or f"{n}:" in record.getMessage()
                                                              for n in self.names))


def _quiet_user_errors() -> None:
    """Put the filter on every handler Prefect's logging configuration created."""
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    for handler in {h for lg in loggers for h in lg.handlers}:
        if not any(isinstance(f, _UserErrorFilter) for f in handler.filters):
            handler.addFilter(_UserErrorFilter())


def _add_render(sub) -> None:
    p = sub.add_parser("render", help="print the sbatch script and node launcher without submitting",
                       description="Dry run: render the Slurm scripts for a profile and print them.")
    p.add_argument("--profile", default="h100x16")
    p.add_argument("--engine", choices=ENGINE_NAMES,
                   help="the serving engine to render the profile with (default: the profile's, nemo for the built-ins)")
    p.add_argument("--model-path", help="the model on the cluster: NeMo's gpt_model_file, or the Hugging Face "
                                        "checkpoint vllm/trtllm load (default NSDG_MODEL__PATH)")
    p.add_argument("--account")
    p.add_argument("--partition")
    p.add_argument("--run-id", default="dry-run")
    p.add_argument("--pipeline", help="render this pipeline file's job instead: its generation server's profile, and "
                                      "a reward server in the job (swap_with: its second step; resident: beside it)")
    p.set_defaults(func=_render)


def _render(args: argparse.Namespace) -> int:
    from infra.settings import load_settings
    from infra.slurm.backend import render_for_profile

    if args.pipeline:
        from infra.pipeline.files import load_pipeline
        from infra.slurm.steps import pipeline_job

        settings = load_settings()
        the = load_pipeline(args.pipeline, settings)
        files = pipeline_job(settings, the.servers, the.server[0], args.run_id,
                             tuple(s.name for s in the.stages if s.kind == "generate" and the.level(s) > 0))
    else:
        files = render_for_profile(load_settings(), args.profile, model_path=args.model_path, account=args.account,
                                   partition=args.partition, run_id=args.run_id, engine=args.engine)
    for title, text in files:
        print(f"# ===== {title} =====")
        print(text)
    return 0


def _add_check(sub) -> None:
    p = sub.add_parser("check", help="check a pipeline file and render its templates, without a server",
                       description="Validate a pipeline file (docs/pipelines.md), render each stage's template on the "
                                   "input's first rows (a later stage on a placeholder of its parent's row) and print "
                                   "the stage graph. Starts no server and asks for no GPU.")
    p.add_argument("--pipeline", required=True, help="the pipeline file: YAML or JSON, a local path, file:// or s3://")
    p.add_argument("--rows", type=_rows, default=3, metavar="N",
                   help="input rows each first stage's template is rendered on, 1 to 100 (default 3)")
    p.add_argument("--show-prompts", action="store_true", help="also print each stage's first rendered prompt")
    p.set_defaults(func=_check)


def _rows(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 100:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from 1 to 100")
    return int(text)


def _check(args: argparse.Namespace) -> int:
    from infra.pipeline.check import check_file
    from infra.settings import load_settings

    print("\n".join(check_file(args.pipeline, load_settings(), args.rows, args.show_prompts)))
    return 0


def _add_install_automations(sub) -> None:
    from flows import zombies

    p = sub.add_parser(
        "install-automations", help="install the Prefect automation that marks runs with a dead flow process Crashed",
        description="Create (or update) the automation on the Prefect server at PREFECT_API_URL that sets a "
                    f"run tagged {zombies.TAG!r} to Crashed when its flow process stops sending heartbeats. "
                    "Run once after `prefect deploy --all`; running it again updates it in place.")
    p.add_argument("--heartbeat-s", type=float,
                   help="the heartbeat (s) flow runs send (default: read from the deployments' job variables, "
                        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY, which prefect.yaml sets; refused when shorter than that)")
    p.add_argument("--within-s", type=float,
                   help=f"seconds without a heartbeat before a run counts as dead (default and minimum: "
                        f"{zombies.MISSED_HEARTBEATS} heartbeats)")
    p.set_defaults(func=_install_automations)


def _install_automations(args: argparse.Namespace) -> int:
    from prefect.settings import PREFECT_API_URL

    from flows import zombies
    from infra.errors import ConfigError

    api = PREFECT_API_URL.value()
    if not api:
        raise ConfigError("PREFECT_API_URL is not set: the automation would go to a temporary server that stops "
                          "with this command. Set it to your server's API (http://HOST:4200/api) and run again.")
    heartbeat_s, source = zombies.choose_heartbeat(args.heartbeat_s, zombies.deployment_heartbeats(),
                                                   zombies.heartbeat_frequency())
    within_s = args.within_s or zombies.MISSED_HEARTBEATS * heartbeat_s
    automation_id, what = zombies.install(within_s, heartbeat_s)
    print(f"{what} automation {zombies.NAME!r} ({automation_id}) on {api}: runs tagged {zombies.TAG!r} with no "
          f"heartbeat for {within_s:g} s are set to Crashed; sized for {source}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from flows.doctor import register as register_doctor
    from infra.local_server.cli import register as register_local_server

    parser = argparse.ArgumentParser(prog="nemotron-sdg", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub)
    _add_render(sub)
    _add_check(sub)
    _add_install_automations(sub)
    register_doctor(sub)
    register_local_server(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore"):  # one line per Prefect API call otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args) or 0
    except ConfigError as exc:  # the user's to fix: one message, exit 2
        print(f"nemotron-sdg {args.command}: {exc}", file=sys.stderr)
        return 2
    except SdgError as exc:  # a run that failed for a reason outside the user's input (server, Slurm, storage)
        print(f"nemotron-sdg {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
