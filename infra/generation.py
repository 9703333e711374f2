"""One shard: batches of prompts through the server, records written to a part file, the part
published atomically with its checksum and a state object that marks the shard done.

The client sends the shard's prompts the way its API is fed (infra/engines/batch.py); a prompt
the server refused becomes a reject with the server's message, the rest are generated. A circuit
breaker stops the run when too many recent records fail.

Each request's results are kept in the shard's spill as they come back (infra/storage/spill.py),
so the next try of an unfinished shard (a task retry, or a resume after kill -9) asks only for the
requests that never came back: a kill costs the requests in flight, not the shard.

With an output_schema (infra/recipes/structured.py) each reply is parsed and validated; the rows
whose reply is not a value of the schema are asked again, as one batch per attempt, up to
max_attempts in all, each attempt's seed derived from the run's seed, the shard and the attempt
(so a seeded run asks again the same way); a row still invalid keeps its last reply and error in
`generation.structured`, which the curation stage drops as schema_invalid.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

from infra.prompting.batching import DEFAULT_WINDOW_BATCHES
from infra.prompting.dataset import RESERVED_FIELDS, Record, Shard
from infra.errors import CircuitOpen, RequestRejected, ServerLost, TransientServerError
from infra.run.layout import rejects_name, state_name
from infra.run.manifest import PartInfo
from infra.engines.batch import GeneratedText, PromptBatch, Result, result_from_json, result_to_json
from infra.engines.http import HttpClient
from infra.prompting.prompt_format import RAW, PromptFormat
from infra.recipes.judge import Judge, judge_part, judged_current
from infra.recipes.lineage import ROW_FIELDS
from infra.recipes.structured import Invalid, Parsed, Structured, reply_fields
from infra.prompting.samples import request_seed
from infra.prompting.plan_identity import plan_identity, resume_plan
from infra.prompting.sampling import SamplingParams
from infra.run.states import invalidate, published_part
from infra.storage import OutputStore
from infra.storage.jsonl import publish
from infra.storage.spill import Spill, discard_spill

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardJob:
    """Everything a shard needs besides its records; shared by every shard of a run."""

    run_id: str
    model: str  # the served model (infra/engines/served_model.py ServedModel.label), which the rows name
    config_hash: str
    sampling: SamplingParams
    batch_size: int
    length_window: int = DEFAULT_WINDOW_BATCHES  # batches' worth sorted by length together (a default shard whole; the run's counter)
    prompt_format: PromptFormat = RAW
    samples: int = 1  # rows per record: the recipe's samples_per_prompt
    # Who makes the shard, recorded in its state: the replica, its Slurm job(s), the flow run.
    replica: int | None = None
    job_ids: tuple[str, ...] = ()
    invocation: str | None = None
    judge: "Judge | None" = None  # the recipe's judge (infra.recipes.judge), on the same server
    requested_model: str | None = None  # NSDG_MODEL__NAME: the name requests carry, whatever answers them
    structured: Structured | None = None  # the run's output_schema, checked
    max_attempts: int = 1  # with `structured`: requests per row for a valid reply
    stage: str | None = None  # a pipeline's stage: its shard tasks are named after it (tasks/steps.py)

    @property
    def stage_prefix(self) -> str:
        """`answers-` for a pipeline's stage (`generate-answers-shard-3`), empty for a plain run."""
        return f"{self.stage}-" if self.stage else ""


@dataclass(frozen=True)
class ShardResult:
    part: PartInfo
    generated_tokens: int
    seconds: float
    upload_seconds: float
    started_at: float  # wall clock, for busy intervals across shards
    finished_at: float
    judged_only: bool = False  # a published part judged anew: no generation in it


