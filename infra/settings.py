"""The one settings object: built once at flow start from the environment (prefix NSDG_,
nested sections joined with __) and `.env`, then passed down. No other module reads os.environ.

    NSDG_SERVER__PORT=1424  NSDG_SLURM__ACCOUNT=my-acct  NSDG_S3__ENDPOINT_URL=http://minio:9000
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

from infra.engines import Api, Engine, EngineName, engine, engine_in_flight
from infra.errors import ConfigError
from infra.storage.s3_settings import S3Settings
from infra.storage.uris import validate_allowed_entry
from infra.prompting.prompt_format import PromptFormatName

ENV_PREFIX = "NSDG_"
# Characters allowed in anything that becomes a Slurm name, a path component or a storage key.
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# sbatch --time's forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S.
SLURM_TIME = re.compile(r"(\d+-)?\d{1,3}(:\d{2}){0,2}")
ContainerRuntime = Literal["pyxis", "apptainer", "none"]
GpuRequest = Literal["gpus-per-node", "gres"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Profile(_Section):
    """Where and how the server runs. Built-ins below; add your own with NSDG_EXTRA_PROFILES (JSON)."""

    backend: Literal["local", "slurm", "attach"]
    nodes: int = Field(1, ge=1, le=64)
    gpus_per_node: int = Field(0, ge=0, le=16)
    tensor_parallel: int = Field(1, ge=1, le=64)
    pipeline_parallel: int = Field(1, ge=1, le=64)
    gpu_type: str | None = Field(None, description="GRES type of the GPUs (e.g. h100): --gpus-per-node=h100:8")
    description: str = ""
    # How prompts are wrapped (infra/prompting/prompt_format.py); None: `raw`, or `chat` for a local model with a template.
    prompt_format: PromptFormatName | None = None
    # The serving program (infra/engines): it fixes the HTTP API unless server.api overrides it.
    engine: EngineName = "nemo"
    # Known before any job: a fresh run's first sbatch is judged by it (infra/backends/rollover.py).
    expected_load_s: float = Field(0.0, ge=0, le=86_400, description="a job's model load (s) assumed until the run "
                                   "has measured one (NSDG_SLURM__EXPECTED_LOAD_S overrides it); 0: nothing assumed")

    @property
    def billed_gpus(self) -> int:
        """The GPUs a replica of this profile holds, for GPU-hours: its Slurm job's; none locally or attached."""
        return self.nodes * self.gpus_per_node if self.backend == "slurm" else 0

    @property
    def tasks_per_node(self) -> int:
        """One rank per GPU, as NeMo expects (srun --ntasks-per-node, no torchrun)."""
        return max(self.gpus_per_node, 1)

    @model_validator(mode="after")
    def _topology(self) -> "Profile":
        if self.backend == "slurm":
            ranks = self.nodes * self.tasks_per_node
            needed = self.tensor_parallel * self.pipeline_parallel
            if ranks != needed:
                raise ValueError(
                    f"devices x nodes = {self.tasks_per_node} x {self.nodes} = {ranks} must equal "
                    f"tensor_parallel x pipeline_parallel = {self.tensor_parallel} x "
                    f"{self.pipeline_parallel} = {needed}"
                )
        return self


# The built-in GPU profiles serve Nemotron-4-340B: 680 GB of bf16 weights read from a shared filesystem at
# 1-5 GB/s is 2-12 min (an estimate, not a measurement); the low end is assumed, so no limit that could
# work is refused. A measured load replaces it; NSDG_SLURM__EXPECTED_LOAD_S overrides it.
LOAD_340B_S = 120.0
BUILTIN_PROFILES: dict[str, Profile] = {
    "h100x16": Profile(backend="slurm", nodes=2, gpus_per_node=8, tensor_parallel=8, pipeline_parallel=2,
                       description="2 nodes x 8 H100 80GB, TP8 PP2 (the model card's layout)",
                       expected_load_s=LOAD_340B_S),
    "a100x16": Profile(backend="slurm", nodes=2, gpus_per_node=8, tensor_parallel=8, pipeline_parallel=2,
                       description="2 nodes x 8 A100 80GB, TP8 PP2",
                       expected_load_s=LOAD_340B_S),
    "h200x8": Profile(backend="slurm", nodes=1, gpus_per_node=8, tensor_parallel=8, pipeline_parallel=1,
                      description="1 node x 8 H200, TP8 PP1",
                      expected_load_s=LOAD_340B_S),
    "local": Profile(backend="local", description="the NeMo-compatible local server on this machine, no GPU"),
    "attach": Profile(backend="attach", description="a server someone else runs, at server.url"),
}


