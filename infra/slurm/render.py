"""The two scripts of a Slurm job, rendered from its `SbatchSpec` (infra/slurm/spec.py), and
writing them into the job directory (its layout is in spec.py's docstring).

`render_sbatch` and `render_node_launcher` are pure: `string.Template` over
`infra/templates/*.sh.tmpl`, with every value written once as a shell-quoted variable assignment
and used only as "$VAR". What differs per serving engine is decided in infra/slurm/launch.py.
"""

from __future__ import annotations

import math
import shlex
import string
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from infra.errors import ConfigError
from infra.slurm import launch, options
from infra.slurm.spec import LAUNCHER_NAME, REWARD_LAUNCHER_NAME, SBATCH_NAME, STDERR_PATTERN, STDOUT_PATTERN, SbatchSpec


class _ScriptTemplate(string.Template):
    # '$' belongs to the shell; placeholders are written @@{name}, which no shell code uses.
    delimiter = "@@"


def _template(name: str) -> _ScriptTemplate:
    return _ScriptTemplate(resources.files("infra").joinpath("templates", name).read_text(encoding="utf-8"))


def _assign(name: str, value: str | int) -> str:
    return f"{name}={shlex.quote(str(value))}"


def _assign_array(name: str, values: Sequence[str]) -> str:
    return f"{name}=(" + " ".join(shlex.quote(v) for v in values) + ")"


def _seconds(value: float) -> str:
    """A number `sleep` accepts, without float noise: 15.0 -> '15', 0.25 -> '0.25'."""
    return format(value, "g")


def gpu_directive(spec: SbatchSpec) -> list[str]:
    """One GPU request, in the form the site wants: `--gpus-per-node=[type:]N` or `--gres=gpu[:type]:N`."""
    if not spec.gpus_per_node:
        return []
    typed = f"{spec.gpu_type}:" if spec.gpu_type else ""
    if spec.gpu_request == "gres":
        return [f"--gres=gpu:{typed}{spec.gpus_per_node}"]
    return [f"--gpus-per-node={typed}{spec.gpus_per_node}"]


def sbatch_directives(spec: SbatchSpec) -> list[str]:
    """The #SBATCH lines. Values were held to safe charsets by the spec; the comment, which has
    spaces, is double-quoted (sbatch groups quoted words itself)."""
    lines = [f"-J {spec.job_name}"]
    lines += [f"{flag} {value}" for flag, value in (("-A", spec.account), ("-p", spec.partition)) if value]
    lines += [f"--qos={spec.qos}"] if spec.qos else []
    lines += [f"--reservation={spec.reservation}"] if spec.reservation else []
    # A resident reward server's nodes come after the generator's, in the same job (infra/slurm/steps.py).
    nodes = spec.nodes + (spec.reward.nodes if spec.resident and spec.reward is not None else 0)
    lines += [f"-N {nodes}", f"--ntasks-per-node={launch.srun_tasks_per_node(spec)}"]
    lines += gpu_directive(spec)
    lines += [f"--cpus-per-task={spec.cpus_per_task}"] if spec.cpus_per_task else []
    lines += [f"--time={spec.time_limit}"]
    # Slurm's warning before the end (a time limit, a shortened one, a preemption): the batch script
    # notes it for the flow, which then plans the replica's successor. A site's own --signal wins.
    if spec.warn_signal_s and not any(d.startswith("--signal") for d in spec.extra_directives):
        lines += [f"--signal=B:USR1@{spec.warn_signal_s}"]
    lines += ["--exclusive"] if spec.exclusive else []
    # --exclusive gives every CPU and GPU of a node but only the default memory.
    lines += [f"--mem={spec.mem}"] if spec.mem is not None else []
    # The worker's rlimits (a systemd unit's small LIMIT_MEMLOCK breaks NCCL over InfiniBand).
    lines += [f"--propagate={spec.propagate}"] if spec.propagate is not None else []
    # A requeued job keeps its id on other nodes: the flow restarts lost servers itself instead.
    # (--open-mode=append: a requeued job's second start would truncate the first one's logs.)
    lines += ["--requeue", "--open-mode=append"] if spec.requeue else ["--no-requeue"]
    # Only these variables come from the worker (plus SLURM_*); the job starts from the user's
    # login environment on the node, as with --export=NONE.
    lines += [f"--export={','.join(spec.export)}"] if spec.export else ["--export=NONE"]
    lines += [
        f"--chdir={spec.job_dir}",
        f"-o {spec.job_dir}/{STDOUT_PATTERN}",
        f"-e {spec.job_dir}/{STDERR_PATTERN}",
        f'--comment="{spec.comment}"',
    ]
    lines += list(spec.extra_directives)
    return [f"#SBATCH {line}" for line in lines]


