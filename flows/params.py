"""The flow's parameters as one pydantic model: validated before anything else happens."""

from __future__ import annotations

import inspect
import typing
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.fields import FieldInfo

from infra.errors import ConfigError
from infra.planning import RunConfig
from infra.prompting.prompt_format import load_prompt_format
from infra.prompting.tokens import token_counter
from infra.recipes import Recipe, RecipeParams
from infra.recipes.curate import Curation
from infra.recipes.params import FilterParams, JudgeParams
from infra.prompting.sampling import MAX_BATCH, SamplingParams
from infra.storage.keys import validate_key_component


class RunParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    input_uri: str = Field(min_length=1)
    output_uri: str = Field(min_length=1)
    run_id: str
    profile: str = "local"
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    batch_size: int = Field(32, ge=1, le=MAX_BATCH)
    shard_size: int = Field(1000, ge=1, le=1_000_000)
    prompt_field: str = Field("prompt", min_length=1)
    id_field: str = Field("id", min_length=1)
    on_bad_input: Literal["fail", "skip"] = "fail"
    overlong_prompts: Literal["reject", "truncate_left"] = "reject"
    tokenizer: str | None = None
    prompt_format: Literal["raw", "nemotron-instruct", "chat"] = "raw"
    recipe: RecipeParams = Field(default_factory=RecipeParams)
    judge: JudgeParams = Field(default_factory=JudgeParams)
    filters: FilterParams = Field(default_factory=FilterParams)

    @field_validator("run_id")
    @classmethod
    def _run_id(cls, v: str) -> str:
        return validate_key_component(v, "run_id")

    def __init__(self, **data):
        try:
            super().__init__(**data)
        except ValidationError as exc:
            problems = "\n".join(f"  {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ConfigError(f"Invalid flow parameters:\n{problems}") from None

    def to_run_config(self, recipe: Recipe | None = None, curation: Curation | None = None) -> RunConfig:
        """`recipe`: `self.recipe` loaded (infra.recipes.load_recipe); may be None only when the recipe
        reads no file (no template, no examples)."""
        fmt = load_prompt_format(self.prompt_format, self.tokenizer)
        if recipe is None:
            if self.recipe.prompt_template or self.recipe.uses_examples:
                raise ValueError("to_run_config needs the loaded recipe (infra.recipes.load_recipe) for a template or examples")
            recipe = Recipe(self.recipe)
        # The format's own end strings (a chat model's end-of-turn token) and the recipe's example
        # separator stop generation too.
        extra = [*fmt.end_strings, *recipe.end_strings()]
        ends = [*self.sampling.end_strings]
        ends += [e for i, e in enumerate(extra) if e not in ends and e not in extra[:i]]
        fields = {name: getattr(self, name) for name in RunConfig.__dataclass_fields__ if name not in ("prompt_format", "recipe", "curation", "counter")}
        fields["sampling"] = self.sampling.model_copy(update={"end_strings": ends})
        if curation is None:
            if self.judge.enabled:
                raise ValueError("to_run_config needs the loaded judge (infra.recipes.judge.load_judge) for a judge template")
            curation = Curation(self.judge, self.filters)
        # The run's one token counter, built here once and handed down with the config.
        return RunConfig(**fields, prompt_format=fmt, recipe=recipe, curation=curation, counter=token_counter(self.tokenizer))


def resolve_run_id(flow_run) -> str:
    """A run id stable across `prefect flow-run retry` (same flow-run id and creation time)."""
    if flow_run is None:
        import uuid
        from datetime import datetime, timezone

        return f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:8]}"
    created = flow_run.created or flow_run.expected_start_time
    return f"{created:%Y%m%d-%H%M%S}-{str(flow_run.id)[:8]}"


def document_parameters(fn):
    """Prefect 3.9 leaves Annotated Field descriptions out of the deployment's parameter schema
    (the UI form) but reads a Google-style `Args:` section: append one built from the annotations.
    Apply it under @flow, so the flow sees the finished docstring."""
    hints = typing.get_type_hints(fn, include_extras=True)
    lines = [f"    {name}: {meta.description}" for name, hint in hints.items() if name != "return"
             for meta in getattr(hint, "__metadata__", ()) if isinstance(meta, FieldInfo) and meta.description]
    if lines:
        fn.__doc__ = inspect.cleandoc(fn.__doc__ or "") + "\n\nArgs:\n" + "\n".join(lines)
    return fn