class Breaker:
    """Trips when more than `max_share` of the last `window` records failed. Shared by the
    shards running at once, hence the lock."""

    def __init__(self, window: int = 500, max_share: float = 0.10):
        self.window, self.max_share = window, max_share
        self._outcomes: deque[bool] = deque(maxlen=window)
        self._failed = 0  # failures now in the window, kept as outcomes enter and leave
        self._reasons: Counter[str] = Counter()
        self._lock = threading.Lock()

    def record(self, ok: bool, reason: str | None = None) -> None:
        with self._lock:
            if len(self._outcomes) == self.window and not self._outcomes[0]:
                self._failed -= 1
            self._outcomes.append(ok)
            if not ok:
                self._failed += 1
                self._reasons[(reason or "unknown")[:120]] += 1
            failed = self._failed
            if failed > self.max_share * self.window:
                top = "; ".join(f"{n}× {r}" for r, n in self._reasons.most_common(3))
                raise CircuitOpen(
                    f"{failed} of the last {len(self._outcomes)} records failed (limit {self.max_share:.0%} of "
                    f"{self.window}). Most common: {top}. Fix the prompts or sampling parameters and rerun "
                    "with the same run_id: published shards are kept."
                )


# The GIL switch interval while shards are generated (Python's default: 5 ms). A shard thread whose
# request slot just freed needs the GIL to send its next request; another shard thread parsing a reply,
# keeping it or publishing its part holds it up to the interval, while the server, its other request
# done, waits. Measured on the zero-cost stand-in, 3 shard threads over 2 request slots without Prefect
# (2 cores loaded by other work, so noisy): records/s ÷ the bare client's, median of 7 interleaved
# rounds, 0.68 at 5 ms and 0.83 at 0.5 ms. More switches cost the shard threads little CPU. Used for
# nemo-generate only (flows/generate.py shard_switch_interval): the openai-completions client's 256
# request threads were not measured apart from the noise.
SHARD_SWITCH_INTERVAL_S = 0.0005
_switch_lock = threading.Lock()
_switch = {"users": 0, "found": 0.0}  # pools generating now, and the interval the first of them found


@contextlib.contextmanager
def responsive_threads(interval_s: float | None = SHARD_SWITCH_INTERVAL_S) -> Iterator[None]:
    """The process's GIL switch interval at most `interval_s` while generating (a replica pool's run);
    the one found is set back when the last of those running at once ends (a pipeline runs pools side
    by side). Never raises it: a process that chose a shorter one keeps it. None: leaves it alone."""
    if interval_s is None:
        yield
        return
    with _switch_lock:
        if _switch["users"] == 0:
            _switch["found"] = sys.getswitchinterval()
            sys.setswitchinterval(min(_switch["found"], interval_s))
        _switch["users"] += 1
    try:
        yield
    finally:
        with _switch_lock:
            _switch["users"] -= 1
            if _switch["users"] == 0:
                sys.setswitchinterval(_switch["found"])


class RowTally:
    """Rows generated so far by each shard not yet published: progress within a shard, which takes
    minutes on a big model (issue 27: the UI and the CLI showed nothing until a shard's end). A
    shard's try starts its count afresh (a retry regenerates it); the flow drops it once the part is
    published and counted there. `listener(rows)` gets the sum on every change, from the shards'
    threads: it throttles itself."""

    def __init__(self, listener: Callable[[int], None] = lambda rows: None):
        self._listener = listener
        self._rows: dict[int, int] = {}
        self._lock = threading.Lock()

    def _changed(self, shard: int, rows: int | None) -> None:
        with self._lock:
            if rows is None:
                self._rows.pop(shard, None)
            else:
                self._rows[shard] = rows if rows == 0 else self._rows.get(shard, 0) + rows
            total = sum(self._rows.values())
        self._listener(total)

    def started(self, shard: int) -> None:
        self._changed(shard, 0)

    def generated(self, shard: int, rows: int = 1) -> None:
        self._changed(shard, rows)

    def published(self, shard: int) -> None:
        self._changed(shard, None)


Checked = tuple[int, Parsed | Invalid]  # attempts made, and the last reply's value or error


