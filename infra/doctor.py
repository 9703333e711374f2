"""`nemotron-sdg doctor`: a user's setup for one profile, checked on the login node without
submitting a job. Each check is one line: ok, problem (what was seen and what to do) or skip
(cannot be checked from here, and why). Nothing is left behind: the output probe and the job
directory probe are removed, the port is only bound for a moment.

The checks, in order: the settings load; the profile exists and its launch settings pass the
refusals a run makes before the plan (infra/slurm/spec.py); for a Slurm profile, sbatch, squeue
and scontrol are on PATH and the controller answers, the partition is listed by `sinfo` and up,
the account is associated with the user (`sacctmgr`, where accounting runs), srun has the PMIx
plugin trtllm's MPI world needs (trtllm only), the image is readable here and the NVIDIA driver
floor its CUDA build needs on the nodes (what the in-job preflight enforces), the
model path is readable here, the job root is writable; for every profile the tokenizer loads,
the output location is allowed and writable, the server port is free on this host, and the
Prefect API answers with the credentials given.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from infra.errors import CommandError, SdgError
from infra.settings import Profile, Settings, load_settings
from infra.system.commands import run_command

OK, PROBLEM, SKIP = "ok", "problem", "skip"
SLURM_COMMANDS = ("sbatch", "squeue", "scontrol")
PREFECT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # OK, PROBLEM or SKIP
    detail: str

    def line(self) -> str:
        return f"{self.status:<8} {self.name}: {self.detail}"

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PrefectApi:
    """Where the Prefect API is and the headers that authenticate to it (the CLI reads Prefect's
    settings: infra/ does not import Prefect)."""
    url: str | None
    headers: dict[str, str]


class _Problem(Exception):
    """A check's failure: its text is the line's detail (what was seen, what to do)."""


def _check(name: str, probe: Callable[[], str | tuple[str, str]]) -> Check:
    """Run one probe: its text is the detail of an ok line, (SKIP, why) a skip; a _Problem, a
    ConfigError or another SdgError (the refusals a run would make) is a problem line."""
    try:
        result = probe()
    except _Problem as exc:
        return Check(name, PROBLEM, str(exc))
    except SdgError as exc:
        return Check(name, PROBLEM, " ".join(str(exc).split()))
    if isinstance(result, tuple):
        return Check(name, *result)
    return Check(name, OK, result)


def run_checks(profile_name: str, engine: str | None, prefect: PrefectApi, *, timeout_s: float = 15.0) -> list[Check]:
    checks: list[Check] = []
    try:
        settings = load_settings()
    except SdgError as exc:
        return [Check("settings", PROBLEM, " ".join(str(exc).split()))]
    checks.append(Check("settings", OK, "NSDG_* environment and .env load"))
    try:
        profile = settings.profile(profile_name)
        if engine:
            profile = Profile.model_validate({**profile.model_dump(), "engine": engine})
    except (SdgError, ValueError) as exc:
        return [*checks, Check("profile", PROBLEM, " ".join(str(exc).split()))]
    checks.append(Check("profile", OK, f"{profile_name}: backend {profile.backend}, engine {profile.engine}"))
    if profile.backend == "slurm":
        checks += _slurm_checks(settings, profile, profile_name, timeout_s)
    checks.append(_check("tokenizer", lambda: _tokenizer(settings, profile)))
    checks.append(_check("output", lambda: _output(settings)))
    checks.append(_check("port", lambda: _port(settings, profile)))
    checks.append(_check("prefect", lambda: _prefect(prefect)))
    return checks


def exit_code(checks: list[Check]) -> int:
    """0 when nothing is a problem (a skip is not one: it names what to check by other means)."""
    return 2 if any(c.status == PROBLEM for c in checks) else 0


# --- Slurm ------------------------------------------------------------------------------------

def _slurm_checks(settings: Settings, profile: Profile, profile_name: str, timeout_s: float) -> list[Check]:
    from infra.slurm.backend import check_launch
    from infra.slurm.launch import image_for, image_setting

    built = []  # the job's spec, once its settings pass
    checks = [_check("launch", lambda: (built.append(check_launch(settings, profile, run_id="doctor")),
                                        "the job's settings pass the checks a run makes before submitting")[1])]
    commands = _check("slurm", lambda: _slurm_reachable(timeout_s))
    checks.append(commands)
    if commands.status == OK:
        checks.append(_check("partition", lambda: _partition(settings.slurm.partition, timeout_s)))
        checks.append(_check("account", lambda: _account(settings.slurm.account, timeout_s)))
        if profile.engine == "trtllm" and not settings.server.command:
            checks.append(_check("mpi", lambda: _pmix(timeout_s)))
    else:
        checks += [Check(name, SKIP, "Slurm is not reachable from here (see the slurm line)")
                   for name in ("partition", "account")]
    image = image_for(profile.engine, settings.slurm.container_image, settings.slurm.images)
    checks.append(_check("image", lambda: _image(settings.slurm.container_runtime, image, image_setting(profile.engine))))
    checks.append(_check("driver", lambda: _driver(built[0]) if built
                         else (SKIP, "the launch settings fail (see the launch line)")))
    checks.append(_check("model", lambda: _model(settings)))
    checks.append(_check("job_root", lambda: _writable_dir(Path(settings.slurm.job_root).expanduser(),
                                                           "NSDG_SLURM__JOB_ROOT")))
    return checks


def _run(argv: list[str], timeout_s: float):
    try:
        return run_command(argv, timeout=timeout_s, check=False)
    except CommandError as exc:
        raise _Problem(f"`{' '.join(argv)}` did not run ({' '.join(str(exc).split())[:300]})") from None


def _slurm_reachable(timeout_s: float) -> str:
    missing = [name for name in SLURM_COMMANDS if shutil.which(name) is None]
    if missing:
        raise _Problem(f"{', '.join(missing)} not on PATH: run doctor (and the flow) on a login node of the cluster, "
                       "or add Slurm's bin directory to PATH")
    ping = _run(["scontrol", "ping"], timeout_s)
    if ping.returncode != 0 or "UP" not in ping.stdout:
        raise _Problem(f"`scontrol ping` says {(ping.stdout + ping.stderr).strip()[:200] or 'nothing'}: the Slurm "
                       "controller does not answer; ask the cluster's operators")
    queue = _run(["squeue", "-h", "-u", getpass.getuser(), "-o", "%i"], timeout_s)
    if queue.returncode != 0:
        raise _Problem(f"`squeue` failed: {queue.stderr.strip()[:200]}; check that the controller answers")
    return f"sbatch, squeue and scontrol on PATH; the controller answers ({ping.stdout.strip()[:80]})"


def _partition(partition: str | None, timeout_s: float) -> str:
    listed = _run(["sinfo", "-h", "-o", "%P %a"], timeout_s)
    if listed.returncode != 0:
        return SKIP, f"`sinfo` failed ({listed.stderr.strip()[:200]}): sbatch checks the partition at submit"
    states = {}
    for line in listed.stdout.splitlines():
        name, _, avail = line.strip().partition(" ")
        if name:
            states[name.rstrip("*")] = (avail.strip(), name.endswith("*"))
    if partition is None:
        default = [name for name, (_, is_default) in states.items() if is_default]
        if not default:
            raise _Problem(f"NSDG_SLURM__PARTITION is unset and the cluster has no default partition; "
                           f"set it to one of {', '.join(sorted(states)) or '(none listed)'}")
        return f"unset: the default partition {default[0]} is used"
    if partition not in states:
        raise _Problem(f"NSDG_SLURM__PARTITION={partition!r} is not a partition here (sinfo lists "
                       f"{', '.join(sorted(states)) or 'none'}); set it to one of them")
    if states[partition][0] != "up":
        raise _Problem(f"partition {partition} is {states[partition][0]}: jobs would wait until it is up; "
                       "pick another or ask the operators")
    return f"{partition} is up"


def _account(account: str | None, timeout_s: float) -> str:
    if account is None:
        return "unset: Slurm uses your default account"
    if shutil.which("sacctmgr") is None:
        return SKIP, "sacctmgr is not on PATH: sbatch checks the account at submit"
    user = getpass.getuser()
    found = _run(["sacctmgr", "-n", "-P", "show", "assoc", f"where user={user}", f"account={account}",
                  "format=account"], timeout_s)
    if found.returncode != 0:
        return SKIP, f"no accounting database answers ({found.stderr.strip()[:120]}): sbatch checks the account at submit"
    if account not in {line.strip() for line in found.stdout.splitlines()}:
        raise _Problem(f"NSDG_SLURM__ACCOUNT={account!r} has no association with user {user} (`sacctmgr show assoc "
                       f"where user={user}` lists your accounts); set it to one of them")
    return f"{account} is associated with {user}"


def _pmix(timeout_s: float) -> str:
    """trtllm's ranks form one MPI world through srun --mpi=pmix (audit L5): a Slurm built
    without the plugin fails every rank's MPI_Init after the queue wait."""
    listed = _run(["srun", "--mpi=list"], timeout_s)
    plugins = (listed.stdout + listed.stderr).split()
    if "pmix" not in plugins and not any(p.startswith("pmix_") for p in plugins):
        raise _Problem("`srun --mpi=list` shows no pmix plugin, which trtllm's MPI world needs (srun --mpi=pmix): ask "
                       "the cluster's operators for Slurm's PMIx plugin, or use the vllm engine")
    return "srun lists the pmix plugin (with pyxis, enroot's 50-slurm-pmi.sh extra hook must be installed too)"


