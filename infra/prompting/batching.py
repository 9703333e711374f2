"""Length-aware batching: group prompts of similar length so the server wastes less.

NeMo pads every batch to its longest prompt and keeps every row stepping until the longest
row is done (`longest prompt + tokens_to_generate`, starting at the *shortest* prompt), so
one long prompt in a batch of short ones makes the whole batch pay for it: more prefill,
more decode steps, and short rows that generate past their own `tokens_to_generate`.

`plan_batches` sorts each window of `window_batches × batch_size` consecutive items by
estimated length and cuts the window into batches. The window bounds how far an item can
move from its place (and how many results wait to be written in input order); a window of
one batch is plain arrival-order batching. `in_input_order` runs the planned batches and
hands results back in input order, holding at most one window of them.

With `tokens_to_generate` given, a window's sorted prompts are not cut every `batch_size` but where
the planning model (`StepCost`, NeMo's static batching on 340B) says the window costs least while
at least `MIN_ASKED_SHARE` (0.8) of the tokens the server steps were asked for: a dense run of
similar lengths fills whole batches, a sparse tail of long prompts is cut into smaller batches
rather than padded, and no batch outgrows the GPUs' memory (`cut_sorted`, docs/engines.md "Batch
make-up"). The default window, 32 batches (4,096 prompts at 128), holds a default shard (4,000
records) whole: the more prompts sorted together, the closer their neighbours' lengths.

Pure: no I/O, no server, no Prefect. Lengths are the run's token counts (or estimates,
`infra.prompting.tokens.estimate_tokens`, when no tokenizer is at hand): their order groups the
prompts; with `tokens_to_generate` their values are priced as tokens too.

    plan = plan_batches(prompts, 128, length=estimate_tokens, tokens_to_generate=256)
    for i, result in in_input_order(plan, lambda idx: client.generate([prompts[j] for j in idx], s)):
        write(records[i], result)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

DEFAULT_WINDOW_BATCHES = 32
MIN_ASKED_SHARE = 0.8


@dataclass(frozen=True)
class StepCost:
    """The planning model: seconds one static batch holds the GPUs, as NeMo runs it, and whether it fits
    in their memory. NeMo's first forward pass covers every row up to the batch's *shortest* prompt
    (prefill); then one decode step per position from there to `longest + tokens_to_generate`, the
    positions still inside a longer prompt included (fed from the prompt, one token a row a step), each
    step a little dearer per row. The defaults are the planning figures for Nemotron-4-340B on 16 H100
    (TP 8, PP 2), the shape the simulated engine's PLANNING_340B_TP8_PP2 uses; the memory figures are
    estimates per GPU (docs/engines.md "Batch make-up"): the KV cache of `longest + tokens_to_generate`
    positions, the prefill's logits and activations of `shortest` positions, against what the weights leave."""

    prefill_s_per_token: float = 2e-4
    decode_step_s: float = 0.05
    decode_batch_slope: float = 0.004
    kv_bytes_per_token: float = 36_864  # 2 (K, V) × 1 KV head a GPU × 192 × 2 B × 48 layers a stage
    prefill_bytes_per_token: float = 211_456  # logits 256k / TP 8 × 2 B, and 4 hidden states of 18,432 × 2 B
    free_bytes: float = 35e9  # 80 GiB less 42.5 GB of weights and ~8 GB of CUDA context, NCCL and workspace

    def seconds(self, rows: int, shortest: int, longest: int, tokens_to_generate: int) -> float:
        steps = longest - shortest + tokens_to_generate
        return (self.prefill_s_per_token * rows * shortest
                + steps * self.decode_step_s * (1.0 + self.decode_batch_slope * rows))

    def fits(self, rows: int, shortest: int, longest: int, tokens_to_generate: int) -> bool:
        """A batch of one always fits (a prompt too long alone is the context check's business)."""
        return rows == 1 or rows * (self.prefill_bytes_per_token * shortest
                                    + self.kv_bytes_per_token * (longest + tokens_to_generate)) <= self.free_bytes


PLANNING_340B = StepCost()


def stepped_tokens(lengths: Sequence[int], plan: Sequence[Sequence[int]], tokens_to_generate: int) -> int:
    """Tokens the server generates for `plan`: each row of a batch runs on to the batch's longest prompt +
    tokens_to_generate (the server's `generated_tokens`), so a row gets `longest − its length + tokens_to_generate`.
    Asked ÷ stepped is the share of those that was asked for."""
    total = 0
    for batch in plan:
        if batch:
            longest = max(lengths[i] for i in batch)
            total += sum(longest - lengths[i] + tokens_to_generate for i in batch)
    return total