class ModelSettings(_Section):
    path: str = Field("/models/Nemotron-4-340B-Base", description="gpt_model_file on the cluster: an extracted .nemo directory")
    name: str = "nemotron-4-340b-base"
    context_length: int = Field(4096, ge=16, le=1_048_576)
    tokenizer: str | None = Field(None, description="a tokenizer.json (or its directory) for exact prompt token counts; else a byte estimate")


class ServerSettings(_Section):
    port: int = Field(1424, ge=1024, le=65535)
    url: str | None = Field(None, description="attach backend: the server's base URL")
    urls: list[str] = Field(default_factory=list, description="attach backend with several replicas: one base URL each")
    replicas: int = Field(1, ge=1, le=64, description="server replicas working through one run, each its own job")
    connect_timeout_s: float = Field(5.0, gt=0, le=300)
    read_timeout_s: float = Field(1800.0, gt=0, le=86_400)
    ready_timeout_s: float = Field(2700.0, gt=0, le=86_400, description="one deadline for the whole wait (45 min for 340B)")
    ready_poll_s: float = Field(0.25, gt=0, le=60)
    api: Api | None = Field(
        None, description="the HTTP API spoken to the server; default: the profile's engine's (nemo: nemo-generate)")
    max_in_flight: int | None = Field(None, ge=1, le=4096, description="requests kept in flight per replica; default "
                                      "per API: 2 for nemo-generate (one computing, one queued), 256 for openai-completions")
    throttle_tries: int = Field(10, ge=1, le=100, description="openai-completions: sends of one request while the "
                                "server answers 429/503 (busy), the first included; then the run stops, never a lost replica")
    throttle_wait_s: float = Field(600.0, gt=0, le=86_400, description="openai-completions: the deadline for one "
                                   "request's throttled tries and their waits (Retry-After, else backoff)")
    max_server_restarts: int = Field(2, ge=0, le=20, description="new servers started after one dies or hangs mid-run")
    keep_alive_s: float = Field(3600.0, ge=1, le=4 * 3600, description="a ready replica idle this long gets a 1-token "
                                "request: megatron_gpt_eval.py's idle ranks die at NCCL's 5 h timeout")
    breaker_window: int = Field(500, ge=10, le=1_000_000, description="records the circuit breaker looks back over")
    breaker_max_share: float = Field(0.10, gt=0, le=1, description="share of failed records in the window that stops the run")
    command: list[str] | None = Field(None, description="replaces megatron_gpt_eval.py in the node launcher")
    eval_script: str = Field("/opt/NeMo/examples/nlp/language_modeling/megatron_gpt_eval.py",
                             description="megatron_gpt_eval.py as the ranks see it (bare metal: in your NeMo checkout)")
    reward_script: str = Field("/opt/NeMo-Aligner/examples/nlp/gpt/serve_reward_model.py",
                               description="NeMo-Aligner's serve_reward_model.py as the ranks see it, for a reward server "
                               "started in the job (a pipeline's swap_with or resident)")
    reward_command: list[str] | None = Field(None, description="replaces serve_reward_model.py in a job's reward "
                                             "server's launcher ({port}: its port); tests and site wrappers")


