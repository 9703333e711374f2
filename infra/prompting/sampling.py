"""Sampling parameters of NeMo 24.05's PUT /generate, validated the way the client must: the
server accepts some values that desynchronise its ranks or that it silently misreads."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator

# Sampling parameters travel to the other ranks as a float32 tensor: larger seeds get rounded.
MAX_RANDOM_SEED = 2**24
MAX_BATCH = 128  # the server's hard limit per PUT


class SamplingParams(BaseModel):
    """What to generate. Shown in the Prefect UI form with these descriptions and defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tokens_to_generate: StrictInt = Field(256, ge=1, description="new tokens per prompt; prompt + these must fit the context length")
    greedy: StrictBool = Field(False, description="argmax decoding; ignores temperature, top_k and top_p")
    temperature: float = Field(1.0, le=100.0, description="> 0 unless greedy (the server rejects 0)")
    top_k: StrictInt = Field(0, ge=0, description="0 = off")
    top_p: float = Field(0.9, ge=0.0, le=1.0, description="nucleus sampling; applies only when 0 < top_p < 1")
    min_tokens_to_generate: StrictInt = Field(0, ge=0, description="tokens generated before an end string may stop generation")
    end_strings: list[str] = Field(default_factory=lambda: ["<|endoftext|>"], description="generation stops at the first of these; trimmed from the completion")
    add_BOS: StrictBool = Field(False, description="put the tokenizer's beginning-of-sequence token before each prompt")
    random_seed: StrictInt | None = Field(None, ge=0, lt=MAX_RANDOM_SEED, description="< 2^24 (sent as float32 to the other ranks)")

    @model_validator(mode="after")
    def _temperature(self) -> "SamplingParams":
        if not self.greedy and self.temperature <= 0:
            raise ValueError(
                f"temperature must be > 0 unless greedy is true (got {self.temperature}); "
                "set greedy=true for deterministic decoding"
            )
        if self.min_tokens_to_generate > self.tokens_to_generate:
            raise ValueError("min_tokens_to_generate must not exceed tokens_to_generate")
        return self

    def request_fields(self) -> dict:
        """The JSON fields for PUT /generate, every one explicit (the server's defaults differ
        from the YAML's, and repetition_penalty only acts with compute_logprob)."""
        return {
            "tokens_to_generate": self.tokens_to_generate,
            "temperature": self.temperature if self.temperature > 0 else 1.0,
            "add_BOS": self.add_BOS,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "greedy": self.greedy,
            "all_probs": False,
            "compute_logprob": False,
            "repetition_penalty": 1.0,
            "min_tokens_to_generate": self.min_tokens_to_generate,
            "end_strings": list(self.end_strings),
            **({"random_seed": self.random_seed} if self.random_seed is not None else {}),
        }