def _image(runtime: str, image: str, setting: str) -> str:
    if runtime == "none":
        return SKIP, "container_runtime none: the ranks run on the nodes' own software"
    if not image.startswith("/"):
        return SKIP, f"{image} is a registry image, pulled on the nodes at start: a .sqsh/.sif path ({setting}) " \
                     "can be checked here and starts faster"
    path = Path(image)
    if not path.is_file():
        raise _Problem(f"{setting}={image}: no such file on this host; create it (`enroot import` for pyxis, "
                       "`apptainer pull` for apptainer) on the filesystem the nodes share")
    if not os.access(path, os.R_OK):
        raise _Problem(f"{setting}={image}: not readable by {getpass.getuser()}; fix its permissions")
    return f"{image} is readable"


def _driver(spec) -> str | tuple[str, str]:
    """The NVIDIA driver floor the job's preflight enforces on the nodes (their driver is not seen from here)."""
    from infra.slurm.launch import enforced_driver_floor

    floor, source = enforced_driver_floor(spec, dict(spec.env))
    if not floor:
        return SKIP, f"no driver floor: {source}"
    if floor == "0":
        return f"any driver: {source} is 0"
    return f"the nodes need NVIDIA driver {floor} or newer ({source}); the job's preflight refuses an older one"


def _model(settings: Settings) -> str:
    if settings.server.command:
        return SKIP, "server.command replaces the engine: its model is its own business"
    path = Path(settings.model.path)
    if not path.exists():
        raise _Problem(f"NSDG_MODEL__PATH={path}: not found on this host; login nodes usually mount the nodes' "
                       "filesystem, so check the path (or ignore this where only the nodes see it)")
    if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        raise _Problem(f"NSDG_MODEL__PATH={path}: not readable by {getpass.getuser()}; fix its permissions")
    return f"{path} is readable"


