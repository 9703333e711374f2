"""What a site may add to the Slurm job, and what it may not: the checks behind `SbatchSpec`.

Each check raises one ConfigError line that names the setting, the value and why, so a launch
that would break on a real cluster is refused before any job is submitted. The reasons come from
how megatron_gpt_eval.py really runs (see docs/operators.md):

- every rank must see all 8 GPUs of its node (Lightning's `trainer.devices=8` picks
  `cuda:$SLURM_LOCALID`): no `--gpu-bind`, `--gpus-per-task`, `--ntasks-per-gpu`;
- options the spec renders itself (memory, rlimits, requeue, CPUs per task, the environment, GPUs)
  are settings of their own, never a second value in `extra_directives` or `srun_args`;
- pyxis reads a registry only after `#` on enroot < 4.0; apptainer needs a local image file.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath

from infra.errors import ConfigError


def fail(field: str, value: object, allowed: str) -> ConfigError:
    return ConfigError(f"Slurm job spec: {field}={value!r} is not valid: {allowed}.")


_SLURM_SPLITTERS = ("packjob", "hetjob")
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
# What may appear in an #SBATCH or srun option value: no whitespace, quotes, backslash or '#'.
_OPTION_VALUE = re.compile(r"[A-Za-z0-9._:=/@+,%|&\[\]*!-]+")
_OPTION = re.compile(r"(--[a-z][a-z-]*)(?:=(.*))?", re.DOTALL)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_int(field: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise fail(field, value, f"use a whole number from {low} to {high}")


def check_sbatch_value(field: str, value: str) -> None:
    """sbatch rewrites 'packjob' and splits a job at 'hetjob' wherever they appear in a directive line."""
    if any(word in value.lower() for word in _SLURM_SPLITTERS):
        raise fail(field, value, "it must not contain 'packjob' or 'hetjob' (sbatch splits the job there)")


# --- options that break the launch, with the reason ---------------------------------------------

_GPU_VISIBILITY = ("it narrows the GPUs each rank sees, and NeMo's trainer.devices=8 then fails "
                   "(every rank must see all GPUs of its node)")
REFUSED_OPTIONS: dict[str, str] = {
    "--gpu-bind": _GPU_VISIBILITY,
    "--gpus-per-task": _GPU_VISIBILITY,
    "--ntasks-per-gpu": _GPU_VISIBILITY,
    "--mem": "set NSDG_SLURM__MEM instead (default 0: all of each node's memory)",
    "--propagate": "set NSDG_SLURM__PROPAGATE instead (default NONE: the worker's rlimits stay off the ranks)",
    "--requeue": "set NSDG_SLURM__REQUEUE instead (default false: the flow restarts lost servers itself)",
    "--no-requeue": "it is the default; NSDG_SLURM__REQUEUE=true turns it off",
    "--export": "the job's environment is set by NSDG_SLURM__EXPORT and NSDG_SLURM__ENV",
    "--cpus-per-task": "set NSDG_SLURM__CPUS_PER_TASK instead (srun needs it too since Slurm 22.05)",
    "--cpus-per-gpu": "set NSDG_SLURM__CPUS_PER_TASK instead (srun rejects it next to --cpus-per-task)",
}

# Options a user may add to the #SBATCH header. Everything the spec sets itself (nodes, tasks,
# GPUs, time, memory, output files, name, comment...) is missing on purpose: two values for one
# option would make the rendered script lie about what it asks for.
VALUE_DIRECTIVES = frozenset({
    "--begin", "--constraint", "--exclude", "--gres", "--gres-flags", "--hint", "--licenses", "--mail-type",
    "--mail-user", "--mem-per-cpu", "--mem-per-gpu", "--network", "--nice", "--nodelist", "--signal",
    "--switches", "--wckey",
})
FLAG_DIRECTIVES: frozenset[str] = frozenset()
ALLOWED_DIRECTIVES = tuple(sorted(VALUE_DIRECTIVES | FLAG_DIRECTIVES))

# Flags a site may add to the srun line (`slurm.srun_args`): MPI/PMIx, network, CPU binding, the
# step's exit wait, pyxis' writable or root-remapped rootfs.
SRUN_VALUE_ARGS = frozenset({"--mpi", "--network", "--cpu-bind", "--wait", "--container-save"})
SRUN_FLAG_ARGS = frozenset({"--container-writable", "--container-readonly", "--container-remap-root",
                            "--no-container-remap-root"})
PYXIS_ONLY_ARGS = frozenset({"--container-save", "--container-writable", "--container-readonly",
                             "--container-remap-root", "--no-container-remap-root"})
ALLOWED_SRUN_ARGS = tuple(sorted(SRUN_VALUE_ARGS | SRUN_FLAG_ARGS))
REFUSED_SRUN_ARGS: dict[str, str] = {
    **{k: v for k, v in REFUSED_OPTIONS.items() if k in ("--gpu-bind", "--gpus-per-task", "--ntasks-per-gpu",
                                                          "--cpus-per-task", "--cpus-per-gpu", "--export")},
    "--ntasks": "the spec sets one task per GPU",
    "--ntasks-per-node": "the spec sets one task per GPU",
    "--nodes": "the profile sets the nodes",
    "--distribution": "block distribution keeps each tensor-parallel group on one node's NVLink",
    "--output": "every rank writes to the job's log, which the flow reads",
    "--error": "every rank writes to the job's log, which the flow reads",
    "--container-image": "set NSDG_SLURM__CONTAINER_IMAGE instead",
    "--container-mounts": "set NSDG_SLURM__CONTAINER_MOUNTS instead",
    "--container-mount-home": "a home directory's pip --user packages would shadow the container's",
}
_SHORT_SRUN = {"-n": "--ntasks", "-N": "--nodes", "-m": "--distribution", "-o": "--output", "-e": "--error",
               "-c": "--cpus-per-task"}


def _check_option(field: str, option: str, values: frozenset[str], flags: frozenset[str],
                  refused: Mapping[str, str], allowed: Sequence[str]) -> None:
    match = _OPTION.fullmatch(option) if isinstance(option, str) else None
    name = match.group(1) if match else None
    if isinstance(option, str) and option[:2] in _SHORT_SRUN and field == "slurm.srun_args":
        name = _SHORT_SRUN[option[:2]]
    if name in refused:
        raise fail(field, option, f"{name} is refused: {refused[name]}")
    if match is None or name not in values | flags:
        raise fail(field, option, f"allowed options are {', '.join(allowed)}; write each as --name=value")
    value = match.group(2)
    if name in flags:
        if value is not None:
            raise fail(field, option, f"{name} takes no value")
        return
    if value is None or not _OPTION_VALUE.fullmatch(value):
        raise fail(field, option, f"{name} needs =value made of letters, digits and . _ : = / @ + , % | & [ ] * ! - "
                                  "(no spaces, quotes, '\\' or '#')")
    check_sbatch_value(field, option)


def check_directive(directive: str, *, gpu_request: str = "gpus-per-node") -> None:
    """One extra #SBATCH option: an allowed name, written `--name=value` (or a bare allowed flag)."""
    _check_option("slurm.extra_directives", directive, VALUE_DIRECTIVES, FLAG_DIRECTIVES, REFUSED_OPTIONS,
                  ALLOWED_DIRECTIVES)
    name, _, value = directive.partition("=")
    if name == "--signal" and not value.startswith("B:"):
        raise fail("slurm.extra_directives", directive,
                   "Slurm sends it to every process of the step, the server included, and Python dies of "
                   "SIGUSR1/SIGUSR2: write --signal=B:<sig>@<s>, which the batch script notes in the job dir")
    if name == "--gres" and (any(item.split(":")[0] == "gpu" for item in value.split(",")) or gpu_request == "gres"):
        raise fail("slurm.extra_directives", directive,
                   "the GPUs are requested once, by the profile and NSDG_SLURM__GPU_REQUEST "
                   "(gres renders --gres=gpu[:type]:N); a second GPU request would be counted twice")


