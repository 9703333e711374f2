"""How each serving engine (infra/engines) is started inside the Slurm job: its image, how many
srun tasks a node gets, the server's command line, which launcher tail runs it, and the launches
that cannot work, refused with one ConfigError line before anything is submitted.

| engine        | srun tasks per node | command (sources: docs/operators.md, reference/openai-engines.md)          |
|---------------|---------------------|-----------------------------------------------------------------------------|
| `nemo`        | one per GPU         | the seed's `megatron_gpt_eval.py ... server=True` (NeMo 24.05)               |
| `nemo-openai` | one per GPU         | the same script in a NeMo >= 2.1 image, whose server adds /v1/completions    |
| `trtllm`      | one per GPU         | `trtllm-llmapi-launch trtllm-serve`: one MPI world under `srun --mpi=pmix`   |
| `vllm`        | one per node        | several nodes: Ray head on node 0 + Ray workers, then `vllm serve` on node 0 |
|               |                     | (TP x PP, `--distributed-executor-backend ray`); one node: `vllm serve` only |
| `custom`      | one per GPU         | `server.command`, verbatim                                                   |
| `nemo-aligner`| one per GPU         | NeMo-Aligner's `serve_reward_model.py` (a reward server swapped into the job: |
|               |                     | infra/slurm/steps.py), or `server.reward_command`                            |

`server.command` replaces the engine's server command for every engine (for `vllm`, the
`vllm serve` line on node 0; the Ray roles stay): tests and site wrappers use it.

Pure: no I/O. `infra/slurm/render.py` renders what this module decides. It reads a job's spec
(`infra/slurm/spec.py`, which validates itself with `check_engine` below) through `LaunchSpec`,
the fields it needs, so it does not import the spec.
"""

from __future__ import annotations

import re
from typing import Protocol

from infra.slurm.options import check_int, fail

from infra.engines import ENGINES

ENGINE_NAMES = tuple(ENGINES)  # the contract's names, in its order
# The reward server a pipeline starts as a later step of the generator's job (infra/slurm/steps.py):
# launched like an engine, but spoken to by infra/reward/client.py, so not one of infra/engines'.
REWARD_ENGINE = "nemo-aligner"
LAUNCH_ENGINES = (*ENGINE_NAMES, REWARD_ENGINE)

# Default images of the engines that do not run slurm.container_image (nemo and custom do: its
# default, the model card's container, is in infra/settings.py). vllm: the first release with Ray
# executor V2, which fixes multi-node PP > 1 (vllm #36836, v0.20.0; opted into by the Ray launcher's
# VLLM_USE_RAY_V2_EXECUTOR_BACKEND=1 until 0.23 makes it the default), in its CUDA 12.9 build: the
# plain tag is CUDA 13.0 and needs driver >= 580; 12.9 runs on R525 and newer. trtllm: NGC's release image
# (its PyTorch backend lists NemotronForCausalLM). nemo-openai: 24.12, the first NeMo Framework
# container after 24.09 (NeMo 2.0.0), i.e. NeMo 2.1 with the OpenAI routes. Pin what your site has.
DEFAULT_IMAGES = {
    "vllm": "vllm/vllm-openai:v0.20.0-cu129",
    "trtllm": "nvcr.io/nvidia/tensorrt-llm/release:1.0.0",
    "nemo-openai": "nvcr.io/nvidia/nemo:24.12",
}
# Engines whose image is slurm.container_image (the setting predates the others). nemo-aligner: the
# NGC card of Nemotron-4-340B-Reward runs NeMo-Aligner's script from inside the NeMo container.
CONTAINER_IMAGE_ENGINES = ("nemo", "custom", REWARD_ENGINE)
NEMO_SCRIPT_ENGINES = ("nemo", "nemo-openai")
HYDRA_SCRIPT_ENGINES = (*NEMO_SCRIPT_ENGINES, REWARD_ENGINE)  # a script whose paths Hydra parses
PMIX = "--mpi=pmix"