class LocalSettings(_Section):
    model_dir: str = ".cache/smollm2-135m-instruct"  # make-local-model; the tests set the tiny one
    engine: Literal["transformers", "simulated"] = "transformers"
    host: str = "127.0.0.1"
    ready_timeout_s: float = Field(180.0, gt=0, le=3600)
    extra_args: list[str] = Field(default_factory=list, description="more serve-local flags, e.g. the simulated engine's cost model or fault switches")


class SlurmSettings(_Section):
    account: str | None = None
    partition: str | None = None
    qos: str | None = None
    reservation: str | None = None
    time_limit: str = Field("04:00:00", description="sbatch --time: the last net against a leaked allocation")
    exclusive: bool = True
    job_root: str = Field("~/.nemotron-sdg/jobs", description="per-job directories; must be on a filesystem the nodes share")
    container_runtime: ContainerRuntime = "pyxis"
    container_image: str = Field("nvcr.io/nvidia/nemo:24.05", description="pyxis: a registry image (rendered "
                                 "nvcr.io#nvidia/nemo:24.05) or, better, a .sqsh path; apptainer: a .sif path")
    images: dict[str, str] = Field(default_factory=dict, description="per-engine images (engine -> image), e.g. "
                                   '{"vllm": "/shared/images/vllm.sqsh"}; nemo, custom and nemo-aligner (a swapped reward '
                                   "server) fall back to container_image, the others to their default (infra/slurm/launch.py)")
    ray_port: int = Field(6379, ge=1024, le=65535,
                          description="the vllm engine's Ray head port on the job's first node; Ray's other ports "
                                      "follow it (P+1..P+1099)")
    container_mounts: list[str] = Field(default_factory=list)
    mount_model: bool = Field(True, description="mount model.path read-only at its own path unless a mount covers it; "
                              "false: refuse a model path no mount covers")
    extra_directives: list[str] = Field(default_factory=list)
    mem: str | None = Field("0", description="sbatch --mem; 0 = all of each node's memory (--exclusive alone gives "
                            "only the default); empty to leave it out")
    propagate: str | None = Field("NONE", description="sbatch --propagate: the worker's rlimits the ranks get; "
                                  "empty to leave it out")
    requeue: bool = Field(False, description="let Slurm requeue the job (the flow treats a requeue as a lost server)")
    cpus_per_task: int | None = Field(None, ge=1, le=1024, description="CPUs per rank; default: the node's CPUs / ranks")
    gpu_request: GpuRequest = Field("gpus-per-node",
                                    description="how GPUs are asked for: --gpus-per-node or --gres=gpu")
    export: list[str] = Field(default_factory=lambda: ["PATH", "LANG", "LC_ALL", "TZ"],
                              description="variables sbatch copies from the worker; the job starts from the login environment")
    env: dict[str, str] = Field(default_factory=dict, description="variables for every rank, e.g. NCCL_SOCKET_IFNAME")
    setup: list[str] = Field(default_factory=list, description="shell lines each rank runs before the server "
                             "(module load ..., source .../activate)")
    srun_args: list[str] = Field(default_factory=list, description="more srun flags from an allowlist (--mpi=pmix, ...)")
    heartbeat_timeout_s: float = Field(600.0, ge=10, le=86_400)
    heartbeat_interval_s: float = Field(15.0, gt=0, le=3600)
    command_timeout_s: float = Field(30.0, gt=0, le=600)
    unknown_grace_s: float = Field(60.0, ge=0, le=3600)
    poll_s: float = Field(1.0, gt=0, le=60)
    release_margin_s: float = Field(60.0, ge=0, le=3600, description="a cancelled job may stay listed this long "
                                    "past the cluster's KillWait (epilog, GPU release) before release gives up on it")
    # Planned rollover across time limits (infra/backends/rollover.py): a successor job per replica ahead of its end.
    max_rollovers: int = Field(50, ge=0, le=10_000, description="planned successor jobs per run (a job nearing "
                               "its time limit); 0: none, a job that reaches its limit is then a lost server")
    rollover_margin_s: float = Field(60.0, ge=0, le=86_400, description="added to the successor's lead (queue wait "
                                     "+ load + one shard, measured) and kept free before a job's end")
    rollover_factor: float = Field(1.25, ge=1.0, le=10.0, description="on the measured queue wait, load and shard time")
    expected_load_s: float | None = Field(None, ge=0, le=86_400, description="a job's model load (s) assumed until "
                                          "the run has measured one: a time limit too short for it and one shard is "
                                          "refused before the first sbatch; default: the profile's (120 s for the "
                                          "built-in 340B profiles, else 0: nothing assumed)")
    warn_signal_s: int = Field(300, ge=0, le=65_535, description="sbatch --signal=B:USR1@<s>: Slurm warns the job "
                               "this long before its end (a shortened limit, a preemption); 0: no warning")

    @field_validator("time_limit")
    @classmethod
    def _time(cls, v: str) -> str:
        if not SLURM_TIME.fullmatch(v):
            raise ValueError("must be a Slurm time like 04:00:00 or 1-00:00:00")
        return v

    @field_validator("account", "partition", "qos", "reservation")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not SAFE_NAME.match(v):
            raise ValueError(f"{v!r} is not a Slurm name: use letters, digits, '.', '_' or '-'")
        return v