def check_srun_arg(arg: str, runtime: str) -> None:
    _check_option("slurm.srun_args", arg, SRUN_VALUE_ARGS, SRUN_FLAG_ARGS, REFUSED_SRUN_ARGS, ALLOWED_SRUN_ARGS)
    if arg.split("=", 1)[0] in PYXIS_ONLY_ARGS and runtime != "pyxis":
        raise fail("slurm.srun_args", arg, "it is a pyxis flag and needs container_runtime 'pyxis'")


_PROPAGATE = {"ALL", "NONE", "AS", "CORE", "CPU", "DATA", "FSIZE", "MEMLOCK", "NOFILE", "NPROC", "RSS", "STACK"}
_MEM = re.compile(r"\d+[KMGT]?")


def check_mem(mem: str | None) -> None:
    if mem is not None and not _MEM.fullmatch(mem):
        raise fail("slurm.mem", mem, "use a Slurm size like 0 (all of each node's memory), 512G or 800000M")


def check_propagate(value: str | None) -> None:
    if value is not None and not set(value.split(",")) <= _PROPAGATE:
        raise fail("slurm.propagate", value, f"use NONE, ALL or a comma list of {', '.join(sorted(_PROPAGATE - {'ALL', 'NONE'}))}")


# --- the job's environment -----------------------------------------------------------------------