def _writable_dir(path: Path, setting: str) -> str:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".doctor-"):
            pass
    except OSError as exc:
        raise _Problem(f"{setting}={path}: not writable ({exc.strerror or exc}); pick a directory you can write "
                       "on a filesystem the nodes share") from None
    return f"{path} is writable"


# --- every profile ------------------------------------------------------------------------------

def _tokenizer(settings: Settings, profile: Profile) -> str:
    from infra.prompting.tokens import token_counter

    path = settings.tokenizer_path(profile)
    if path is None:
        raise _Problem("no tokenizer found (NSDG_MODEL__TOKENIZER unset, none beside the model): prompts would be "
                       "counted by a byte estimate; set NSDG_MODEL__TOKENIZER to the model's tokenizer.json")
    try:
        counter = token_counter(path)
        counter.count("doctor")
    except (OSError, ValueError, RuntimeError) as exc:
        raise _Problem(f"{path}: could not be loaded ({exc}); point NSDG_MODEL__TOKENIZER at a tokenizer.json") from None
    return counter.description


def _output(settings: Settings) -> str:
    from infra.storage import open_output_store
    from infra.storage.locations import check_allowed
    from infra.storage.uris import is_s3, local_path

    check_allowed(settings.output_uri, settings.allowed_uris, what="NSDG_OUTPUT_URI")
    probe = f"nsdg-doctor-{uuid.uuid4().hex[:12]}"
    store = open_output_store(settings.output_uri, probe, settings.s3, settings.work_path("staging"))
    root = None if is_s3(settings.output_uri) else local_path(settings.output_uri).absolute()
    made = [] if root is None else [d for d in (root / probe, root, *root.parents) if not os.path.lexists(d)]
    store.preflight()
    for folder in made:  # the probe's run directory and the folders it made: doctor leaves nothing behind
        folder.rmdir()
    return f"{settings.output_uri} is writable" + (" and allowed" if settings.allowed_uris else "")


def _port(settings: Settings, profile: Profile) -> str:
    port = settings.server.port
    if profile.backend == "attach":
        return SKIP, "attach: the server is someone else's"
    host = settings.local.host if profile.backend == "local" else ""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise _Problem(f"NSDG_SERVER__PORT={port} is taken on this host ({exc.strerror or exc}); pick a free "
                           "port (`ss -ltn` lists the taken ones)") from None
    return f"{port} is free on this host"


def _prefect(api: PrefectApi) -> str:
    import requests

    if not api.url:
        return SKIP, "PREFECT_API_URL is unset: `nemotron-sdg run` starts a temporary server; set it to reach yours"
    # /health answers without credentials (for probes): /admin/version is the first call that needs them.
    base = api.url.rstrip("/")
    try:
        health = requests.get(f"{base}/health", timeout=PREFECT_TIMEOUT_S)
        version = requests.get(f"{base}/admin/version", headers=api.headers, timeout=PREFECT_TIMEOUT_S)
    except requests.RequestException as exc:
        raise _Problem(f"{base} does not answer ({type(exc).__name__}); check PREFECT_API_URL and that the "
                       "server runs") from None
    if health.status_code != 200:
        raise _Problem(f"{base}/health answered HTTP {health.status_code}; check PREFECT_API_URL (it ends in /api)")
    if version.status_code in (401, 403):
        raise _Problem(f"{base} refused the credentials (HTTP {version.status_code}); set PREFECT_API_AUTH_STRING "
                       "(user:password) or PREFECT_API_KEY as the server expects")
    if version.status_code != 200:
        raise _Problem(f"{base}/admin/version answered HTTP {version.status_code}; check PREFECT_API_URL")
    return f"{base} answers (Prefect {version.json()}), credentials accepted"