class _OwnDotEnvKeys(PydanticBaseSettingsSource):
    """`.env` is shared with Prefect, which reads it too (PREFECT_API_URL, PREFECT_API_AUTH_STRING):
    only NSDG_ keys are ours. A misspelled NSDG_ key still fails; other keys are left to Prefect,
    and never echoed in an error."""

    def __init__(self, settings_cls: type[BaseSettings], dotenv: PydanticBaseSettingsSource):
        super().__init__(settings_cls)
        self._dotenv = dotenv

    def get_field_value(self, field, field_name: str):  # values come whole from __call__
        return None, field_name, False

    def __call__(self) -> dict:
        return {k: v for k, v in self._dotenv().items()
                if k in self.settings_cls.model_fields or k.upper().startswith(ENV_PREFIX)}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        env_file=".env",
        extra="forbid",
        frozen=True,
    )

    output_uri: str = "output"
    run_lease_ttl_s: float = Field(120.0, ge=3, le=3600, description="a run's lease on its output location "
                                   "(infra/run/lease.py) expires this long after its last renewal (every third of it)")
    artifacts_flush_s: float = Field(15.0, gt=0, le=600, description="how long a run's end waits for its last "
                                     "Prefect UI updates (progress, tables) before dropping them (flows/artifacts.py)")
    allowed_uris: list[str] = Field(default_factory=list, description="local directories and s3://bucket/prefix "
                                    "prefixes every input and output must lie in (infra/storage/locations.py); empty: any")
    work_dir: str = Field(".nemotron-sdg", description="local state: logs of local servers, temp parts")
    extra_profiles: dict[str, Profile] = Field(default_factory=dict)
    model: ModelSettings = ModelSettings()
    server: ServerSettings = ServerSettings()
    local: LocalSettings = LocalSettings()
    slurm: SlurmSettings = SlurmSettings()
    s3: S3Settings = S3Settings()

    @field_validator("allowed_uris")
    @classmethod
    def _allowed(cls, v: list[str]) -> list[str]:
        return [validate_allowed_entry(entry) for entry in v]

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
        return init_settings, env_settings, _OwnDotEnvKeys(settings_cls, dotenv_settings), file_secret_settings

    def profile(self, name: str) -> Profile:
        profiles = {**BUILTIN_PROFILES, **self.extra_profiles}
        try:
            return profiles[name]
        except KeyError:
            raise ConfigError(
                f"Unknown profile {name!r}. Valid profiles: {', '.join(sorted(profiles))}. "
                f"Add one with {ENV_PREFIX}EXTRA_PROFILES."
            ) from None

    def engine(self, profile: Profile) -> Engine:
        return engine(profile.engine)

    def api(self, profile: Profile) -> str:
        return self.server.api or self.engine(profile).api

    def in_flight(self, profile: Profile) -> int:
        if self.server.max_in_flight is not None:
            return self.server.max_in_flight
        return engine_in_flight(profile.engine, self.api(profile))

    def served_name(self, profile: Profile) -> str:
        """The model name the server lists in /v1/models, which the client sends and readiness looks
        for. trtllm-serve (<= 1.2, no --served-model-name) lists a local model directory under its
        basename (engine-launch-audit B1): readiness would fail after the whole load on model.name."""
        if profile.engine == "trtllm" and profile.backend == "slurm" and not self.server.command:
            return PurePosixPath(self.model.path).name
        return self.model.name

    def tokenizer_path(self, profile: Profile) -> str | None:
        """The tokenizer to count prompt tokens with: the configured one, the local model's, or
        the model directory itself when this host can read it (login nodes usually mount the
        same filesystem as the compute nodes); None means the byte estimate."""
        if self.model.tokenizer:
            return self.model.tokenizer
        if profile.backend == "local":
            candidate = Path(self.local.model_dir).expanduser() / "tokenizer.json"
            return str(candidate) if self.local.engine == "transformers" and candidate.is_file() else None
        model_dir = Path(self.model.path).expanduser()
        readable = model_dir.is_dir() and any((model_dir / name).is_file() for name in ("model_config.yaml", "tokenizer.json"))
        return str(model_dir) if readable else None

    def work_path(self, *parts: str) -> Path:
        return Path(self.work_dir).expanduser().joinpath(*parts)


