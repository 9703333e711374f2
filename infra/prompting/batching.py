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
the planning model (`StepCost`, NeMo's static batching on 340B) says the window costs least: a
dense run of similar lengths fills whole batches, a sparse tail of long prompts is cut into smaller
batches rather than padded (`cut_sorted`, docs/engines.md "Batch make-up").

Pure: no I/O, no server, no Prefect. Lengths are estimates (`infra.prompting.tokens.estimate_tokens`,
UTF-8 bytes, when no tokenizer is at hand); only their order matters.

    plan = plan_batches(prompts, 32, 8, length=estimate_tokens)
    for i, result in in_input_order(plan, lambda idx: client.generate([prompts[j] for j in idx], s)):
        write(records[i], result)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

DEFAULT_WINDOW_BATCHES = 8


@dataclass(frozen=True)
class StepCost:
    """Seconds one static batch holds the GPUs, as NeMo runs it: every row padded to the longest prompt
    (prefill), then decode steps from the shortest prompt to `longest + tokens_to_generate`, each step a
    little dearer per row. The defaults are the planning figures for Nemotron-4-340B on 16 H100 (TP 8,
    PP 2), the shape the simulated engine's PLANNING_340B_TP8_PP2 uses."""

    prefill_s_per_token: float = 2e-4
    decode_step_s: float = 0.05
    decode_batch_slope: float = 0.004

    def seconds(self, rows: int, shortest: int, longest: int, tokens_to_generate: int) -> float:
        steps = longest - shortest + tokens_to_generate
        return (self.prefill_s_per_token * rows * longest
                + steps * self.decode_step_s * (1.0 + self.decode_batch_slope * rows))


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


def cut_sorted(lengths: Sequence[int], batch_size: int, tokens_to_generate: int,
               cost: StepCost = PLANNING_340B, max_spread: int | None = None) -> list[int]:
    """Batch sizes (in order) for ascending `lengths` that make the sum of `cost.seconds` least, each at most
    `batch_size`. When cutting every `batch_size` leaves no batch whose spread (longest − shortest)
    passes a quarter of `tokens_to_generate`, that plain cut is kept as it is (the common case of
    similar lengths, checked in one pass); otherwise a dynamic programme over the cut points, O(n ×
    batch_size), finds the cheapest cut (a long tail is cut into smaller batches when padding it would
    cost more). `max_spread`: no batch spans more tokens than that (asked ÷ stepped ≥ T ÷ (T + max_spread)),
    whatever it costs; the benchmark's comparison, not the flow's default."""
    n = len(lengths)
    plain = [min(batch_size, n - i) for i in range(0, n, batch_size)]
    bound = tokens_to_generate / 4 if max_spread is None else max_spread
    if all(lengths[min(i + batch_size, n) - 1] - lengths[i] <= bound for i in range(0, n, batch_size)):
        return plain
    pre, dec, slope, t = cost.prefill_s_per_token, cost.decode_step_s, cost.decode_batch_slope, tokens_to_generate
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = lengths[j - 1]
        b, at = float("inf"), j - 1
        for i in range(j - 1, max(0, j - batch_size) - 1, -1):
            if max_spread is not None and longest - lengths[i] > max_spread and i < j - 1:
                break
            rows = j - i
            c = best[i] + pre * rows * longest + (longest - lengths[i] + t) * dec * (1.0 + slope * rows)
            if c < b:
                b, at = c, i
        best[j], cut[j] = b, at
    sizes, j = [], n
    while j:
        sizes.append(j - cut[j])
        j = cut[j]
    return sizes[::-1]


def plan_batches(
    items: Sequence[T],
    batch_size: int,
    window_batches: int = DEFAULT_WINDOW_BATCHES,
    *,
    length: Callable[[T], int] = len,  # type: ignore[assignment]
    tokens_to_generate: int | None = None,
    cost: StepCost = PLANNING_340B,
) -> list[list[int]]:
    """Indices into `items`, cut into batches of at most `batch_size`.

    Every index appears exactly once. Items are taken in windows of `window_batches *
    batch_size` consecutive indices; inside a window they are sorted by `length` (ties keep
    input order, so the plan is deterministic) and cut into batches, so only the last batch of
    a window can be short. Windows follow each other in input order: no batch mixes items of
    two windows, and an item never moves out of its window. With `tokens_to_generate`, a sorted
    window is cut by `cut_sorted` (the cheapest cut under `cost`), so any batch may be short.
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
                for size in cut_sorted([lengths[i] for i in order], batch_size, tokens_to_generate, cost):
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
