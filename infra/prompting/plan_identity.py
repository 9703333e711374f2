"""Which batch plan a shard's seeded requests followed, as its spill records it, and what a resume
does when its own plan differs (infra/generation.py run_shard).

A seeded request's seed follows its batch (infra/prompting/samples.py: seed, shard, batch, sample),
and the plan decides which records share a batch: `plan_batches` with the run's batch_size, the
length window, MIN_ASKED_SHARE and the planning model (StepCost), and the cut's own rules. None of
it is in the run's config hash, on purpose: an upgrade that plans differently must not regenerate
every finished part. A shard resumed from its spill must not mix two make-ups though (every (id,
sample) would still be there once, but the resumed requests' completions would be neither run's):
the spill's header names its plan, and a resume under another plan goes on with the spill's where
it can (same cut rules, other batch_size or window), else generates that shard again from nothing.
Unseeded requests draw anew anyway, and openai-completions seeds each prompt on its own: their
results are kept whatever the plan.
"""

from __future__ import annotations

from dataclasses import asdict

from infra.prompting.batching import MIN_ASKED_SHARE, PLANNING_340B

# Bump when plan_batches cuts the same prompts differently for the same settings.
# 2: the exact cut_sorted, the asked-share search, the first pass priced to the shortest prompt.
PLAN_VERSION = 2


def plan_identity(batch_size: int, window: int) -> dict:
    """What a shard's batch plan depends on besides its prompts and their token counts (which the
    config hash covers: the prompts, the model's tokenizer, tokens_to_generate)."""
    return {"version": PLAN_VERSION, "batch_size": batch_size, "window": window,
            "min_asked_share": MIN_ASKED_SHARE, "cost": asdict(PLANNING_340B)}


def resume_plan(spilled: dict | None, ours: dict, *, seeded: bool, shard: int) -> tuple[dict | None, str]:
    """A resume whose plan `ours` is not the spill's `spilled` (None: a spill from before plans were
    recorded): (the plan the rest of the shard follows, or None to generate the shard again; the log line)."""
    was = ("an unrecorded plan (written before plans were recorded)" if spilled is None else
           ", ".join(f"{k} {spilled.get(k)!r}" for k in ours if spilled.get(k) != ours[k] and k != "cost")
           + (", another planning model (StepCost)" if spilled.get("cost") != ours["cost"] else ""))
    where = f"shard {shard}: its spill was written under {was.lstrip(', ')}, unlike this version's plan"
    if not seeded:
        return ours, f"{where}; its requests' seeds do not follow the plan (unseeded, or one prompt a request): its " \
                     "results are kept, the rest planned as now"
    if spilled is not None and all(spilled.get(k) == ours[k] for k in ours if k not in ("batch_size", "window")):
        return spilled, (f"{where}; the rest is planned with the spill's batch_size {spilled['batch_size']} and window "
                         f"{spilled['window']}, so its seeded requests are the ones an uninterrupted run made")
    return None, (f"{where}; a seeded shard cannot mix two batch make-ups and the spill's cannot be planned again "
                  f"here, so shard {shard} is generated again from nothing (its spill's results are dropped)")