# What a template leaves for the site to fill in (prefect.yaml's `s3://CHANGE-ME-bucket/...`): a run
# holding it is refused before anything is read or submitted, naming where it still stands.
PLACEHOLDER = "CHANGE-ME"


def placeholders(values, loc: tuple = ()) -> list[tuple[tuple, str]]:
    """(location, value) of every string under `values` (nested dicts and lists) still holding PLACEHOLDER."""
    if isinstance(values, dict):
        return [hit for key, value in values.items() for hit in placeholders(value, (*loc, key))]
    if isinstance(values, (list, tuple)):
        return [hit for i, value in enumerate(values) for hit in placeholders(value, (*loc, i))]
    return [(loc, values)] if isinstance(values, str) and PLACEHOLDER.lower() in values.lower() else []


def check_no_placeholders(settings: Settings) -> None:
    """Refuse settings that still hold PLACEHOLDER (SecretStr values are not strings here, so never shown)."""
    if hits := placeholders(settings.model_dump()):
        loc, value = hits[0]
        raise ConfigError(f"Setting {env_name(loc)} is {value!r}, still the template's placeholder {PLACEHOLDER}: set it "
                          "to your site's value in .env or the worker's environment (docs/settings.md).")


def env_name(loc: tuple) -> str:
    name = "__".join(str(p).upper() for p in loc)
    return name if name.startswith(ENV_PREFIX) else ENV_PREFIX + name  # a misspelled key keeps its own name


def _shown_input(error: dict) -> str:
    # Never echo what was given for a secret.
    if any(word in str(part).lower() for part in error["loc"]
           for word in ("secret", "key", "token", "passw", "auth", "credential")):
        return ""
    return f" (got {error.get('input')!r})"


def load_settings(**overrides) -> Settings:
    """Build the settings once, turning pydantic's errors into one ConfigError that names each
    environment variable, what was wrong and the allowed range."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = [f"  {env_name(e['loc'])}: {e['msg']}{_shown_input(e)}" for e in exc.errors()]
        raise ConfigError("Invalid settings:\n" + "\n".join(problems) + "\nFix them in the environment or .env.") from None
    except SettingsError as exc:  # a list or object setting whose text is not JSON
        field = re.search(r'field "([^"]+)"', str(exc))
        name = env_name((field.group(1),)) if field else "a NSDG_ list or object setting"
        raise ConfigError(f"Invalid settings:\n  {name}: not valid JSON (write a JSON list or object, e.g. "
                          f"'[\"a\", \"b\"]' or '{{\"key\": \"value\"}}').\nFix it in the environment or .env.") from None
