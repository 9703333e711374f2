"""A typed Slurm job spec for the model server: the values the two job scripts are rendered from
(infra/slurm/render.py; what differs per serving engine is decided in infra/slurm/launch.py).

`SbatchSpec` holds every value the scripts need and validates all of them when it is built,
so nothing bad is found after a GPU has been asked for.

Values that land in `#SBATCH` lines are parsed by sbatch, not by the shell (quotes group
words, an unquoted `#` ends the line, `packjob`/`hetjob` anywhere splits the job), so they are
held to a charset instead of being quoted. That includes `job_dir` (it appears in `-o`, `-e`
and `--chdir`): it must be an absolute path of letters, digits and `. _ + / -`.

The job directory (the caller creates it on a filesystem every node shares):

    <job_dir>/sbatch.sh            the batch script: submit this
    <job_dir>/node-launcher.sh     srun runs it once per rank
    <job_dir>/heartbeat            the orchestrator writes or touches it; the dead-man switch watches it
    <job_dir>/submitted            the job id, written by the orchestrator between `sbatch --hold` and
                                   `scontrol release` (infra/slurm/backend.py)
    <job_dir>/job-info             written by the batch script: job_id, batch_host, nodelist, first_node, started_at
    <job_dir>/rank0-host           `hostname` of global rank 0, the only rank that serves HTTP
    <job_dir>/rank0-node           Slurm node name of rank 0 (for `scontrol show node` -> NodeAddr)
    <job_dir>/ray-head             engine vllm on 2+ nodes: "<job id>.<restart count> <address>:<port>" of
                                   the Ray head, for the workers (infra/templates/launcher-ray.sh.tmpl)
    <job_dir>/preflight-failed     the in-job preflight's one line, when a check failed (the node
                                   launcher, before the server starts)
    <job_dir>/cancel-reason        why the dead-man switch cancelled the job (only when it did)
    <job_dir>/signal-received      the last SIGUSR1/SIGUSR2 the job got (`--signal`, `scancel --signal`):
                                   signal=USR1, received_at=<epoch s>, by=batch; the job goes on
    <job_dir>/<job_name>-<id>.out  the job's stdout (batch script and every rank); `.err` for stderr
    <job_dir>/reward-launcher.sh   a job with a reward step (`reward`, infra/slurm/steps.py): its launcher
    <job_dir>/step-request         "<n> <step>": the step the orchestrator asked for next (steps.py)
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import get_args

from pydantic import BaseModel

from infra.errors import ConfigError
from infra.settings import (
    SAFE_NAME,
    SLURM_TIME,
    ContainerRuntime,
    GpuRequest,
    ModelSettings,
    Profile,
    ServerSettings,
    Settings,
    SlurmSettings,
)
from infra.slurm import launch, options
from infra.slurm.options import check_directive, check_int, check_mount, check_sbatch_value, fail as _fail

SBATCH_NAME = "sbatch.sh"
LAUNCHER_NAME = "node-launcher.sh"
REWARD_LAUNCHER_NAME = "reward-launcher.sh"
STEP_REQUEST_NAME = "step-request"
HEARTBEAT_NAME = "heartbeat"
JOB_INFO_NAME = "job-info"
SUBMITTED_NAME = "submitted"
PREFLIGHT_FAILED_NAME = "preflight-failed"
RANK0_HOST_NAME = "rank0-host"
RANK0_NODE_NAME = "rank0-node"
CANCEL_REASON_NAME = "cancel-reason"
SIGNAL_MARKER_NAME = "signal-received"
STDOUT_PATTERN = "%x-%j.out"
STDERR_PATTERN = "%x-%j.err"

CONTAINER_RUNTIMES = get_args(ContainerRuntime)
GPU_REQUESTS = get_args(GpuRequest)

# Lightning's SLURMEnvironment switches itself off for these job names: the srun tasks would
# then not learn their ranks from Slurm and never form one 16-rank world.
FORBIDDEN_JOB_NAMES = frozenset({"bash", "interactive"})

_COMMENT = re.compile(r"[A-Za-z0-9._:=/@+,-]+( [A-Za-z0-9._:=/@+,-]+)*")
_SBATCH_PATH = re.compile(r"/[A-Za-z0-9._+/-]*")
# Hydra's override parser reads `gpt_model_file=<path>`: quotes, spaces, brackets, braces,
# commas, '=' and '$' mean something to it, so the model path keeps to plain path characters.
_HYDRA_PATH = re.compile(r"/[A-Za-z0-9._+/@%:-]*")
_GPU_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _default(section: type[BaseModel], name: str):
    """The settings model's default for a field: SbatchSpec's defaults are these, so each is
    written once (in infra/settings.py); lists become tuples, dicts tuples of items."""
    value = section.model_fields[name].get_default(call_default_factory=True)
    if isinstance(value, dict):
        return tuple(value.items())
    return tuple(value) if isinstance(value, list) else value


_slurm, _server, _model = (partial(_default, section) for section in (SlurmSettings, ServerSettings, ModelSettings))


def _check_pattern(field: str, value: str, pattern: re.Pattern[str], allowed: str) -> None:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise _fail(field, value, allowed)


def _check_slurm_name(field: str, value: str | None) -> None:
    if value is not None:
        _check_pattern(field, value, SAFE_NAME,
                       "use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit")
        check_sbatch_value(field, value)


# The settings of `slurm` that SbatchSpec.from_settings copies as they are, to the spec field of
# the same name (the others it renames or derives).
FROM_SLURM = (
    "time_limit", "account", "partition", "qos", "reservation", "exclusive", "requeue", "cpus_per_task",
    "gpu_request", "extra_directives", "srun_args", "export", "env", "setup", "container_runtime",
    "container_mounts", "mount_model", "heartbeat_timeout_s", "heartbeat_interval_s", "warn_signal_s", "ray_port",
)


@dataclass(frozen=True)
class SbatchSpec:
    """Everything the batch script and the node launcher need, validated on construction.

    `server_command`, when set, replaces the engine's server command line verbatim (tests, the
    NeMo-compatible local server); otherwise `launch.server_command` builds the engine's
    (infra/slurm/launch.py), for `nemo` the seed's `megatron_gpt_eval.py`.
    """

    job_name: str
    job_dir: str
    comment: str
    nodes: int
    tasks_per_node: int
    gpus_per_node: int
    tensor_parallel: int
    pipeline_parallel: int
    # Every default below is the settings' (see _default): from_settings(Settings()) and a spec
    # built with the job's own values alone agree (tests/test_slurm_render.py checks it).
    time_limit: str = _slurm("time_limit")
    account: str | None = _slurm("account")
    partition: str | None = _slurm("partition")
    qos: str | None = _slurm("qos")
    reservation: str | None = _slurm("reservation")
    exclusive: bool = _slurm("exclusive")
    mem: str | None = _slurm("mem")
    propagate: str | None = _slurm("propagate")
    requeue: bool = _slurm("requeue")
    cpus_per_task: int | None = _slurm("cpus_per_task")
    gpu_type: str | None = _default(Profile, "gpu_type")
    gpu_request: GpuRequest = _slurm("gpu_request")
    extra_directives: tuple[str, ...] = _slurm("extra_directives")
    srun_args: tuple[str, ...] = _slurm("srun_args")
    export: tuple[str, ...] = _slurm("export")
    env: tuple[tuple[str, str], ...] = _slurm("env")
    setup: tuple[str, ...] = _slurm("setup")
    container_runtime: ContainerRuntime = _slurm("container_runtime")
    container_image: str = _slurm("container_image")
    container_mounts: tuple[str, ...] = _slurm("container_mounts")
    mount_model: bool = _slurm("mount_model")
    model_path: str = _model("path")
    eval_script: str = _server("eval_script")
    port: int = _server("port")
    server_command: tuple[str, ...] | None = _server("command")
    heartbeat_timeout_s: float = _slurm("heartbeat_timeout_s")
    heartbeat_interval_s: float = _slurm("heartbeat_interval_s")
    # The serving program (infra/engines) and what its launch needs beyond NeMo's.
    engine: str = _default(Profile, "engine")
    served_model_name: str = _model("name")
    max_model_len: int = _model("context_length")
    ray_port: int = _slurm("ray_port")
    # How long Ray's head and workers wait for each other: the server's whole ready deadline.
    launch_wait_s: int = math.ceil(_server("ready_timeout_s"))
    warn_signal_s: int = _slurm("warn_signal_s")  # --signal=B:USR1@<s>: noted in signal-received; 0: none
    # A reward server swapped into this job after the generator's step (infra/slurm/steps.py): its own
    # launch on the same nodes; the batch script then runs the steps the orchestrator asks for.
    reward: "SbatchSpec | None" = None
    # The reward step starts with the generator's, on nodes of its own after the generator's (a
    # pipeline's `resident: true`): the job asks for both servers' nodes, and no step is swapped.
    resident: bool = False

    def __post_init__(self) -> None:
        # Lists given by callers become tuples, so the spec stays immutable and hashable.
        if isinstance(self.env, Mapping):
            object.__setattr__(self, "env", tuple(self.env.items()))
        for name in ("extra_directives", "srun_args", "export", "env", "setup", "container_mounts", "server_command"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                if isinstance(value, str) or not isinstance(value, Iterable):
                    raise _fail(name, value, "give a list of strings")
                object.__setattr__(self, name, tuple(value))
        self._validate_header()
        self._validate_topology()
        self._validate_launch()
        self._validate_container()
        self._validate_server()
        launch.check_engine(self)
        self._validate_heartbeat()
        if self.resident and (self.reward is None or self.reward.gpus_per_node != self.gpus_per_node):
            raise ConfigError("Slurm job spec: resident needs a reward step" if self.reward is None else
                              f"Slurm job spec: the resident reward step needs {self.reward.gpus_per_node} GPUs per node, "
                              f"the generator's {self.gpus_per_node}: one job asks one number of GPUs per node; give the "
                              "reward server a profile with as many")
        if not self.resident and self.reward is not None and (self.reward.nodes, self.reward.gpus_per_node) != (self.nodes, self.gpus_per_node):
            raise ConfigError(f"Slurm job spec: the reward step needs {self.reward.nodes} x {self.reward.gpus_per_node} "
                              f"GPUs, the job has {self.nodes} x {self.gpus_per_node}: a swapped reward server runs on the "
                              "generator's nodes; give it a profile of the same shape")

    # --- validation, one concern per method ---------------------------------------------------

    def _validate_header(self) -> None:
        _check_slurm_name("job_name", self.job_name)
        if self.job_name.lower() in FORBIDDEN_JOB_NAMES:
            raise _fail("job_name", self.job_name,
                        "'bash' and 'interactive' make Lightning ignore Slurm; pick another name")
        for field in ("account", "partition", "qos", "reservation"):
            _check_slurm_name(f"slurm.{field}", getattr(self, field))
        _check_pattern(
            "job_dir", self.job_dir, _SBATCH_PATH,
            "use an absolute path of letters, digits and . _ + / - (it lands in #SBATCH -o/-e/--chdir lines)",
        )
        check_sbatch_value("job_dir", self.job_dir)
        _check_pattern("comment", self.comment, _COMMENT,
                       "use words of letters, digits and . _ : = / @ + , - separated by single spaces, e.g. "
                       "'nsdg run=<run_id> flow_run=<id>'")
        check_sbatch_value("comment", self.comment)
        if len(self.comment) > 512:
            raise _fail("comment", self.comment, "keep it under 512 characters")
        _check_pattern("slurm.time_limit", self.time_limit, SLURM_TIME, "use a Slurm time like 04:00:00 or 1-00:00:00")
        for field in ("exclusive", "requeue", "mount_model"):
            if not isinstance(getattr(self, field), bool):
                raise _fail(f"slurm.{field}", getattr(self, field), "use true or false")
        options.check_mem(self.mem)
        options.check_propagate(self.propagate)
        if self.gpu_request not in GPU_REQUESTS:
            raise _fail("slurm.gpu_request", self.gpu_request, f"use one of {', '.join(GPU_REQUESTS)}")
        if self.gpu_type is not None:
            _check_pattern("profile.gpu_type", self.gpu_type, _GPU_TYPE,
                           "use the GRES type name your site gives the GPUs, e.g. h100 (letters, digits, . _ -)")
        for directive in self.extra_directives:
            check_directive(directive, gpu_request=self.gpu_request)
        if self.mem is not None and (clash := [d for d in self.extra_directives if d.startswith("--mem-per-")]):
            raise _fail("slurm.extra_directives", clash[0],
                        f"sbatch refuses it next to --mem={self.mem}; set NSDG_SLURM__MEM= (empty) to use it")

    def _validate_topology(self) -> None:
        check_int("profile.nodes", self.nodes, 1, 64)
        check_int("profile.tasks_per_node", self.tasks_per_node, 1, 64)
        check_int("profile.gpus_per_node", self.gpus_per_node, 0, 16)
        check_int("profile.tensor_parallel", self.tensor_parallel, 1, 64)
        check_int("profile.pipeline_parallel", self.pipeline_parallel, 1, 64)
        if self.gpus_per_node and self.tasks_per_node != self.gpus_per_node:
            raise ConfigError(
                f"Slurm job spec: tasks_per_node={self.tasks_per_node} must equal gpus_per_node={self.gpus_per_node}: "
                "NeMo runs one rank per GPU, started by srun."
            )
        ranks = self.tasks_per_node * self.nodes
        needed = self.tensor_parallel * self.pipeline_parallel
        if ranks != needed:
            raise ConfigError(
                f"Slurm job spec: devices x nodes = {self.tasks_per_node} x {self.nodes} = {ranks} must equal "
                f"tensor_parallel x pipeline_parallel = {self.tensor_parallel} x {self.pipeline_parallel} = {needed}. "
                "Fix the profile's nodes, gpus_per_node, tensor_parallel or pipeline_parallel."
            )

    def _validate_launch(self) -> None:
        if self.cpus_per_task is not None:
            check_int("slurm.cpus_per_task", self.cpus_per_task, 1, 1024)
        for arg in self.srun_args:
            options.check_srun_arg(arg, self.container_runtime)
        for name in self.export:
            options.check_export_name(name)
        options.check_env(dict(self.env))
        for line in self.setup:
            options.check_setup_line(line)

    def _validate_container(self) -> None:
        if self.container_runtime not in CONTAINER_RUNTIMES:
            raise _fail("slurm.container_runtime", self.container_runtime,
                        f"use one of {', '.join(CONTAINER_RUNTIMES)}")
        options.check_image(self.container_runtime, self.container_image, setting=launch.image_setting(self.engine))
        for mount in self.container_mounts:
            check_mount(self.container_runtime, mount)

    def _validate_server(self) -> None:
        check_int("server.port", self.port, 1024, 65535)
        if self.server_command is not None:
            if not self.server_command or not all(isinstance(a, str) for a in self.server_command):
                raise _fail("server.command", self.server_command, "give a non-empty list of strings")
            if any("\x00" in arg for arg in self.server_command):
                raise _fail("server.command", self.server_command, "arguments cannot contain NUL bytes")
            return
        if self.engine in launch.HYDRA_SCRIPT_ENGINES:
            _check_pattern(
                "model.path", self.model_path, _HYDRA_PATH,
                "use an absolute path of letters, digits and . _ + / @ % : - (Hydra parses gpt_model_file=<path> and "
                "treats quotes, spaces, brackets, commas, '=' and '$' specially); mount the model under a plainer path",
            )
            script = "server.reward_script" if self.engine == launch.REWARD_ENGINE else "server.eval_script"
            _check_pattern(script, self.eval_script, _HYDRA_PATH,
                           "use an absolute path of letters, digits and . _ + / @ % : -")
        else:
            _check_pattern("model.path", self.model_path, _HYDRA_PATH,
                           f"{self.engine} loads a Hugging Face checkpoint directory: use its absolute path, of "
                           "letters, digits and . _ + / @ % : - (it is mounted as SRC:DST:ro)")
        if self.container_runtime == "none" or options.covering_mount(self.container_mounts, self.model_path):
            return
        if not self.mount_model:
            raise _fail("model.path", self.model_path,
                        "no container mount covers it, so the ranks would not find it: add one to "
                        "NSDG_SLURM__CONTAINER_MOUNTS (e.g. /lustre/models:/lustre/models:ro) or set "
                        "NSDG_SLURM__MOUNT_MODEL=true to mount it read-only at its own path")
        options.check_model_mountable(self.model_path)

    def _validate_heartbeat(self) -> None:
        for field in ("heartbeat_timeout_s", "heartbeat_interval_s"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 86_400:
                raise _fail(f"slurm.{field}", value, "use a number of seconds above 0 and at most 86400")
        if self.heartbeat_timeout_s < 2 * self.heartbeat_interval_s:
            raise ConfigError(
                f"Slurm job spec: slurm.heartbeat_timeout_s={self.heartbeat_timeout_s} must be at least twice "
                f"slurm.heartbeat_interval_s={self.heartbeat_interval_s}, or one late check cancels a healthy job."
            )
        # Rendered into an #SBATCH line: an int, nothing else.
        check_int("slurm.warn_signal_s", self.warn_signal_s, 0, 65_535)

    # --- derived values ------------------------------------------------------------------------

    @property
    def heartbeat_file(self) -> str:
        return f"{self.job_dir}/{HEARTBEAT_NAME}"

    def job_path(self, name: str) -> Path:
        return Path(self.job_dir) / name

    def model_mount(self) -> tuple[str | None, str]:
        """The mount that makes the model visible in the container (None: none is added), and the
        sentence the batch script says about it."""
        if self.server_command is not None:
            return None, "the server command is replaced (server.command); no model is mounted for it."
        if self.container_runtime == "none":
            return None, f"{self.model_path} is read from each node's own filesystem (container_runtime none)."
        if mount := options.covering_mount(self.container_mounts, self.model_path):
            return None, f"{self.model_path} is inside the mount {mount} (slurm.container_mounts)."
        return (f"{self.model_path}:{self.model_path}:ro",
                f"{self.model_path} is mounted read-only at its own path (slurm.mount_model).")

    def mounts(self) -> list[str]:
        """Every container mount: the site's, the model's (when added), the job dir at its own path."""
        model, _ = self.model_mount()
        return [*self.container_mounts, *([model] if model else []), f"{self.job_dir}:{self.job_dir}"]

    def check_paths_seen_here(self) -> None:
        """Refuse a model file or a missing image that this host can see (see options.check_paths_seen_here)."""
        options.check_paths_seen_here(
            model_path=self.model_path if self.server_command is None else None,
            image=self.container_image if self.container_runtime != "none" else None,
            hf_checkpoint=self.engine in ("vllm", "trtllm"),
            engine=self.engine,
        )

    # --- construction from settings ------------------------------------------------------------

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        profile: Profile | str,
        *,
        job_name: str,
        comment: str,
        job_dir: str | os.PathLike[str],
    ) -> "SbatchSpec":
        """The spec for one run: `profile` (a Profile or a profile name) gives the topology,
        `settings.slurm`, `.server` and `.model` the rest. `job_dir` may start with `~`."""
        if isinstance(profile, str):
            profile = settings.profile(profile)
        if profile.backend != "slurm":
            raise _fail("profile.backend", profile.backend, "an sbatch script needs a profile with backend 'slurm'")
        slurm, server = settings.slurm, settings.server
        engine = settings.engine(profile).name
        launch.check_images_map(slurm.images)
        spec = cls(
            job_name=job_name,
            job_dir=os.path.expanduser(os.fspath(job_dir)),
            comment=comment,
            nodes=profile.nodes,
            tasks_per_node=profile.tasks_per_node,
            gpus_per_node=profile.gpus_per_node,
            tensor_parallel=profile.tensor_parallel,
            pipeline_parallel=profile.pipeline_parallel,
            gpu_type=profile.gpu_type,
            engine=engine,
            **{name: getattr(slurm, name) for name in FROM_SLURM},
            mem=slurm.mem or None,  # empty: no --mem line
            propagate=slurm.propagate or None,
            container_image=launch.image_for(engine, slurm.container_image, slurm.images),
            model_path=settings.model.path,
            served_model_name=settings.model.name,
            max_model_len=settings.model.context_length,
            eval_script=server.eval_script,
            port=server.port,
            server_command=server.command,
            launch_wait_s=math.ceil(server.ready_timeout_s),
        )
        spec.check_paths_seen_here()
        launch.check_api(engine, settings.api(profile), spec.server_command is not None)
        return spec
