"""The loaded recipe: template and examples read once (at flow start), then used by the plan and
the generation pass alike, so both build the same prompts from the same bytes."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace

from infra.prompting.dataset import BadLine, Record
from infra.recipes.examples import Examples, load_examples
from infra.recipes.params import RecipeParams
from infra.recipes.templates import MIN_PROMPT_CHARS, PromptTemplate, RenderError, load_template, prompt_char_limit, render


@dataclass(frozen=True, eq=False)
class Recipe:
    params: RecipeParams
    template: PromptTemplate | None = None
    examples: Examples | None = None
    max_prompt_chars: int = MIN_PROMPT_CHARS  # from the context length (load_recipe): longer is a bad line

    @property
    def samples(self) -> int:
        return self.params.samples_per_prompt

    @property
    def templated(self) -> bool:
        return self.template is not None

    def fingerprint(self) -> dict:
        """What the recipe changes in a run's parts, as flat keys so a refused rerun names each one.
        Empty for the default recipe: runs without one keep the config they had."""
        out: dict = {}
        if self.template is not None:
            out["recipe.prompt_template_sha256"] = self.template.sha256
        if self.examples is not None:
            out.update({"recipe.examples_sha256": self.examples.sha256,
                        "recipe.examples_per_prompt": self.params.examples_per_prompt,
                        "recipe.example_separator": self.params.example_separator})
        if self.samples != 1:
            out["recipe.samples_per_prompt"] = self.samples
        return out

    def end_strings(self) -> list[str]:
        """The separator between examples, when the user lets it stop generation."""
        return [self.params.example_separator] if self.examples is not None and self.params.stop_at_separator else []

    def renderer(self) -> Callable[[Record], Record | BadLine] | None:
        """record -> record with the rendered prompt, or the bad line saying why it cannot render."""
        if self.template is None:
            return None
        compiled, examples, k = self.template.compiled(), self.examples, self.params.examples_per_prompt
        separator, max_chars = self.params.example_separator, self.max_prompt_chars

        def render_record(rec: Record) -> Record | BadLine:
            context = {**rec.fields, "id": rec.id, "separator": separator, "examples": []}
            if rec.prompt:  # a text line, or a JSONL record's prompt_field when it has one
                context.setdefault("prompt", rec.prompt)
            if examples is not None:
                picked = examples.pick(rec.id, rec.fields, k)
                if picked is None:
                    return _bad(rec, f"fewer than {k} examples in {examples.uri} other than this record")
                context["examples"] = picked
            try:
                text = render(compiled, context, max_chars)
            except RenderError as exc:
                return _bad(rec, f"{TEMPLATE_FAILS}{exc}")
            if not text.strip():
                return _bad(rec, "prompt_template rendered an empty prompt for this record")
            return replace(rec, prompt=text)

        return render_record


# How a record the template cannot render is reported; the plan tells "every line fails this way"
# (the template is wrong) from a few bad records by it.
TEMPLATE_FAILS = "prompt_template cannot render this record: "


def _bad(rec: Record, reason: str) -> BadLine:
    return BadLine(rec.line, reason, json.dumps({"id": rec.id, **rec.fields}, ensure_ascii=False)[:200])


def load_recipe(params: RecipeParams, settings) -> Recipe:
    """Read the template and the examples (local or s3) once; errors are the user's (ConfigError)."""
    template = load_template(params.prompt_template, settings) if params.prompt_template else None
    examples = load_examples(params.examples_uri, settings, params.examples_per_prompt) if params.uses_examples else None
    return Recipe(params, template, examples, prompt_char_limit(settings.model.context_length))
