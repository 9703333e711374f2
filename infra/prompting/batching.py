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

Pure: no I/O, no server, no Prefect. Lengths are estimates (`infra.prompting.tokens.estimate_tokens`,
UTF-8 bytes, when no tokenizer is at hand); only their order matters.

    plan = plan_batches(prompts, 32, 8, length=estimate_tokens)
    for i, result in in_input_order(plan, lambda idx: client.generate([prompts[j] for j in idx], s)):
        write(records[i], result)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

DEFAULT_WINDOW_BATCHES = 8


def plan_batches(
    items: Sequence[T],
    batch_size: int,
    window_batches: int = DEFAULT_WINDOW_BATCHES,
    *,
    length: Callable[[T], int] = len,  # type: ignore[assignment]
) -> list[list[int]]:
    """Indices into `items`, cut into batches of at most `batch_size`.

    Every index appears exactly once. Items are taken in windows of `window_batches *
    batch_size` consecutive indices; inside a window they are sorted by `length` (ties keep
    input order, so the plan is deterministic) and cut into batches, so only the last batch of
    a window can be short. Windows follow each other in input order: no batch mixes items of
    two windows, and an item never moves out of its window.
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
            order = sorted(range(start, stop), key=lambda i: length(items[i]))  # stable: ties keep input order
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
