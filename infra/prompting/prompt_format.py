"""How a prompt's text is wrapped before it is sent: the model's prompt format.

- `raw`: the text as it is, the seed's `PROMPT_TEMPLATE = "{prompt}"`; right for a base model
  (Nemotron-4-340B-Base) and the default of every cluster profile.
- `nemotron-instruct`: Nemotron-4-340B-Instruct's turn markup, ending where the assistant's turn
  begins; the model ends its turn with `<extra_id_1>`, which becomes an end string.
- `chat`: the model's own chat template (`chat_template.jinja` or `tokenizer_config.json`'s
  `chat_template`, next to its tokenizer.json), rendered for one user message with the generation
  prompt added, as transformers' `apply_chat_template` does. The tokenizer's eos token (SmolLM2:
  `<|im_end|>`) becomes an end string. The default of the `local` profile when its model ships a
  template (the tiny random model and the simulated engine have none: they stay `raw`).

The wrapped text is what is counted against the context and what the server echoes; the output
keeps the user's prompt under `prompt` and names the format in `generation.prompt_format`. A
format's identity (its name and a digest of its template) is part of the run's config hash.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, get_args

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from infra.errors import ConfigError

# The formats' names, spelled here only: the flow's parameter, the settings' profile field and the CLI's choices use these.
PromptFormatName = Literal["raw", "nemotron-instruct", "chat"]
FORMATS: tuple[str, ...] = get_args(PromptFormatName)
NEMOTRON_INSTRUCT = "<extra_id_0>System\n{system}\n<extra_id_1>User\n{prompt}\n<extra_id_1>Assistant\n"
NEMOTRON_END = "<extra_id_1>"


@dataclass(frozen=True)
class PromptFormat:
    name: str = "raw"
    template: str = "{prompt}"  # for description and digest; `chat` renders `_jinja` instead
    end_strings: tuple[str, ...] = ()
    variables: tuple[tuple[str, str], ...] = ()  # bos_token / eos_token for a chat template
    _jinja: object = field(default=None, compare=False, repr=False)
    system: str = ""  # the system turn's text (a judge's system prompt); raw has none

    def with_system(self, system: str, field_name: str = "judge.system_prompt") -> "PromptFormat":
        """This format with a system turn: nemotron-instruct's System turn, a chat template's system
        message. `raw` has no turns to put one in: refused, naming the field."""
        if self.name == "raw":
            raise ConfigError(f"{field_name} is set but the prompt format is raw, which has no system turn: set the "
                              f"judge's format (--judge-format nemotron-instruct or chat), or write the instruction "
                              f"into the judging template")
        return replace(self, system=system)

    def wrap(self, prompt: str) -> str:
        if self.name == "raw":
            return prompt
        if self.name == "nemotron-instruct":
            return NEMOTRON_INSTRUCT.format(system=self.system, prompt=prompt)
        messages = [{"role": "system", "content": self.system}] if self.system else []
        try:
            return self._jinja.render(messages=[*messages, {"role": "user", "content": prompt}],
                                      add_generation_prompt=True, **dict(self.variables))
        except TemplateError as exc:  # a template that fails on one prompt fails on all
            raise ConfigError(f"The chat template could not render a prompt: {exc}. Use prompt_format='raw'.") from exc

    def identity(self) -> dict:
        """What the config hash records: a changed template is a changed run."""
        # The system turn only when there is one, so a format without one keeps its earlier digest.
        parts = [self.template, self.variables, self.end_strings, *([self.system] if self.system else [])]
        digest = hashlib.sha256(json.dumps(parts).encode()).hexdigest()
        return {"name": self.name, "sha256": digest[:16]}


RAW = PromptFormat()


def chat_template_of(tokenizer: str | None) -> tuple[str, dict[str, str]] | None:
    """(template, {bos_token, eos_token}) from the directory of a tokenizer.json, or None."""
    if not tokenizer:
        return None
    folder = Path(tokenizer).expanduser()
    folder = folder if folder.is_dir() else folder.parent
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    jinja_file = folder / "chat_template.jinja"
    template = jinja_file.read_text() if jinja_file.is_file() else config.get("chat_template")
    if not isinstance(template, str) or not template.strip():
        return None
    tokens = {name: _token_text(config.get(name)) for name in ("bos_token", "eos_token")}
    return template, {k: v for k, v in tokens.items() if v}


def _token_text(value) -> str:
    if isinstance(value, dict):  # tokenizer_config.json may store an AddedToken as an object
        value = value.get("content")
    return value if isinstance(value, str) else ""


def default_format(requested: str | None, profile_default: str | None, backend: str, tokenizer: str | None) -> str:
    """The parameter wins, then the profile's own; `local` chats when its model has a template."""
    if requested:
        return requested
    if profile_default:
        return profile_default
    return "chat" if backend == "local" and chat_template_of(tokenizer) is not None else "raw"


def load_prompt_format(name: str, tokenizer: str | None) -> PromptFormat:
    if name == "raw":
        return RAW
    if name == "nemotron-instruct":
        return PromptFormat(name, NEMOTRON_INSTRUCT, (NEMOTRON_END,))
    if name != "chat":
        raise ConfigError(f"Unknown prompt_format {name!r}: use one of {', '.join(FORMATS)}.")
    found = chat_template_of(tokenizer)
    if found is None:
        raise ConfigError(
            f"prompt_format='chat' needs the model's chat template, and the tokenizer {tokenizer or '(none configured)'} "
            "has none beside it (chat_template.jinja or tokenizer_config.json). Set NSDG_MODEL__TOKENIZER to the "
            "model's tokenizer directory, or use prompt_format='raw'."
        )
    template, variables = found
    # Sandboxed: a template is data from a model directory, never code with access to Python objects.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    try:
        jinja = env.from_string(template)
    except TemplateError as exc:
        raise ConfigError(f"The chat template beside {tokenizer} does not parse: {exc}. Use prompt_format='raw'.") from exc
    eos = variables.get("eos_token")
    return PromptFormat("chat", template, (eos,) if eos else (), tuple(sorted(variables.items())), jinja)


def _raise_exception(message: str):
    raise TemplateError(message)
