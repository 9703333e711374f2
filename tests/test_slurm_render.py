"""SbatchSpec -> sbatch.sh and node-launcher.sh: golden files, validation, hostile values, and
the rendered scripts run for real with bash (Slurm's commands replaced by small stubs that
record their argv; the run on the real local cluster is the `slurm` test at the end).

Regenerate the golden files with `NSDG_UPDATE_GOLDEN=1 pytest tests/test_slurm_render.py`, then
review the diff. (tests/conftest.py drops NSDG_* variables at import; while it does not spare
this one, add `--noconftest -m "not slurm"`.)
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from infra.errors import ConfigError
from infra.settings import ServerSettings, Settings, SlurmSettings
from infra.slurm.options import ALLOWED_DIRECTIVES
from infra.slurm.render import render_node_launcher, render_sbatch, write_job_files
from infra.slurm.spec import FROM_SLURM, LAUNCHER_NAME, SBATCH_NAME, SbatchSpec

GOLDEN = Path(__file__).parent / "golden"
UPDATE_GOLDEN = os.environ.get("NSDG_UPDATE_GOLDEN") == "1"

GOLDEN_JOB_DIR = "/shared/nsdg/jobs/nsdg-golden-0001"
GOLDEN_NAME = "nsdg-golden-0001"
GOLDEN_COMMENT = "nsdg run=golden-0001 flow_run=00000000-0000-4000-8000-000000000001"
JOB_ID = "4242"

# Payloads whose only effect, if quoting ever broke, is a file named PWNED: these are executed.
HOSTILE = [
    "a'; touch PWNED; echo '",
    "$(touch PWNED)",
    "`touch PWNED`",
    "\"; touch PWNED; \"",
    "with  spaces\tand tab",
    "line1\nline2; touch PWNED\n",
    "${PATH} $HOME $1 $@",
    "-rf",
    "--container-image=evil",
    "*",
    "'",
    "",
    "back\\slash\\",
    "a\"b'c",
    "!! ~ ; & | < > ( ) { } [ ]",
    "ünïcödé ☃",
]
# Rendered and checked statically (bash -n, shlex), never executed.
DESTRUCTIVE = "a'; rm -rf /"


# --- helpers -------------------------------------------------------------------------------------


MODEL = "/lustre/models/Nemotron-4-340B-Base"
SIF = "/shared/images/nemo-24.05.sif"
SQSH = "/shared/images/nemo-24.05.sqsh"


def make_settings(runtime: str = "pyxis", model_path: str = MODEL, **slurm) -> Settings:
    slurm.setdefault("account", "my-acct")
    slurm.setdefault("partition", "batch")
    if runtime == "apptainer":
        slurm.setdefault("container_image", SIF)
    return Settings(_env_file=None, model={"path": model_path}, slurm=SlurmSettings(container_runtime=runtime, **slurm))


# a100x16 keeps the model under a mount of the site's own; the others get it mounted read-only.
GOLDEN_MOUNTS = {"a100x16": ["/lustre/models:/lustre/models:ro"]}


def golden_spec(profile: str, runtime: str) -> SbatchSpec:
    mounts = [] if runtime == "none" else GOLDEN_MOUNTS.get(profile, [])
    return SbatchSpec.from_settings(
        make_settings(runtime, container_mounts=mounts), profile, job_name=GOLDEN_NAME, comment=GOLDEN_COMMENT,
        job_dir=GOLDEN_JOB_DIR,
    )


HF_MODELS = {"h100x16": "/lustre/models/Nemotron-4-340B-Base-hf", "h200x8": "/lustre/models/Nemotron-4-340B-Base-hf-FP8"}
CUSTOM_COMMAND = ["/opt/site/serve", "--model", "/lustre/models/n", "--listen", "0.0.0.0:{port}", DESTRUCTIVE]


def engine_golden_spec(engine: str, profile: str, runtime: str) -> SbatchSpec:
    """`profile` switched to `engine` and nothing else (an HF checkpoint path for vLLM/TRT-LLM;
    apptainer gets each engine's .sif, which it cannot pull itself)."""
    model = HF_MODELS[profile] if engine in ("vllm", "trtllm") else MODEL
    images = {engine: f"/shared/images/{engine}.sif"} if runtime == "apptainer" else {}
    settings = make_settings(runtime, model_path=model, images=images)
    if engine == "custom":
        settings = settings.model_copy(update={"server": ServerSettings(command=CUSTOM_COMMAND)})
    return SbatchSpec.from_settings(settings, settings.profile(profile).model_copy(update={"engine": engine}),
                                    job_name=GOLDEN_NAME, comment=GOLDEN_COMMENT, job_dir=GOLDEN_JOB_DIR)


SITE_ENV = {"NCCL_SOCKET_IFNAME": "ib0", "NCCL_IB_HCA": "mlx5_0,mlx5_1", "NCCL_DEBUG": "INFO", "ODD": DESTRUCTIVE}


def custom_spec() -> SbatchSpec:
    """Every optional header line and setting, and a replacement server command with awkward arguments."""
    settings = Settings(
        _env_file=None,
        extra_profiles={"h100x16": {"backend": "slurm", "nodes": 2, "gpus_per_node": 8, "tensor_parallel": 8,
                                    "pipeline_parallel": 2, "gpu_type": "h100"}},
        slurm=SlurmSettings(
            account="my-acct", partition="batch", qos="high", reservation="resv-1", exclusive=False,
            time_limit="1-00:00:00", container_mounts=["/shared/models:/models:ro", "/scratch"],
            container_image=SQSH, mem="800G", propagate="ALL", requeue=True, cpus_per_task=12, gpu_request="gres",
            extra_directives=["--constraint=h100&ib", "--signal=B:USR1@120"],
            srun_args=["--mpi=pmix", "--container-writable"], env=SITE_ENV,
            setup=["module load nccl/2.21", "source /opt/site/env.sh"], export=["PATH", "http_proxy"],
            heartbeat_timeout_s=300, heartbeat_interval_s=10,
        ),
        server=ServerSettings(port=5555, command=["python3", "-m", "infra.local_server", DESTRUCTIVE, "two words"]),
    )
    return SbatchSpec.from_settings(settings, "h100x16", job_name=GOLDEN_NAME, comment=GOLDEN_COMMENT,
                                    job_dir=GOLDEN_JOB_DIR)


def simple_spec(job_dir: Path, /, **changes) -> SbatchSpec:
    """A 1-node spec that runs anywhere: no container, a harmless server command."""
    fields = dict(
        job_name="nsdg-render-test", job_dir=str(job_dir), comment="nsdg run=render-test flow_run=none",
        nodes=1, tasks_per_node=1, gpus_per_node=0, tensor_parallel=1, pipeline_parallel=1,
        container_runtime="none", server_command=(sys.executable, "-c", "pass"),
    )
    fields.update(changes)
    return SbatchSpec(**fields)


def bash_n(text: str, tmp_path: Path, name: str = "script.sh") -> None:
    path = tmp_path / name
    path.write_text(text)
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def assigned_array(script: str, name: str, tmp_path: Path) -> list[str]:
    """What bash itself holds in array `name`: run only the script's header (comments and the
    quoted assignments, which end at the first blank line after them) and print the array."""
    header = script.split("\n\nBATCH_PID=", 1)[0].split('\n\nRANK="', 1)[0]
    probe = tmp_path / "probe.sh"
    probe.write_text(header + f'\nfor _arg in "${{{name}[@]}}"; do printf "%s\\0" "$_arg"; done\n')
    out = subprocess.run(["bash", str(probe)], capture_output=True, cwd=tmp_path, timeout=30, check=True).stdout
    return out.decode().split("\0")[:-1] if out else []


def sbatch_lines(script: str) -> list[str]:
    return [line[len("#SBATCH "):] for line in script.splitlines() if line.startswith("#SBATCH ")]


@pytest.fixture
def job_dir(tmp_path_factory) -> Path:
    # mktemp names keep to the charset #SBATCH lines allow (tmp_path may hold '[' from params).
    return tmp_path_factory.mktemp("job")


# Stand-ins for srun (with pyxis' --container-* flags) and apptainer that read their argv the way
# the real ones do, refuse what the real ones would refuse (exit 97 with the reason), record the
# argv and run the launcher as rank 0 of one node.
STUB_PRELUDE = r"""#!PYTHON
import os, sys
open(os.path.join(os.environ["STUB_LOG"], "NAME.args"), "wb").write(b"".join(a.encode() + b"\0" for a in sys.argv[1:]))
def refuse(why):
    print(f"NAME stub: {why}", file=sys.stderr)
    sys.exit(97)
"""
SRUN_STUB = r"""
args, env = sys.argv[1:], dict(os.environ)
PYXIS_FLAGS = {"--no-container-mount-home", "--container-writable", "--container-remap-root"}
while args and args[0].startswith("-"):
    name, _, value = args.pop(0).partition("=")
    if name == "--container-image":
        first = value.split("/", 1)[0]
        if not value.startswith("/") and "#" not in value and "/" in value and ("." in first or ":" in first):
            refuse(f"enroot < 4.0 looks {value} up on Docker Hub: 401 Unauthorized (write {first}#...)")
    elif name == "--container-mounts":
        for mount in value.split(","):
            parts = mount.split(":")
            if len(parts) > 3 or not parts[0] or (len(parts) == 3 and not set(parts[2].split("+")) <= {"ro", "rw", "private", "rprivate", "slave", "rslave", "rbind", "nosuid", "nodev", "noexec"}):
                refuse(f"bad mount {mount!r}")
    elif name == "--container-env":
        missing = [k for k in value.split(",") if k not in env]
        if missing:
            refuse(f"--container-env names {missing}, which are not in the environment")
    elif name == "--container-workdir":
        env["STUB_CONTAINER_WORKDIR"] = value
    elif name == "--cpus-per-task":
        env["SLURM_CPUS_PER_TASK"] = value
    elif name == "--mpi" and value.startswith("pmix"):
        # slurmd's PMIx server directory for this step, given to each task (it is not under /tmp).
        env["PMIX_SERVER_TMPDIR"] = os.path.join(os.environ["STUB_LOG"], "spool", "pmix.4242.0")
    elif name.startswith("--container-") and name not in PYXIS_FLAGS:
        refuse(f"pyxis has no option {name}")
env.update(SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0", SLURMD_NODENAME="node1")
os.execvpe(args[0], args, env)
"""
APPTAINER_STUB = r"""
args = sys.argv[1:]
if args.pop(0) != "exec":
    refuse("only exec is stubbed")
while args and args[0].startswith("-"):
    name, _, value = args.pop(0).partition("=")
    if name == "--bind":
        parts = value.split(":")
        if len(parts) > 3 or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
            refuse(f"bad bind {value!r}")
    elif name not in ("--nv", "--no-home"):
        refuse(f"unknown flag {name}")
image = args.pop(0)
if "://" not in image and not os.path.isfile(image):
    refuse(f"could not open image {image}: failed to retrieve path for {image}: no such file or directory")
os.execvp(args[0], args)
"""
STUBS = {
    **{name: STUB_PRELUDE.replace("PYTHON", sys.executable).replace("NAME", name) + body
       for name, body in (("srun", SRUN_STUB), ("apptainer", APPTAINER_STUB))},
    "scancel": """#!/bin/bash
printf '%s\\0' "$@" >> "$STUB_LOG/scancel.args"
""",
    "scontrol": """#!/bin/bash
echo node1
echo node2
""",
}


@pytest.fixture
def stubs(tmp_path) -> Path:
    """A directory with stub srun/apptainer/scancel/scontrol that log to it."""
    bin_dir = tmp_path / "stub-bin"
    bin_dir.mkdir()
    for name, text in STUBS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def stub_env(stubs: Path) -> dict[str, str]:
    return {
        "PATH": f"{stubs}:{os.environ['PATH']}",
        "STUB_LOG": str(stubs),
        "SLURM_JOB_ID": JOB_ID,
        "SLURM_JOB_NODELIST": "node[1-2]",
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": "C.UTF-8",
    }


def recorded(stubs: Path, name: str) -> list[str] | None:
    path = stubs / f"{name}.args"
    return path.read_bytes().decode().split("\0")[:-1] if path.exists() else None


def start_batch(spec: SbatchSpec, stubs: Path, cwd: Path) -> subprocess.Popen:
    sbatch = write_job_files(spec)
    return subprocess.Popen(["bash", str(sbatch)], env=stub_env(stubs), cwd=cwd, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, timeout: float = 30) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out.decode(errors="replace")
    finally:
        if proc.poll() is None:  # never leave our own process group behind
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_for_file(path: Path, timeout: float) -> float:
    start = time.monotonic()
    while not path.exists():
        assert time.monotonic() - start < timeout, f"{path} did not appear within {timeout} s"
        time.sleep(0.05)
    return time.monotonic() - start


def gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


# --- golden files --------------------------------------------------------------------------------

COMBOS = [(profile, runtime) for profile in ("h100x16", "a100x16", "h200x8") for runtime in ("pyxis", "apptainer", "none")]
RENDERED = {f"{p}-{r}": (lambda p=p, r=r: golden_spec(p, r)) for p, r in COMBOS}
RENDERED["h100x16-custom"] = custom_spec
# The other engines (infra/slurm/launch.py): vllm over 2 nodes (Ray) and on one H200 node (FP8),
# trtllm as one MPI world, NeMo >= 2.1, and a command template.
ENGINE_PROFILES = [("vllm", "h100x16"), ("vllm", "h200x8"), ("trtllm", "h100x16"), ("nemo-openai", "h100x16"),
                   ("custom", "h100x16")]
RENDERED.update({f"{e}-{p}-{r}": (lambda e=e, p=p, r=r: engine_golden_spec(e, p, r))
                 for e, p in ENGINE_PROFILES for r in ("pyxis", "apptainer", "none")})


@pytest.mark.parametrize("combo", sorted(RENDERED))
@pytest.mark.parametrize("kind", ["sbatch", "node-launcher"])
def test_matches_golden(combo, kind, tmp_path):
    spec = RENDERED[combo]()
    text = render_sbatch(spec) if kind == "sbatch" else render_node_launcher(spec)
    path = GOLDEN / f"{kind}-{combo}.sh"
    if UPDATE_GOLDEN:
        path.write_text(text)
    assert path.exists(), f"{path.name} missing: run with NSDG_UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(), f"{path.name} differs: review, then NSDG_UPDATE_GOLDEN=1 to accept"


def golden_scripts() -> list[Path]:
    # Only this module's files: other tests may keep golden files here too.
    return sorted([*GOLDEN.glob("sbatch-*.sh"), *GOLDEN.glob("node-launcher-*.sh")])


@pytest.mark.parametrize("path", golden_scripts(), ids=lambda p: p.name)
def test_golden_scripts_parse(path):
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_every_golden_file_is_rendered():
    expected = {f"{kind}-{combo}.sh" for combo in RENDERED for kind in ("sbatch", "node-launcher")}
    assert {p.name for p in golden_scripts()} == expected


# --- what the scripts say ------------------------------------------------------------------------


def test_h100x16_carries_the_seed_layout(tmp_path):
    spec = golden_spec("h100x16", "pyxis")
    sbatch, launcher = render_sbatch(spec), render_node_launcher(spec)
    lines = sbatch_lines(sbatch)
    for expected in ("-N 2", "--ntasks-per-node=8", "--gpus-per-node=8", f"-J {GOLDEN_NAME}", "-A my-acct",
                     "-p batch", "--time=04:00:00", "--exclusive", f"--chdir={GOLDEN_JOB_DIR}",
                     f"-o {GOLDEN_JOB_DIR}/%x-%j.out", f"-e {GOLDEN_JOB_DIR}/%x-%j.err",
                     f'--comment="{GOLDEN_COMMENT}"'):
        assert expected in lines, expected
    assert assigned_array(sbatch, "SRUN_CONTAINER_ARGS", tmp_path) == [
        "--container-image=nvcr.io#nvidia/nemo:24.05",
        f"--container-mounts={MODEL}:{MODEL}:ro,{GOLDEN_JOB_DIR}:{GOLDEN_JOB_DIR}",
        f"--container-workdir={GOLDEN_JOB_DIR}", "--no-container-mount-home",
    ]
    assert "srun --kill-on-bad-exit=1 --ntasks-per-node=\"$TASKS_PER_NODE\" --cpus-per-task=\"$CPUS_PER_TASK\"" in sbatch
    assert {"--mem=0", "--propagate=NONE", "--no-requeue", "--export=PATH,LANG,LC_ALL,TZ"} <= set(lines)
    assert f"# Model: {MODEL} is mounted read-only at its own path (slurm.mount_model)." in sbatch
    assert assigned_array(launcher, "SERVER_CMD", tmp_path) == [
        "python3", "/opt/NeMo/examples/nlp/language_modeling/megatron_gpt_eval.py",
        f"gpt_model_file={MODEL}",
        "tensor_model_parallel_size=8", "pipeline_model_parallel_size=2", "pipeline_model_parallel_split_rank=0",
        "trainer.devices=8", "trainer.num_nodes=2", "trainer.precision=bf16", "megatron_amp_O2=True",
        "server=True", "web_server=False", "port=1424",
    ]


def test_h200x8_is_one_node_pp1(tmp_path):
    spec = golden_spec("h200x8", "pyxis")
    assert "-N 1" in sbatch_lines(render_sbatch(spec))
    command = assigned_array(render_node_launcher(spec), "SERVER_CMD", tmp_path)
    assert {"pipeline_model_parallel_size=1", "trainer.num_nodes=1", "trainer.devices=8"} <= set(command)


def test_all_directives_precede_the_first_command():
    # sbatch stops reading #SBATCH lines at the first line that is not a comment.
    text = render_sbatch(custom_spec())
    first_command = next(i for i, line in enumerate(text.splitlines()) if line and not line.startswith("#"))
    assert max(i for i, line in enumerate(text.splitlines()) if line.startswith("#SBATCH")) < first_command


def test_optional_header_lines():
    lines = sbatch_lines(render_sbatch(custom_spec()))
    assert {"--qos=high", "--reservation=resv-1", "--time=1-00:00:00", "--mem=800G", "--constraint=h100&ib",
            "--signal=B:USR1@120", "--requeue", "--open-mode=append", "--propagate=ALL", "--gres=gpu:h100:8",
            "--cpus-per-task=12", "--export=PATH,http_proxy"} <= set(lines)
    assert not [line for line in lines if line.startswith(("--exclusive", "--gpus-per-node", "--no-requeue"))]
    bare = sbatch_lines(render_sbatch(replace(golden_spec("h100x16", "pyxis"), account=None, partition=None,
                                              gpus_per_node=0, tasks_per_node=8, mem=None, propagate=None,
                                              export=())))
    assert not [line for line in bare if line.startswith(("-A", "-p", "--gpus-per-node", "--mem", "--propagate"))]
    assert "--export=NONE" in bare
    typed = replace(golden_spec("h100x16", "pyxis"), gpu_type="h100")
    assert "--gpus-per-node=h100:8" in sbatch_lines(render_sbatch(typed))


def test_runtimes_wrap_the_launcher_differently(tmp_path):
    apptainer = render_sbatch(golden_spec("h100x16", "apptainer"))
    assert assigned_array(apptainer, "SRUN_CONTAINER_ARGS", tmp_path) == []
    assert assigned_array(apptainer, "LAUNCH_PREFIX", tmp_path) == [
        "apptainer", "exec", "--nv", "--no-home", f"--bind={MODEL}:{MODEL}:ro",
        f"--bind={GOLDEN_JOB_DIR}:{GOLDEN_JOB_DIR}", SIF,
    ]
    bare = render_sbatch(golden_spec("h100x16", "none"))
    assert assigned_array(bare, "SRUN_CONTAINER_ARGS", tmp_path) == []
    assert assigned_array(bare, "LAUNCH_PREFIX", tmp_path) == []


def test_replacement_command_is_used_verbatim(tmp_path):
    command = assigned_array(render_node_launcher(custom_spec()), "SERVER_CMD", tmp_path)
    assert command == ["python3", "-m", "infra.local_server", DESTRUCTIVE, "two words"]


def test_heartbeat_values():
    spec = replace(golden_spec("h100x16", "pyxis"), heartbeat_timeout_s=2.5, heartbeat_interval_s=0.25)
    text = render_sbatch(spec)
    assert spec.heartbeat_file == f"{GOLDEN_JOB_DIR}/heartbeat"
    assert f"HEARTBEAT_FILE={GOLDEN_JOB_DIR}/heartbeat\n" in text
    assert "HEARTBEAT_TIMEOUT_S=3\n" in text and "HEARTBEAT_INTERVAL_S=0.25\n" in text


# --- validation ----------------------------------------------------------------------------------


def test_topology_mismatch_names_both_sides(job_dir):
    with pytest.raises(ConfigError, match=r"8 x 2 = 16 must equal tensor_parallel x pipeline_parallel = 8 x 1 = 8"):
        simple_spec(job_dir, nodes=2, tasks_per_node=8, gpus_per_node=8, tensor_parallel=8, pipeline_parallel=1)


def test_tasks_must_match_gpus(job_dir):
    with pytest.raises(ConfigError, match="one rank per GPU"):
        simple_spec(job_dir, nodes=1, tasks_per_node=4, gpus_per_node=8, tensor_parallel=4)


@pytest.mark.parametrize("name", ["bash", "interactive", "BASH"])
def test_job_names_that_switch_lightning_off_are_rejected(job_dir, name):
    with pytest.raises(ConfigError, match="Lightning ignore Slurm"):
        simple_spec(job_dir, job_name=name)


@pytest.mark.parametrize("name", ["", "-x", "a b", "a;b", "x" * 129, "nsdg-hetjob", "a\nb"])
def test_unsafe_job_names_are_rejected(job_dir, name):
    with pytest.raises(ConfigError, match="job_name"):
        simple_spec(job_dir, job_name=name)


def test_disallowed_directive_lists_the_allowed_ones(job_dir):
    with pytest.raises(ConfigError) as info:
        simple_spec(job_dir, extra_directives=["--time=99:00:00"])
    message = str(info.value)
    assert "--time=99:00:00" in message and "extra_directives" in message
    assert all(option in message for option in ALLOWED_DIRECTIVES)


@pytest.mark.parametrize("directive", [
    "--mem", "--mem=1 G", "--mail-user=\"a@b\"", "--constraint=a#b", "--export=A=$(touch PWNED)",
    "--nice=1\n#SBATCH --time=9", "--no-requeue=1", "mem=0", "-N 3", "--gres=gpu:8 --time=1",
])
def test_malformed_directives_are_rejected(job_dir, directive):
    with pytest.raises(ConfigError, match="extra_directives"):
        simple_spec(job_dir, extra_directives=[directive])


def test_allowed_directives_pass(job_dir):
    spec = simple_spec(job_dir, extra_directives=["--mail-type=END,FAIL", "--mail-user=ml@example.com",
                                                  "--gres=nvme:1", "--signal=B:USR1@60"])
    assert spec.extra_directives[-1] == "--signal=B:USR1@60"


HARMLESS_COMMENTS = {"-rf", "--container-image=evil"}  # one word each, double-quoted in the header


@pytest.mark.parametrize("value", [v for v in [*HOSTILE, DESTRUCTIVE, "a #b", "run=1 hetjob", "a  b", " a"]
                                   if v not in HARMLESS_COMMENTS])
def test_hostile_comments_are_rejected(job_dir, value):
    with pytest.raises(ConfigError, match="comment"):
        simple_spec(job_dir, comment=value)


@pytest.mark.parametrize("value", [*HOSTILE, DESTRUCTIVE, "/tmp/a b", "/tmp/#x", "relative/dir", "/a/hetjob"])
def test_hostile_job_dirs_are_rejected(value):
    with pytest.raises(ConfigError, match="job_dir"):
        simple_spec(Path("/unused"), job_dir=value)


def test_harmless_comments_render_as_one_directive():
    spec = replace(golden_spec("h100x16", "pyxis"), comment="--container-image=evil -rf")
    assert '--comment="--container-image=evil -rf"' in sbatch_lines(render_sbatch(spec))


@pytest.mark.parametrize("value", [*HOSTILE, DESTRUCTIVE, "models/x", "/m/a=b", "/m/${x}"])
def test_model_paths_hydra_would_misread_are_rejected(job_dir, value):
    with pytest.raises(ConfigError, match="model.path"):
        simple_spec(job_dir, server_command=None, model_path=value)


@pytest.mark.parametrize("mount", ["/a:/b,/c:/d", "/a\n:/b", ""])
def test_mounts_that_would_split_are_rejected(job_dir, mount):
    with pytest.raises(ConfigError, match="container_mounts"):
        simple_spec(job_dir, container_runtime="pyxis", container_mounts=[mount])


def test_mounts_need_a_container(job_dir):
    with pytest.raises(ConfigError, match="'none'"):
        simple_spec(job_dir, container_mounts=["/a:/b"])


def test_heartbeat_timeout_must_outlast_two_checks(job_dir):
    with pytest.raises(ConfigError, match="at least twice"):
        simple_spec(job_dir, heartbeat_timeout_s=10, heartbeat_interval_s=6)


def test_from_settings_needs_a_slurm_profile(job_dir):
    with pytest.raises(ConfigError, match="backend"):
        SbatchSpec.from_settings(make_settings(), "local", job_name="nsdg-x", comment="c", job_dir=job_dir)
    with pytest.raises(ConfigError, match="Unknown profile"):
        SbatchSpec.from_settings(make_settings(), "h100x99", job_name="nsdg-x", comment="c", job_dir=job_dir)


def test_from_settings_expands_home(monkeypatch, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    spec = SbatchSpec.from_settings(make_settings(), "h200x8", job_name="nsdg-x", comment="c", job_dir="~/jobs/j1")
    assert spec.job_dir == f"{home}/jobs/j1"


def test_spec_defaults_are_the_settings_defaults():
    """One definition of each default (infra/settings.py): a spec given only the job's own values
    equals the one built from default settings, field by field."""
    settings = Settings(_env_file=None)
    profile = settings.profile("h100x16")
    job = dict(job_name=GOLDEN_NAME, comment=GOLDEN_COMMENT, job_dir=GOLDEN_JOB_DIR)
    built = SbatchSpec.from_settings(settings, profile, **job)
    bare = SbatchSpec(**job, nodes=profile.nodes, tasks_per_node=profile.tasks_per_node,
                      gpus_per_node=profile.gpus_per_node, tensor_parallel=profile.tensor_parallel,
                      pipeline_parallel=profile.pipeline_parallel)
    differ = {f.name: (getattr(bare, f.name), getattr(built, f.name)) for f in dataclasses.fields(SbatchSpec)
              if getattr(bare, f.name) != getattr(built, f.name)}
    assert differ == {}


def test_from_settings_copies_every_slurm_setting_the_spec_has():
    """A spec field named like a slurm setting is copied from it (mem, propagate and the image
    are derived), so a setting the spec gains is never left at its default."""
    shared = {f.name for f in dataclasses.fields(SbatchSpec)} & set(SlurmSettings.model_fields)
    assert shared - set(FROM_SLURM) == {"mem", "propagate", "container_image"}
    assert set(FROM_SLURM) <= shared


# --- hostile values through the scripts, executed ------------------------------------------------


def test_destructive_value_is_one_quoted_word(tmp_path, job_dir):
    spec = simple_spec(job_dir, server_command=("echo", DESTRUCTIVE))
    launcher = render_node_launcher(spec)
    bash_n(launcher, tmp_path)
    line = next(line for line in launcher.splitlines() if line.startswith("SERVER_CMD=("))
    assert shlex.split(line[len("SERVER_CMD=("):-1]) == ["echo", DESTRUCTIVE]


def test_launcher_passes_hostile_arguments_through(tmp_path, job_dir):
    out = tmp_path / "argv.json"
    dump = "import json, sys; open(sys.argv[1], 'w').write(json.dumps(sys.argv[2:]))"
    spec = simple_spec(job_dir, server_command=(sys.executable, "-c", dump, str(out), *HOSTILE))
    write_job_files(spec)
    bash_n(render_sbatch(spec), tmp_path, "sbatch.sh")
    env = {"PATH": os.environ["PATH"], "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
           "SLURM_JOB_ID": JOB_ID, "SLURMD_NODENAME": "node1", "LANG": "C.UTF-8"}
    result = subprocess.run(["bash", str(job_dir / LAUNCHER_NAME)], env=env, cwd=tmp_path, capture_output=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr.decode()
    assert json.loads(out.read_text()) == HOSTILE
    assert not list(tmp_path.rglob("PWNED")) and not list(job_dir.rglob("PWNED"))
    hostname = subprocess.run(["hostname"], capture_output=True, text=True, check=True).stdout.strip()
    assert (job_dir / "rank0-host").read_text() == f"{hostname}\n"
    assert (job_dir / "rank0-node").read_text() == "node1\n"
    assert b"rank 0: local_rank=0 node_rank=0" in result.stdout


@pytest.mark.parametrize("runtime", ["pyxis", "apptainer"])
def test_batch_script_passes_hostile_mounts_through(tmp_path, job_dir, stubs, runtime):
    mounts = [m for m in HOSTILE if m and "\n" not in m and "\t" not in m and "," not in m and m.count(":") < 3]
    image = tmp_path / "img.sif"
    image.write_text("")
    spec = simple_spec(job_dir, container_runtime=runtime, container_mounts=mounts,
                       container_image="registry.example/img:1" if runtime == "pyxis" else str(image))
    rc, out = finish(start_batch(spec, stubs, tmp_path))
    assert rc == 0, out
    launcher = ["bash", f"{job_dir}/node-launcher.sh"]
    srun = ["--kill-on-bad-exit=1", "--ntasks-per-node=1", "--cpus-per-task=1", "--export=ALL", "--label"]
    if runtime == "pyxis":
        mount_arg = "--container-mounts=" + ",".join([*mounts, f"{job_dir}:{job_dir}"])
        assert recorded(stubs, "srun") == [*srun, "--container-image=registry.example#img:1", mount_arg,
                                           f"--container-workdir={job_dir}", "--no-container-mount-home", *launcher]
    else:
        binds = [f"--bind={m}" for m in [*mounts, f"{job_dir}:{job_dir}"]]
        assert recorded(stubs, "apptainer") == ["exec", "--no-home", *binds, str(image), *launcher]
    assert not list(tmp_path.rglob("PWNED")) and not list(job_dir.rglob("PWNED"))


@pytest.mark.parametrize("site_gds", [None, "ds21"])
def test_apptainer_tasks_of_a_pmix_world_bind_their_steps_pmix_directory(tmp_path, job_dir, stubs, site_gds):
    """Audit L5: the directory is the step's, known only inside the task, so the bind is added there;
    PMIx's hash store unless the site chose another (slurm.env)."""
    image = tmp_path / "trtllm.sif"
    image.write_text("")
    spec = simple_spec(job_dir, container_runtime="apptainer", container_image=str(image), srun_args=("--mpi=pmix",),
                       server_command=("env",), env=(("PMIX_MCA_gds", site_gds),) if site_gds else ())
    rc, out = finish(start_batch(spec, stubs, tmp_path))
    assert rc == 0, out
    pmix_dir = stubs / "spool" / "pmix.4242.0"
    assert recorded(stubs, "apptainer") == ["exec", f"--bind={pmix_dir}", "--no-home", f"--bind={job_dir}:{job_dir}",
                                            str(image), "bash", f"{job_dir}/node-launcher.sh"]
    assert f"PMIX_MCA_gds={site_gds or 'hash'}" in out
    # Without PMIx nothing changes: apptainer is srun's command itself.
    spec = replace(spec, srun_args=())
    assert assigned_array(render_sbatch(spec), "LAUNCH_PREFIX", tmp_path)[:2] == ["apptainer", "exec"]


# --- the batch script, run ------------------------------------------------------------------------


def test_batch_exits_with_the_servers_exit_code(tmp_path, job_dir, stubs):
    spec = simple_spec(job_dir, server_command=(sys.executable, "-c", "import sys; sys.exit(3)"))
    rc, out = finish(start_batch(spec, stubs, tmp_path))
    assert rc == 3, out
    assert "server exited with code 3" in out and "srun exited with code 3" in out
    info = dict(line.split("=", 1) for line in (job_dir / "job-info").read_text().splitlines())
    assert info["job_id"] == JOB_ID and info["first_node"] == "node1" and info["nodelist"] == "node[1-2]"
    assert recorded(stubs, "scancel") is None


def test_batch_keeps_secrets_off_the_nodes(tmp_path, job_dir, stubs):
    spec = simple_spec(job_dir, server_command=("env",))
    proc = subprocess.Popen(["bash", str(write_job_files(spec))], cwd=tmp_path, start_new_session=True,
                            env={**stub_env(stubs), "NSDG_S3__SECRET_ACCESS_KEY": "s3cr3t", "AWS_SESSION_TOKEN": "t0k",
                                 "NSDG_KEEP": "kept"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    rc, out = finish(proc)
    assert rc == 0, out
    assert "s3cr3t" not in out and "t0k" not in out and "NSDG_KEEP=kept" in out


def server_that_records_pids(pid_file: Path) -> tuple[str, ...]:
    """A server stand-in that forks a grandchild and records both pids, then sleeps."""
    code = ("import os, subprocess, sys, time; child = subprocess.Popen(['sleep', '60']); "
            "open(sys.argv[1] + '.tmp', 'w').write(f'{os.getpid()} {child.pid}'); "
            "os.rename(sys.argv[1] + '.tmp', sys.argv[1]); time.sleep(60)")
    return (sys.executable, "-c", code, str(pid_file))


def test_dead_man_switch_cancels_when_the_heartbeat_never_appears(tmp_path, job_dir, stubs):
    pid_file = tmp_path / "server.pids"
    spec = simple_spec(job_dir, server_command=server_that_records_pids(pid_file),
                       heartbeat_timeout_s=2, heartbeat_interval_s=0.2)
    # Timed from before the script exists, since the switch's clock starts with the job, not the server (timed
    # from the server's pid file it failed under load: a slow server start, the cancel 0.86 s after it). The
    # switch counts whole seconds of the node's clock (`%(%s)T`), so "missing for 2s" is more than 1 s real.
    started = time.monotonic()
    proc = start_batch(spec, stubs, tmp_path)
    try:
        wait_for_file(pid_file, 15)
        wait_for_file(stubs / "scancel.args", 15)
        assert time.monotonic() - started > 1.0, "cancelled before the timeout"
        assert recorded(stubs, "scancel") == [JOB_ID]
        assert "missing for" in (job_dir / "cancel-reason").read_text()
        # What Slurm does next: SIGTERM to the batch script, which must pass it down and exit.
        os.kill(proc.pid, signal.SIGTERM)
        rc, out = finish(proc, timeout=15)
    finally:
        if proc.poll() is None:
            finish(proc, timeout=0.1)
    assert rc == 143, out
    assert "dead-man switch: heartbeat file" in out and "received SIGTERM" in out
    server, grandchild = map(int, pid_file.read_text().split())
    assert gone(server) and gone(grandchild)


def test_dead_man_switch_waits_while_the_heartbeat_moves(tmp_path, job_dir, stubs):
    spec = simple_spec(job_dir, server_command=("sleep", "60"), heartbeat_timeout_s=2, heartbeat_interval_s=0.2)
    heartbeat = Path(spec.heartbeat_file)
    stop = threading.Event()

    def beat() -> None:  # the orchestrator's side: a new value every 0.3 s
        count = 0
        while not stop.wait(0.3):
            count += 1
            heartbeat.write_text(str(count))

    beater = threading.Thread(target=beat, daemon=True)
    beater.start()
    proc = start_batch(spec, stubs, tmp_path)
    try:
        time.sleep(4.5)
        assert recorded(stubs, "scancel") is None, "cancelled a job whose heartbeat was alive"
        stop.set()
        stopped = time.monotonic()
        wait_for_file(stubs / "scancel.args", 10)
        # The switch counts whole seconds on the node's clock and the last beat may be 0.3 s old:
        # with a 2 s timeout it may fire from ~0.7 s after the beats stop.
        assert time.monotonic() - stopped > 0.5
        assert "unchanged for" in (job_dir / "cancel-reason").read_text()
        os.kill(proc.pid, signal.SIGTERM)
        rc, out = finish(proc, timeout=15)
    finally:
        stop.set()
        if proc.poll() is None:
            finish(proc, timeout=0.1)
    assert rc == 143, out


def test_launcher_signals_only_its_own_process_group(tmp_path, job_dir):
    pid_file, bystander_file = tmp_path / "server.pids", tmp_path / "bystander.pid"
    spec = simple_spec(job_dir, server_command=server_that_records_pids(pid_file))
    write_job_files(spec)
    # The bystander shares the launcher's process group: a launcher that signalled its own
    # group (`kill 0`, `pkill`) would take it down too.
    launcher = shlex.quote(str(job_dir / LAUNCHER_NAME))
    wrapper = f"sleep 60 >/dev/null 2>&1 & echo $! > {shlex.quote(str(bystander_file))}; exec bash {launcher}"
    proc = subprocess.Popen(["bash", "-c", wrapper], cwd=tmp_path, start_new_session=True,
                            env={"PATH": os.environ["PATH"], "SLURM_PROCID": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for_file(pid_file, 15)
        os.kill(proc.pid, signal.SIGTERM)
        out = proc.communicate(timeout=15)[0].decode(errors="replace")
        server, grandchild = map(int, pid_file.read_text().split())
        bystander = int(bystander_file.read_text())
        assert proc.returncode == 143, out
        assert "sending SIGTERM to the server's process group" in out
        assert gone(server) and gone(grandchild)
        assert not gone(bystander, timeout=0.5)
        assert not (job_dir / "rank0-host").exists(), "only rank 0 publishes its host"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# --- files in the job dir ------------------------------------------------------------------------


def test_write_job_files(job_dir):
    spec = simple_spec(job_dir)
    path = write_job_files(spec)
    assert path == job_dir / SBATCH_NAME
    assert sorted(p.name for p in job_dir.iterdir()) == [LAUNCHER_NAME, SBATCH_NAME]
    for name in (SBATCH_NAME, LAUNCHER_NAME):
        assert (job_dir / name).stat().st_mode & 0o777 == 0o755
    assert (job_dir / SBATCH_NAME).read_text() == render_sbatch(spec)


def test_write_job_files_needs_the_dir(tmp_path_factory):
    missing = tmp_path_factory.mktemp("parent") / "not-there"
    with pytest.raises(ConfigError, match="does not exist"):
        write_job_files(simple_spec(missing))


# --- sbatch's own parser, on the local cluster ----------------------------------------------------


@pytest.mark.slurm
def test_real_sbatch_reads_the_header(slurm_cluster, job_dir):
    """Submit held, read back what slurmctld parsed, cancel: nothing runs."""
    from infra.system.commands import run_command

    comment = "nsdg-render-test run=r-1 flow_run=f-1"
    spec = simple_spec(job_dir, job_name="nsdg-render-parse", comment=comment, nodes=2, tasks_per_node=8,
                       gpus_per_node=8, tensor_parallel=8, pipeline_parallel=2, time_limit="00:07:00",
                       extra_directives=["--signal=B:USR1@60"])
    sbatch = write_job_files(spec)
    job_id = run_command(["sbatch", "--hold", "--parsable", str(sbatch)], timeout=30).stdout.strip().split(";")[0]
    try:
        shown = run_command(["scontrol", "show", "job", "-o", job_id], timeout=30).stdout
    finally:
        run_command(["scancel", job_id], timeout=30, check=False)
    fields = dict(re.findall(r"(\w+)=(\S*)", shown))
    assert fields["JobName"] == "nsdg-render-parse" and fields["NumNodes"] in ("2", "2-2")
    assert fields["StdOut"] == f"{job_dir}/nsdg-render-parse-{job_id}.out"
    assert fields["WorkDir"] == str(job_dir) and fields["TimeLimit"] == "00:07:00" and fields["Requeue"] == "0"
    assert f"Comment={comment} " in shown


# --- the site's environment and setup, through the stubs -------------------------------------------


@pytest.mark.parametrize("runtime", ["pyxis", "apptainer", "none"])
def test_site_env_reaches_the_rank_over_the_orchestrators(tmp_path, job_dir, stubs, runtime):
    """slurm.env is exported for srun (pyxis keeps the keys named in --container-env, which the
    stub checks are in its environment) and again in the launcher; the orchestrator's Python is not."""
    image = tmp_path / "img.sif"
    image.write_text("")
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    (tmp_path / "venv" / "pyvenv.cfg").write_text("")
    site = {"NCCL_IB_HCA": "mlx5_0,mlx5_1", "ODD": DESTRUCTIVE, "PYTHONPATH": "/site/lib"}
    spec = simple_spec(job_dir, container_runtime=runtime, env=tuple(site.items()), server_command=("env",),
                       setup=("export FROM_SETUP=yes",),
                       container_image="registry.example/img:1" if runtime == "pyxis" else str(image))
    env = {**stub_env(stubs), "PATH": f"{venv_bin}:{stubs}:{os.environ['PATH']}", "VIRTUAL_ENV": str(venv_bin.parent),
           "PYTHONPATH": "/orchestrator/src", "NCCL_IB_HCA": "from-the-worker"}
    proc = subprocess.Popen(["bash", str(write_job_files(spec))], cwd=tmp_path, start_new_session=True, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    rc, out = finish(proc)
    assert rc == 0, out
    seen = dict(line.split("=", 1) for line in out.splitlines() if re.match(r"[A-Za-z_][A-Za-z0-9_]*=", line))
    assert {k: seen.get(k) for k in site} == site
    assert "VIRTUAL_ENV" not in seen and str(venv_bin) not in seen["PATH"]
    assert seen["FROM_SETUP"] == "yes" and seen["PYTHONNOUSERSITE"] == "1" and seen["HYDRA_FULL_ERROR"] == "1"
    if runtime == "pyxis":
        assert "--container-env=NCCL_IB_HCA,ODD,PYTHONPATH" in recorded(stubs, "srun")
    if runtime == "apptainer":
        assert seen["APPTAINERENV_ODD"] == DESTRUCTIVE


def test_a_failing_setup_line_ends_the_rank(tmp_path, job_dir, stubs):
    spec = simple_spec(job_dir, setup=("false",), server_command=("touch", str(tmp_path / "server-ran")))
    rc, out = finish(start_batch(spec, stubs, tmp_path))
    assert rc == 1, out
    assert "setup line failed (exit 1): false" in out and not (tmp_path / "server-ran").exists()


def test_usr1_to_the_batch_script_is_noted_not_fatal(tmp_path, job_dir, stubs):
    pid_file = tmp_path / "server.pids"
    proc = start_batch(simple_spec(job_dir, server_command=server_that_records_pids(pid_file)), stubs, tmp_path)
    try:
        wait_for_file(pid_file, 15)
        os.kill(proc.pid, signal.SIGUSR1)
        wait_for_file(job_dir / "signal-received", 10)
        assert "signal=USR1" in (job_dir / "signal-received").read_text()
        assert proc.poll() is None, "USR1 ended the batch script"
        os.kill(proc.pid, signal.SIGTERM)
        rc, out = finish(proc, timeout=15)
    finally:
        if proc.poll() is None:
            finish(proc, timeout=0.1)
    assert rc == 143 and "received SIGUSR1; noted" in out, out
