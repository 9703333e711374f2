"""Every object of a run directory, `{output_uri}/{run_id}/`, named in one place (pure: no I/O).

    {output_uri}/{run_id}/
      run.lease                       RunLease: which flow run holds the run (lease.py)
      run.json                        the config hash and config the run started with (planning)
      input-rejects.jsonl             the plan's unusable input lines (on_bad_input=skip)
      input-scan.json                 what the plan's last full read of the input found, and the input's pin (run/input_scan.py)
      served-model.json               what the run's first server served (engines/served_model.py)
      part-00000.jsonl                a shard's generated rows: the unit of publication and upload
      part-00000.jsonl.state.json     its state (manifest.PartInfo), written right after the part
      part-00000.jsonl.rejects.jsonl  its records the server refused
      part-00000.jsonl.judge.jsonl    the judge's replies to its rows (recipes/judge.py)
      part-00000.jsonl.judge.json     their state: which judge, which sha256
      part-00000.jsonl.reward.jsonl   a reward stage's replies to its rows (reward/stage.py)
      part-00000.jsonl.reward.json    their state: which reward server and conversation, which sha256
      part-00000.jsonl.filter-inputs.json  what the filters read of its rows, for a fast re-filter (recipes/filter_inputs.py)
      kept-00000.jsonl                the rows curation kept: the training set (recipes/curate.py)
      kept-00000.jsonl.verdict.json   the curation state of the shard
      filtered-00000.jsonl            the rows curation dropped, with the reason
      filtered.jsonl                  every shard's dropped rows, in input order
      rejects.jsonl                   input rejects + every part's refused records, at the run's end
      manifest.json                   written last: the whole run (manifest.Manifest)
      README.md                       the dataset card, with exports (run/card.py; `--export`, and pipelines)
      data/sft.jsonl, data/sft.parquet ...  files a trainer loads as they are (run/exports.py)
      .part-00000.jsonl.XXXX.tmp      a file being written: never a part's name (S3 output: in a local
                                      staging directory, {work}/staging/{bucket}/_{prefix}.{hash}/{run_id}/)
      .part-00000.jsonl.spill         the finished requests of a shard not yet published, reused by its
                                      next try (storage/spill.py; in the staging directory too)

A pipeline's run (flows/pipeline.py) has one such directory per stage, and its own files beside them:

    {output_uri}/{run_id}/
      run.lease                       the pipeline's lease
      pipeline.json                   each stage's config hashes (and settings groups) as last run, its parent,
                                      and the superseded directories of its earlier settings
      allocations.json                each invocation's allocation, by stage (infra/pipeline/allocations.py)
      manifest.json                   the pipeline's manifest: each stage's counts, the training set
      stages/{stage}/                 a run directory as above (run_id: the stage's name), plus
        rows.jsonl                    its kept rows after its split, with ids and lineage: its children's input
        pairs.jsonl                   a pairs stage's preference pairs (infra/pipeline/pairs_stage.py)
      superseded/{stage}-{hash}/      a stage's run directory as an earlier run of the file left it, moved
                                      aside when a change made its rows stale (hash: its old generation
                                      hash, infra/pipeline/invalidate.py); the rows it holds of parents still
                                      kept are reused from here, the rest is never read again

A state is named after its file plus a suffix, so listing the directory finds every shard done;
the judge's state ends in `.judge.json`, not `.state.json`, so it is never taken for a part's.
"""

from __future__ import annotations

import re

