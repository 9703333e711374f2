"""The plan step: everything that can be checked before a GPU is asked for.

Validates the input (every line), the output location, and the resume state: which shards are
already published under the same config hash. A rerun whose config differs is refused with the
differing fields named.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from infra.prompting.dataset import BadLine, Format, Record, Shard, detect_format, iter_input, iter_shards, shard_count
from infra.errors import ConfigError, InputError
from infra.run import input_scan
from infra.run.input_scan import Scan
from infra.storage.scratch import IdSet
from infra.storage.input_pin import InputPin
from infra.run.layout import INPUT_REJECTS, RUN_CONFIG, STATE_SUFFIX, TEMP_FILES, left_by_a_kill, part_name, state_name
from infra.run.manifest import PartInfo, config_hash, diff_config
from infra.prompting.prompt_format import RAW, PromptFormat
from infra.recipes import Recipe, RecipeParams
from infra.recipes.recipe import TEMPLATE_FAILS
from infra.recipes.curate import Curation
from infra.prompting.sampling import SamplingParams
from infra.engines import served_model
from infra.settings import Settings
from infra.run.states import published_part
from infra.storage import OutputStore, check_input, look_at_input, open_input
from infra.prompting.tokens import ByteEstimate, TokenCounter, check_fits_context, count_within_begun

log = logging.getLogger(__name__)
SHOWN_PROBLEMS = 10
COUNT_CHUNK = 1024  # input lines per tokenizer call in the plan's scan and the generation pass
COUNT_CHUNK_CHARS = 1 << 24  # and at most about this many prompt characters held for one call (plus one prompt)


@dataclass(frozen=True)
class RunConfig:
    """Validated flow parameters, resolved against the settings."""

    input_uri: str
    output_uri: str
    run_id: str
    profile: str
    sampling: SamplingParams
    batch_size: int
    shard_size: int
    prompt_field: str
    id_field: str
    on_bad_input: str
    overlong_prompts: str = "reject"
    # The run's one token counter (infra.prompting.tokens.token_counter of its tokenizer), built
    # once with the config: the plan, the clients and the judge count with this very object.
    counter: TokenCounter = ByteEstimate()
    prompt_format: PromptFormat = RAW
    recipe: Recipe = Recipe(RecipeParams())  # loaded once at flow start (infra.recipes.load_recipe)
    # The judge and filters: later stages, kept out of `fingerprint` so changing them reruns only them.
    curation: Curation = Curation()
    output_schema: dict | None = None  # the reply's JSON Schema (infra/recipes/structured.py)
    max_attempts: int = 3

    @property
    def input_prompt_field(self) -> str | None:
        """None when the recipe's template builds the prompt: no line needs a prompt field."""
        return None if self.recipe.templated else self.prompt_field

    def fingerprint(self, input_sha256: str, fmt: Format, settings: Settings) -> dict:
        """What changes the content of a part (not where or how fast it is made)."""
        return {
            "input_sha256": input_sha256,
            "format": fmt,
            "prompt_field": self.prompt_field,
            "id_field": self.id_field,
            "shard_size": self.shard_size,
            "sampling": self.sampling.model_dump(mode="json"),
            "model": settings.model.name,  # the name requests carry, not what answers them:
            "served_model": served_model.expected(settings, settings.profile(self.profile)),  # what is served
            "context_length": settings.model.context_length,
            "overlong_prompts": self.overlong_prompts,
            # Which prompts fit, and so which records exist and where shards begin.
            "token_counter": self.counter.identity,
            "prompt_format": self.prompt_format.identity(),  # what is sent, hence what comes back
            **self.recipe.fingerprint(),
            # A seeded request's rows depend on their batch's make-up (infra.prompting.samples).
            **({"batch_size": self.batch_size} if self.sampling.random_seed is not None else {}),
            # Which replies are kept and how often a row is asked again (absent without one: older hashes hold).
            **({"output_schema": self.output_schema, "max_attempts": self.max_attempts}
               if self.output_schema is not None else {}),
        }


@dataclass
class Plan:
    run_id: str
    input_uri: str
    format: Format
    records_in: int
    rejected: int
    shards_total: int
    config: dict
    config_hash: str
    done: dict[int, PartInfo] = field(default_factory=dict)
    # Lines whose id an earlier line already had: the generation pass skips them by number
    # instead of remembering every id a second time.
    duplicate_lines: frozenset[int] = frozenset()
    input_pin: InputPin | None = None  # what the plan read: the generation pass must read the same
    samples: int = 1  # output rows per record (the recipe's samples_per_prompt)

    @property
    def rows_planned(self) -> int:
        return self.records_in * self.samples

    @property
    def todo(self) -> list[int]:
        return [i for i in range(self.shards_total) if i not in self.done]


