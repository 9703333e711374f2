"""Simulated server time for a mixed-length prompt set: length-aware vs arrival-order batching.

The same prompts go to the NeMo-compatible server (simulated engine) in batches of 32, one
request at a time, under three plans from `infra.prompting.batching.plan_batches`:
- arrival order (window of 1 batch: what the seed and a plain client do),
- length-aware with the window the flow uses (`ShardJob.length_window`, 8 batches),
- length-aware over the whole set (window = every batch; an upper bound on the gain).
The server's `--stats-file` gives each generation's start and end; the figure is their sum.

The server pads a batch to its longest prompt and steps from the shortest prompt to
`longest + tokens_to_generate` (NeMo's semantics, kept by the simulated engine), so a batch
mixing short and long prompts pays for its longest row in prefill and decode.

Prompt lengths are log-normal (median ≈ 60 words, σ = 1), 5–550 words, so a few long
prompts are spread among many short ones, as in instruction and document-rewrite sets.
The cost model is PLANNING_340B_TP8_PP2's shape scaled ×1/120 to keep the run short; the
table also gives the same plans' cost computed with the unscaled planning model.
"""

from __future__ import annotations

import random
import re
import time
from pathlib import Path

from benchmarks.common import Cost, local_server, read_stats

WORDS = ("data model answer careful step check write line clear useful correct safe people read later "
         "today training example noisy large set prompt token batch server length window order").split()
PLANNING = Cost(prefill_s_per_token=2e-4, decode_step_s=0.05, decode_batch_slope=0.004)
SCALE = 1 / 120
TOKENS = 128
BATCH = 32
SPREAD = TOKENS * 3 // 4
PIECE = re.compile(r"\s+|\w+|[^\w\s]", re.UNICODE)  # the simulated engine's tokens


def mixed_prompts(n: int, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        words = int(min(550, max(5, rng.lognormvariate(4.1, 1.0))))
        prompts.append(f"Task {i}: " + " ".join(rng.choice(WORDS) for _ in range(words)) + ".")
    return prompts


def sim_tokens(text: str) -> int:
    return len(PIECE.findall(text))


def modelled_seconds(prompts: list[str], plan: list[list[int]], cost: Cost) -> float:
    """The simulated engine's cost formula (every row runs to its budget: finish_fraction 0)."""
    total = 0.0
    for batch in plan:
        lengths = [sim_tokens(prompts[i]) for i in batch]
        steps = max(lengths) + TOKENS - min(lengths)
        total += cost.seconds(len(batch), max(lengths), steps)
    return total


def run(workdir: Path, log, n: int = 768) -> dict:
    from infra.backends.ready import make_client
    from infra.generation import ShardJob
    from infra.pipeline.fields import StageSettings
    from infra.prompting.batching import plan_batches
    from infra.prompting.sampling import SamplingParams
    from infra.settings import load_settings

    # The flow's defaults, read where they are defined: the batch size and the length window.
    flow_batch = StageSettings.model_fields["batch_size"].default
    flow_window = ShardJob.__dataclass_fields__["length_window"].default
    prompts = mixed_prompts(n)
    sampling = SamplingParams(tokens_to_generate=TOKENS, greedy=True)
    # The plans group by the server's own token counts, as the flow does with the run's counter.
    plans = {
        f"arrival order, batches of {BATCH}": plan_batches(prompts, BATCH, 1, length=sim_tokens),
        f"length-aware, batches of {BATCH}, window {flow_window} (the default before issue 28)":
            plan_batches(prompts, BATCH, flow_window, length=sim_tokens),
        f"length-aware, at most {flow_batch}, window {flow_window}, cut by the planning model (flow default)":
            plan_batches(prompts, flow_batch, flow_window, length=sim_tokens, tokens_to_generate=TOKENS),
        # The cheapest bound found that brings asked ÷ stepped past 0.8 on this set (T/4 guarantees it anywhere,
        # at a higher price): what meeting the target costs in GPU time.
        f"the same, no batch spanning more than {SPREAD} prompt tokens":
            _spread_bounded(prompts, flow_batch, flow_window, SPREAD),
    }
    cost = Cost(PLANNING.prefill_s_per_token * SCALE, PLANNING.decode_step_s * SCALE, PLANNING.decode_batch_slope)
    rows = []
    for i, (name, plan) in enumerate(plans.items()):
        with local_server(workdir, f"batching-{i}", cost) as srv:
            client = make_client(load_settings(), srv.url)
            t = time.monotonic()
            for batch in plan:
                client.generate([prompts[j] for j in batch], sampling)
            wall = time.monotonic() - t
            stats = read_stats(srv.stats_file)
        busy = sum(s["end"] - s["start"] for s in stats)
        generated = sum(s["generated_tokens"] for s in stats)
        modelled = modelled_seconds(prompts, plan, PLANNING)
        rows.append({"plan": name, "server_busy_s": busy, "wall_s": wall, "requests": len(stats), "generated_tokens": generated,
                     "asked_over_stepped": n * TOKENS / generated, "planning_model_h": modelled / 3600,
                     "asked_per_gpu_s": n * TOKENS / (modelled * 16), "batches": len(plan)})
        log(f"batching {name}: server busy {busy:.2f} s over {len(stats)} requests, "
            f"{rows[-1]['generated_tokens']} tokens generated (planning model {rows[-1]['planning_model_h']:.2f} h)")
    base = rows[0]["server_busy_s"]
    for r in rows:
        r["saving"] = 1 - r["server_busy_s"] / base
        r["planning_saving"] = 1 - r["planning_model_h"] / rows[0]["planning_model_h"]
    lengths = sorted(sim_tokens(p) for p in prompts)
    return {"rows": rows, "prompts": n, "batch_size": BATCH, "flow_batch_size": flow_batch, "flow_window": flow_window, "spread": SPREAD, "tokens_to_generate": TOKENS, "scale": SCALE,
            "cost": cost.__dict__, "length_tokens": {"min": lengths[0], "median": lengths[len(lengths) // 2],
                                                     "p90": lengths[int(len(lengths) * 0.9)], "max": lengths[-1]}}


def _spread_bounded(prompts: list[str], batch_size: int, window: int, spread: int) -> list[list[int]]:
    """The flow's plan with every batch's spread bounded: what forcing asked ÷ stepped ≥ 0.8 costs."""
    from infra.prompting.batching import cut_sorted

    plan: list[list[int]] = []
    for start in range(0, len(prompts), batch_size * window):
        order = sorted(range(start, min(len(prompts), start + batch_size * window)), key=lambda i: sim_tokens(prompts[i]))
        j = 0
        for size in cut_sorted([sim_tokens(prompts[i]) for i in order], batch_size, TOKENS, max_spread=spread):
            plan.append(order[j:j + size])
            j += size
    return plan