# The orchestrator's Python and credentials: never carried into the job.
_ORCHESTRATOR_ONLY = re.compile(r"VIRTUAL_ENV|PYTHONPATH|PYTHONHOME|CONDA_.*|NSDG_.*|PREFECT_.*|AWS_.*")
_SECRET_WORDS = re.compile(r"SECRET|TOKEN|PASSW|CREDENTIAL|_KEY$|^KEY$", re.IGNORECASE)


def check_export_name(name: str) -> None:
    """One name in `slurm.export`: a variable sbatch copies from the worker's environment."""
    if not isinstance(name, str) or not _ENV_NAME.fullmatch(name) or name.upper() in ("ALL", "NONE", "NIL"):
        raise fail("slurm.export", name, "give variable names only (values go in NSDG_SLURM__ENV)")
    if _ORCHESTRATOR_ONLY.fullmatch(name) or _SECRET_WORDS.search(name):
        raise fail("slurm.export", name, "the orchestrator's Python settings and credentials stay off the nodes")


def check_env(env: Mapping[str, str]) -> None:
    """`slurm.env`: NAME -> value for every rank. The values are written into both scripts, so no
    secret may be one; Slurm's own variables are Slurm's."""
    for name, value in env.items():
        if not isinstance(name, str) or not _ENV_NAME.fullmatch(name) or name.startswith("SLURM"):
            raise fail("slurm.env", name, "use a variable name of letters, digits and '_' (not SLURM_*)")
        if _SECRET_WORDS.search(name):
            raise fail("slurm.env", name, "its value would be written into sbatch.sh: keep secrets out of the job")
        if not isinstance(value, str) or _CONTROL_CHARS.search(value):
            raise fail("slurm.env", f"{name}={value!r}", "values are strings without control characters")


def check_setup_line(line: str) -> None:
    """One `slurm.setup` line: shell code the operator wrote (module load, source ...), one line each."""
    if not isinstance(line, str) or not line.strip() or _CONTROL_CHARS.search(line):
        raise fail("slurm.setup", line, "give one non-empty shell line per entry, without control characters")


# --- images, mounts and the model -----------------------------------------------------------------


def check_mount(runtime: str, mount: str) -> None:
    """A container mount `SRC[:DST[:FLAGS]]`. Pyxis and Apptainer both split their mount lists
    at commas, so a comma would silently become two mounts."""
    if not isinstance(mount, str) or not mount or "," in mount or _CONTROL_CHARS.search(mount):
        raise fail("slurm.container_mounts", mount,
                   "write each mount as SRC:DST[:FLAGS], without commas or control characters")
    if runtime == "none":
        raise fail("slurm.container_mounts", mount, "mounts need container_runtime 'pyxis' or 'apptainer', not 'none'")


