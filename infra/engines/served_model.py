"""Which model writes a run's rows: the served model, apart from the name the client sends.

`NSDG_MODEL__NAME` is only the name requests carry (vllm's --served-model-name; the local server
answers to it whatever it loads), so it cannot tell two models apart. What is served is:

- `expected(settings, profile)`: what the settings start, known before anything is allocated:
  local: the engine and the model directory (its resolved path and a cheap digest); Slurm: the
  engine, the model path, the container runtime and image (and `server.command` where it replaces
  the engine's); attach: the engine (its API) alone, the server being someone else's.
  It is part of the run's config hash (infra/planning.py), so a resume on another model is refused.
- `reported(client)`: what the server says it serves, asked once it is ready: `GET /v1/models`'
  `id` and `root` (vLLM, trtllm-serve and the local server answer it; NeMo 24.05 and 2.1 do not).
- `check_served(store, served)`: the run's first ready server records both in `served-model.json`;
  any later server (a replacement, another replica, a resume) must report the same, or the run
  stops: an attached URL may serve another model from one invocation to the next.

`ServedModel.label` is the name rows and the manifest carry as `model`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

import requests

from infra.errors import ConfigError
from infra.settings import Profile, Settings
from infra.run.layout import SERVED_MODEL
from infra.storage import OutputStore

# Files hashed whole up to this size; larger ones (weights) by size and their first and last MiB:
# a model of tens of GB is told apart without reading it.
WHOLE_FILE_BYTES = 8 << 20
EDGE_BYTES = 1 << 20
MODELS_TIMEOUT_S = 10.0


def model_dir_digest(path: Path) -> str:
    """sha256 over every file's name and size, small files' bytes (config.json, the weights index,
    the tokenizer) and large files' first and last MiB."""
    sha = hashlib.sha256()
    hidden = lambda p: any(part.startswith(".") for part in p.relative_to(path).parts)  # noqa: E731 (caches, locks)
    for file in sorted(p for p in path.rglob("*") if p.is_file() and not hidden(p)):
        size = file.stat().st_size
        sha.update(f"{file.relative_to(path).as_posix()}\0{size}\0".encode())
        with file.open("rb") as f:
            if size <= WHOLE_FILE_BYTES:
                sha.update(f.read())
            else:
                sha.update(f.read(EDGE_BYTES))
                f.seek(size - EDGE_BYTES)
                sha.update(f.read(EDGE_BYTES))
    return "sha256:" + sha.hexdigest()[:16]


def expected(settings: Settings, profile: Profile) -> dict:
    """What the settings serve, before anything runs (see the module docstring)."""
    if profile.backend == "local":
        local = settings.local
        if local.engine == "simulated":
            return {"engine": "simulated"}
        model_dir = Path(local.model_dir).expanduser().resolve()
        digest = model_dir_digest(model_dir) if model_dir.is_dir() else None  # missing: LocalBackend.start says so
        return {"engine": local.engine, "path": str(model_dir), "digest": digest}
    engine = settings.engine(profile)
    if profile.backend == "attach":
        return {"engine": engine.name, "api": settings.api(profile)}
    from infra.slurm.launch import image_for

    slurm = settings.slurm
    return {"engine": engine.name, "api": settings.api(profile), "path": settings.model.path,
            "runtime": slurm.container_runtime,
            "image": None if slurm.container_runtime == "none" else image_for(engine.name, slurm.container_image, slurm.images),
            **({"command": list(settings.server.command)} if settings.server.command else {})}


def reported(client, timeout: float = MODELS_TIMEOUT_S) -> dict | None:
    """The served model as `GET /v1/models` lists it ({id, root}), the entry the client asks for
    first; None where the server has no such route or no usable answer (NeMo)."""
    try:
        resp = client.session.get(client.base_url + "/v1/models", timeout=(client.connect_timeout, timeout))
        listed = [m for m in resp.json().get("data", []) if isinstance(m, dict)] if resp.status_code == 200 else []
    except (requests.RequestException, ValueError, AttributeError):
        return None
    if not listed:
        return None
    wanted = getattr(client, "model", None)
    entry = next((m for m in listed if m.get("id") == wanted), listed[0])
    return {"id": entry.get("id"), "root": entry.get("root")}


@dataclass(frozen=True)
class ServedModel:
    requested: str  # NSDG_MODEL__NAME: the name requests carry
    expected: dict
    reported: dict | None = None

    @property
    def label(self) -> str:
        """A short name of what is served: the server's model root (a path's last part), else the
        model directory or path the settings start, else the simulated engine, else the requested name."""
        root = (self.reported or {}).get("root") or self.expected.get("path")
        if root:
            return PurePosixPath(str(root).rstrip("/")).name if str(root).startswith("/") else str(root)
        if self.expected.get("engine") == "simulated":
            return "simulated"
        return (self.reported or {}).get("id") or self.requested

    def as_manifest(self) -> dict:
        return {"label": self.label, **asdict(self)}

    @classmethod
    def from_manifest(cls, data: dict) -> "ServedModel":
        return cls(requested=data["requested"], expected=data["expected"], reported=data.get("reported"))


def check_served(store: OutputStore, served: ServedModel, where: str) -> None:
    """Record the run's served model at its first ready server; refuse a server that reports another."""
    data = store.read_bytes(SERVED_MODEL)
    if data is None:
        store.write_bytes(SERVED_MODEL, json.dumps(served.as_manifest(), indent=2, sort_keys=True).encode())
        return
    first = ServedModel.from_manifest(json.loads(data))
    if first.reported != served.reported:
        raise ConfigError(
            f"Run {store.location} was generated by the model {first.reported} ({first.label}), but the server at "
            f"{where} serves {served.reported} ({served.label}): its rows would mix two models under one run. "
            "Point the run at the server it started with, or start over under a new id "
            "(`nemotron-sdg run --new-run`, or another run_id).")


def recorded_served(store: OutputStore) -> ServedModel | None:
    """The served model the run's first ready server recorded, if one did."""
    data = store.read_bytes(SERVED_MODEL)
    return ServedModel.from_manifest(json.loads(data)) if data is not None else None