def srun_container_args(spec: SbatchSpec) -> list[str]:
    """Pyxis flags for srun. The job dir is mounted at its own path, because the launcher and
    the files ranks write live there; the home directory is not (its pip --user packages would
    shadow the container's); slurm.env keys keep the host's values over the image's."""
    if spec.container_runtime != "pyxis":
        return []
    args = [f"--container-image={options.pyxis_image(spec.container_image)}",
            f"--container-mounts={','.join(spec.mounts())}",
            f"--container-workdir={spec.job_dir}",
            "--no-container-mount-home"]
    if spec.env:
        args.append(f"--container-env={','.join(name for name, _ in spec.env)}")
    return args


# Audit L5: under srun --mpi=pmix each task reaches slurmd's PMIx server through the directory in
# its own PMIX_SERVER_TMPDIR (per job step, so known only when the task starts), which apptainer does
# not bind; and PMIx's shared-memory store (gds/dstore) fails inside Singularity/Apptainer, its hash
# store works (apptainer/singularity#5195). So each task binds that directory and defaults
# PMIX_MCA_gds to hash (slurm.env may set it otherwise), then execs apptainer: "$1 $2" are
# `apptainer exec`, the rest its flags, the image and the launcher. What enroot's 50-slurm-pmi.sh
# hook does for pyxis, which the site installs (docs/operators.md). No single quote: one shell word.
APPTAINER_PMIX = ('binds=(); [ -z "${PMIX_SERVER_TMPDIR:-}" ] || binds=(--bind="$PMIX_SERVER_TMPDIR"); '
                  'export PMIX_MCA_gds="${PMIX_MCA_gds:-hash}"; exec "$1" "$2" "${binds[@]}" "${@:3}"')


def launch_prefix(spec: SbatchSpec) -> list[str]:
    """What runs the launcher inside an Apptainer container; nothing for pyxis or bare."""
    if spec.container_runtime != "apptainer":
        return []
    gpu_flags = ["--nv"] if spec.gpus_per_node else []
    binds = [f"--bind={mount}" for mount in spec.mounts()]
    apptainer = ["apptainer", "exec", *gpu_flags, "--no-home", *binds, spec.container_image]
    if launch.pmix_world(spec):
        return ["bash", "-c", APPTAINER_PMIX, "nsdg-apptainer-pmix", *apptainer]
    return apptainer


def _exports(spec: SbatchSpec, prefix: str = "") -> list[str]:
    return [f"export {prefix}{name}={shlex.quote(value)}" for name, value in spec.env]


def render_sbatch(spec: SbatchSpec) -> str:
    """The batch script: job info, dead-man switch, srun of the launcher, srun's exit code."""
    _, model_note = spec.model_mount()
    assignments = [
        _assign("JOB_DIR", spec.job_dir),
        _assign("HEARTBEAT_FILE", spec.heartbeat_file),
        # Integer seconds: the switch does its arithmetic in bash.
        _assign("HEARTBEAT_TIMEOUT_S", math.ceil(spec.heartbeat_timeout_s)),
        _assign("HEARTBEAT_INTERVAL_S", _seconds(spec.heartbeat_interval_s)),
        *_step_assignments(spec, "", f"# Model: {model_note}"),
    ]
    env = ["# slurm.env, for srun and the container runtime (the launcher sets it again inside)."] if spec.env else []
    env += _exports(spec)
    if spec.container_runtime == "apptainer":
        env += _exports(spec, "APPTAINERENV_")  # apptainer's way to win over the image's values
    return _template("sbatch.sh.tmpl").substitute(
        what=launch.job_title(spec) + (f" on {spec.nodes} node(s), and {launch.job_title(spec.reward)} at once on "
                                       f"{spec.reward.nodes} node(s) of its own" if spec.resident else
                                       f", then {launch.job_title(spec.reward)} when asked" if spec.reward else ""),
        directives="\n".join(sbatch_directives(spec)),
        assignments="\n".join(assignments),
        site_env="\n".join(env) or "# slurm.env is empty.",
        launch=_launch(spec),
    )


