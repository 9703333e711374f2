"""Each stage's config hash: its own settings plus its parent's hash, so a change to a stage reaches
the stages after it and none before it.

Two hashes per stage, as a run has today (infra/planning.py's fingerprint, infra/recipes/curate.py's
stage hash): `generation` names what its parts hold (its generation settings and its parent's
`kept`), `kept` adds what curation keeps of them (judge, filters). A change to a stage's filters
alone changes its `kept` hash and not its `generation` hash: it is re-curated with no server, and
its children, whose parent hash is that `kept`, are made again from the rows it now keeps.

A third, `lineage`, chains the generation settings alone (its own and its parent's `lineage`): a
stage whose `lineage` is unchanged but whose `generation` changed has the same settings over other
parent rows, so its rows of parents still kept are reused (infra/pipeline/invalidate.py says what a
rerun does with each). `groups` hashes each group of settings apart, so a change is named by group.

Pure: the files a stage reads (templates, examples, its input) count by their contents when the
caller gives their sha256 in `files` (location -> sha256), else by their location.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from infra.pipeline.model import Pipeline, Stage
from infra.run.manifest import config_hash


@dataclass(frozen=True)
class StageHash:
    generation: str  # the stage's parts: its generation settings and its parent's `kept`
    kept: str  # its kept rows: `generation`, the judge and the filters; its children's parent hash
    lineage: str = ""  # its generation settings and its parent's `lineage`: no parent rows, no curation
    groups: Mapping[str, str] = field(default_factory=dict, compare=False)  # each settings group's hash, by name


def _file(value: str | None, files: Mapping[str, str]):
    return {"sha256": files[value]} if value is not None and value in files else value


def generation_settings(pipeline: Pipeline, stage: Stage, files: Mapping[str, str] = {}) -> dict:
    """What changes the rows a stage generates, its parent's rows aside."""
    if stage.kind == "reward":  # it generates nothing: its parts are the rows it reads
        return {"name": stage.name, "kind": "reward", "input": _file(pipeline.input_of(stage), files)}
    _name, server = pipeline.server
    recipe = stage.recipe.model_dump(mode="json")
    recipe["prompt_template"] = _file(recipe["prompt_template"], files)
    recipe["examples_uri"] = _file(recipe["examples_uri"], files)
    return {
        "name": stage.name,  # it is part of its rows' ids
        "input": _file(pipeline.input_of(stage), files),
        "server": server.model_dump(mode="json"),
        "recipe": recipe,
        "sampling": stage.sampling.model_dump(mode="json"),
        "prompt_format": stage.prompt_format,
        "split": stage.split.model_dump(mode="json") if stage.split else None,
        "output_schema": stage.output_schema,
        **({"max_attempts": stage.max_attempts} if stage.output_schema is not None else {}),
        # A seeded request's rows depend on their batch's make-up (infra.prompting.samples).
        **({"batch_size": stage.batch_size} if stage.sampling.random_seed is not None else {}),
    }


def curation_settings(stage: Stage, files: Mapping[str, str] = {}, pipeline: Pipeline | None = None) -> dict:
    if stage.kind == "reward" and pipeline is not None:  # scored and kept as the judge's: a new model rescores, no regeneration
        server = pipeline.reward_server(stage)[1].model_dump(mode="json", exclude={"url"})  # a new address is the same model
        return {"reward": stage.reward_params.model_dump(mode="json"), "server": server,
                "filters": stage.filters.model_dump(mode="json")}
    judge = stage.judge.model_dump(mode="json")
    judge["template"] = _file(judge["template"], files)
    # A pairs stage's choice is curation: a new margin re-pairs its parent's rows, with no server.
    pairs = {"pairs": stage.pairs.model_dump(mode="json")} if stage.pairs is not None else {}
    return {"judge": judge, "filters": stage.filters.model_dump(mode="json"), **pairs}


def stage_hashes(pipeline: Pipeline, files: Mapping[str, str] = {}) -> dict[str, StageHash]:
    """Every stage's hashes, by name, in the order parents come first."""
    out: dict[str, StageHash] = {}
    for stage in pipeline.ordered():
        parent = out[stage.from_] if stage.from_ is not None else None
        own, curation = generation_settings(pipeline, stage, files), curation_settings(stage, files, pipeline)
        generation = config_hash({"stage": own, "parent": parent.kept if parent else None})
        lineage = config_hash({"stage": own, "parent": parent.lineage if parent else None})
        groups = {k: config_hash({k: v}) for k, v in {**own, **curation}.items() if k != "name"}
        out[stage.name] = StageHash(generation, config_hash({"generation": generation, **curation}), lineage, groups)
    return out
