"""The pipeline file's model: the first stage's `input`, the `servers` it uses, `defaults` for every
stage, and the `stages`, each reading the kept rows of its parent (`from`) or its own `input`.

A stage has what a run has (`StageSettings`: recipe, sampling, prompt_format, judge, filters,
batch_size, output_schema, max_attempts: the same types and defaults), plus `split`. A field
a stage leaves unset comes from `defaults`, merged one level deep (`defaults.sampling.temperature`
with a stage's own `sampling.tokens_to_generate`), before the stage is validated: a group's checks
see the merged group, as a run sees its parameters.

The graph checks (one message each, naming the stage and the field): duplicate names, an unknown
parent, a cycle, a stage with both or neither of `from` and `input`, a child stage without a
template (its prompt is built from its parent's row), a split that has no text reply to cut.

A stage of kind `reward` generates nothing: a reward server (`servers:` entry with a reward engine,
infra/reward/) scores its rows and its `reward.keep_if` keeps or drops them; from `defaults` it
takes only `filters` and `batch_size` (a generation's template or sampling means nothing to it).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from infra.engines import EngineName
from infra.pipeline.fields import StageSettings
from infra.recipes.lineage import ROW_FIELDS, STAGE_NAME
from infra.recipes.pairs import PairParams
from infra.recipes.split import SplitParams
from infra.reward.client import REWARD_ENGINES, RewardEngine
from infra.reward.scores import RewardParams
from infra.run.exports import ExportParams
from infra.run.hub import HubParams

MAX_STAGES = 64
# A stage's name becomes a key component (`stages/{name}/`), part of its rows' ids and of task names.
NAME_PATTERN = rf"^{STAGE_NAME.pattern}$"
# What `defaults` may set: a run's settings (output_schema and max_attempts among them).
DEFAULTABLE = tuple(StageSettings.model_fields)
# What a stage does: generate (a server answers its prompts), reward (a reward server scores its rows),
# or pairs (chosen/rejected picked from its parent's scored samples on the CPU: infra/recipes/pairs.py,
# infra/pipeline/pairs_stage.py).
StageKind = Literal["generate", "reward", "pairs"]
REWARD_DEFAULTS = ("filters", "batch_size")  # what a reward stage takes from `defaults`
ServerEngine = Literal[EngineName.__args__ + RewardEngine.__args__]  # one Literal: one readable refusal


class Server(BaseModel):
    """A server the stages use: the profile it is started with, and its engine when not the profile's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    profile: str | None = Field(None, min_length=1, description="h100x16, a100x16, h200x8, local, attach, or one from "
                                                                "NSDG_EXTRA_PROFILES (a generation server)")
    engine: ServerEngine | None = Field(None, description="the serving engine; default: the profile's. A reward "
                                                     f"server's: {', '.join(REWARD_ENGINES)}")
    url: str | None = Field(None, pattern=r"^https?://[^\s]+$", description="a reward server already running, "
                            "e.g. http://node:1424 (NeMo-Aligner's serve_reward_model.py inference.port)")
    model: str | None = Field(None, min_length=1, max_length=200, description="the model name a reward server serves; "
                              "default: reward_model (nemo-aligner)")
    # Where a reward server runs when no url is given (docs/pipelines.md, "Allocation"). Where, not what:
    # kept out of model_dump, so out of the stage hashes (a run begun before these fields keeps its
    # hashes; the scorer's identity names a swapped server's checkpoint, flows/reward.py).
    swap_with: str | None = Field(None, exclude=True, description="a nemo-aligner reward server started in the generation server's "
                                  "Slurm job once the generating stages are done: its step stopped, this one started")
    resident: bool = Field(False, exclude=True, description="a nemo-aligner reward server started at once in the generation "
                           "server's Slurm job, on nodes of its own (its profile's), both resident until the last score")
    model_path: str | None = Field(None, exclude=True, min_length=1, max_length=4096, description="the checkpoint on the "
                                   "cluster of a reward server started in the job (serve_reward_model.py rm_model_file)")
    port: int | None = Field(None, exclude=True, ge=1024, le=65535, description="a reward server's port in "
                             "the job (inference.port); default: the generator's (server.port), free once its step is "
                             "stopped or on the reward server's own nodes")

    @property
    def is_reward(self) -> bool:
        return self.engine in REWARD_ENGINES

    @model_validator(mode="after")
    def _kind(self) -> "Server":
        placed = [f for f in ("swap_with", "model_path", "port") if getattr(self, f) is not None] + \
            (["resident"] if self.resident else [])
        if not self.is_reward:
            if self.profile is None:
                raise ValueError("profile: a generation server needs its profile")
            if self.url is not None or self.model is not None or placed:
                wrong = "url" if self.url is not None else "model" if self.model is not None else placed[0]
                raise ValueError(f"{wrong}: a reward server's setting (engine nemo-aligner, openai-reward, vllm-pooling, "
                                 "vllm-classify); a generation server is started from its profile")
            return self
        if self.resident and (self.swap_with is not None or self.url is not None):
            raise ValueError(f"resident and {'swap_with' if self.swap_with is not None else 'url'}: a reward server is "
                             "started on nodes of its own beside the generator (resident), on the generator's nodes after "
                             "it (swap_with), or already running (url): one of them")
        if self.resident and self.profile is None:
            raise ValueError("resident: give the reward server's profile (its own nodes in the generator's job, e.g. "
                             "h100x16 for 2 x 8 GPUs)")
        if not self.resident and (self.url is None) == (self.swap_with is None):
            raise ValueError(f"engine {self.engine}: give url (a reward server already running), swap_with (the "
                             "generation server whose Slurm job it is started in) or resident: true, one of them"
                             if self.url is None else "url and swap_with: the server is either already running (url) "
                             "or started in the generator's job (swap_with), not both")
        if (self.swap_with is not None or self.resident) and self.engine != "nemo-aligner":
            raise ValueError(f"{'swap_with' if self.swap_with is not None else 'resident'}: only a nemo-aligner reward "
                             f"server (serve_reward_model.py) is started in the job; run the {self.engine} server "
                             "yourself and give its url")
        if self.url is not None and (self.model_path is not None or self.port is not None):
            raise ValueError(f"{'model_path' if self.model_path is not None else 'port'}: set only on a server started "
                             "in the job (swap_with, resident); a running server's address is its url")
        return self




