"""infra.prompting.batching: length-aware batch plans and putting results back in input order."""

import random

import pytest

from infra.prompting.batching import in_input_order, padded_cost, plan_batches


def mixed_lengths(n: int, seed: int = 7) -> list[int]:
    rng = random.Random(seed)
    return [rng.choice((rng.randint(5, 40), rng.randint(300, 2000))) for _ in range(n)]


@pytest.mark.parametrize("n", [0, 1, 31, 32, 33, 255, 256, 257, 1000])
@pytest.mark.parametrize("batch_size,window_batches", [(1, 1), (4, 1), (32, 8), (7, 3), (128, 2)])
def test_every_index_exactly_once_and_batches_bounded(n, batch_size, window_batches):
    lengths = mixed_lengths(n)
    plan = plan_batches(lengths, batch_size, window_batches, length=lambda x: x)
    flat = [i for batch in plan for i in batch]
    assert sorted(flat) == list(range(n))
    assert all(1 <= len(batch) <= batch_size for batch in plan)


@pytest.mark.parametrize("batch_size,window_batches", [(4, 1), (32, 8), (7, 3)])
def test_no_index_leaves_its_window_and_only_a_windows_last_batch_is_short(batch_size, window_batches):
    n, window = 1000, batch_size * window_batches
    plan = plan_batches(mixed_lengths(n), batch_size, window_batches, length=lambda x: x)
    windows_seen = []
    for batch in plan:
        windows = {i // window for i in batch}
        assert len(windows) == 1, "a batch mixes two windows"
        windows_seen.append(windows.pop())
    assert windows_seen == sorted(windows_seen), "windows must follow each other in input order"
    for w in set(windows_seen):
        sizes = [len(b) for b, ww in zip(plan, windows_seen) if ww == w]
        assert all(s == batch_size for s in sizes[:-1])


def test_window_of_one_batch_is_arrival_order():
    plan = plan_batches(mixed_lengths(100), 8, 1, length=lambda x: x)
    assert [i for batch in plan for i in batch] == list(range(100))
    assert all(batch == list(range(batch[0], batch[0] + len(batch))) for batch in plan)


def test_similar_lengths_are_grouped():
    # Alternating short and long prompts: arrival order puts a long one in every batch.
    lengths = [10 if i % 2 == 0 else 1000 for i in range(256)]
    plan = plan_batches(lengths, 32, 8, length=lambda x: x)
    for batch in plan:
        assert len({lengths[i] for i in batch}) == 1
    arrival = plan_batches(lengths, 32, 1, length=lambda x: x)
    assert padded_cost(lengths, plan) < 0.6 * padded_cost(lengths, arrival)


def test_inside_a_window_batches_are_sorted_by_length_and_ties_keep_input_order():
    lengths = [5, 1, 5, 3, 1, 3, 5, 1]
    plan = plan_batches(lengths, 3, 4, length=lambda x: x)
    assert plan == [[1, 4, 7], [3, 5, 0], [2, 6]]


def test_length_function_is_applied_to_items():
    prompts = ["a" * 50, "b", "c" * 49, "d" * 2]
    assert plan_batches(prompts, 2, 2) == [[1, 3], [2, 0]]  # default length=len


@pytest.mark.parametrize("batch_size,window_batches", [(0, 1), (1, 0), (-3, 2)])
def test_bad_sizes_are_refused(batch_size, window_batches):
    with pytest.raises(ValueError):
        plan_batches([1, 2, 3], batch_size, window_batches, length=lambda x: x)


def test_results_come_back_in_input_order():
    prompts = [f"p{i}" + "x" * (i * 37 % 11) for i in range(100)]
    plan = plan_batches(prompts, 8, 4)
    sent = []

    def run(batch):
        sent.append(list(batch))
        return [prompts[i].upper() for i in batch]

    out = list(in_input_order(plan, run))
    assert [i for i, _ in out] == list(range(100))
    assert [r for _, r in out] == [p.upper() for p in prompts]
    assert sent == plan  # batches run in plan order, one after another


def test_results_are_released_window_by_window():
    # With windows of 2 batches of 4, indices 0..7 must be out before batch 3 runs.
    plan = plan_batches(list(range(16, 0, -1)), 4, 2, length=lambda x: x)
    yielded, ran = [], []

    def run(batch):
        ran.append(len(yielded))
        return list(batch)

    for i, _ in in_input_order(plan, run):
        yielded.append(i)
    assert ran == [0, 0, 8, 8]


def test_plan_that_misses_or_repeats_an_index_is_refused():
    with pytest.raises(ValueError):
        list(in_input_order([[0, 1], [1, 2]], lambda b: list(b)))
    with pytest.raises(ValueError):
        list(in_input_order([[0, 2]], lambda b: list(b)))


def test_batch_returning_wrong_count_is_refused():
    with pytest.raises(ValueError):
        list(in_input_order([[0, 1]], lambda b: [1]))


def test_padded_cost():
    assert padded_cost([1, 10, 2, 3], [[0, 1], [2, 3]]) == 2 * 10 + 2 * 3


@pytest.mark.integration
def test_a_shard_is_batched_by_the_runs_token_counts_not_characters(tmp_path, tiny_model_dir):
    """Characters order these prompts A < C < B < D, the tiny model's tokens A < B < C < D: the
    batches the server receives are the token-count groups."""
    import json

    from infra.prompting.dataset import Record, Shard
    from infra.generation import ShardJob, generate_shard_results
    from infra.engines.nemo import NemoClient
    from infra.prompting.sampling import SamplingParams
    from infra.prompting.tokens import token_counter
    from tests.localserver import running_server

    tokenizer = str(tiny_model_dir / "tokenizer.json")
    counter = token_counter(tokenizer)
    a, b, c, d = "the", "the the the the the", "@#$%^&*", "@#$%^&*" * 3
    assert len(a) < len(c) < len(b) < len(d) and counter.count(a) < counter.count(b) < counter.count(c) < counter.count(d)
    stats = tmp_path / "stats.jsonl"
    records = [Record(f"r{i}", p, i + 1) for i, p in enumerate((d, b, c, a))]
    # 64 tokens to generate: next to that the prompts' spread is small, so the cheapest cut is two full batches.
    job = ShardJob("r", "m", "h", SamplingParams(tokens_to_generate=64, greedy=True), batch_size=2, length_window=2)
    with running_server(tmp_path, "--model-dir", str(tiny_model_dir), "--stats-file", str(stats)) as (url, _):
        generate_shard_results(NemoClient(url, count_tokens=counter.count), Shard(0, records), job)  # the run's counter
    sent = sorted(json.loads(line)["prompt_tokens"] for line in stats.read_text().splitlines())
    assert sent == sorted([counter.count(a) + counter.count(b), counter.count(c) + counter.count(d)])


# --- batch make-up under the planning model (cut_sorted): pure logic, no server


def _cost(lengths, sizes, t, cost=None):
    from infra.prompting.batching import PLANNING_340B

    cost, total, i = cost or PLANNING_340B, 0.0, 0
    for size in sizes:
        total += cost.seconds(size, lengths[i], lengths[i + size - 1], t)
        i += size
    return total


def test_similar_lengths_fill_whole_batches():
    from infra.prompting.batching import cut_sorted

    lengths = sorted(100 + (i % 7) for i in range(300))
    sizes = cut_sorted(lengths, 128, 128)
    assert len(sizes) == 3  # as few batches as 128 allows; where the cuts fall is the cheapest place
    assert _cost(lengths, sizes, 128) <= _cost(lengths, [128, 128, 44], 128)


@pytest.mark.parametrize("seed", range(5))
def test_the_cut_is_the_cheapest_there_is(seed):
    """Against every cut of a small window (brute force over the compositions of n), none costs less."""
    import itertools

    from infra.prompting.batching import cut_sorted

    rng = random.Random(seed)
    lengths = sorted(int(rng.lognormvariate(4, 1.2)) + 1 for _ in range(10))
    sizes = cut_sorted(lengths, 4, 32)
    assert sum(sizes) == 10 and max(sizes) <= 4
    best = min(_cost(lengths, [b - a for a, b in zip((0,) + c, c + (10,))], 32)
               for k in range(10) for c in itertools.combinations(range(1, 10), k)
               if all(b - a <= 4 for a, b in zip((0,) + c, c + (10,))))
    assert _cost(lengths, sizes, 32) == pytest.approx(best)


def test_a_long_tail_is_cut_smaller_rather_than_padded():
    from infra.prompting.batching import cut_sorted

    lengths = [50] * 120 + [2000] * 8  # one batch of 128 would pad 120 short rows to 2000 tokens
    assert cut_sorted(lengths, 128, 128) == [120, 8]


def test_max_spread_bounds_every_batch_and_so_asked_over_stepped():
    from infra.prompting.batching import cut_sorted, stepped_tokens

    rng = random.Random(3)
    lengths = sorted(int(rng.lognormvariate(5, 1)) for _ in range(500))
    sizes = cut_sorted(lengths, 128, 128, max_spread=32)
    plan, i = [], 0
    for size in sizes:
        plan.append(list(range(i, i + size)))
        assert lengths[i + size - 1] - lengths[i] <= 32 or size == 1
        i += size
    assert 500 * 128 / stepped_tokens(lengths, plan, 128) >= 0.8


def test_plan_with_tokens_to_generate_covers_each_index_once_and_windows_hold():
    rng = random.Random(5)
    items = ["x" * int(rng.lognormvariate(4, 1.3)) for _ in range(1000)]
    plan = plan_batches(items, 32, 4, tokens_to_generate=64)
    assert sorted(i for b in plan for i in b) == list(range(1000))
    assert all(1 <= len(b) <= 32 for b in plan)
    assert all(len({i // 128 for i in b}) == 1 for b in plan)  # no batch crosses a window
    assert any(len(b) < 32 for b in plan[:-1])  # the make-up differs from a fixed cut on this spread


def test_cheaper_than_the_fixed_cut_on_a_mixed_set():
    from infra.prompting.batching import cut_sorted

    rng = random.Random(9)
    lengths = sorted(int(rng.lognormvariate(5, 1)) for _ in range(768))
    fixed = [min(128, 768 - i) for i in range(0, 768, 128)]
    assert _cost(lengths, cut_sorted(lengths, 128, 128), 128) < _cost(lengths, fixed, 128)