class LaunchSpec(Protocol):
    """The fields of `infra.slurm.spec.SbatchSpec` a launch is decided from."""

    engine: str
    nodes: int
    tasks_per_node: int
    gpus_per_node: int
    tensor_parallel: int
    pipeline_parallel: int
    model_path: str
    eval_script: str
    served_model_name: str
    max_model_len: int
    port: int
    ray_port: int
    launch_wait_s: int
    srun_args: tuple[str, ...]
    server_command: tuple[str, ...] | None
    container_runtime: str
    container_image: str


def image_setting(engine: str) -> str:
    """The environment variable that sets `engine`'s image, for error messages and docs."""
    if engine in CONTAINER_IMAGE_ENGINES:
        return "NSDG_SLURM__CONTAINER_IMAGE"
    return f'NSDG_SLURM__IMAGES=\'{{"{engine}": "..."}}\''


def image_for(engine: str, container_image: str, images: dict[str, str]) -> str:
    """`slurm.images[engine]`, else `slurm.container_image` for nemo/custom, else the engine's default."""
    if engine in images:
        return images[engine]
    return container_image if engine in CONTAINER_IMAGE_ENGINES else DEFAULT_IMAGES[engine]


def check_images_map(images: dict[str, str]) -> None:
    for name in images:
        if name not in LAUNCH_ENGINES:
            raise fail("slurm.images", name, f"keys are engine names: {', '.join(LAUNCH_ENGINES)}")


def uses_ray(spec: LaunchSpec) -> bool:
    """vLLM across nodes: its workers are placed through a Ray cluster spanning the job."""
    return spec.engine == "vllm" and spec.nodes > 1


def srun_tasks_per_node(spec: LaunchSpec) -> int:
    """Tasks srun starts on each node: one launcher per node for vLLM (its engine spawns the GPU
    workers itself), one per GPU for the rest (NeMo's ranks, TRT-LLM's MPI world)."""
    return 1 if spec.engine == "vllm" else spec.tasks_per_node


def srun_args(spec: LaunchSpec) -> tuple[str, ...]:
    """The site's srun flags, plus PMIx for TRT-LLM's MPI world when the site gave no --mpi."""
    if spec.engine == "trtllm" and spec.server_command is None and not any(a.startswith("--mpi=") for a in spec.srun_args):
        return (*spec.srun_args, PMIX)
    return spec.srun_args


def pmix_world(spec: LaunchSpec) -> bool:
    """The tasks form one MPI world through Slurm's PMIx (trtllm's, or a site's --mpi=pmix): inside
    apptainer they then need slurmd's PMIx directory (infra/slurm/render.py launch_prefix)."""
    return any(a.startswith(PMIX) for a in srun_args(spec))


def launcher_tail(spec: LaunchSpec) -> str:
    """The template that ends the node launcher: the Ray roles, or one server per task."""
    return "launcher-ray.sh.tmpl" if uses_ray(spec) else "launcher-server.sh.tmpl"


_TITLES = {"nemo": "the NeMo server job", "custom": "the NeMo server job", "vllm": "the vLLM server job",
           "trtllm": "the TensorRT-LLM server job", "nemo-openai": "the NeMo >= 2.1 server job",
           REWARD_ENGINE: "the NeMo-Aligner reward server step"}
_SRUN_PER_GPU = """# One task per GPU, no torchrun, each seeing every GPU of its node; a rank that exits non-zero
# ends the whole step (and the job then ends FAILED with that exit code). --export=ALL: the
# ranks get this script's environment (sbatch's --export list would otherwise narrow it again);
# --label prefixes each line with its rank."""
_SRUN_PER_NODE = """# One task per node, seeing every GPU of its node (vLLM starts its GPU workers itself); a task
# that exits non-zero ends the whole step (and the job then ends FAILED with that exit code).
# --export=ALL: the tasks get this script's environment (sbatch's --export list would otherwise
# narrow it again); --label prefixes each line with its task."""


def job_title(spec: LaunchSpec) -> str:
    return _TITLES[spec.engine]


def _task_per_node(spec: LaunchSpec) -> bool:
    return srun_tasks_per_node(spec) != spec.tasks_per_node


def launcher_runs(spec: LaunchSpec) -> str:
    return "once per node (vLLM starts its GPU workers)" if _task_per_node(spec) else "once per rank (one rank per GPU)"


def srun_comment(spec: LaunchSpec) -> str:
    return _SRUN_PER_NODE if _task_per_node(spec) else _SRUN_PER_GPU


