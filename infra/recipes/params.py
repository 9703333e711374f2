"""The recipe's parameters: one nested model, so the Prefect UI form shows them as one group."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator

from infra.prompting.prompt_format import PromptFormatName
from infra.recipes.patterns import checked_pattern

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


DEFAULT_SCORE_PATTERN = r"(-?\d+(?:\.\d+)?)"


class JudgeParams(BaseModel):
    """The judge: the same server scores each generated record, on the same allocation.
    Shown in the Prefect UI form as one group with these descriptions."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    template: str | None = Field(
        None, description="Jinja2 judging prompt over the record's fields, `id`, `sample`, `prompt` and `completion` "
                          "(few-shot judged examples may be written into it); inline text, or a .j2/.jinja/.txt path, "
                          "file:// or s3:// URI. Empty: no judge")
    score_pattern: str = Field(
        DEFAULT_SCORE_PATTERN, min_length=1,
        description="regex that finds the score in the judge's reply (its first group, else the whole match); "
                    "default: the first number. A reply it does not match is dropped as judge_unparsed")
    min_score: float | None = Field(None, description="keep records whose score is at least this; empty: keep every scored record")
    tokens_to_generate: StrictInt = Field(8, ge=1, le=1024, description="tokens the judge may answer with")
    end_strings: list[str] = Field(default_factory=lambda: ["\n"], description="the judge's reply stops at the first of these")
    prompt_format: PromptFormatName | None = Field(
        None, description="how the judging prompt is wrapped: raw, nemotron-instruct or chat, whatever the generation "
                          "used (an instruction judge over a base model's completions); default: the run's prompt_format")
    system_prompt: str | None = Field(
        None, description="the judge's system prompt, in its prompt format's system turn (nemotron-instruct's System "
                          "turn, a chat template's system message; raw has none and is refused); empty: none")

    @model_validator(mode="after")
    def _pattern(self) -> "JudgeParams":
        checked_pattern(self.score_pattern, "judge.score_pattern")
        if self.template is not None and not self.template.strip():
            raise ValueError("judge.template is empty: leave it unset for no judge, or write the judging prompt")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.template)

    def locations(self) -> dict[str, str]:
        from infra.recipes.templates import is_template_uri

        return {"judge.template": self.template.strip()} if self.template and is_template_uri(self.template) else {}


class FilterParams(BaseModel):
    """What is kept of the generated (and judged) records; each dropped record goes to filtered.jsonl
    with the filter's name and the value it measured. Changing these reruns no generation."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    drop_truncated: StrictBool = Field(False, description="drop completions that hit tokens_to_generate (finish_reason length)")
    min_completion_tokens: StrictInt | None = Field(None, ge=0, description="drop completions shorter than this, in generated tokens")
    max_completion_tokens: StrictInt | None = Field(None, ge=1, description="drop completions longer than this, in generated tokens")
    max_repeated_ngram_share: float | None = Field(
        None, gt=0.0, le=1.0, description="drop completions where more than this share of word n-grams are repeats")
    ngram_size: StrictInt = Field(3, ge=1, le=32, description="n of the n-grams max_repeated_ngram_share counts")
    must_match: list[str] = Field(default_factory=list, description="regexes the completion must all match (searched, at most 1 CPU second per completion)")
    must_not_match: list[str] = Field(default_factory=list, description="regexes the completion must not match (searched, at most 1 CPU second per completion)")
    dedup_exact: StrictBool = Field(
        False, description="drop exact duplicates of a normalized completion (case, spacing, Unicode form) across the "
                           "run; the first in input order is kept")
    dedup_near: StrictBool = Field(False, description="drop near-duplicates (MinHash LSH over word shingles) across the run; the first in input order is kept")
    near_threshold: float = Field(0.8, gt=0.0, lt=1.0, description="estimated Jaccard similarity from which two completions are near-duplicates")
    shingle_size: StrictInt = Field(3, ge=1, le=16, description="words per shingle for near-duplicates")
    num_perm: StrictInt = Field(128, ge=16, le=512, description="MinHash permutations for near-duplicates")

    @model_validator(mode="after")
    def _check(self) -> "FilterParams":
        for i, pattern in enumerate(self.must_match):
            checked_pattern(pattern, f"filters.must_match[{i}]")
        for i, pattern in enumerate(self.must_not_match):
            checked_pattern(pattern, f"filters.must_not_match[{i}]")
        if (self.min_completion_tokens is not None and self.max_completion_tokens is not None
                and self.min_completion_tokens > self.max_completion_tokens):
            raise ValueError("filters.min_completion_tokens is above filters.max_completion_tokens")
        return self

    @property
    def enabled(self) -> bool:
        return self != FilterParams()
