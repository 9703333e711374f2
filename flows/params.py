"""A run's parameters, defined once as one pydantic model (RunParams), and what is made from it: the
flow's signature and so the Prefect UI form (`with_run_parameters`), the CLI's flags and --params keys
(`parameters()`, read by flows/cli.py) and docs/parameters.md (`python -m flows.params --markdown`)."""

from __future__ import annotations

import inspect
import json
import sys
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.fields import FieldInfo

from infra.errors import ConfigError
from infra.pipeline.fields import OutputSchema, shared_field
from infra.planning import RunConfig
from infra.prompting.prompt_format import PromptFormatName, load_prompt_format
from infra.prompting.tokens import token_counter
from infra.recipes import Recipe, RecipeParams
from infra.recipes.curate import Curation
from infra.recipes.params import FilterParams, JudgeParams
from infra.prompting.sampling import SamplingParams
from infra.settings import PLACEHOLDER, placeholders
from infra.storage.uris import validate_key_component


# The demo prompts: a run on a local or attached server may default to them; one that asks Slurm for
# GPUs may not (issue 27: the on-demand form pre-filled them on h100x16, one click from a 16-GPU job).
DEMO_INPUT = "examples/prompts.jsonl"


class RunParams(BaseModel):
    """Every parameter of a run, defined once: the flow's signature (the Prefect UI form), the CLI's
    flags, the keys of a `--params` file and docs/parameters.md are all made from these fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_uri: str | None = Field(None, min_length=1,
                                  description=f"prompts: a JSONL or .txt path, file:// or s3:// URI, optionally .gz; "
                                              f"default: the demo prompts {DEMO_INPUT}, on the local profile only (a "
                                              f"cluster profile needs one: the demo must not spend GPU hours)")
    output_uri: str | None = Field(None, description="where results go (local path, file:// or "
                                                                   "s3://bucket/prefix); default NSDG_OUTPUT_URI")
    run_id: str | None = Field(None, description="reuse a run id to resume it; default: derived from the flow run")
    profile: str = Field("local", description="h100x16, a100x16, h200x8, local, attach, or one from NSDG_EXTRA_PROFILES")
    sampling: SamplingParams = shared_field("sampling")
    batch_size: int = shared_field("batch_size")
    shard_size: int = Field(4000, ge=1, le=1_000_000, description="records per output part: the unit of upload and publication (a kill costs only the requests in flight)")
    prompt_field: str = Field("prompt", min_length=1, description="JSONL field holding the prompt")
    id_field: str = Field("id", min_length=1, description="JSONL field holding the record's id (a line without one gets an id derived from it)")
    on_bad_input: Literal["fail", "skip"] = Field("fail", description="fail on unusable lines, or skip them into rejects.jsonl")
    overlong_prompts: Literal["reject", "truncate_left"] = Field(
        "reject", description="prompts too long for the context: reject them, or keep their end")
    prompt_format: PromptFormatName | None = shared_field("prompt_format")
    replicas: int | None = Field(None, ge=1, le=64, description="server replicas sharing the work, each its own "
                                                                "allocation; default NSDG_SERVER__REPLICAS (1)")
    max_server_restarts: int | None = Field(
        None, ge=0, le=20, description="servers started anew after one dies or hangs; default NSDG_SERVER__MAX_SERVER_RESTARTS (2)")
    export: bool = Field(False, description="at the run's end, write its kept rows as trainer files (data/*.jsonl "
                                            "and .parquet) and a dataset card README.md (docs/outputs.md)")
    recipe: RecipeParams = shared_field("recipe")
    judge: JudgeParams = shared_field("judge")
    filters: FilterParams = shared_field("filters")
    output_schema: OutputSchema | None = shared_field("output_schema")
    max_attempts: int = shared_field("max_attempts")

    @field_validator("run_id")
    @classmethod
    def _run_id(cls, v: str | None) -> str | None:
        return validate_key_component(v, "run_id") if v else None  # empty, as a cleared form field: the run's own

    def __init__(self, **data):
        try:
            super().__init__(**data)
        except ValidationError as exc:
            problems = "\n".join(f"  {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ConfigError(f"Invalid flow parameters:\n{problems}") from None

    def check_runnable(self, backend: str) -> None:
        """Refuse what only a template or the demo would hold, before anything is read or submitted: a
        value still holding the placeholder (prefect.yaml's site block), and a run that asks Slurm for
        GPUs without its own input."""
        if hits := placeholders(self.model_dump(mode="json")):
            loc, value = hits[0]
            raise ConfigError(f"Parameter {'.'.join(map(str, loc))} is {value!r}, still the placeholder {PLACEHOLDER}: "
                              "set it (prefect.yaml's definitions.site, then deploy again; or --param "
                              f"{loc[0]}=... on the run).")
        if backend == "slurm" and self.input_uri in (None, DEMO_INPUT):
            seen = "no input_uri was given" if self.input_uri is None else f"input_uri is the demo prompts {DEMO_INPUT}"
            raise ConfigError(f"profile {self.profile!r} asks Slurm for GPUs and {seen}: set input_uri to your prompts "
                              "(--input-uri, or the deployment's input_uri parameter); the demo runs on the local profile.")

    def resolved(self, *, output_uri: str, run_id: str, prompt_format: str) -> "RunParams":
        """These parameters with the defaults only the run can choose filled in where none was given:
        the demo input (check_runnable refuses it on a cluster), the settings' output, the flow run's
        id, the profile's prompt format."""
        return RunParams(**{**dict(self), "input_uri": self.input_uri or DEMO_INPUT, "output_uri": self.output_uri or output_uri,
                            "run_id": self.run_id or run_id, "prompt_format": self.prompt_format or prompt_format})

    def to_run_config(self, recipe: Recipe | None = None, curation: Curation | None = None, *,
                      tokenizer: str | None = None) -> RunConfig:
        """`recipe`: `self.recipe` loaded (infra.recipes.load_recipe); may be None only when the recipe
        reads no file (no template, no examples). `tokenizer`: the model's, from the settings."""
        if self.output_uri is None or self.run_id is None or self.prompt_format is None:
            raise ValueError("to_run_config needs the run's own defaults filled in first (RunParams.resolved)")
        fmt = load_prompt_format(self.prompt_format, tokenizer)
        if recipe is None:
            if self.recipe.prompt_template or self.recipe.uses_examples:
                raise ValueError("to_run_config needs the loaded recipe (infra.recipes.load_recipe) for a template or examples")
            recipe = Recipe(self.recipe)
        # The format's own end strings (a chat model's end-of-turn token) and the recipe's example
        # separator stop generation too.
        extra = [*fmt.end_strings, *recipe.end_strings()]
        ends = [*self.sampling.end_strings]
        ends += [e for i, e in enumerate(extra) if e not in ends and e not in extra[:i]]
        fields = {name: getattr(self, name) for name in RunConfig.__dataclass_fields__
                  if name in RunParams.model_fields and name not in ("prompt_format", "recipe")}
        fields["sampling"] = self.sampling.model_copy(update={"end_strings": ends})
        if curation is None:
            if self.judge.enabled:
                raise ValueError("to_run_config needs the loaded judge (infra.recipes.judge.load_judge) for a judge template")
            curation = Curation(self.judge, self.filters, schema=self.output_schema is not None)
        # The run's one token counter, built here once and handed down with the config.
        return RunConfig(**fields, prompt_format=fmt, recipe=recipe, curation=curation, counter=token_counter(tokenizer))


def resolve_run_id(flow_run) -> str:
    """A run id stable across `prefect flow-run retry` (same flow-run id and creation time)."""
    if flow_run is None:
        import uuid
        from datetime import datetime, timezone

        return f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:8]}"
    created = flow_run.created or flow_run.expected_start_time
    return f"{created:%Y%m%d-%H%M%S}-{str(flow_run.id)[:8]}"


