"""The prompt template: Jinja2 in a sandbox, strict about missing fields.

A template may come from a UI form, so it is rendered in Jinja2's `SandboxedEnvironment`: no
attribute starting with `_` (`''.__class__`, `cycler.__init__.__globals__`), no unsafe method,
`range` capped; and with bounds on work (`infra.recipes.sandbox`): steps, time and the size of
every value it builds, the rendered text at most `prompt_char_limit` characters. `StrictUndefined`
makes a missing field an error instead of an empty string. Each of these is a RenderError, which
the plan reports as a bad input line.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from jinja2 import TemplateError, TemplateSyntaxError

from infra.errors import ConfigError
from infra.recipes.sandbox import BoundedEnvironment, budget
from infra.storage import check_input, open_input

MAX_TEMPLATE_BYTES = 1 << 20
# A rendered prompt is refused past this many characters per context token, before it is held or
# counted (a token is ~4 characters of prose; 16 leaves room for long whitespace or code tokens).
PROMPT_CHARS_PER_TOKEN = 16
MIN_PROMPT_CHARS = 1 << 16
_URI = re.compile(r"^(s3://|file://)\S+$|^[^\s{}]+\.(j2|jinja|jinja2|txt)$")


def is_template_uri(value: str) -> bool:
    """A URI (s3://, file://) or a one-line path ending in .j2/.jinja/.jinja2/.txt; anything else is inline."""
    return bool(_URI.match(value.strip()))


def read_text(uri: str, settings, what: str, limit: int) -> bytes:
    """The bytes of a small local or s3 file, read whole (at most `limit` bytes)."""
    check_input(uri, settings.s3)
    with open_input(uri, settings.s3) as stream:
        data = stream.read(limit + 1)
    if len(data) > limit:
        raise ConfigError(f"{what} {uri} is larger than {limit} bytes: keep it small (it is held in memory).")
    return data


def prompt_char_limit(context_tokens: int) -> int:
    """The most characters a rendered prompt may have: a few times what could fit the context."""
    return max(PROMPT_CHARS_PER_TOKEN * context_tokens, MIN_PROMPT_CHARS)


def _environment() -> BoundedEnvironment:
    # autoescape off: prompts are text, not HTML. keep_trailing_newline: the text is exactly the file.
    return BoundedEnvironment(autoescape=False, keep_trailing_newline=True)


@dataclass(frozen=True)
class PromptTemplate:
    source: str  # where it came from: "inline" or the URI
    text: str
    parameter: str = "recipe.prompt_template"  # named in a syntax error

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    def compiled(self):
        try:
            template = _environment().from_string(self.text)
        except TemplateSyntaxError as exc:
            raise ConfigError(f"{self.parameter} ({self.source}) line {exc.lineno}: {exc.message}. "
                              "Fix the template's Jinja2 syntax.") from None
        # Jinja2 copies the globals into every render's context from a ChainMap, key by key through
        # its layers: a fifth of a short prompt's render. This environment is the template's own and
        # never changes, so one flat copy holds the same names.
        template.globals = dict(template.globals)
        return template


def load_template(value: str, settings, parameter: str = "recipe.prompt_template") -> PromptTemplate:
    if not is_template_uri(value):
        template = PromptTemplate("inline", value, parameter)
    else:
        data = read_text(value.strip(), settings, "prompt template", MAX_TEMPLATE_BYTES)
        try:
            template = PromptTemplate(value.strip(), data.decode("utf-8"), parameter)
        except UnicodeDecodeError as exc:
            raise ConfigError(f"prompt template {value} is not UTF-8 (byte {exc.start}).") from None
    template.compiled()  # a syntax error is the user's to fix, before any line is read
    return template


def render(compiled, context: dict, max_chars: int = MIN_PROMPT_CHARS) -> str:
    """The rendered text (at most `max_chars` characters, within one record's budget of steps and
    time), or raises RenderError with the reason."""
    pieces, size = [], 0
    with budget(max_chars):
        stream = compiled.generate(context)
        try:
            for piece in stream:  # streamed, so an oversized prompt is refused before it is built whole
                size += len(piece)
                if size > max_chars:
                    raise RenderError(f"the rendered prompt is longer than {max_chars} characters: shorten what the "
                                      "template writes for this record")
                pieces.append(piece)
        except TemplateError as exc:  # UndefinedError, SecurityError (a sandbox refusal), RenderLimit, ...
            raise RenderError(f"{type(exc).__name__}: {exc}") from None
        except (ArithmeticError, TypeError, ValueError, LookupError, AttributeError) as exc:
            raise RenderError(f"{type(exc).__name__}: {exc}") from None
        except RecursionError:  # a macro that calls itself: the template's, not a crash of the plan
            raise RenderError("RecursionError: the template recurses too deep (a macro calling itself?)") from None
        except MemoryError:
            raise RenderError("MemoryError: the template needs more memory than there is for one record") from None
        finally:
            stream.close()
    return "".join(pieces)


class RenderError(Exception):
    """A record the template cannot render; becomes a bad input line, never leaves infra/recipes."""