class Stage(StageSettings):
    """One generation pass over the kept rows of its parent (`from`) or over its own `input`."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: str = Field(pattern=NAME_PATTERN, description="the stage's name: lower-case letters, digits, - and _")
    from_: str | None = Field(None, alias="from", description="the stage whose kept rows this one reads")
    input: str | None = Field(None, min_length=1, description="this stage's own records, instead of a parent's; "
                                                                "default for a first stage: the pipeline's input")
    split: SplitParams | None = Field(None, description="cut each reply into several rows (infra/recipes/split.py)")
    kind: StageKind = Field("generate", description="generate; reward: a reward server scores the rows it reads; "
                                                    "pairs: preference pairs from its parent's samples")
    pairs: PairParams | None = Field(None, description="a pairs stage's score, strategy and margins")
    server: str | None = Field(None, description="a reward stage's server (a servers: name); default: the only reward server")
    reward: RewardParams | None = Field(None, description="a reward stage's conversation, attributes, weights, keep_if")

    @model_validator(mode="after")
    def _pairs_fields(self) -> "Stage":
        if self.kind == "pairs" and (self.pairs is None or self.from_ is None):
            raise ValueError(f"stage {self.name!r}: a pairs stage needs {'pairs: {score: ...}' if self.pairs is None else 'from'}"
                             " (it pairs the scored samples of the stage it reads)")
        if self.kind != "pairs" and self.pairs is not None:
            raise ValueError(f"stage {self.name!r}: pairs: set only on a stage of kind pairs; add kind: pairs")
        if self.kind == "pairs" and (self.split is not None or self.output_schema is not None):
            raise ValueError(f"stage {self.name!r}: a pairs stage generates nothing, so it takes no "
                             f"{'split' if self.split is not None else 'output_schema'}; drop it")
        return self

    @model_validator(mode="after")
    def _reward_fields(self) -> "Stage":
        if self.kind != "reward":
            if self.reward is not None or self.server is not None:
                raise ValueError(f"stage {self.name!r}: {'reward' if self.reward is not None else 'server'}: set only on "
                                 "a stage of kind reward; add kind: reward")
            return self
        unused = [name for name, off in (("recipe", self.recipe.prompt_template is None and self.recipe.samples_per_prompt == 1),
                                         ("split", self.split is None), ("output_schema", self.output_schema is None),
                                         ("judge", not self.judge.enabled)) if not off]
        if unused:
            raise ValueError(f"stage {self.name!r}: a reward stage generates nothing, so it takes no {unused[0]}; drop it")
        return self

    @property
    def reward_params(self) -> RewardParams:
        return self.reward if self.reward is not None else RewardParams()

    @model_validator(mode="after")
    def _split_needs_text(self) -> "Stage":
        kind = (self.output_schema or {}).get("type")
        if self.split is not None and self.output_schema is not None and kind != "array":
            raise ValueError(f"split: the reply is one JSON {kind or 'value'} (output_schema), with no list to "
                             "cut; give output_schema type array, or drop split")
        if self.split is not None and self.output_schema is not None and self.split.parser != "json_list":
            raise ValueError(f"split.parser {self.split.parser}: the reply is a JSON list (output_schema type array); "
                             "use parser json_list, which cuts the validated list")
        return self

    @property
    def settings(self) -> StageSettings:
        """The stage's run settings alone, as a run would have them."""
        return StageSettings(**{name: getattr(self, name) for name in StageSettings.model_fields})

    def schema_fields(self) -> dict[str, str]:
        """The fields a valid reply gives each row (output_schema's object properties), by JSON type."""
        schema = self.output_schema
        if schema is None:
            return {}
        if self.split is not None and isinstance(schema.get("items"), dict):  # split cuts the list: an item's fields
            schema = schema["items"]
        if schema.get("type") != "object":  # infra/recipes/structured.py reply_fields: any other value is `output`
            return {} if self.split is not None else {"output": str(schema.get("type") or "value")}
        return {(f"output_{k}" if k in ROW_FIELDS else k): (v.get("type") if isinstance(v, dict) and isinstance(v.get("type"), str) else "string")
                for k, v in (schema.get("properties") or {}).items() if isinstance(k, str)}


