"""`nemotron-sdg check --pipeline FILE`: everything about a pipeline that can be known without a
server, each problem one line naming the stage and the field.

For each stage, parents first:
- its template's variables (found in the sandboxed template's syntax tree) must be fields of the
  rows it reads: a first stage's are its input's first rows; a child's are its parent's rows, which
  hold the parent's own fields (`id`, `sample`, `prompt`, `completion`, `generation`, the split's
  `into`, the output schema's properties), the fields the parent read, passed on, and under
  `parent` those the parent's own fields hide (`{{ parent.completion }}`);
- the template is rendered as a run renders it (infra/recipes/recipe.py): on the input's first rows
  for a first stage, for a child on placeholder rows of its parent (one per first input row, the
  input's fields passed on, placeholders for what a server would write); the judge's template
  likewise, on the placeholders of the stage's own rows.
A variable the template tests with `is defined` is optional: not required of the parent (a use of it
outside the test is still caught when the first input rows are rendered).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePosixPath

from jinja2 import meta, nodes

from infra.errors import ConfigError
from infra.pipeline.files import load_pipeline
from infra.pipeline.hashes import stage_hashes
from infra.pipeline.model import Pipeline, Stage
from infra.pipeline.outputs import sft_stage
from infra.prompting.dataset import RESERVED_FIELDS, BadLine, Record, detect_format, iter_input
from infra.prompting.prompt_format import RAW
from infra.recipes.judge import Judge, load_judge
from infra.recipes.pair_check import check_template
from infra.recipes.params import FilterParams
from infra.recipes.recipe import Recipe, load_recipe
from infra.recipes.templates import PromptTemplate, is_template_uri
from infra.reward.conversation import format_conversation, turns_of
from infra.slurm.steps import swap_step
from infra.storage import check_input, open_input

FIRST_ROWS = 3
# What a run's renderer gives every record's template besides its fields (infra/recipes/recipe.py).
RENDER_CONTEXT = ("id", "separator", "examples")
_PLACEHOLDERS = {"integer": 0, "number": 0.0, "boolean": False, "array": [], "object": {}, "null": None}


def template_variables(template: PromptTemplate) -> set[str]:
    """The names a template reads from its context, less those it only tests with `is defined`."""
    tree = template.compiled().environment.parse(template.text)
    guarded = {t.node.name for t in tree.find_all(nodes.Test)
               if t.name in ("defined", "undefined") and isinstance(t.node, nodes.Name)}
    return meta.find_undeclared_variables(tree) - guarded


@dataclass
class StageCheck:
    """What the check found for one stage."""

    stage: Stage
    reads: str  # "input <file name>" or the parent's name
    recipe: Recipe
    judge: Judge | None = None
    prompts: list[str] = field(default_factory=list)  # the rendered first prompts
    rows: list[dict] = field(default_factory=list)  # placeholders of its output rows: what its children read
    judge_prompt: str | None = None


def _first_records(uri: str, settings, templated: bool, count: int) -> list[Record]:
    check_input(uri, settings.s3)
    out: list[Record] = []
    with open_input(uri, settings.s3) as stream:
        for item in iter_input(stream, detect_format(uri), None if templated else "prompt"):
            if isinstance(item, BadLine):
                raise ConfigError(f"input line {item.line}: {item.reason}")
            out.append(item)
            if len(out) == count:
                break
    if not out:
        raise ConfigError("the input has no records")
    return out


def _child_record(row: dict, stage: Stage) -> Record:
    return Record(f"{row['id']}/{stage.name}", "", 0, {k: v for k, v in row.items() if k != "id"})


def output_row(stage: Stage, rec: Record, prompt: str) -> dict:
    """A placeholder of the stage's first output row: the fields it passes on, and its own."""
    own = {"id": f"{rec.id}.0", "sample": 0, "prompt": prompt, "completion": f"<{stage.name} completion>",
           "generation": {"finish_reason": "stop", "generated_tokens": 1}}
    if stage.split is not None:
        own[stage.split.into] = f"<{stage.name} {stage.split.into}>"
    for name, kind in stage.schema_fields().items():
        own[name] = _PLACEHOLDERS.get(kind, f"<{stage.name} {name}>")
    read = {k: v for k, v in rec.fields.items() if k != "parent"}
    hidden = {k: v for k, v in read.items() if k in own or k in RESERVED_FIELDS}
    return {**{k: v for k, v in read.items() if k not in hidden}, **own, **({"parent": hidden} if hidden else {})}


def _require(stage: Stage, what: str, template: PromptTemplate, have: set[str], source: str) -> None:
    if missing := sorted(template_variables(template) - have):
        names = ", ".join(f"{{{{ {m} }}}}" for m in missing)
        raise ConfigError(f"stage {stage.name!r}: {what} uses {names}, which {source} do not have "
                          f"(they have: {', '.join(sorted(have))})")