def _launch(spec: SbatchSpec) -> str:
    """The end of the batch script: one srun of the server; or, with a reward step, the steps the
    orchestrator asks for one after another (infra/slurm/steps.py)."""
    if spec.reward is None:
        return _template("sbatch-one-step.sh.tmpl").substitute(srun_comment=launch.srun_comment(spec))
    rm = spec.reward
    assignments = _step_assignments(rm, "REWARD_", f"# Reward model: {rm.model_mount()[1]}")
    if spec.resident:  # both steps at once, each on its own nodes of the job
        assignments += [_assign("GENERATOR_NODES", spec.nodes), _assign("REWARD_NODES", rm.nodes)]
    return _template("sbatch-resident.sh.tmpl" if spec.resident else "sbatch-steps.sh.tmpl").substitute(
        reward_title=launch.job_title(rm), reward_assignments="\n".join(assignments))


def _step_assignments(spec: SbatchSpec, prefix: str, model_line: str) -> list[str]:
    """How one server's job step is launched (the generator's, or with `REWARD_` the swapped reward
    server's): its ranks per node, CPUs per rank, srun and container arguments, launch prefix."""
    return [
        _assign(f"{prefix}TASKS_PER_NODE", launch.srun_tasks_per_node(spec)),
        # Empty: every CPU of the node shared by its ranks (SLURM_CPUS_ON_NODE / TASKS_PER_NODE).
        _assign(f"{prefix}CPUS_PER_TASK", spec.cpus_per_task or ""),
        _assign_array(f"{prefix}SRUN_ARGS", launch.srun_args(spec)),
        model_line,
        _assign_array(f"{prefix}SRUN_CONTAINER_ARGS", srun_container_args(spec)),
        _assign_array(f"{prefix}LAUNCH_PREFIX", launch_prefix(spec)),
    ]


def render_node_launcher(spec: SbatchSpec) -> str:
    """The per-rank script: rank info, rank 0's host file, the site's setup, the server in its own
    process group."""
    assignments = [
        _assign("JOB_DIR", spec.job_dir),
        _assign_array("SETUP_LINES", spec.setup),
        _assign_array("SERVER_CMD", launch.server_command(spec)),
        *(_assign_array(name, value) if isinstance(value, tuple) else _assign(name, value)
          for name, value in (*launch.ray_assignments(spec), *launch.preflight_assignments(spec))),
    ]
    return _template("node-launcher.sh.tmpl").substitute(
        assignments="\n".join(assignments),
        site_env="\n".join(_exports(spec)) or "# slurm.env is empty.",
        runs=launch.launcher_runs(spec),
        server=_template(launch.launcher_tail(spec)).template,
    )


def write_job_files(spec: SbatchSpec) -> Path:
    """Write sbatch.sh and node-launcher.sh (mode 0755) into the existing job dir; return the
    sbatch path. Each file is written to a temp name and renamed, so a reader never sees half."""
    job_dir = Path(spec.job_dir)
    if not job_dir.is_dir():
        raise ConfigError(f"Job directory {job_dir} does not exist: create it (on a filesystem the nodes share) first.")
    files = [(LAUNCHER_NAME, render_node_launcher(spec))]
    files += [(REWARD_LAUNCHER_NAME, render_node_launcher(spec.reward))] if spec.reward is not None else []
    for name, text in (*files, (SBATCH_NAME, render_sbatch(spec))):
        tmp = job_dir / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.chmod(0o755)
        tmp.replace(job_dir / name)
    return job_dir / SBATCH_NAME