def cut_sorted(lengths: Sequence[int], batch_size: int, tokens_to_generate: int, cost: StepCost = PLANNING_340B,
               max_spread: int | None = None, min_asked_share: float | None = None) -> list[int]:
    """Batch sizes (in order) for ascending `lengths`, each at most `batch_size` and fitting `cost`'s
    memory, that make the sum of `cost.seconds` least: a dynamic programme over the cut points, O(n ×
    batch_size), exact over every cut of the sorted lengths into consecutive batches.

    `min_asked_share`: the cheapest cut found whose asked ÷ stepped (`stepped_tokens`) is at least that.
    When the cheapest cut pads more, each padding token is priced at λ seconds on top and λ is bisected
    to the least that brings the share up (a Lagrangian relaxation: each cut it finds is the cheapest
    for its padding; the cheapest of those that reach the share is kept, and the plain cut every
    `batch_size` if it reaches it and costs less). A high enough λ leaves no padding, so the share is
    always met. `max_spread`: no batch spans more tokens than that, whatever it costs (the benchmark's
    comparison)."""
    if min_asked_share is not None and not 0 < min_asked_share <= 1:
        raise ValueError(f"min_asked_share must be in (0, 1], got {min_asked_share}")
    n, t = len(lengths), tokens_to_generate
    if n == 0:
        return []
    asked = n * t

    def share(sizes: list[int]) -> float:
        return asked / (asked + _padding(lengths, sizes))

    sizes = _cheapest(lengths, batch_size, t, cost, 0.0, max_spread)
    if min_asked_share is None or share(sizes) >= min_asked_share:
        return sizes
    found: list[tuple[float, list[int]]] = []
    plain = [min(batch_size, n - i) for i in range(0, n, batch_size)]
    if share(plain) >= min_asked_share and all(cost.fits(*_shape(lengths, plain, k), t) for k in range(len(plain))):
        found.append((_seconds(lengths, plain, t, cost), plain))
    # Above `ceiling` seconds a padding token is dearer than sending every prompt alone: no padding left.
    ceiling = sum(cost.seconds(1, x, x, t) for x in lengths) + 1.0
    lo, hi = 0.0, cost.decode_step_s / t
    while True:
        hi = min(hi, ceiling)
        sizes = _cheapest(lengths, batch_size, t, cost, hi, max_spread)
        if share(sizes) >= min_asked_share or hi == ceiling:  # at the ceiling nothing is padded: a share of 1
            found.append((_seconds(lengths, sizes, t, cost), sizes))
            break
        lo, hi = hi, hi * 4
    for _ in range(12):
        mid = (lo + hi) / 2
        sizes = _cheapest(lengths, batch_size, t, cost, mid, max_spread)
        if share(sizes) >= min_asked_share:
            hi = mid
            found.append((_seconds(lengths, sizes, t, cost), sizes))
        else:
            lo = mid
    return min(found, key=lambda f: f[0])[1]


def _cheapest(lengths: Sequence[int], cap: int, t: int, cost: StepCost, per_pad: float,
              max_spread: int | None) -> list[int]:
    """The cut of sorted `lengths` into batches of at most `cap` rows that fit `cost`'s memory and make
    Σ seconds + per_pad × padding tokens least. best[j]: the least for the first j lengths, over the
    batches i..j-1 that end there; ties go to the largest i. The inner loop spells out `cost.seconds`
    and `cost.fits` (a call each would double the planning time); the tests check its cuts against
    brute force over `cost.seconds`.

    Where every batch ending at j fits (the largest of them at its longest prompt fits, so each fits:
    rounding is monotone) and no spread is bounded, its candidates are priced in one comprehension,
    each by the same float operations in the same order as the loop, so the cut is the loop's to the
    bit (tests/test_batching.py); the loop, the rest. The plan is a shard task's largest piece of
    Python after its requests: issue 28's ceiling."""
    n = len(lengths)
    pre, dec, slope = cost.prefill_s_per_token, cost.decode_step_s, cost.decode_batch_slope
    kv, pb, free = cost.kv_bytes_per_token, cost.prefill_bytes_per_token, cost.free_bytes
    prefix = [0]
    for x in lengths:
        prefix.append(prefix[-1] + x)
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    # By rows (index r - 1): `pre * rows` and `1.0 + slope * rows`, the loop's first products, made once.
    pre_rows = [pre * rows for rows in range(1, cap + 1)]
    slope_rows = [1.0 + slope * rows for rows in range(1, cap + 1)]
    for j in range(1, n + 1):
        longest, sj = lengths[j - 1], prefix[j]
        kv_row = kv * (longest + t)
        lo = max(0, j - cap)
        if max_spread is None and (j - lo == 1 or (j - lo) * (pb * longest + kv_row) <= free):
            # i = lo .. j-1, rows = j - i: the by-rows lists read backwards from j - lo rows down to 1.
            pr, sr, shortest_ = pre_rows[j - lo - 1::-1], slope_rows[j - lo - 1::-1], lengths[lo:j]
            if per_pad:
                cs = [bi + p * s + (longest - s + t) * dec * f + per_pad * (r * longest - sj + pi)
                      for bi, p, s, f, r, pi in zip(best[lo:j], pr, shortest_, sr, range(j - lo, 0, -1), prefix[lo:j])]
            else:  # x + 0.0 * y is x: the loop's sum without its last term
                cs = [bi + p * s + (longest - s + t) * dec * f for bi, p, s, f in zip(best[lo:j], pr, shortest_, sr)]
            b = min(cs)
            k = len(cs) - 1 - cs[::-1].index(b)  # the last of equals: the largest i, as the loop keeps
            best[j], cut[j] = b, lo + k
            continue
        b, at = float("inf"), j - 1
        for i in range(j - 1, lo - 1, -1):
            shortest, rows = lengths[i], j - i
            if rows > 1:
                if max_spread is not None and longest - shortest > max_spread:
                    break  # ascending: every smaller i spans more
                if rows * (pb * shortest + kv_row) > free:
                    continue
            c = (best[i] + pre * rows * shortest + (longest - shortest + t) * dec * (1.0 + slope * rows)
                 + per_pad * (rows * longest - sj + prefix[i]))
            if c < b:
                b, at = c, i
        best[j], cut[j] = b, at
    sizes, j = [], n
    while j:
        sizes.append(j - cut[j])
        j = cut[j]
    return sizes[::-1]


