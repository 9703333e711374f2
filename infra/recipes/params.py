"""The recipe's parameters: one nested model, so the Prefect UI form shows them as one group."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator

MAX_EXAMPLES_PER_PROMPT = 64
MAX_SAMPLES_PER_PROMPT = 64


class RecipeParams(BaseModel):
    """How each input record becomes prompts. Shown in the Prefect UI form with these descriptions."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt_template: str | None = Field(
        None, description="Jinja2 template rendered per record with its fields ({{ topic }}), `examples` and "
                          "`separator`; inline text, or a .j2/.jinja/.txt path, file:// or s3:// URI. "
                          "Empty: the prompt is the record's prompt_field")
    examples_uri: str | None = Field(
        None, description="few-shot examples: a JSONL file (local path, file:// or s3://), one object a line")
    examples_per_prompt: StrictInt = Field(
        0, ge=0, le=MAX_EXAMPLES_PER_PROMPT,
        description="examples given to each record's template as `examples`, chosen from the record's id, never the record itself")
    example_separator: str = Field(
        "\n\n###\n\n", min_length=1, description="text between examples; the template sees it as `separator`")
    stop_at_separator: StrictBool = Field(
        True, description="add the separator to sampling.end_strings, so a base model stops after one answer "
                          "(only when examples are used)")
    samples_per_prompt: StrictInt = Field(
        1, ge=1, le=MAX_SAMPLES_PER_PROMPT,
        description="samples per prompt, each its own output record with `sample` 0..N-1; "
                    "with sampling.random_seed every sample is reproducible")

    @model_validator(mode="after")
    def _examples(self) -> "RecipeParams":
        if self.examples_per_prompt and not self.examples_uri:
            raise ValueError("examples_per_prompt needs examples_uri (a JSONL file of examples)")
        if self.examples_uri and not self.examples_per_prompt:
            raise ValueError("examples_uri is set but examples_per_prompt is 0: set how many examples each prompt gets")
        if self.examples_per_prompt and not self.prompt_template:
            raise ValueError("examples need a prompt_template that places them ({% for ex in examples %}...)")
        return self

    @property
    def uses_examples(self) -> bool:
        return self.examples_per_prompt > 0

    def locations(self) -> dict[str, str]:
        """The files the recipe reads, by parameter name, for NSDG_ALLOWED_URIS."""
        from infra.recipes.templates import is_template_uri

        found = {}
        if self.prompt_template and is_template_uri(self.prompt_template):
            found["recipe.prompt_template"] = self.prompt_template.strip()
        if self.examples_uri:
            found["recipe.examples_uri"] = self.examples_uri
        return found
