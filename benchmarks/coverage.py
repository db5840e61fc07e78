"""At how many training seeds does a seed-aware LDS interval mean something? Coverage by simulation.

    python benchmarks/coverage.py [--seeds 2 3 4 6] [--experiments 200] [--draws 16] [--seed-effect 0.4]

Worlds of das_lightning_testing/lds_worlds.py (real subset masks, attributions shared across queries, a per-model
quality factor), with a seed effect drawn afresh in every experiment: each training seed's models get a noise level
exp(0.4 z) (z standard normal), so which seeds were trained moves the LDS itself. The target of a seed-aware
interval is then the LDS of an R-seed average over fresh draws of the seeds (the mean of the world's population
value over ``--draws`` draws of the seeds' noise levels, brute force each). For each R this measures, at nominal
90%: the two-way interval on the seed-averaged ground truth (conditional on the seeds: it targets the seeds'
own value, not this one) and the seed-aware interval (intervals.py: seeds resampled, its seed part centred). Writes
benchmarks/results/<--name>.{json,md}; the smallest R whose seed-aware coverage is within three binomial standard
errors of 0.90 is what intervals.MIN_SEEDS_FOR_SEED_INTERVAL should be.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from das_lightning.evaluation.intervals import MIN_SEEDS_FOR_SEED_INTERVAL, seed_spread_lds
from das_lightning_testing.lds_worlds import World, draw, population_targets

REPO = Path(__file__).resolve().parents[1]
NOMINAL = 0.9


def seed_levels(rng: np.random.Generator, num_seeds: int, effect: float) -> tuple[float, ...]:
    """Each seed's noise level, exp(effect x z): effect 0 is no seed effect (every seed alike)."""
    return tuple(float(level) for level in np.exp(effect * rng.normal(size=num_seeds)))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[2, 3, 4, 6])
    parser.add_argument("--experiments", type=int, default=200)
    parser.add_argument("--draws", type=int, default=16, help="seed draws averaged into the marginal target")
    parser.add_argument("--resamples", type=int, default=200)
    parser.add_argument(
        "--seed-effect", type=float, default=0.4, help="log-sd of a seed's noise level (0: none)"
    )
    parser.add_argument("--name", default="coverage", help="results file stem")
    args = parser.parse_args()
    started = time.perf_counter()
    base = World()
    rows = []
    for num_seeds in args.seeds:
        rng = np.random.default_rng([2026, num_seeds])
        target = float(
            np.mean(
                [
                    population_targets(
                        replace(base, seed_noise=seed_levels(rng, num_seeds, args.seed_effect)),
                        1500,
                        600,
                        seed=draw_index,
                    ).plain[0]
                    for draw_index in range(args.draws)
                ]
            )
        )
        two_way, seeded, widths = [], [], []
        for experiment in range(args.experiments):
            world = replace(base, seed_noise=seed_levels(rng, num_seeds, args.seed_effect))
            sample = draw(world, 32, 30, rng)
            spread = seed_spread_lds(
                sample.scores[0], sample.masks, sample.losses_by_seed, args.resamples, experiment, NOMINAL
            )
            two_way.append(spread.averaged.corrected_low <= target <= spread.averaged.corrected_high)
            seeded.append(spread.seed_low <= target <= spread.seed_high)
            widths.append(
                (spread.seed_high - spread.seed_low)
                / (spread.averaged.corrected_high - spread.averaged.corrected_low)
            )
        tolerance = 3.0 * math.sqrt(NOMINAL * (1 - NOMINAL) / args.experiments)
        row = {
            "seeds": num_seeds,
            "target": 100 * target,
            "two_way_coverage": float(np.mean(two_way)),
            "seed_aware_coverage": float(np.mean(seeded)),
            "width_ratio": float(np.median(widths)),  # seed-aware width over two-way width, median
            "tolerance": tolerance,
        }
        rows.append(row)
        print(row, flush=True)
    tolerance = rows[0]["tolerance"]
    meaningful = [row["seeds"] for row in rows if abs(row["seed_aware_coverage"] - NOMINAL) <= tolerance]
    document = {
        "command": "python benchmarks/coverage.py "
        + " ".join(
            [
                f"--seeds {' '.join(map(str, args.seeds))}",
                f"--experiments {args.experiments}",
                f"--draws {args.draws}",
                f"--seed-effect {args.seed_effect:g}",
                f"--name {args.name}",
            ]
        ),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "machine": {"cores": os.cpu_count(), "python": platform.python_version()},
        "seconds": round(time.perf_counter() - started, 1),
        "nominal": NOMINAL,
        "seed_effect_log_sd": args.seed_effect,
        "rows": rows,
        "smallest_meaningful_seeds": min(meaningful) if meaningful else None,
        "min_seeds_for_seed_interval": MIN_SEEDS_FOR_SEED_INTERVAL,
    }
    lines = [
        "# Coverage of LDS intervals (benchmarks/coverage.py)",
        "",
        f"{document['command']} ({document['date']}, {document['seconds']:.0f} s). Nominal 90%, "
        f"{args.experiments} experiments per row (binomial tolerance +-{tolerance:.3f}); seed effect: log-sd "
        f"{args.seed_effect:g} of a seed's noise level; target: the LDS of an R-seed average over fresh seeds.",
        "",
        "| seeds R | target LDS (%) | two-way on the averaged ground truth | seed-aware | width ratio |",
        "|---|---|---|---|---|",
        *(
            f"| {row['seeds']} | {row['target']:.1f} | {row['two_way_coverage']:.3f} | "
            f"{row['seed_aware_coverage']:.3f} | {row['width_ratio']:.2f} |"
            for row in rows
        ),
        "",
        f"Smallest R whose seed-aware interval covers within the tolerance: {document['smallest_meaningful_seeds']}; "
        f"intervals.MIN_SEEDS_FOR_SEED_INTERVAL = {MIN_SEEDS_FOR_SEED_INTERVAL}.",
    ]
    results = REPO / "benchmarks" / "results"
    (results / f"{args.name}.json").write_text(json.dumps(document, indent=2) + "\n")
    (results / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