WHOLE = ("output_schema",)  # an object field that is one value, not a group: a stage's replaces the default's


def merged(defaults: dict, stage: dict) -> dict:
    """The stage's fields over the defaults: a group (an object) field by field, anything else whole."""
    out = dict(defaults)
    for key, value in stage.items():
        base = out.get(key)
        group = isinstance(base, dict) and isinstance(value, dict) and key not in WHOLE
        out[key] = {**base, **value} if group else value
    return out


class Pipeline(BaseModel):
    """A pipeline file (docs/pipelines.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: str | None = Field(None, min_length=1, description="the first stage's records: a JSONL or .txt path, "
                                                                "file:// or s3:// URI, optionally .gz")
    servers: dict[str, Server] = Field(min_length=1, max_length=8, description="the servers the stages use, by name: "
                                       "one generation server, and reward servers for reward stages")
    defaults: dict[str, Any] = Field(default_factory=dict, description="every stage's settings where it sets none")
    stages: list[Stage] = Field(min_length=1, max_length=MAX_STAGES)
    push_to_hub: HubParams | None = Field(None, description="upload the finished dataset (card and exports) to this "
                                          "Hugging Face Hub dataset repository; off by default (infra/run/hub.py)")
    exports: ExportParams = Field(default_factory=ExportParams, description="what the trainer files take from a row: "
                                  "`user_field`, the user's turn (docs/outputs.md)")

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("defaults"), dict) or not isinstance(data.get("stages"), list):
            return data
        defaults = data["defaults"]
        if unknown := [k for k in defaults if k not in DEFAULTABLE]:
            raise ValueError(f"defaults.{unknown[0]}: not a setting a stage takes from defaults; those are "
                             f"{', '.join(DEFAULTABLE)}")
        stages = [merged({k: v for k, v in defaults.items() if k in REWARD_DEFAULTS} if s.get("kind") == "reward" else defaults, s)
                  if isinstance(s, dict) else s for s in data["stages"]]
        return {**data, "stages": stages}

    @field_validator("servers")
    @classmethod
    def _server_names(cls, v: dict[str, Server]) -> dict[str, Server]:
        for name in v:
            if not re.match(NAME_PATTERN, name):
                raise ValueError(f"server name {name!r}: use lower-case letters, digits, - and _")
        if sum(1 for s in v.values() if not s.is_reward) != 1:
            raise ValueError(f"servers: {', '.join(v)}: give exactly one generation server (a profile), besides any reward servers")
        return v

    @model_validator(mode="after")
    def _graph(self) -> "Pipeline":
        names = [s.name for s in self.stages]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ValueError(f"stage {name!r}: name: given to two stages (stages {names.index(name)} and {i}); "
                                 "give each stage its own name")
        for stage in self.stages:
            where = f"stage {stage.name!r}"
            if stage.from_ is not None and stage.from_ not in names:
                raise ValueError(f"{where}: from: {stage.from_!r} is not a stage of this pipeline "
                                 f"(stages: {', '.join(names)})")
            if stage.from_ is not None and stage.input is not None:
                raise ValueError(f"{where}: from and input are both set; a stage reads its parent's rows or its own input")
            if stage.from_ is None and stage.input is None and self.input is None:
                raise ValueError(f"{where}: input: this stage has no parent (from) and the pipeline no input; set one")
            if stage.kind == "reward":
                self.reward_server(stage)  # raises when it names none
            if stage.from_ is not None and stage.kind == "generate" and not stage.recipe.prompt_template:
                raise ValueError(f"{where}: recipe.prompt_template: a stage reading its parent's rows builds its "
                                 "prompt from them; give it a template")
        for name, server in self.servers.items():
            if server.resident and not any(s.kind == "reward" and self.reward_server(s)[0] == name for s in self.stages):
                raise ValueError(f"servers.{name}.resident: no reward stage uses {name!r}, so its nodes would be held for "
                                 "nothing; add a reward stage with server: " + name + ", or drop the server")
            if server.swap_with is not None and server.swap_with != self.server[0]:
                raise ValueError(f"servers.{name}.swap_with: {server.swap_with!r} is not the generation server of this "
                                 f"pipeline ({self.server[0]!r}); name it")
            if server.swap_with is not None and not any(s.kind == "reward" and self.reward_server(s)[0] == name
                                                        for s in self.stages):
                raise ValueError(f"servers.{name}.swap_with: no reward stage uses {name!r}, so it would hold the job for "
                                 "nothing; add a reward stage with server: " + name + ", or drop the server")
        self._cycle()
        for stage in self.stages:
            self._pairs_source(stage)
        return self

    def _pairs_source(self, stage: Stage) -> None:
        """A stage reading a pairs stage has no responses to read; a pairs stage needs several samples
        per prompt from the nearest generating stage above it (a scoring stage between them passes rows on)."""
        parent = self.parent(stage)
        if parent is not None and parent.kind == "pairs":
            raise ValueError(f"stage {stage.name!r}: from: {parent.name!r} is a pairs stage, whose rows are pairs; "
                             "read the stage it pairs instead")
        if stage.kind == "pairs" and (source := self.samples_stage(stage)) is not None:
            if source.recipe.samples_per_prompt < 2:
                raise ValueError(f"stage {stage.name!r}: pairs needs at least 2 responses per prompt, but stage "
                                 f"{source.name!r} has recipe.samples_per_prompt {source.recipe.samples_per_prompt}; "
                                 "set it to 2 or more")
            parent = self.parent(stage)
            if stage.pairs.score.startswith("judge.") and parent is source and not source.judge.enabled:
                raise ValueError(f"stage {stage.name!r}: pairs.score: {stage.pairs.score} is the judge's, but stage "
                                 f"{source.name!r} has no judge; give it a judge, or score by another field")

    def samples_stage(self, stage: Stage) -> Stage | None:
        """The generating stage whose samples a pairs stage pairs: its nearest generating ancestor."""
        seen: set[str] = set()
        parent = self.parent(stage)
        while parent is not None and parent.kind != "generate" and parent.name not in seen:
            seen.add(parent.name)
            parent = self.parent(parent)
        return parent if parent is not None and parent.kind == "generate" else None

    def _cycle(self) -> None:
        parent = {s.name: s.from_ for s in self.stages}
        for start in parent:
            seen, name = [start], parent[start]
            while name is not None:
                if name in seen:
                    loop = seen[seen.index(name):]
                    reads = ", ".join(f"{s} reads {parent[s]}" for s in loop)
                    raise ValueError(f"stage {name!r}: from: the stages read each other in a cycle ({reads}); "
                                     "break the cycle: one of them must read the input or another stage")
                seen.append(name)
                name = parent[name]

    def level(self, stage: Stage) -> int:
        """How many reward stages a stage reads through (its ancestors): the pipeline runs level by
        level, each level's generating stages on one pool, then its reward stages (flows/pipeline.py);
        a generating stage reading a reward stage runs after it, on the job the reward server gives back."""
        seen: set[str] = set()
        count, parent = 0, self.parent(stage)
        while parent is not None and parent.name not in seen:
            seen.add(parent.name)
            count += parent.kind == "reward"
            parent = self.parent(parent)
        return count

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def parent(self, stage: Stage) -> Stage | None:
        return None if stage.from_ is None else self.stage(stage.from_)

    def input_of(self, stage: Stage) -> str | None:
        """The records a stage without a parent reads: its own input, else the pipeline's."""
        return None if stage.from_ is not None else (stage.input or self.input)

    def ordered(self) -> list[Stage]:
        """The stages with every parent before its children, otherwise in the file's order."""
        out: list[Stage] = []
        placed: set[str] = set()
        while len(out) < len(self.stages):
            for s in self.stages:
                if s.name not in placed and (s.from_ is None or s.from_ in placed):
                    out.append(s)
                    placed.add(s.name)
        return out

    @property
    def server(self) -> tuple[str, Server]:
        """The one generation server every generating stage uses."""
        return next((n, s) for n, s in self.servers.items() if not s.is_reward)

    def reward_server(self, stage: Stage) -> tuple[str, Server]:
        """A reward stage's server: the one it names, else the only reward server."""
        rewards = {n: s for n, s in self.servers.items() if s.is_reward}
        where = f"stage {stage.name!r}: server"
        if stage.server is not None:
            if stage.server not in rewards:
                raise ValueError(f"{where}: {stage.server!r} is not a reward server of this pipeline "
                                 f"(reward servers: {', '.join(rewards) or 'none'})")
            return stage.server, rewards[stage.server]
        if len(rewards) != 1:
            why = "several: name one" if rewards else "none in servers: add one with engine nemo-aligner and its url"
            raise ValueError(f"{where}: a reward stage needs a reward server ({why})")
        return next(iter(rewards.items()))
