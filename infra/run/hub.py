"""`push_to_hub`: a finished run's dataset (its card and exports, infra/run/card.py) uploaded to a
Hugging Face Hub dataset repository, in one commit, with `huggingface_hub` (which `datasets` and
`transformers` bring).

Off by default: most clusters reach no Hub. It runs after everything is published in the run
directory, so a Hub out of reach loses nothing; it fails in one line naming the repository, the
endpoint and what was seen, and a rerun with the same run id (every stage done: no server) pushes
again. The token is huggingface_hub's own, from the environment (`HF_TOKEN`, or a `hf auth login`
token); it is never a parameter, never logged, never in the manifest. `HF_ENDPOINT` picks another Hub.
Each request is bounded by huggingface_hub's own timeouts.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from infra.errors import ConfigError
from infra.run.layout import DATASET_CARD, EXPORT_DIR
from infra.storage.uris import is_s3


class HubPushFailed(ConfigError):
    """The Hub refused or could not be reached; the run itself is complete."""


class HubParams(BaseModel):
    """Where a finished dataset is pushed (docs/outputs.md, "Push to the Hub")."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    repo_id: str = Field(pattern=r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$",
                         description="the dataset repository, owner/name; created (private unless private: false) "
                                     "when missing")
    private: bool = Field(True, description="create the repository private (an existing one keeps its visibility)")


def run_dir(root) -> str:
    """The run directory's location, for messages (an S3 store names objects, not the empty name)."""
    return root.uri(DATASET_CARD).rsplit("/", 1)[0]


def dataset_files(root, data, dataset: dict, into: Path) -> list[tuple[str, str]]:
    """(path in the repository, local file) of the card and every exported file, as the run published
    them: a local run directory's own files; an S3 one's copied into `into` one at a time, so at most
    one file is ever in memory (huggingface_hub reads a path in chunks to hash and upload it)."""
    wanted = [(DATASET_CARD, root, DATASET_CARD)]
    wanted += [(f"{EXPORT_DIR}/{f['name']}", data, f["name"]) for e in dataset["exports"] for f in e["files"].values()]
    files, missing = [], []
    for path, store, name in wanted:
        uri = store.uri(name)
        if not is_s3(uri):
            (files if Path(uri).is_file() else missing).append((path, uri))
            continue
        body = store.read_bytes(name)
        if body is None:
            missing.append((path, uri))
            continue
        local = into / path
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(body)
        del body
        files.append((path, str(local)))
    if missing:
        raise ConfigError(f"push_to_hub: {', '.join(p for p, _ in missing)} missing from {run_dir(root)}: the run's dataset is "
                          "incomplete; rerun with the same run id to write it again")
    return files


def push_dataset(hub: HubParams, root, data, dataset: dict, run_id: str, staging: Path) -> dict:
    """Create the repository when missing and commit the card and exports; what was pushed (no token).
    `staging`: a local folder for the copies of an S3 run's files (removed after the push)."""
    staging.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hub-", dir=staging) as into:
        return _push(hub, root, dataset_files(root, data, dataset, Path(into)), run_id)


def _push(hub: HubParams, root, files: list[tuple[str, str]], run_id: str) -> dict:
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi()  # its endpoint and token from the environment only
    try:
        api.create_repo(hub.repo_id, repo_type="dataset", private=hub.private, exist_ok=True)
        commit = api.create_commit(hub.repo_id, [CommitOperationAdd(path, body) for path, body in files], repo_type="dataset",
                                   commit_message=f"nemotron-sdg run {run_id}")
    except Exception as exc:  # network, HTTP, offline mode, auth: the run is complete either way
        seen = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise HubPushFailed(f"push_to_hub {hub.repo_id}: the Hub at {api.endpoint} did not take the dataset "
                            f"({type(exc).__name__}: {seen}); the run is complete in {run_dir(root)}: check the network, "
                            "HF_TOKEN and HF_ENDPOINT (HF_HUB_OFFLINE must be unset), then rerun with the same run id "
                            "to push again") from None
    return {"repo_id": hub.repo_id, "endpoint": api.endpoint, "commit": getattr(commit, "oid", None),
            "url": getattr(commit, "commit_url", None), "files": [path for path, _ in files]}
