"""The user's regexes (`filters.must_match`, `filters.must_not_match`, `judge.score_pattern`, `split.pattern`):
compiled and searched here, and only here, with a time bound.

A pattern from a form field can backtrack catastrophically (`^\\s*(\\w+\\s?)+[.?!]?$` on a text with
a comma): `re` would search one completion for hours while holding the GIL, so even the run
lease's heartbeat thread stops and another run may take the run id over. These patterns run in
the `regex` module instead (`re`-compatible syntax), which releases the GIL while it matches and
takes a timeout (in CPU time, its clock()): a search past SEARCH_SECONDS fails the curation stage with the parameter's name,
its pattern and the fix. An error, not a dropped row: a pattern that slow on one text is as slow
on many, and silently filtering rows would change the training set behind the user's back.
"""

from __future__ import annotations

from dataclasses import dataclass

import regex

from infra.errors import ConfigError

SEARCH_SECONDS = 1.0  # CPU seconds for one search of one text: ample for any linear pattern on a long completion


@dataclass(frozen=True)
class UserPattern:
    what: str  # the parameter, as the user names it: "filters.must_match[0]"
    compiled: regex.Pattern
    rerun: str = "then rerun under the same run_id: only the curation stage reruns"  # the error's last step

    @property
    def pattern(self) -> str:
        return self.compiled.pattern

    def search(self, text: str) -> regex.Match | None:
        try:
            return self.compiled.search(text, timeout=SEARCH_SECONDS)
        except TimeoutError:
            raise self._too_slow(text) from None

    def finditer(self, text: str, limit: int) -> list[regex.Match]:
        """At most `limit` non-overlapping matches, in order; the whole scan within SEARCH_SECONDS."""
        found: list[regex.Match] = []
        try:
            for m in self.compiled.finditer(text, timeout=SEARCH_SECONDS):
                found.append(m)
                if len(found) >= limit:
                    break
        except TimeoutError:
            raise self._too_slow(text) from None
        return found

    def _too_slow(self, text: str) -> ConfigError:
        return ConfigError(
            f"{self.what} {self.pattern!r} searched one text of {len(text)} characters for more than "
            f"{SEARCH_SECONDS:g} s of CPU time: it backtracks catastrophically (nested repetition such as (\\w+\\s?)+). "
            "Rewrite it without repetition inside repetition (or make the inner part atomic, (?>...)), "
            f"{self.rerun}.")


def compile_pattern(pattern: str, what: str, rerun: str = UserPattern.rerun) -> UserPattern:
    """The pattern, or ValueError naming the parameter (a pydantic validator's error)."""
    try:
        return UserPattern(what, regex.compile(pattern), rerun)
    except regex.error as exc:
        raise ValueError(f"{what} {pattern!r} is not a valid regex: {exc}") from None