class _HashingReader:
    """Hashes the bytes as the scan reads them, so the input is read once."""

    def __init__(self, raw):
        self.raw = raw
        self.sha = hashlib.sha256()

    def readline(self, limit: int = -1) -> bytes:
        chunk = self.raw.readline(limit)
        self.sha.update(chunk)
        return chunk


def scan_input(cfg: RunConfig, settings: Settings, rejects_file) -> Scan:
    """Read every line once: count usable records, collect problems (first few shown, all
    written to `rejects_file`), and hash the bytes."""
    fmt = detect_format(cfg.input_uri)
    records, bad_count, shown = 0, 0, []
    source = open_input(cfg.input_uri, settings.s3)
    with RecordCheck(cfg, settings) as check, source as stream:
        reader = _HashingReader(stream)
        items = iter_input(reader, fmt, cfg.input_prompt_field, cfg.id_field)
        # Counted a chunk at a time: one tokenizer call per chunk, not per prompt (input order kept);
        # each chunk's count begun before the next is read (counting workers go on meanwhile).
        for chunk, counts in _counted_ahead(_rendered_chunks(items, check), check):
            tokens = iter(counts)
            for item in chunk:
                if isinstance(item, Record):
                    item = check(item, next(tokens), rendered=True)
                if isinstance(item, BadLine):
                    bad_count += 1
                    if len(shown) < SHOWN_PROBLEMS:
                        shown.append(item)
                    rejects_file.write(json.dumps(item.as_reject(cfg.input_uri)) + "\n")
                else:
                    records += 1
        duplicates = frozenset(check.duplicate_lines)
        checked_at = time.time_ns()  # before the last check: a write after it moves the file's ctime past this
        source.verify()  # the bytes hashed are the bytes the pin describes
        pin = replace(source.pin, sha256=reader.sha.hexdigest())
    return Scan(records, bad_count, shown, reader.sha.hexdigest(), fmt, duplicates, pin, checked_at)


def _counted_ahead(chunks: Iterator[list[Record | BadLine]], check: "RecordCheck"):
    """Each chunk with its records' counts, the next chunk read and its count begun first."""
    ahead = None
    for chunk in chunks:
        begun = check.counts_begun([x for x in chunk if isinstance(x, Record)])
        if ahead is not None:
            yield ahead[0], ahead[1]()
        ahead = (chunk, begun)
    if ahead is not None:
        yield ahead[0], ahead[1]()


def _rendered_chunks(items: Iterator[Record | BadLine], check: "RecordCheck") -> Iterator[list[Record | BadLine]]:
    """The scan's items, records rendered, in chunks of COUNT_CHUNK lines or COUNT_CHUNK_CHARS
    prompt characters, whichever comes first: a chunk of long rendered prompts (each at most the
    recipe's prompt_char_limit, a longer one is a bad line before it is held) stays small."""
    chunk: list[Record | BadLine] = []
    chars = 0
    for item in items:
        if isinstance(item, Record) and isinstance(item := check.rendered(item), Record):
            chars += len(item.prompt)
        chunk.append(item)
        if len(chunk) >= COUNT_CHUNK or chars >= COUNT_CHUNK_CHARS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