def mount_destination(mount: str) -> str:
    parts = mount.split(":")
    return parts[1] if len(parts) > 1 and parts[1] else parts[0]


def covering_mount(mounts: Sequence[str], path: str) -> str | None:
    """The first mount whose destination holds `path` inside the container, if any."""
    for mount in mounts:
        dest = PurePosixPath(mount_destination(mount))
        if dest.is_absolute() and (PurePosixPath(path) == dest or dest in PurePosixPath(path).parents):
            return mount
    return None


def _is_path(image: str) -> bool:
    return image.startswith(("/", "./", "../"))


def pyxis_image(image: str) -> str:
    """pyxis' `[USER@][REGISTRY#]IMAGE[:TAG]`: enroot < 4.0 splits the registry off only at '#',
    so `nvcr.io/nvidia/nemo:24.05` would be looked up on Docker Hub (401 Unauthorized).
    A first component with '.' or ':' (or `localhost`) is a registry host; paths stay as they are."""
    if _is_path(image) or "#" in image or "/" not in image:
        return image
    first, rest = image.split("/", 1)
    host = first.rsplit("@", 1)[-1]
    if "." in host or ":" in host or host == "localhost":
        return f"{first}#{rest}"
    return image


def suggested_sif(image: str) -> str:
    name = image.rsplit("/", 1)[-1].replace(":", "-").replace("#", "-") or "image"
    return f"/shared/images/{name}.sif"


# Tags that name no release: the image behind one moves, so two jobs of one run (a replica's
# replacement, a rollover's successor, a rerun) could start different engine versions, and the data
# would not say which (audit S7). A release tag, a digest or an imported file pins the image.
FLOATING_TAGS = frozenset({"latest", "nightly", "main", "master", "dev", "edge", "stable", "rolling"})
_DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")


def image_pin(image: str) -> str | None:
    """How a pyxis image is pinned: 'file', 'digest', 'tag', or None for a floating reference
    (no tag, or a tag in FLOATING_TAGS). `[USER@][REGISTRY#]IMAGE[:TAG][@sha256:DIGEST]`."""
    if _is_path(image):
        return "file"
    if _DIGEST.search(image):
        return "digest"
    name = image.replace("#", "/").rsplit("/", 1)[-1]
    if "@" in name:
        return None  # a digest, but not sha256:<64 hex digits>
    tag = name.partition(":")[2]
    return "tag" if tag and tag.lower() not in FLOATING_TAGS else None


def check_image(runtime: str, image: str, *, setting: str = "NSDG_SLURM__CONTAINER_IMAGE") -> None:
    """`setting` is the variable that sets this image, named in the refusals."""
    if runtime == "none":
        return
    if not isinstance(image, str) or not image or image.startswith("-") or re.search(r"[\s,]", image):
        raise fail("slurm.container_image", image,
                   "give an image reference or file path without spaces or commas, e.g. nvcr.io#nvidia/nemo:24.05")
    if runtime == "apptainer" and image.endswith((".sif", ".sqsh", ".img")) and not image.startswith("/"):
        raise fail("slurm.container_image", image, "give the image file's absolute path (the ranks start in the job dir)")
    if runtime == "apptainer" and not image.startswith("/"):
        source = image if "://" in image else f"docker://{image.replace('#', '/')}"
        raise fail("slurm.container_image", image,
                   f"apptainer needs a local image file (16 ranks would each convert a registry image, racing on "
                   f"one cache): run `apptainer pull {suggested_sif(image)} {source}` once and set "
                   f"{setting} to that absolute path")
    if runtime == "pyxis" and (image.startswith(("./", "../")) or "://" in image):
        raise fail("slurm.container_image", image,
                   "use nvcr.io#nvidia/nemo:24.05 or an absolute path to a .sqsh file "
                   "(`enroot import -o /shared/images/nemo-24.05.sqsh docker://nvcr.io#nvidia/nemo:24.05`)")
    if runtime == "pyxis" and image_pin(image) is None:
        raise fail(setting.split("=")[0], image,
                   "a floating tag (none, or latest and the like): the run's jobs could start different engine "
                   "versions; pin a release tag (nvcr.io#nvidia/nemo:24.05), a digest (...@sha256:<hex>) or "
                   "an imported .sqsh file")