def _check_prompts(stage: Stage, recipe: Recipe, records: list[Record], source: str) -> list[str]:
    if recipe.template is not None:
        have = set.intersection(*({*r.fields, *RENDER_CONTEXT, *(["prompt"] if r.prompt else [])} for r in records))
        _require(stage, "recipe.prompt_template", recipe.template, have, source)
    render = recipe.renderer()
    prompts = []
    for rec in records:
        done = render(rec) if render is not None else rec
        if isinstance(done, BadLine):
            where = f" (input line {done.line})" if stage.from_ is None else ""
            raise ConfigError(f"stage {stage.name!r}: {done.reason}{where}")
        prompts.append(done.prompt)
    return prompts


def _check_judge(stage: Stage, judge: Judge, rows: list[dict]) -> str:
    have = set.intersection(*({*row, "id", "sample"} for row in rows))
    _require(stage, "judge.template", judge.template, have, f"the rows of stage {stage.name!r}")
    prompts = judge.prompts(rows)
    if errors := [p for p in prompts if isinstance(p, dict)]:
        raise ConfigError(f"stage {stage.name!r}: {errors[0]['error']}")
    return prompts[0]


def check_reward_stage(pipeline: Pipeline, stage: Stage, parent: StageCheck | None, settings, rows: int) -> StageCheck:
    """A reward stage: each row it reads must give a conversation (messages, or prompt and
    completion: infra/reward/conversation.py); its rows for its children carry the attributes."""
    params = stage.reward_params
    if parent is None:
        uri = pipeline.input_of(stage)
        read = [{**r.fields, "id": r.id} for r in _first_records(uri, settings, True, rows)]
        reads, source = f"input {PurePosixPath(uri).name}", f"the first rows of its input {uri}"
    else:
        read, reads, source = parent.rows, parent.stage.name, f"the rows of stage {parent.stage.name!r}"
    result = StageCheck(stage, reads, load_recipe(stage.recipe, settings))
    for row in read:
        turns = turns_of(row, params.messages_field, params.prompt_field, params.completion_field)
        if isinstance(turns, str):
            raise ConfigError(f"stage {stage.name!r}: reward: {source} give no conversation to score: {turns}; set "
                              "reward.messages_field, or reward.prompt_field and reward.completion_field")
        result.prompts.append(format_conversation(turns, params.system_prompt))
    scalar = {"reward": 0.0} if params.weights is not None else {}
    result.rows = [{**row, "reward": {**{a: 0.0 for a in params.attributes}, **scalar}} for row in read]
    return result


def check_stage(pipeline: Pipeline, stage: Stage, done: dict[str, StageCheck], settings, rows: int) -> StageCheck:
    parent = done.get(stage.from_) if stage.from_ is not None else None
    if stage.kind == "reward":
        return check_reward_stage(pipeline, stage, parent, settings, rows)
    recipe = load_recipe(stage.recipe, settings)
    if stage.kind == "pairs":  # renders nothing: it pairs its parent's scored rows (infra/pipeline/pairs_stage.py)
        if stage.pairs.check is not None:  # ...but its check's A/B prompt, over the parent's first rows
            check_template(stage.pairs.check, parent.rows, settings, parent.stage.name)
        return StageCheck(stage, parent.stage.name, recipe)
    if parent is None:
        uri = pipeline.input_of(stage)
        records, source, reads = (_first_records(uri, settings, recipe.templated, rows),
                                  f"the first rows of its input {uri}", f"input {PurePosixPath(uri).name}")
    else:
        records, source, reads = ([_child_record(row, stage) for row in parent.rows],
                                  f"the rows of stage {parent.stage.name!r}", parent.stage.name)
    result = StageCheck(stage, reads, recipe, load_judge(stage.judge, settings, RAW))
    result.prompts = _check_prompts(stage, recipe, records, source)
    result.rows = [output_row(stage, rec, prompt) for rec, prompt in zip(records, result.prompts)]
    if result.judge is not None:
        result.judge_prompt = _check_judge(stage, result.judge, result.rows)
    return result


def _located(pipeline_uri: str, stage: Stage, exc: ConfigError) -> ConfigError:
    text = str(exc)
    return ConfigError(f"pipeline {pipeline_uri}: " + (text if text.startswith("stage ") else f"stage {stage.name!r}: {text}"))


def check_pipeline(pipeline: Pipeline, settings, uri: str, rows: int = FIRST_ROWS) -> list[StageCheck]:
    """Every stage checked and rendered, parents first; ConfigError at the first problem."""
    name, server = pipeline.server
    try:
        settings.profile(server.profile)
    except ConfigError as exc:
        raise ConfigError(f"pipeline {uri}: servers.{name}.profile: {exc}") from None
    try:  # a reward server started in the generator's job: its launch, as the job will be built
        swap_step(settings, pipeline.servers, name, "check")
    except ConfigError as exc:
        raise ConfigError(f"pipeline {uri}: {exc}") from None
    done: dict[str, StageCheck] = {}
    for stage in pipeline.ordered():
        try:
            done[stage.name] = check_stage(pipeline, stage, done, settings, rows)
        except ConfigError as exc:
            raise _located(uri, stage, exc) from None
    _check_user_field(pipeline, done, uri)
    return list(done.values())


