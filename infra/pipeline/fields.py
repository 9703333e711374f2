"""The settings a run and a pipeline stage share, defined once: `StageSettings` holds them with
their types, defaults, bounds and descriptions; flows/params.py RunParams takes each of these
fields from here (`shared_field`), and a pipeline's `Stage` subclasses `StageSettings`. So the CLI
flags, the UI form, docs/parameters.md and the pipeline file all read the same definition."""

from __future__ import annotations

import copy
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictInt
from pydantic.fields import FieldInfo

from infra.prompting.prompt_format import PromptFormatName
from infra.prompting.sampling import MAX_BATCH, SamplingParams
from infra.recipes.params import FilterParams, JudgeParams, RecipeParams
from infra.recipes.structured import check_schema, schema_from_text

MAX_ATTEMPTS = 20
# A JSON Schema, checked (meta-schema and bounds: infra/recipes/structured.py) wherever it is declared;
# also taken as its JSON text, the form it travels in as a flow parameter (schema_from_text says why).
OutputSchema = Annotated[dict[str, Any], BeforeValidator(schema_from_text), AfterValidator(check_schema)]


class StageSettings(BaseModel):
    """What one generation pass is made with: a run has one, each stage of a pipeline its own."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sampling: SamplingParams = Field(default_factory=SamplingParams, description="sampling parameters sent to /generate")
    # The server's maximum: under the planning model a full batch of 128 asks ~2.3× the tokens per GPU-second of
    # the old 32, and its KV cache fits 16 × 80 GB (docs/engines.md "Batch make-up").
    batch_size: int = Field(MAX_BATCH, ge=1, le=MAX_BATCH,
                            description=f"prompts per PUT /generate at most (the server allows {MAX_BATCH}); a batch of "
                                        "prompts far apart in length is cut smaller where that costs less GPU time")
    prompt_format: PromptFormatName | None = Field(
        None, description="how each prompt is wrapped: raw (a base model), nemotron-instruct, or chat (the model's chat "
                          "template); default: the profile's (local: chat when its model has a template, else raw)")
    recipe: RecipeParams = Field(default_factory=RecipeParams, description="prompts from a template over each record, "
                                 "few-shot examples, several samples per prompt")
    judge: JudgeParams = Field(default_factory=JudgeParams, description="score each generated record with the same server "
                               "(same allocation): a judging template, the score's pattern, a minimum score")
    filters: FilterParams = Field(default_factory=FilterParams, description="what is kept: truncation, length, repetition, "
                                  "regexes, exact and near duplicates; dropped records go to filtered.jsonl with their "
                                  "reason. Changing only these reruns no generation")
    output_schema: OutputSchema | None = Field(
        None, description="a JSON Schema (Draft 2020-12) the reply must match: sent to engines that constrain "
                          "decoding (vLLM, trtllm), parsed and validated on every engine; a valid object's fields "
                          "become the row's, an invalid reply is dropped as schema_invalid. As a flow parameter: its JSON text "
                          "(Prefect reads an object holding $ref as a block reference)")
    max_attempts: StrictInt = Field(3, ge=1, le=MAX_ATTEMPTS, description="with output_schema: tries per row for a "
                                    "valid reply, each with a seed derived from the run's (greedy: one)")


def shared_field(name: str) -> FieldInfo:
    """A copy of StageSettings' field `name`, to declare it in another model (RunParams)."""
    return copy.deepcopy(StageSettings.model_fields[name])