def output_record(rec: Record, gen: GeneratedText, job: ShardJob, shard: int, sample: int = 0,
                  checked: Checked | None = None) -> dict:
    # The input's own fields pass through; ours win a name clash and theirs keep an input_ prefix.
    # A valid structured reply's fields are ours too.
    own = reply_fields(checked[1].value, ROW_FIELDS) if checked and isinstance(checked[1], Parsed) else {}
    passthrough = {(f"input_{k}" if k in RESERVED_FIELDS or k in own else k): v for k, v in rec.fields.items()}
    return {
        **passthrough,
        "id": rec.id,
        "sample": sample,  # (id, sample) is the row's key, stable across reruns
        "prompt": rec.prompt,
        "completion": gen.completion.text,
        "generation": {
            "model": job.model,
            "requested_model": job.requested_model,
            "run_id": job.run_id,
            "shard": shard,
            "input_line": rec.line,
            "finish_reason": gen.completion.finish_reason,
            "prompt_match": gen.completion.prompt_match,
            "prompt_format": job.prompt_format.name,
            "generated_tokens": gen.generated_tokens,
            # NeMo >= 2.1's /v1/completions reports whitespace-split words as its usage.
            **({"generated_tokens_unit": gen.tokens_unit} if gen.tokens_unit != "tokens" else {}),
            # A row cut to tokens_to_generate (NeMo's /generate runs short prompts past it): what the server made.
            **({"server_tokens": gen.server_tokens} if gen.server_tokens is not None else {}),
            **({"structured": {"attempts": checked[0], **({"error": checked[1].error} if isinstance(checked[1], Invalid)
                                                          else {})}} if checked else {}),
        },
        **own,
    }


def reject_record(rec: Record, exc: RequestRejected, shard: int, sample: int = 0) -> dict:
    return {"id": rec.id, "sample": sample, "line": rec.line, "shard": shard, "stage": "generation",
            "status": exc.status, "reason": str(exc.body if exc.body is not None else exc)[:500]}


def generate_shard_results(client: HttpClient, shard: Shard, job: ShardJob, breaker: Breaker | None = None,
                           tally: RowTally | None = None, spill: Spill | None = None) -> list[Result]:
    """One result per (record, sample), record-major (row i * samples + s), through whichever API
    the client speaks (infra/engines/batch.py); each result counts in the breaker as it comes in, and
    each request's rows in the tally once all are in. With a spill, the results it kept are not asked
    again (nor counted in the breaker a second time), and each request's results are appended to it
    once all are in."""
    size = len(shard.records) * job.samples
    done = {p: result_from_json(r) for p, r in (spill.kept if spill is not None else {}).items() if 0 <= p < size}
    batch = PromptBatch([r.prompt for r in shard.records], job.sampling, job.prompt_format, job.samples, shard.index,
                        job.batch_size, job.length_window, [r.line for r in shard.records], done=done,
                        output_schema=job.structured.schema if job.structured is not None else None)

    def record(result: Result) -> None:
        ok = isinstance(result, GeneratedText)
        breaker.record(ok, None if ok else str(result.body))  # type: ignore[union-attr]

    def keep(results: list[tuple[int, Result]]) -> None:
        if spill is not None:
            spill.append([(p, result_to_json(r)) for p, r in results])
        if tally is not None:  # per request, not per row: a request's rows come in together anyway
            tally.generated(shard.index, len(results))

    if tally is not None:
        tally.started(shard.index)
        if done:
            tally.generated(shard.index, len(done))
    return client.generate_batch(batch, record if breaker is not None else None,
                                 keep if spill is not None or tally is not None else None)


def spill_header(store: OutputStore, shard: Shard, job: ShardJob) -> dict:
    """What a spill's results belong to: kept results are reused only under all of it."""
    return {"config_hash": job.config_hash, "part": store.uri(shard.name), "records": len(shard.records),
            "first_line": shard.records[0].line, "last_line": shard.records[-1].line, "samples": job.samples,
            "plan": plan_identity(job.batch_size, job.length_window)}  # compared apart: run_shard