class RecordCheck:
    """The checks on a parsed record beyond its line: fits the context, id not seen before.
    The plan and the generation pass both use it, so shards hold exactly what the plan counted.

    The plan finds duplicate ids, given or derived, with an IdSet (on disk: memory stays flat)
    and notes their lines; the generation pass is given those lines (`known_duplicates`) and
    keeps no ids. The later of two lines with one id is the duplicate."""

    def __init__(self, cfg: RunConfig, settings: Settings, known_duplicates: frozenset[int] | None = None):
        self.sampling, self.context = cfg.sampling, settings.model.context_length
        self.counter = cfg.counter
        self.truncate = cfg.overlong_prompts == "truncate_left"
        self.wrap = cfg.prompt_format.wrap  # the wrapped text is what the server sees and counts
        self.wrapper_tokens = self.counter.count(self.wrap("")) if cfg.prompt_format != RAW else 0
        self.derived_only = detect_format(cfg.input_uri) == "text"  # a text line cannot name its id
        self.known_duplicates = known_duplicates
        self.seen = IdSet() if known_duplicates is None else None
        self.duplicate_lines: list[int] = []
        self.render = cfg.recipe.renderer()  # the template, when the recipe has one

    def __enter__(self) -> "RecordCheck":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.seen is not None:
            self.seen.close()

    def rendered(self, rec: Record) -> Record | BadLine:
        """The record with its prompt rendered from the recipe's template (a BadLine if it cannot be)."""
        return rec if self.render is None else self.render(rec)

    def counts(self, recs: list[Record]) -> list[int]:
        """The rendered records' prompt tokens in one batch; exact wherever a prompt might not fit."""
        return self.counter.count_within([self.wrap(r.prompt) for r in recs], self._fits())

    def counts_begun(self, recs: list[Record]) -> Callable[[], list[int]]:
        """`counts(recs)` begun now where the counter counts in the background (its worker processes)."""
        return count_within_begun(self.counter, [self.wrap(r.prompt) for r in recs], self._fits())

    def _fits(self) -> int:
        return self.context - self.sampling.tokens_to_generate - (1 if self.sampling.add_BOS else 0)

    def __call__(self, rec: Record, tokens: int | None = None, *, rendered: bool = False) -> Record | BadLine:
        """`tokens`: the record's count from `counts`, when the caller batched them (and so
        rendered the record first: `rendered=True`)."""
        if not rendered and isinstance(rec := self.rendered(rec), BadLine):
            return rec
        first = self.counter.count if tokens is None else (lambda _text: tokens)
        reason = check_fits_context(self.wrap(rec.prompt), self.sampling, self.context, first)
        if reason is not None and self.truncate:
            # Keep the prompt's end, where a completion continues from.
            room = self.context - self.sampling.tokens_to_generate - self.wrapper_tokens
            kept = self.counter.keep_last(rec.prompt, room)
            if kept.strip():
                rec = replace(rec, prompt=kept, fields={**rec.fields, "prompt_truncated_left": True})
                reason = check_fits_context(self.wrap(rec.prompt), self.sampling, self.context, self.counter.count)
        if reason is not None:
            return BadLine(rec.line, f"{reason} (counted with {self.counter.description})", rec.prompt[:200])
        if not rec.given_id and self.derived_only:
            return rec  # every id derived from its line number: unique by construction
        # Given and derived ids share one namespace: a given id may equal another line's derived
        # id (earlier output mixed back into the input), so both go through the one IdSet.
        if self.seen is not None and not self.seen.add(rec.id):
            self.duplicate_lines.append(rec.line)
        elif self.known_duplicates is None or rec.line not in self.known_duplicates:
            return rec
        return BadLine(rec.line, f"duplicate id {rec.id!r}", rec.prompt[:200])


def usable_records(stream, cfg: RunConfig, settings: Settings, fmt: Format,
                   duplicate_lines: frozenset[int] = frozenset()) -> Iterator[Record]:
    """The records the plan counted, in input order; `duplicate_lines` comes from the plan."""
    check = RecordCheck(cfg, settings, known_duplicates=duplicate_lines)
    # Counted a chunk at a time, as the plan counts (one prompt at a time, every prompt was encoded).
    for chunk in _rendered_chunks(iter_input(stream, fmt, cfg.input_prompt_field, cfg.id_field), check):
        tokens = iter(check.counts([x for x in chunk if isinstance(x, Record)]))
        for item in chunk:
            if isinstance(item, Record) and isinstance(rec := check(item, next(tokens), rendered=True), Record):
                yield rec


def planned_shards(stream, cfg: RunConfig, settings: Settings, plan: Plan, verify: Callable[[], None]) -> Iterator[Shard]:
    """The shards the plan counted, not yet published, from a second read of its input: never
    more records than the plan counted, and `verify()` (is the input still what the plan read?)
    passes before the last one is handed out."""
    records = usable_records(stream, cfg, settings, plan.format, plan.duplicate_lines)
    return iter_shards(_at_most(records, plan.records_in, verify), cfg.shard_size, skip=frozenset(plan.done))


def _at_most(records: Iterator[Record], count: int, verify: Callable[[], None]) -> Iterator[Record]:
    n = 0
    for n, rec in enumerate(records, 1):
        if n == count:
            verify()
        yield rec
        if n == count:
            return
    verify()  # fewer than planned: the input shrank, which the check names


def _problems_message(cfg: RunConfig, bad_count: int, shown: list[BadLine], records: int = 0) -> str:
    reasons = {b.reason for b in shown}
    if records == 0 and len(reasons) == 1 and shown[0].reason.startswith(TEMPLATE_FAILS):
        # Every line fails the template the same way: the template is wrong, not the input, and
        # on_bad_input='skip' would drop every record (issue 27: ten identical lines, then that advice).
        return (f"recipe.prompt_template fails on every one of the {bad_count} line(s) of {cfg.input_uri} the same way: "
                f"{shown[0].reason.removeprefix(TEMPLATE_FAILS)}. The template is wrong, not the input: the records "
                f"have {_fields_of(shown[0].raw)}; fix the template's names.")
    lines = "\n".join(f"  line {b.line}: {b.reason}" for b in shown)
    more = f"\n  … and {bad_count - len(shown)} more" if bad_count > len(shown) else ""
    return (
        f"Input {cfg.input_uri} has {bad_count} unusable line(s):\n{lines}{more}\n"
        "Fix these lines, or run with on_bad_input='skip' to write them to rejects.jsonl and go on."
    )


