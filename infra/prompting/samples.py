"""Several samples per prompt, reproducible under a seed.

NeMo's `random_seed` seeds a whole request (`torch.manual_seed` before the batch), so what a row
gets depends on the seed and on every other row of its batch. To make a sample reproducible:

- a shard's records are cut into batches once (`plan_batches`: fixed by the shard's prompts,
  `batch_size`, the length window and tokens_to_generate), and each sample index s is sent as its own pass over
  those batches: a batch holds rows of one sample index, in the same make-up on every rerun;
- each request's seed is derived from (user seed, shard, batch, sample), below 2^24 (it travels
  as float32 to the other ranks).

A rerun, or a resume after kill -9, with the same input, parameters, batch_size and server
(model, container, GPU kind and count) sends the same requests and gets the same samples. Not
reproducible: runs without a seed; a batch the server rejected and the client bisected (its halves
keep the seed but not the make-up); a different batch_size (so it is part of a seeded run's config);
a different server build or GPU (kernels differ).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence

from infra.prompting.batching import plan_batches
from infra.prompting.sampling import MAX_RANDOM_SEED, SamplingParams


def request_seed(seed: int, shard: int, batch: int, sample: int) -> int:
    digest = hashlib.sha256(f"nsdg-seed\x00{seed}\x00{shard}\x00{batch}\x00{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % MAX_RANDOM_SEED


def sample_batches(prompts: Sequence[str], samples: int, shard: int, sampling: SamplingParams, batch_size: int,
                   window: int, length: Callable[[str], int] = len) -> Iterator[tuple[int, list[int], SamplingParams]]:
    """(sample, record indices, sampling for this request) for every request of a shard: for each
    sample index, the shard's one batch plan (prompts grouped by `length`, the run's token counter);
    with a seed, each request its own derived seed."""
    plan = plan_batches(prompts, batch_size, window, length=length, tokens_to_generate=sampling.tokens_to_generate)
    for sample in range(samples):
        for b, indices in enumerate(plan):
            if sampling.random_seed is None:
                yield sample, indices, sampling
            else:
                seed = request_seed(sampling.random_seed, shard, b, sample)
                yield sample, indices, sampling.model_copy(update={"random_seed": seed})