def check_model_mountable(model_path: str) -> None:
    if ":" in model_path or "," in model_path:
        raise fail("model.path", model_path,
                   "it cannot be mounted as SRC:DST:ro (it holds ':' or ','); set NSDG_SLURM__MOUNT_MODEL=false "
                   "and mount a directory above it with NSDG_SLURM__CONTAINER_MOUNTS")


def _quantization(config: Path) -> dict:
    """The checkpoint's quantization_config ({} when there is none or config.json is unreadable)."""
    import json

    try:
        quant = json.loads(config.read_text(encoding="utf-8")).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return {}
    return quant if isinstance(quant, dict) else {}


def check_paths_seen_here(*, model_path: str | None, image: str | None, hf_checkpoint: bool = False,
                          engine: str | None = None) -> None:
    """What the login node can see of the model and a local image (it usually mounts the same
    shared filesystem as the nodes); paths it cannot see at all are left to the nodes.
    `hf_checkpoint`: the engine (vLLM, TensorRT-LLM) loads a Hugging Face directory, not a .nemo one;
    `engine` trtllm: a per-tensor FP8 checkpoint is refused too (audit S6)."""
    if model_path is not None and hf_checkpoint:
        model = Path(model_path)
        if model.is_file() or (model.is_dir() and not (model / "config.json").is_file()):
            raise fail("model.path", model_path,
                       "vLLM and TensorRT-LLM load a Hugging Face checkpoint directory (config.json and weights), "
                       "and this has no config.json: convert the .nemo with transformers' "
                       "convert_nemotron_nemo_to_hf.py or use an HF conversion (docs/operators.md, engines)")
        if model.is_dir() and not any(model.glob("*.safetensors")) and any(model.glob("*.bin")):
            raise fail("model.path", model_path,
                       "it holds .bin weights and no .safetensors: vLLM and TensorRT-LLM load a .bin whole in every "
                       "worker (8 x 680 GB of host memory per node for the one-file conversion). Reshard it to "
                       "safetensors first (docs/operators.md, engines: save_pretrained(..., safe_serialization=True, "
                       "max_shard_size='5GB'))")
        if engine == "trtllm" and model.is_dir() and (quant := _quantization(model / "config.json")):
            if quant.get("quant_method") == "fp8" and "weight_block_size" not in quant:
                raise fail("model.path", model_path,
                           "it is a per-tensor FP8 checkpoint (quantization_config: fp8, no weight_block_size), which "
                           "TensorRT-LLM's loader does not map: serve the BF16 checkpoint, a ModelOpt FP8 export, or "
                           "use the vllm engine (docs/operators.md, engines)")
    elif model_path is not None:
        model = Path(model_path)
        if model.is_file() or (model_path.endswith(".nemo") and not model.is_dir()):
            raise fail("model.path", model_path,
                       "it is a .nemo file, and NeMo would untar all 680 GB into the container's RAM-backed /tmp on "
                       "every node: extract it once (`tar -xf MODEL.nemo -C DIR`) and point NSDG_MODEL__PATH at DIR")
    if image is not None and image.startswith("/"):
        path = Path(image)
        if path.parent.is_dir() and not path.exists():
            raise fail("slurm.container_image", image,
                       f"there is no such file, although {path.parent} is visible here: create it first "
                       "(`enroot import -o IMAGE.sqsh docker://nvcr.io#nvidia/nemo:24.05` for pyxis, "
                       "`apptainer pull IMAGE.sif docker://nvcr.io/nvidia/nemo:24.05` for apptainer)")