LEASE_NAME = "run.lease"
RUN_CONFIG = "run.json"
INPUT_REJECTS = "input-rejects.jsonl"  # the plan's; merged into rejects.jsonl at the end
INPUT_SCAN = "input-scan.json"  # the plan's findings, reused while the input is the one it read
SERVED_MODEL = "served-model.json"
REJECTS = "rejects.jsonl"
FILTERED = "filtered.jsonl"
MANIFEST = "manifest.json"
STAGES = "stages"
STAGE_ROWS = "rows.jsonl"
STAGE_PAIRS = "pairs.jsonl"
STAGE_PAIR_CHECK = "pair-check.jsonl"  # a pairs stage's check answers, by the exact prompt sent (pairs_stage.py)
PIPELINE_HASHES = "pipeline.json"
SUPERSEDED = "superseded"
PIPELINE_ALLOCATIONS = "allocations.json"
DATASET_CARD = "README.md"
EXPORT_DIR = "data"  # the exports' folder under the run directory: data only, so a reader never meets the manifest

STATE_SUFFIX = ".state.json"
# A file is written under a hidden temp name (temp_prefix) in its own directory, or an S3 run's
# staging directory, and renamed into place or uploaded; the plan discards what a killed run left
# there (TEMP_FILES that are `left_by_a_kill`), which is why the pattern is shared.
TEMP_SUFFIX = ".tmp"
TEMP_FILES = f".*{TEMP_SUFFIX}"
# A shard's finished requests until its part is published (infra/storage/spill.py): hidden, like a
# temp file, but kept across a kill (it ends in .spill, not TEMP_SUFFIX, so discard_partials leaves it).
SPILL_SUFFIX = ".spill"
SPILLS = f".part-*{SPILL_SUFFIX}"
# What the curation stage writes (kept and filtered files, verdicts): removed when it is turned off.
CURATION_FILE = re.compile(r"kept-\d{5,}\.jsonl(\.verdict\.json)?|filtered-\d{5,}\.jsonl|filtered\.jsonl")


def part_name(index: int) -> str:
    return f"part-{index:05d}.jsonl"


def state_name(part: str) -> str:
    return f"{part}{STATE_SUFFIX}"


def rejects_name(part: str) -> str:
    return f"{part}.rejects.jsonl"


def judge_name(part: str) -> str:
    return f"{part}.judge.jsonl"


def judge_state_name(part: str) -> str:
    return f"{part}.judge.json"  # not *.state.json: those are the parts' own states


def reward_name(part: str) -> str:
    return f"{part}.reward.jsonl"


def reward_state_name(part: str) -> str:
    return f"{part}.reward.json"  # as the judge's: not *.state.json


def kept_name(part: str) -> str:
    return "kept-" + part.removeprefix("part-")


def filtered_name(part: str) -> str:
    return "filtered-" + part.removeprefix("part-")


def filter_inputs_name(part: str) -> str:
    return f"{part}.filter-inputs.json"


def verdict_name(part: str) -> str:
    return f"{kept_name(part)}.verdict.json"


def spill_name(part: str) -> str:
    return f".{part}{SPILL_SUFFIX}"


def temp_prefix(name: str) -> str:
    """The start of the temp file's name `name` is written under (TEMP_SUFFIX ends it)."""
    return f".{name}."


def left_by_a_kill(filename: str) -> bool:
    """A temp file of the run's own objects (a part, its state, kept rows, the manifest ...), which
    nothing appends to: what a killed writer left. Not the lease's: its writer may be another flow
    taking the run over this very moment (run/lease.py links it into place)."""
    return (filename.startswith(".") and filename.endswith(TEMP_SUFFIX)
            and not filename.startswith(temp_prefix(LEASE_NAME)))


def stages_uri(output_uri: str, run_id: str) -> str:
    """The output location whose run directories are a pipeline run's stages (run_id: the stage's name)."""
    return f"{output_uri.rstrip('/')}/{run_id}/{STAGES}"


def superseded_uri(output_uri: str, run_id: str) -> str:
    """The output location whose run directories are a pipeline run's superseded stage directories."""
    return f"{output_uri.rstrip('/')}/{run_id}/{SUPERSEDED}"


def superseded_name(stage: str, generation_hash: str) -> str:
    """A stage's directory moved aside, named by the generation hash its parts were made under."""
    return f"{stage}-{generation_hash[:12]}"