def nemo_command(spec: LaunchSpec) -> tuple[str, ...]:
    """The seed's megatron_gpt_eval.py command, with the spec's topology and port."""
    return (
        "python3", spec.eval_script,
        f"gpt_model_file={spec.model_path}",
        f"tensor_model_parallel_size={spec.tensor_parallel}",
        f"pipeline_model_parallel_size={spec.pipeline_parallel}",
        "pipeline_model_parallel_split_rank=0",
        f"trainer.devices={spec.tasks_per_node}",
        f"trainer.num_nodes={spec.nodes}",
        "trainer.precision=bf16",
        "megatron_amp_O2=True",
        "server=True",
        "web_server=False",
        f"port={spec.port}",
    )


def vllm_command(spec: LaunchSpec) -> tuple[str, ...]:
    cmd = ["vllm", "serve", spec.model_path, "--served-model-name", spec.served_model_name,
           "--tensor-parallel-size", str(spec.tensor_parallel)]
    if spec.pipeline_parallel > 1:
        cmd += ["--pipeline-parallel-size", str(spec.pipeline_parallel)]
    if uses_ray(spec):
        # Explicit: vLLM 0.11.x picked a backend that saw one node's GPUs (NVIDIA-NeMo/Skills#1059).
        cmd += ["--distributed-executor-backend", "ray"]
    # vLLM's own sampling defaults, not the checkpoint's generation_config.json: that would fill the
    # fields a request leaves unset (repetition_penalty, min_p, top_k) behind the run's back (audit S5).
    return (*cmd, "--max-model-len", str(spec.max_model_len), "--generation-config", "vllm",
            "--host", "0.0.0.0", "--port", str(spec.port))


def trtllm_command(spec: LaunchSpec) -> tuple[str, ...]:
    # trtllm-llmapi-launch makes MPI rank 0 the server and the other ranks its workers.
    return ("trtllm-llmapi-launch", "trtllm-serve", spec.model_path, "--backend", "pytorch",
            "--tp_size", str(spec.tensor_parallel), "--pp_size", str(spec.pipeline_parallel),
            "--max_seq_len", str(spec.max_model_len), "--host", "0.0.0.0", "--port", str(spec.port))


def reward_command(spec: LaunchSpec) -> tuple[str, ...]:
    """NeMo-Aligner's reward server as the NGC card of Nemotron-4-340B-Reward launches it, with the
    spec's topology and port (`eval_script` is serve_reward_model.py, `model_path` the reward
    checkpoint: server.reward_script and the pipeline's `servers.<rm>.model_path`)."""
    return (
        "python3", spec.eval_script,
        f"rm_model_file={spec.model_path}",
        f"trainer.num_nodes={spec.nodes}",
        f"trainer.devices={spec.tasks_per_node}",
        f"++model.tensor_model_parallel_size={spec.tensor_parallel}",
        f"++model.pipeline_model_parallel_size={spec.pipeline_parallel}",
        "inference.micro_batch_size=2",
        f"inference.port={spec.port}",
    )


def engine_command(spec: LaunchSpec) -> tuple[str, ...]:
    """The server's command line when server.command does not replace it."""
    if spec.engine == REWARD_ENGINE:
        return reward_command(spec)
    if spec.engine == "vllm":
        return vllm_command(spec)
    if spec.engine == "trtllm":
        return trtllm_command(spec)
    return nemo_command(spec)


def server_command(spec: LaunchSpec) -> tuple[str, ...]:
    """The engine's command, or server.command with `{port}` standing for this job's port (each
    replica of a run listens on server.port + its index)."""
    if spec.server_command is None:
        return engine_command(spec)
    return tuple(arg.replace("{port}", str(spec.port)) for arg in spec.server_command)


# Ray's ports, fixed from slurm.ray_port P instead of picked at random by Ray, so a firewall between
# the job's nodes can allow them and nothing else on a node takes one by chance (audit S3; NeMo-Skills
# fixes them for this job shape). P is the head's GCS; then, on every node, its node manager, object
# manager, dashboard agent (gRPC, HTTP), metrics export and runtime-env agent at P+1..P+6; on the head
# its Ray client server and dashboard at P+7, P+8; the worker processes at P+100..P+RAY_PORT_SPAN-1.
RAY_NODE_PORTS = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-grpc-port",
                  "--dashboard-agent-listen-port", "--metrics-export-port", "--runtime-env-agent-port")
