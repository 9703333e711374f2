"""A run's dataset card and its exports, published together (docs/outputs.md).

`README.md` at the run directory's root, with the YAML header Hugging Face `datasets` reads: one
`configs` entry per exported file (`data/*.parquet`, split `train`), the SFT one the default, so
`datasets.load_dataset(run_dir)` reads the SFT set and `load_dataset(run_dir, "dpo_trl")` the pairs.
Its body says where the rows came from: the model(s) that generated and scored
them (judge, reward model with its weights, pair check), the run or pipeline with its config hashes,
each stage's counts and the reasons rows were dropped, the GPU-hours held. The licence is left for
the user (a commented `license:` line): the terms of the generating model apply, and only the user
knows which they accepted.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import yaml

from infra.pipeline.rows import kept_part_names
from infra.run.exports import write_exports
from infra.run.layout import DATASET_CARD, EXPORT_DIR, MANIFEST

TRAINERS = {"sft": "TRL SFTTrainer (conversational `messages`), OpenAI fine-tuning",
            "sft_nemo_aligner": "NeMo-Aligner SFT (GPTSFTChatDataset JSONL)",
            "dpo_nemo_aligner": "NeMo-Aligner DPO / RPO (`chosen_reward`, `rejected_reward`)",
            "dpo_trl": "TRL DPOTrainer (conversational preference)"}


def _header(exports: list[dict], run_id: str) -> str:
    configs = [{"config_name": e["config"], "data_files": [{"split": "train", "path": f"{EXPORT_DIR}/{e['files']['parquet']['name']}"}],
                **({"default": True} if e["config"] == "sft" else {})} for e in exports if e["files"]]
    if configs and not any(c.get("default") for c in configs):
        configs[0]["default"] = True
    head = {"pretty_name": f"nemotron-sdg {run_id}", "tags": ["synthetic", "nemotron-sdg"],
            "task_categories": ["text-generation"], "configs": configs}
    return ("---\n" + yaml.safe_dump(head, sort_keys=False, allow_unicode=True)
            + "# license: fill in: the terms of the model(s) below apply to what they generated\n---\n")


def _cell(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items()) or "—"
    return str(value).replace("|", "\\|")


def card_text(run_id: str, exports: list[dict], facts: dict) -> str:
    """The card: `facts` holds `models` (names), `made_by` (a sentence: the run or pipeline and its
    hashes), `stages` (one dict of counts per stage, the same keys each), `gpu_hours` and `scorers`
    (one sentence per judge, reward model or pair check: which model cut or ranked the rows)."""
    lines = [_header(exports, run_id), f"# nemotron-sdg {run_id}", "",
             f"Synthetic data made by nemotron-sdg, run `{run_id}`. {facts.get('made_by', '')}", "",
             "## Files", "", "| config | Parquet | JSONL | rows | for |", "|---|---|---|---|---|"]
    for e in exports:
        files = [f"`{EXPORT_DIR}/{e['files'][x]['name']}`" if e["files"] else "(no rows, no file)" for x in ("parquet", "jsonl")]
        lines.append(f"| `{e['config']}` | {' | '.join(files)} | {e['rows']} | {TRAINERS[e['config']]} |")
    lines += ["", "```python", "import datasets", "sft = datasets.load_dataset(\"path/to/this/folder\")  # the default config",
              *([f"pairs = datasets.load_dataset(\"path/to/this/folder\", \"{e['config']}\")" for e in exports
                 if e["source"] == "pairs" and e["files"]][:1]), "```", "", "## Models", ""]
    lines += [f"- `{m}`" for m in facts.get("models") or ["(not recorded)"]]
    if facts.get("scorers"):  # who judged, rewarded or checked the rows: the quality cut is theirs
        lines += ["", "## Scoring", "", *[f"- {line}" for line in facts["scorers"]]]
    stages = facts.get("stages") or []
    if stages:
        keys = list(stages[0])
        lines += ["", "## How the rows were made", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(_cell(s.get(k, "")) for k in keys) + " |" for s in stages]
    lines += ["", f"GPU-hours held by the run's servers: {facts.get('gpu_hours', 0):g}.", "",
              "## Licence", "", "Left for you: set `license:` in the header. The terms of the model(s) above apply to "
              "what they generated.", ""]
    return "\n".join(lines)


def publish_dataset(root, data, run_id: str, sft_rows, pair_rows, facts: dict) -> dict:
    """The exports into `data` (the run's `data/` store) and the card into `root`; what was written."""
    exports = write_exports(data, sft_rows, pair_rows)
    root.write_bytes(DATASET_CARD, card_text(run_id, exports, facts).encode("utf-8"))
    return {"card": root.uri(DATASET_CARD), "exports": exports}


def judge_line(manifest: dict, where: str) -> str | None:
    """Who judged a run's (or stage's) rows, from its manifest's curation config: the generating model
    itself, with the judge's template hash and threshold; None without a judge."""
    judge = ((manifest.get("curation") or {}).get("config") or {}).get("judge") or {}
    if not judge.get("template"):
        return None
    floor = f", kept at score >= {judge['min_score']:g}" if judge.get("min_score") is not None else ""
    return (f"{where}judged by the generating model `{manifest.get('model') or '(not recorded)'}` (judge template "
            f"sha256 `{str(judge.get('template_sha256', ''))[:12]}`, score `judge.score`{floor})")


def reward_line(stage: str, reward: dict, weights: dict | None, url: str | None) -> str:
    """A reward stage's scorer: the reward model, its engine and server, and how its scalar is weighted."""
    where = f" at `{strip_userinfo(url)}`" if url else ""
    terms = " + ".join(f"{w:g} × {k}" for k, w in (weights or {}).items()).replace("+ -", "- ")
    scalar = f", scalar `reward.reward` = {terms}" if weights else ", no weighted scalar (weights unset)"
    return (f"stage `{stage}`: scored by reward model `{reward.get('model') or '(not recorded)'}` "
            f"({reward.get('engine')} server `{reward.get('server')}`{where}){scalar}")


def strip_userinfo(url: str) -> str:
    """A server URL without any user:password@ part: a card is published, a credential never is."""
    scheme, sep, rest = url.partition("://") if "://" in url else ("", "", url)
    authority, slash, path = rest.partition("/")
    return f"{scheme}{sep}{authority.rsplit('@', 1)[-1]}{slash}{path}"


def run_facts(manifest: dict) -> dict:
    """A plain run's card facts, from its manifest."""
    cur = manifest.get("curation") or {}
    return {"models": [manifest.get("model")] if manifest.get("model") else [],
            "scorers": [x for x in (judge_line(manifest, "rows "),) if x],
            "made_by": f"Config hash `{manifest.get('config_hash')}`, input `{manifest.get('input_uri')}`, "
                       f"profile `{manifest.get('profile')}`; its manifest is `{MANIFEST}`.",
            "stages": [{"stage": "run", "records in": manifest.get("records_in"), "rows out": manifest.get("records_written"),
                        "rejected": manifest.get("records_rejected"), "kept": cur.get("records_kept", manifest.get("records_written")),
                        "dropped": cur.get("filtered") or {}}],
            "gpu_hours": round(sum(r.get("gpu_hours") or 0 for r in manifest.get("replicas") or []), 3)}


class StoredRows:
    """The rows of `names` in `store`, in order, read again at each iteration a part at a time (the
    exports iterate once per format; memory: one part)."""

    def __init__(self, store, names: list[str]):
        self.store, self.names = store, names

    def __iter__(self) -> Iterator[dict]:
        for name in self.names:
            for line in (self.store.read_bytes(name) or b"").decode("utf-8").splitlines():
                if line.strip():
                    yield json.loads(line)


def read_rows(store, names: list[str]) -> list[dict]:
    """The rows of `names` in `store`, in order, in memory (pairing groups them all)."""
    return list(StoredRows(store, names))


def export_store(output_uri: str, run_id: str, settings, lease=None):
    """The run directory's `data/` folder as a store, fenced by the run's lease when given."""
    from infra.run.lease import FencedStore
    from infra.storage import open_output_store

    data = open_output_store(f"{output_uri.rstrip('/')}/{run_id}", EXPORT_DIR, settings.s3, settings.work_path("staging"))
    return FencedStore(data, lease) if lease is not None else data


def export_run(store, output_uri: str, run_id: str, settings) -> dict:
    """A finished plain run's exports (its kept rows as SFT) and card, from its manifest."""
    data = export_store(output_uri, run_id, settings, getattr(store, "lease", None))
    manifest = json.loads(store.read_bytes(MANIFEST) or b"{}")
    return publish_dataset(store, data, run_id, StoredRows(store, kept_part_names(manifest)), None, run_facts(manifest))