def _shape(lengths: Sequence[int], sizes: Sequence[int], k: int) -> tuple[int, int, int]:
    """(rows, shortest, longest) of batch k of a cut of ascending `lengths`."""
    start = sum(sizes[:k])
    return sizes[k], lengths[start], lengths[start + sizes[k] - 1]


def _seconds(lengths: Sequence[int], sizes: Sequence[int], t: int, cost: StepCost) -> float:
    total, i = 0.0, 0
    for size in sizes:
        total += cost.seconds(size, lengths[i], lengths[i + size - 1], t)
        i += size
    return total


def _padding(lengths: Sequence[int], sizes: Sequence[int]) -> int:
    """Tokens a cut of ascending `lengths` steps past what was asked: Σ (longest − length) per batch."""
    total, i = 0, 0
    for size in sizes:
        longest = lengths[i + size - 1]
        total += sum(longest - x for x in lengths[i:i + size])
        i += size
    return total


def plan_batches(
    items: Sequence[T],
    batch_size: int,
    window_batches: int = DEFAULT_WINDOW_BATCHES,
    *,
    length: Callable[[T], int] = len,  # type: ignore[assignment]
    tokens_to_generate: int | None = None,
    cost: StepCost = PLANNING_340B,
    min_asked_share: float | None = MIN_ASKED_SHARE,
) -> list[list[int]]:
    """Indices into `items`, cut into batches of at most `batch_size`.

    Every index appears exactly once. Items are taken in windows of `window_batches *
    batch_size` consecutive indices; inside a window they are sorted by `length` (ties keep
    input order, so the plan is deterministic) and cut into batches, so only the last batch of
    a window can be short. Windows follow each other in input order: no batch mixes items of
    two windows, and an item never moves out of its window. With `tokens_to_generate`, a sorted
    window is cut by `cut_sorted` (the cheapest cut under `cost` whose asked ÷ stepped is at least
    `min_asked_share`, so every window, and so the whole plan, reaches it), so any batch may be short.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if window_batches < 1:
        raise ValueError(f"window_batches must be >= 1, got {window_batches}")
    window = batch_size * window_batches
    plan: list[list[int]] = []
    for start in range(0, len(items), window):
        stop = min(start + window, len(items))
        if window_batches == 1:
            order = list(range(start, stop))  # arrival order: nothing to sort
        else:
            lengths = {i: length(items[i]) for i in range(start, stop)}
            order = sorted(range(start, stop), key=lengths.__getitem__)  # stable: ties keep input order
            if tokens_to_generate is not None:
                j = 0
                for size in cut_sorted([lengths[i] for i in order], batch_size, tokens_to_generate, cost,
                                       min_asked_share=min_asked_share):
                    plan.append(order[j:j + size])
                    j += size
                continue
        plan.extend(order[j:j + batch_size] for j in range(0, len(order), batch_size))
    return plan


def in_input_order(plan: Sequence[Sequence[int]], run_batch: Callable[[Sequence[int]], Sequence[R]]) -> Iterator[tuple[int, R]]:
    """Run the planned batches one after another (`run_batch(indices)` returns one result per
    index, in the order given) and yield `(index, result)` in increasing index order, each as
    soon as every smaller index has its result.

    With a plan from `plan_batches` that is every window's results once its last batch is
    back, so at most one window of results is held. Raises ValueError if the plan does not
    cover 0..n-1 exactly once or a batch returns the wrong number of results.
    """
    covered = sorted(i for batch in plan for i in batch)
    if covered != list(range(len(covered))):
        raise ValueError("the plan must hold every index 0..n-1 exactly once")
    pending: dict[int, R] = {}
    next_index = 0
    for batch in plan:
        results = run_batch(batch)
        if len(results) != len(batch):
            raise ValueError(f"a batch of {len(batch)} returned {len(results)} results")
        pending.update(zip(batch, results))
        while next_index in pending:
            yield next_index, pending.pop(next_index)
            next_index += 1


def padded_cost(lengths: Sequence[int], plan: Sequence[Sequence[int]]) -> int:
    """Prompt tokens the server computes for `plan` once every batch is padded to its longest
    prompt: sum over batches of `len(batch) * longest`. A quick, model-free way to compare plans."""
    return sum(len(batch) * max(lengths[i] for i in batch) for batch in plan if batch)