RAY_HEAD_PORTS = ("--ray-client-server-port", "--dashboard-port")
RAY_WORKER_PORTS_FROM = 100
RAY_PORT_SPAN = 1100


def ray_ports(spec: LaunchSpec) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """`ray start`'s port flags on every node, and the head's own."""
    base = spec.ray_port
    node = tuple(f"{flag}={base + 1 + i}" for i, flag in enumerate(RAY_NODE_PORTS))
    node += (f"--min-worker-port={base + RAY_WORKER_PORTS_FROM}", f"--max-worker-port={base + RAY_PORT_SPAN - 1}")
    head = tuple(f"{flag}={base + 1 + len(RAY_NODE_PORTS) + i}" for i, flag in enumerate(RAY_HEAD_PORTS))
    return node, head


def ray_assignments(spec: LaunchSpec) -> list[tuple[str, str | int | tuple[str, ...]]]:
    """The launcher's extra variables for the Ray roles (none for the other launches)."""
    if not uses_ray(spec):
        return []
    node, head = ray_ports(spec)
    return [("RAY_PORT", spec.ray_port), ("RAY_PORT_SPAN", RAY_PORT_SPAN), ("RAY_NODE_ARGS", node), ("RAY_HEAD_ARGS", head),
            ("RAY_GPUS", spec.nodes * spec.gpus_per_node), ("RAY_WAIT_S", spec.launch_wait_s)]


# What the in-job preflight requires in the model directory, per engine (the file its loader reads
# first): NeMo's extracted .nemo, the Hugging Face checkpoint vLLM and TensorRT-LLM load.
MODEL_FILES = {"nemo": ("model_config.yaml",), "vllm": ("config.json",), "trtllm": ("config.json",),
               REWARD_ENGINE: ("model_config.yaml",)}


# The oldest NVIDIA driver an image's CUDA runs on, for the in-job preflight (audit L3): CUDA 12.x
# on R525 and newer through minor-version compatibility, 13.x on 580.65.06 and newer (CUDA 13.0's
# release notes). A tag names its CUDA build (`-cu129`); vLLM's plain release tags are its CUDA 13.0
# build from v0.20.0 on; NGC's NeMo 24.xx-25.xx and TensorRT-LLM 1.0.x images are CUDA 12.
CUDA_DRIVER_FLOORS = {"12": "525.60.13", "13": "580.65.06"}
_CUDA_TAG = re.compile(r"[-_.]cu(1[2-9])\d(?![0-9])")
_CUDA_OF_TAG = ((re.compile(r"vllm-openai:v0\.(?:[2-9]\d)\.\d+$"), "13"),
                (re.compile(r"nvidia/nemo:2[45]\.\d\d"), "12"),
                (re.compile(r"tensorrt-llm/release:1\.0\."), "12"))


def driver_floor(spec: LaunchSpec) -> str:
    """The minimum NVIDIA driver the engine's image needs ('' when its tag does not say, or no
    image: the preflight then only logs the driver it sees)."""
    if spec.container_runtime == "none":
        return ""
    image = spec.container_image.split("@", 1)[0].replace("#", "/")
    if match := _CUDA_TAG.search(image.rsplit("/", 1)[-1]):
        return CUDA_DRIVER_FLOORS.get(match.group(1), "")
    return next((CUDA_DRIVER_FLOORS[cuda] for pattern, cuda in _CUDA_OF_TAG if pattern.search(image)), "")


DRIVER_MIN_ENV = "NSDG_DRIVER_MIN"  # in slurm.env: the site's floor, over the image's ('0' accepts any driver)