def _fields_of(raw: str) -> str:
    """The field names of a refused record, from its reject's (possibly cut) JSON."""
    names = re.findall(r'(?:^\{|, )"((?:[^"\\]|\\.)*)":', raw)
    return "the fields " + ", ".join(names) if names else "no fields the template could use"


def load_published(store: OutputStore, chash: str) -> dict[int, PartInfo]:
    """The shards done under config `chash`: a state whose part file still has the sha256 it names
    (infra.run.states); a part rewritten after its state (a kill in between) is generated again."""
    done: dict[int, PartInfo] = {}
    for name in store.list_names():
        if not name.endswith(STATE_SUFFIX):
            continue
        part = published_part(store, name.removesuffix(STATE_SUFFIX), chash)
        if part is not None and state_name(part_name(part.shard)) == name:
            done[part.shard] = part
    return done


def check_run_config(store: OutputStore, config: dict, chash: str) -> None:
    data = store.read_bytes(RUN_CONFIG)
    if data is None:
        store.write_bytes(RUN_CONFIG, json.dumps({"config_hash": chash, "config": config}, indent=2, sort_keys=True).encode())
        return
    old = json.loads(data)
    if old.get("config_hash") != chash:
        diffs = "\n  ".join(diff_config(old.get("config", {}), config)) or "(fields unknown)"
        raise ConfigError(
            f"Run {store.location} was started with a different configuration:\n  {diffs}\n"
            "Rerun with the original parameters and input to resume, or start over under a new id "
            "(`nemotron-sdg run --new-run`, or another run_id)."
        )


def discard_partials(store: OutputStore) -> None:
    """A run killed mid-write leaves temp files behind (a part's, kept rows', the manifest's ...) in its
    directory, or an S3 run's staging directory; they are never appended to, only removed. Plain
    files only: a link or folder of that name is no writer's."""
    for tmp in store.staging_dir().glob(TEMP_FILES):
        try:
            plain = stat.S_ISREG(tmp.lstat().st_mode)
        except FileNotFoundError:
            continue
        if plain and left_by_a_kill(tmp.name):
            log.info("discarding half-written %s", tmp)
            tmp.unlink(missing_ok=True)


def make_plan(cfg: RunConfig, settings: Settings, store: OutputStore) -> Plan:
    check_input(cfg.input_uri, settings.s3)
    store.preflight()
    discard_partials(store)
    store.abort_incomplete_uploads()  # uploads an earlier, killed attempt left open
    # The last full scan's findings while the input is the object it read (infra/run/input_scan.py).
    scan, rejects_path = input_scan.recorded(
        store, lambda sha, fmt: input_scan.key_hash(cfg.fingerprint(sha, fmt, settings), cfg),
        lambda: look_at_input(cfg.input_uri, settings.s3)), None
    if scan is None:
        with tempfile.NamedTemporaryFile("w+", suffix=".rejects.jsonl", delete=False) as rejects:
            scan = scan_input(cfg, settings, rejects)
        rejects_path = Path(rejects.name)
    records, bad, shown, input_sha, fmt = scan.records, scan.bad, scan.shown, scan.input_sha256, scan.format
    try:
        if bad and cfg.on_bad_input == "fail":
            raise InputError(_problems_message(cfg, bad, shown, records))
        if records == 0:
            raise InputError(f"Input {cfg.input_uri} has no usable prompt ({bad} unusable line(s)). Check input_uri and prompt_field={cfg.prompt_field!r}.")
        config = cfg.fingerprint(input_sha, fmt, settings)
        chash = config_hash(config)
        check_run_config(store, config, chash)
        if bad:
            log.warning("%d unusable input line(s) skipped; they will be listed in rejects.jsonl", bad)
            if rejects_path is not None:  # a reused scan's list is there already, the bytes it wrote
                store.write_bytes(INPUT_REJECTS, rejects_path.read_bytes())
        elif store.read_bytes(INPUT_REJECTS):
            store.write_bytes(INPUT_REJECTS, b"")  # an earlier plan's list is not this plan's
        if not scan.reused:
            input_scan.record(store, scan, input_scan.key_hash(config, cfg))
    finally:
        if rejects_path is not None:
            rejects_path.unlink(missing_ok=True)
    plan = Plan(cfg.run_id, cfg.input_uri, fmt, records, bad, shard_count(records, cfg.shard_size), config, chash,
                load_published(store, chash), scan.duplicate_lines, scan.pin, cfg.recipe.samples)
    log.info("plan: %d records in %d shards, %d already published, %d rejected; prompt format %s; tokens counted with %s%s",
             records, plan.shards_total, len(plan.done), bad, cfg.prompt_format.name, cfg.counter.description,
             "; input unchanged since the run's last scan of it, not read again" if scan.reused else "")
    return plan
