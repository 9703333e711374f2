"""What each suite of `benchmarks.run` measures, and at which sizes: one table, so `make bench`,
`make bench-scale` and the quick test differ only in the sizes they pass.

- bench: every section at the size its target names (100 k records, 100 k × 4 rows), the ratios side
  by side in the one run; 25-27 minutes on the 2-core machine (the section times of the
  last run are in results.md).
- scale: the large runs (1 M records, 1 M × 4 rows, 1 M curation rows, 1 M prompts planned), the
  runs longer than a Slurm time limit and `make run` with the real model; its own results file.
- quick: every section that needs neither Slurm nor the real model, at tiny sizes, so a test can
  run the entry point end to end and check that it writes both files whole (about a minute).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from benchmarks import batching, busy, curation, engines, nagle, readiness, recipes, replicas, rollover, scale
from benchmarks import pipeline as pipeline_bench
from benchmarks import pipeline_rss
from benchmarks import slurm as slurm_bench
from benchmarks import tokens as tokens_bench
from benchmarks.common import REPO

SUITES: dict[str, dict[str, dict]] = {
    "bench": {
        "nagle": {},
        # Sizes trimmed so the whole run stays within its 25 minutes (issue 28): each still crosses several shards
        # (busy: 3 shards a run; its fraction moved by ≤ 0.0005 between repeats, so 2 short repeats, 1 long).
        "busy": {"short": (768, 256, 24, 2), "long": (192, 64, 4, 1)},
        "batching": {"n": 768, "shard": 4000},
        "readiness": {"repeats": 5},
        "slurm": {"repeats": 2},
        "scale": {"sizes": (10_000, 100_000), "repeats": 3},
        "tokens": {"sizes": (100_000,), "realistic": 20_000, "make_run": False},
        "recipes": {"mid": 100_000, "big": 0},
        "curation": {"n": 100_000, "stage_rows": 0},
        "replicas": {"records": 1536, "repeats": 2},
        "engines": {"n": 500, "ceiling_n": 5_000, "ceiling_nemo_n": 50_000, "ceiling_nemo_rounds": 3},
        "pipeline": {},
        "pipeline_rss": {"sizes": (1_000, 2_000, 5_000), "many_shards": (500, 10)},
    },
    "scale": {
        "scale": {"sizes": (100_000, 1_000_000), "repeats": 1},
        "tokens": {"sizes": (1_000_000,), "realistic": 0, "make_run": True},
        "recipes": {"mid": 100_000, "big": 1_000_000, "plain": False},
        "curation": {"n": 0, "stage_rows": 1_000_000},
        "rollover": {},
        "pipeline_rss": {"sizes": (10_000, 100_000)},
    },
    "quick": {
        "nagle": {},
        "busy": {"short": (64, 32, 2, 1), "cost_factor": 0.01},
        "batching": {"n": 64},
        "scale": {"sizes": (300,), "repeats": 1},
        "recipes": {"mid": 200, "big": 0},
        "curation": {"n": 200, "stage_rows": 400},
        "engines": {"n": 64, "ceiling_n": 200, "cost_factor": 0.01, "ceiling_nemo_rounds": 2},
        "pipeline_rss": {"sizes": (20, 60), "many_shards": (20, 5)},
    },
}
OUT = {"bench": REPO / "benchmarks" / "results.md", "scale": REPO / "benchmarks" / "results-scale.md",
       "quick": REPO / "benchmarks" / "results-quick.md"}


def sections(suite: str, workdir: Path, api, log, res: dict, have_slurm: bool) -> dict[str, Callable[[], dict] | None]:
    """name → a call that measures the section (None: it cannot run here, e.g. no Slurm)."""
    z = SUITES[suite]

    def busy_cases() -> list[busy.Case]:
        factor = z["busy"].get("cost_factor", 1.0)
        out = []
        for name, scale_by in (("short", 0.1), ("long", 1.0)):
            if name in z["busy"]:
                records, shard, seed, repeats = z["busy"][name]
                out.append(busy.Case(name, busy.scaled(busy.PLANNING, scale_by * factor), ours_records=records,
                                     ours_shard_size=shard, seed_requests=seed, repeats=repeats))
        return out

    every: dict[str, Callable[[], dict] | None] = {
        "nagle": lambda: nagle.run(workdir, log),
        "busy": lambda: busy.run(workdir, api, busy_cases(), log),
        "batching": lambda: batching.run(workdir, log, **z["batching"]),
        "readiness": lambda: readiness.run(workdir, log, repeats=z["readiness"]["repeats"]),
        "slurm": (lambda: slurm_bench.run(workdir, api, log, repeats=z["slurm"]["repeats"])) if have_slurm else None,
        "scale": lambda: scale.run(workdir, api, log, sizes=z["scale"]["sizes"], repeats=z["scale"]["repeats"]),
        "tokens": lambda: tokens_bench.run(workdir, log, sizes=z["tokens"]["sizes"], realistic=z["tokens"]["realistic"],
                                           with_make_run=z["tokens"]["make_run"]),
        "recipes": lambda: recipes.run(workdir, api, log, z["recipes"]["mid"], z["recipes"]["big"],
                                       plain=z["recipes"].get("plain", True)),
        # The filtered run's plain and unfiltered-recipe neighbours are the recipes section's, same run.
        "curation": lambda: curation.run(workdir, api, log, z["curation"]["n"], z["curation"]["stage_rows"],
                                         measured=res.get("recipes")),
        "replicas": lambda: {"rows": replicas.measure(repeats=z["replicas"]["repeats"], records=z["replicas"]["records"],
                                                      api_url=api.url)},
        "engines": lambda: {"compare": engines.compare(workdir, log, z["engines"]["n"],
                                                       z["engines"].get("cost_factor", 1.0)),
                            "ceiling": engines.ceiling(workdir, log, z["engines"]["ceiling_n"], api=api,
                                                       nemo_n=z["engines"].get("ceiling_nemo_n"),
                                                       nemo_rounds=z["engines"].get("ceiling_nemo_rounds", 1))},
        "rollover": (lambda: {"rows": rollover.measure(api_url=api.url)}) if have_slurm else None,
        "pipeline": lambda: {"rows": pipeline_bench.measure(api_url=api.url)},
        "pipeline_rss": lambda: pipeline_rss.run(workdir, api, log, sizes=z["pipeline_rss"]["sizes"],
                                                 many_shards=z["pipeline_rss"].get("many_shards")),
    }
    return {name: every[name] for name in z}