def run_name() -> str:
    """A flow run's name (the flows' `flow_run_name`): its run id, given or derived as the run derives
    it, so the UI's search finds a run by the name of its output folder (a random name did not)."""
    from prefect.context import get_run_context

    context = get_run_context()
    return (context.parameters or {}).get("run_id") or resolve_run_id(context.flow_run)


def with_run_parameters(fn):
    """Give the flow `fn(**given)` RunParams' fields as its parameters. Prefect builds the UI form and
    checks a run's parameters from the signature (each field's type, constraints and default) and,
    since Prefect 3.9 leaves Annotated Field descriptions out of that form, reads the descriptions
    from a Google-style `Args:` section, appended here. Apply it under @flow."""
    signature, hints = [], {}
    for name, field in RunParams.model_fields.items():
        hints[name] = Annotated[(field.annotation, *field.metadata, Field(description=field.description))]
        signature.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=hints[name],
                                           default=field.get_default(call_default_factory=True)))
    fn.__signature__ = inspect.Signature(signature, return_annotation=dict)
    fn.__annotations__ = {**hints, "return": dict}
    args = [f"    {name}: {field.description}" for name, field in RunParams.model_fields.items()]
    fn.__doc__ = inspect.cleandoc(fn.__doc__ or "") + "\n\nArgs:\n" + "\n".join(args)
    return fn


# The flag (and top-level --params key) of a nested field where its own name would be unclear or taken.
FLAG_NAMES = {("sampling", "add_BOS"): "add_bos", ("sampling", "end_strings"): "end_string",
              ("judge", "template"): "judge_template", ("judge", "tokens_to_generate"): "judge_tokens",
              ("judge", "end_strings"): "judge_end_string", ("judge", "prompt_format"): "judge_format",
              ("judge", "system_prompt"): "judge_system_prompt"}