def _check_user_field(pipeline: Pipeline, done: dict[str, StageCheck], uri: str) -> None:
    """`exports.user_field` must be a field of the rows the trainer files are made of (the SFT stage's,
    and each pairs stage's parent's), as the check's placeholder rows show them."""
    field = pipeline.exports.user_field
    if field == "prompt":
        return
    for name in dict.fromkeys([sft_stage(pipeline), *(s.from_ for s in pipeline.ordered() if s.kind == "pairs")]):
        rows = done[name].rows if name in done else []
        if rows and any(field not in row for row in rows):
            raise ConfigError(f"pipeline {uri}: exports.user_field: {field!r} is not a field of stage {name!r}'s rows "
                              f"(they have {', '.join(sorted(rows[0]))}); name one of them, or drop user_field to "
                              "give the prompt sent")


def _shown(location: str | None) -> str:
    if not location:
        return "-"
    return PurePosixPath(location.strip()).name if is_template_uri(location) else "inline"


def _summary(stage: Stage) -> dict[str, str]:
    if stage.kind == "reward":
        keep = ",".join(f"{k}>={v:g}" if isinstance(v, (int, float)) else k for k, v in stage.reward_params.keep_if.items())
        return {"template": "(reward)", "samples": "-", "split": "-", "judge": f"reward {keep or '-'}",
                "filters": ",".join(k for k, v in stage.filters if v != FilterParams.model_fields[k].get_default(
                    call_default_factory=True)) or "-"}
    split = stage.split
    filters = [k for k, v in stage.filters if v != FilterParams.model_fields[k].get_default(call_default_factory=True)]
    judge = stage.judge
    if stage.pairs is not None:
        p = stage.pairs
        return {"template": f"pairs {p.strategy} by {p.score}", "samples": "-",
                "split": "-", "judge": "A/B, both orders" if p.check is not None else "-", "filters": f"min_margin {p.min_margin:g}"}
    return {
        "template": _shown(stage.recipe.prompt_template) if stage.recipe.prompt_template else "(input prompt)",
        "samples": str(stage.recipe.samples_per_prompt),
        "split": f"{split.parser} -> {split.into}" if split else "-",
        "judge": (f"{_shown(judge.template)}" + (f" >= {judge.min_score:g}" if judge.min_score is not None else ""))
        if judge.enabled else "-",
        "filters": ",".join(filters) or "-",
    }


def graph_lines(pipeline: Pipeline, checks: list[StageCheck], uri: str, files: dict[str, str]) -> list[str]:
    """The stage graph as a small table, parents first, with each stage's config hash."""
    name, server = pipeline.server
    hashes = stage_hashes(pipeline, files)
    table = [["stage", "reads", "template", "samples", "split", "judge", "filters", "hash"]]
    for c in checks:
        table.append([c.stage.name, c.reads, *_summary(c.stage).values(), hashes[c.stage.name].kept])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    rewards = "".join(f", reward server {n!r} ({s.engine} {f'at {s.url}' if s.url else f'resident in the job of {name!r} on its own nodes' if s.resident else f'swapped into the job of {s.swap_with!r}'})"
                      for n, s in pipeline.servers.items() if s.is_reward)
    if later := [s.name for s in pipeline.stages if s.kind == "generate" and pipeline.level(s) > 0]:
        job = any(s.is_reward and (s.swap_with or s.resident) for s in pipeline.servers.values())
        rewards += (f", then back to {name!r} {'in the same job ' if job else ''}for {', '.join(later)} "
                    "(after the reward stage(s) they read)")
    head = (f"pipeline {uri}: {len(checks)} stages on server {name!r} (profile {server.profile}"
            f"{', engine ' + server.engine if server.engine else ''}){rewards}; every template rendered without a server")
    return [head, *("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table)]


def file_hashes(checks: list[StageCheck]) -> dict[str, str]:
    """The sha256 of each template and examples file read, by location (what the stage hashes count)."""
    files: dict[str, str] = {}
    for c in checks:
        for template in (c.recipe.template, c.judge.template if c.judge is not None else None):
            if template is not None and template.source != "inline":
                files[template.source] = template.sha256
        if c.recipe.examples is not None:
            files[c.recipe.examples.uri] = c.recipe.examples.sha256
    return files


def check_file(uri: str, settings, rows: int = FIRST_ROWS, show_prompts: bool = False) -> list[str]:
    """What `nemotron-sdg check --pipeline` prints; ConfigError (one line) for a bad pipeline."""
    pipeline = load_pipeline(uri, settings)
    checks = check_pipeline(pipeline, settings, uri, rows)
    lines = graph_lines(pipeline, checks, uri, file_hashes(checks))
    if show_prompts:
        for c in checks:
            lines += [f"----- {c.stage.name}: first prompt -----", c.prompts[0]]
            if c.judge_prompt is not None:
                lines += [f"----- {c.stage.name}: judge prompt (on a placeholder reply) -----", c.judge_prompt]
    return lines