def enforced_driver_floor(spec: LaunchSpec, env: dict[str, str]) -> tuple[str, str]:
    """The floor the in-job preflight enforces, `${NSDG_DRIVER_MIN:-$PREFLIGHT_DRIVER_MIN}` in
    node-launcher.sh.tmpl, and where it comes from: ('', why) when it checks none (`doctor`)."""
    if spec.server_command is not None:
        return "", "server.command replaces the engine: the preflight checks no GPU or driver"
    if env.get(DRIVER_MIN_ENV):
        return env[DRIVER_MIN_ENV], f"{DRIVER_MIN_ENV} in NSDG_SLURM__ENV"
    if floor := driver_floor(spec):
        return floor, f"the CUDA build of {spec.container_image}"
    if spec.container_runtime == "none":
        return "", "container_runtime none: the nodes' own CUDA, which the preflight does not know"
    return "", f"the tag of {spec.container_image} names no CUDA build the preflight knows"


def preflight_assignments(spec: LaunchSpec) -> list[tuple[str, str | int | tuple[str, ...]]]:
    """The node launcher's preflight inputs (infra/templates/node-launcher.sh.tmpl): the server's
    port always; the model directory, its files and the GPUs only for the engine's own command (a
    command of one's own, server.command, brings its own model and may need no GPU)."""
    own = spec.server_command is None
    return [("PREFLIGHT_PORT", spec.port),
            ("PREFLIGHT_MODEL", spec.model_path if own else ""),
            ("PREFLIGHT_MODEL_FILES", MODEL_FILES.get(spec.engine, ()) if own else ()),
            ("PREFLIGHT_GPUS", spec.gpus_per_node if own else 0),
            ("PREFLIGHT_DRIVER_MIN", driver_floor(spec) if own else "")]


def check_api(engine: str, api: str, own_command: bool) -> None:
    """`vllm serve` and `trtllm-serve` answer only OpenAI's routes: a NeMo client would wait out
    the whole ready deadline on a server that is up. A command of one's own may speak either."""
    if engine in ("vllm", "trtllm") and api != "openai-completions" and not own_command:
        raise fail("server.api", api, f"{engine} serves only /v1/completions: unset NSDG_SERVER__API "
                   f"(or set it to openai-completions)")


def check_engine(spec: LaunchSpec) -> None:
    """The launches that cannot work, each refused with the reason and what to change."""
    if spec.engine not in LAUNCH_ENGINES:
        raise fail("profile.engine", spec.engine, f"use one of {', '.join(ENGINE_NAMES)}")
    if spec.engine == "custom" and spec.server_command is None:
        raise fail("profile.engine", spec.engine,
                   "the custom engine runs NSDG_SERVER__COMMAND (a JSON list, {port} for the port): set it")
    if spec.engine == "vllm":
        if not spec.gpus_per_node:
            raise fail("profile.gpus_per_node", spec.gpus_per_node,
                       "vllm runs one task per node that sees all its GPUs: give the profile gpus_per_node")
        if spec.nodes > 1 and spec.tensor_parallel > spec.gpus_per_node:
            raise fail("profile.tensor_parallel", spec.tensor_parallel,
                       f"vllm over {spec.nodes} nodes keeps tensor parallelism inside a node's NVLink: use "
                       f"tensor_parallel={spec.gpus_per_node} and pipeline_parallel={spec.nodes} (vLLM's layout)")
        last = 65535 - RAY_PORT_SPAN + 1
        check_int("slurm.ray_port", spec.ray_port, 1024, last)
        if uses_ray(spec) and spec.ray_port <= spec.port < spec.ray_port + RAY_PORT_SPAN:
            raise fail("slurm.ray_port", spec.ray_port,
                       f"Ray's ports are {spec.ray_port}..{spec.ray_port + RAY_PORT_SPAN - 1} (the head's, each "
                       f"node's agents and workers), and the server's port {spec.port} is among them: Ray and the "
                       f"server would both listen on it; move one of NSDG_SLURM__RAY_PORT and NSDG_SERVER__PORT")
    if spec.engine == "trtllm" and spec.server_command is None:
        mpi = [a for a in spec.srun_args if a.startswith("--mpi=")]
        if mpi and not mpi[-1].startswith(PMIX):
            raise fail("slurm.srun_args", mpi[-1],
                       "trtllm-llmapi-launch needs the tasks started as one MPI world through PMIx: use --mpi=pmix "
                       "(or drop the option: it is added for trtllm)")
    if spec.engine not in HYDRA_SCRIPT_ENGINES:
        check_int("model.context_length", spec.max_model_len, 16, 1_048_576)