@dataclass(frozen=True)
class Parameter:
    """One value a user sets: a top-level field of RunParams, or a field of one of its groups."""

    group: str | None  # sampling, recipe, judge, filters; None at the top
    name: str
    field: FieldInfo

    @property
    def path(self) -> str:
        return f"{self.group}.{self.name}" if self.group else self.name

    @property
    def flag(self) -> str:
        """The CLI flag's name with `_`: also its key at the top of a --params file."""
        return FLAG_NAMES.get((self.group, self.name), self.name)

    @property
    def option(self) -> str:
        return "--" + self.flag.replace("_", "-")

    @property
    def value_type(self):
        """The annotation without its `| None`: int, float, str, bool, list[str] or a Literal."""
        kinds = [t for t in typing.get_args(self.field.annotation) if t is not type(None)] \
            if typing.get_origin(self.field.annotation) in (typing.Union, types.UnionType) else [self.field.annotation]
        (kind,) = kinds
        return typing.get_args(kind)[0] if typing.get_origin(kind) is Annotated else kind  # StrictInt: int

    @property
    def choices(self) -> tuple[str, ...] | None:
        return typing.get_args(self.value_type) if typing.get_origin(self.value_type) is Literal else None

    @property
    def json(self) -> bool:
        """A JSON object (output_schema): given on the CLI as JSON text."""
        return typing.get_origin(self.value_type) is dict

    @property
    def repeated(self) -> bool:
        """A list: given on the CLI as a flag repeated once per item."""
        return typing.get_origin(self.value_type) is list

    @property
    def default(self):
        return self.field.get_default(call_default_factory=True)

    def shown_default(self) -> str | None:
        """The default as a --params file writes it; None where there is none (the run chooses)."""
        return None if self.default is None else json.dumps(self.default, ensure_ascii=False)


def groups() -> dict[str, type[BaseModel]]:
    """RunParams' nested groups by name (the UI form shows each as one group)."""
    return {name: field.annotation for name, field in RunParams.model_fields.items()
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)}


def parameters() -> list[Parameter]:
    """Every parameter a user sets, in RunParams' order, each group's fields in the group's place."""
    nested = groups()
    return [leaf for name, field in RunParams.model_fields.items()
            for leaf in ([Parameter(name, n, f) for n, f in nested[name].model_fields.items()] if name in nested
                         else [Parameter(None, name, field)])]


def _type_text(p: Parameter) -> str:
    kind = p.value_type
    text = (" | ".join(f"`{c}`" for c in p.choices) if p.choices else "list of str" if p.repeated
            else "JSON object" if p.json else getattr(kind, "__name__", str(kind)))
    bounds = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<", "min_length": "length ≥"}
    text += "".join(f", {sign} {getattr(m, key)}" for m in p.field.metadata for key, sign in bounds.items()
                    if getattr(m, key, None) is not None)
    return text + ("; optional" if p.default is None else "")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown() -> str:
    """docs/parameters.md: every parameter with its flag, type, default and description."""
    head = "| Parameter | CLI flag | Type | Default | Description |\n|---|---|---|---|---|\n"
    rows = {}
    for p in parameters():
        option = f"{p.option} / --no-{p.option[2:]}" if p.value_type is bool else \
            f"{p.option} (repeat)" if p.repeated else p.option
        default = "" if p.shown_default() is None else f"`{p.shown_default()}`"
        rows.setdefault(p.group, []).append(f"| `{p.path}` | `{option}` | {_cell(_type_text(p))} | {_cell(default)} "
                                             f"| {_cell(p.field.description or '')} |\n")
    text = ("# Run parameters\n\n"
            "Generated from `RunParams` (flows/params.py) by `python -m flows.params --markdown > docs/parameters.md`; "
            "tests/test_parameters.py fails when this file is stale.\n\n"
            "Each is a parameter of the `generate` flow (the Prefect UI form shows the groups as nested objects), "
            "a flag of `nemotron-sdg run`, and a key of its `--params` file: at the top level under the flow's "
            "name or the flag's name with `_` (`tokens_to_generate`, `judge_template`), or inside its group "
            "(`{\"sampling\": {\"temperature\": 0.7}}`). Flags override the file. Defaults are "
            "written as in that JSON file; an optional parameter without one: the run chooses (see its description).\n\n")
    text += head + "".join(rows.pop(None))
    for group, lines in rows.items():
        text += f"\n## {group}\n\n{RunParams.model_fields[group].description}.\n\n" + head + "".join(lines)
    return text


if __name__ == "__main__":
    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m flows.params --markdown > docs/parameters.md")
    sys.stdout.write(markdown())
