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

import time
from dataclasses import dataclass

import regex

from infra.errors import ConfigError

SEARCH_SECONDS = 1.0  # CPU seconds for one search of one text: ample for any linear pattern on a long completion
# A pattern checked before anything runs (`backtracks`) searches short texts built to make it backtrack,
# within PROBE_SECONDS of CPU time in all: a linear pattern takes microseconds on each, and one that
# needs more on PROBE_CHARS characters needs far more than SEARCH_SECONDS on a reply a few times longer.
PROBE_SECONDS = 0.2
PROBE_CHARS = 64
_PROBE_UNITS = ("a", "1", " ", "A", ".", "_", "a ", "ab", "a1")  # what repetitions repeat: words, digits, spaces
_PROBE_ENDS = ("", "!", ",", "\x00", "\n")  # what makes the match fail at the end, so every split is tried
_PROBE_LITERALS = 8  # of the pattern's own characters, as units too


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


def backtracks(pattern: UserPattern) -> str | None:
    """Why the pattern backtracks catastrophically, or None: each unit repeated to PROBE_CHARS,
    then each end, searched within what is left of PROBE_SECONDS."""
    own = dict.fromkeys(c for c in pattern.pattern if c.isprintable() and c not in "\\^$.|?*+()[]{}")
    units = list(dict.fromkeys([*_PROBE_UNITS, *list(own)[:_PROBE_LITERALS]]))
    left = PROBE_SECONDS
    for unit in units:
        for end in _PROBE_ENDS:
            text = (unit * PROBE_CHARS)[:PROBE_CHARS] + end
            start = time.thread_time()
            try:
                pattern.compiled.search(text, timeout=max(left, 1e-3))
            except TimeoutError:
                return (f"searched {unit!r} repeated to {PROBE_CHARS} characters then {end!r} for more than "
                        f"{PROBE_SECONDS:g} s of CPU time: it backtracks catastrophically (a repeated alternation whose branches overlap, such as "
                        "(\\w|\\w\\w)+), and a longer reply would take hours. Rewrite it so each text splits one way "
                        "only (or make the repeated part atomic, (?>...))")
            left -= time.thread_time() - start
            if left <= 0:
                return (f"took over {PROBE_SECONDS:g} s of CPU time on {len(units) * len(_PROBE_ENDS)} texts of "
                        f"{PROBE_CHARS} characters: it backtracks catastrophically; rewrite it so each text splits one "
                        "way only")
    return None


def compile_pattern(pattern: str, what: str, rerun: str = UserPattern.rerun) -> UserPattern:
    """The pattern, or ValueError naming the parameter (a pydantic validator's error)."""
    try:
        return UserPattern(what, regex.compile(pattern), rerun)
    except regex.error as exc:
        raise ValueError(f"{what} {pattern!r} is not a valid regex: {exc}") from None


def checked_pattern(pattern: str, what: str, rerun: str = UserPattern.rerun) -> UserPattern:
    """As compile_pattern, and refused (ValueError) when it backtracks catastrophically on the probe texts:
    a settings check, so such a pattern is refused before the GPU is held, not at curation."""
    compiled = compile_pattern(pattern, what, rerun)
    if why := backtracks(compiled):
        raise ValueError(f"{what} {pattern!r} {why}")
    return compiled