def structured_results(client: HttpClient, shard: Shard, job: ShardJob,
                       results: list[Result]) -> tuple[list[Checked | None], int]:
    """Each result's check against the schema (None for a rejected prompt), after asking again for
    the invalid ones: attempt a's batch holds the rows still invalid, in row order, one sample each,
    seeded from (seed, shard, -a) so no attempt's seed is a first request's (those use batch >= 0).
    A greedy run asks once: the same prompt would get the same reply. Also the tokens generated
    for replies that were replaced: the server made them, so the part's tokens count them."""
    schema = job.structured
    checked: list[Checked | None] = [(1, schema.check(r.completion.text)) if isinstance(r, GeneratedText) else None
                                     for r in results]
    attempts, replaced = 1 if job.sampling.greedy else job.max_attempts, 0
    for attempt in range(2, attempts + 1):
        todo = [i for i, c in enumerate(checked) if c is not None and isinstance(c[1], Invalid)]
        if not todo:
            break
        seed = job.sampling.random_seed
        sampling = job.sampling if seed is None else job.sampling.model_copy(
            update={"random_seed": request_seed(seed, shard.index, -attempt, 0)})
        records = [shard.records[i // job.samples] for i in todo]
        again = client.generate_batch(PromptBatch([r.prompt for r in records], sampling, job.prompt_format, 1, shard.index,
                                                  job.batch_size, job.length_window, [r.line for r in records],
                                                  output_schema=schema.schema))
        for i, result in zip(todo, again):
            if isinstance(result, GeneratedText):  # a refused retry keeps the earlier reply
                replaced += results[i].generated_tokens
                results[i] = result
                checked[i] = (attempt, schema.check(result.completion.text))
            else:
                checked[i] = (attempt, checked[i][1])
    return checked, replaced



def run_shard(client: HttpClient, shard: Shard, job: ShardJob, store: OutputStore,
              dead_reason: Callable[[], str | None] = lambda: None, breaker: Breaker | None = None,
              tally: RowTally | None = None) -> ShardResult:
    """`dead_reason` tells a dead server from a hiccup: a transient error from a server whose
    process or job is gone becomes ServerLost, which no retry can fix.

    A shard whose part an earlier try published (its judging then failed, and the task was retried
    or requeued) is judged alone, never generated again."""
    started, started_at = time.monotonic(), time.time()
    if (published := published_part(store, shard.name, job.config_hash)) is not None:
        discard_spill(store.staging_dir(), shard.name)  # that try was killed before it removed it
        return _judge_published(client, published, job, store, dead_reason, started, started_at)
    # A fenced store's lease (infra/run/lease.py FencedStore) fences the spill's appends too.
    fence = getattr(getattr(store, "lease", None), "check_held", None)
    with Spill.open(store.staging_dir(), shard.name, header := spill_header(store, shard, job), fence,
                    job.job_ids, {"invocation": job.invocation, "replica": job.replica}) as spill:
        if not spill.kept and spill.plan != header["plan"]:
            spill.restart()  # nothing kept yet: this try's plan in its header, or its appends would be read as the old's
        elif spill.plan != header["plan"]:  # never two batch make-ups in one seeded shard
            # Only NeMo's requests are batches whose seeds follow the plan; OpenAI's are one prompt each.
            batched = getattr(client, "api", None) == "nemo-generate"  # (a pipeline's reused-rows client has none)
            plan, line = resume_plan(spill.plan, header["plan"], shard=shard.index,
                                     seeded=job.sampling.random_seed is not None and batched)
            log.warning(line)
            if plan is None:
                spill.restart()
            else:
                job = replace(job, batch_size=plan["batch_size"], length_window=plan["window"])
        if spill.kept:
            log.info("shard %d: %d of %d results kept by an earlier try (%s); asking for the rest", shard.index,
                     len(spill.kept), len(shard.records) * job.samples, spill.path)
        try:
            results = generate_shard_results(client, shard, job, breaker, tally, spill)
            # The retries are not kept in the spill: a resumed shard asks them again (the same seeds).
            checks, replaced = structured_results(client, shard, job, results) if job.structured is not None \
                else ([None] * len(results), 0)
        except TransientServerError as exc:
            if (reason := dead_reason()) is not None:
                raise ServerLost(f"shard {shard.index}: the server is gone: {reason}") from exc
            raise
        generated = time.monotonic()
        # One pass over the results (row k is record k // samples, sample k % samples), one over the rows kept:
        # a shard's bookkeeping runs per record, in the thread that feeds the server (issue 28).
        ok, rejected, samples = [], [], job.samples
        for k, (g, c) in enumerate(zip(results, checks)):
            rec, s = shard.records[k // samples], k % samples
            if isinstance(g, GeneratedText):
                ok.append((rec, s, g, c))
            else:
                rejected.append(reject_record(rec, g, shard.index, s))
        invalidate(store, state_name(shard.name))  # a state of an earlier part must not outlive it (infra.run.states)
        if rejected:  # before the part and its state: a published state implies both
            publish(store, rejects_name(shard.name), rejected)
        out, tokens, matches = [], replaced, Counter()  # out: one shard's rows, which the judge reads too
        for r, s, g, c in ok:
            out.append(output_record(r, g, job, shard.index, s, c))
            tokens += g.generated_tokens
            matches[g.completion.prompt_match] += 1
        sha, count, size = publish(store, shard.name, out)
        part = PartInfo(shard.name, shard.index, count, sha, size, job.config_hash,
                        shard.records[0].line, shard.records[-1].line, rejected=len(rejected),
                        generated_tokens=tokens, seconds=round(time.monotonic() - started, 3), started_at=started_at,
                        # Every job that made its rows: an earlier try's kept results came from its jobs.
                        finished_at=time.time(), replica=job.replica,
                        job_ids=list(dict.fromkeys([*spill.kept_jobs, *job.job_ids])),
                        invocation=job.invocation, prompt_match=dict(matches),
                        kept_from=list(spill.kept_by))
        store.write_bytes(part.state_name(), part.to_json())
        spill.remove()  # after the state: a kill in between leaves a spill of a published part, removed when seen
    if job.judge is not None:  # after the part's state: a kill here leaves a part to judge, not to regenerate
        _judging(lambda: judge_part(client, store, job.judge, part, job.batch_size, rows=out), shard.index, dead_reason)
    done = time.monotonic()
    log.info("shard %d: %d records, %d rejected, %d tokens, published %s", shard.index, count, len(rejected), tokens, store.uri(shard.name))
    return ShardResult(part, tokens, done - started, done - generated, started_at, time.time())


def _judge_published(client: HttpClient, part: PartInfo, job: ShardJob, store: OutputStore,
                     dead_reason: Callable[[], str | None], started: float, started_at: float) -> ShardResult:
    """The shard as an earlier try of this task published it, judged if its judgement is not current.
    Reported as generated (not `judged_only`): that try failed, so its part was never reported."""
    log.info("shard %d: its part is already published (%s); judging it only", part.shard, store.uri(part.name))
    if job.judge is not None and not judged_current(store, job.judge, part):
        _judging(lambda: judge_part(client, store, job.judge, part, job.batch_size), part.shard, dead_reason)
    return ShardResult(part, part.generated_tokens or 0, time.monotonic() - started, 0.0,
                       part.started_at or started_at, time.time())


def _judging(step: Callable[[], object], shard: int, dead_reason: Callable[[], str | None]):
    try:
        return step()
    except TransientServerError as exc:
        if (reason := dead_reason()) is not None:
            raise ServerLost(f"shard {shard}: the server is gone while judging: {reason}") from exc
        raise


def run_judge(client: HttpClient, part: PartInfo, job: ShardJob, store: OutputStore,
              dead_reason: Callable[[], str | None] = lambda: None) -> ShardResult:
    """Judge a part published earlier (its judge changed, or a kill came between part and judgement)."""
    started, started_at = time.monotonic(), time.time()
    _judging(lambda: judge_part(client, store, job.judge, part, job.batch_size), part.shard, dead_reason)
    done = time.monotonic()
    return ShardResult(part, 0, done - started, 0.0, started_at, time.time(), judged_only=True)
