"""Interval coverage on simulated LDS worlds that are not any correction's own model (das_lightning_testing/
lds_worlds.py: real subset masks, attributions shared across queries, a per-model quality factor, seeds whose models
differ in noise), at nominal 90%, for R = 1, 2 and 4 training seeds, paired differences and the centred LDS.

The target is the world's population value for its seeds (brute force on 1500 subsets x 600 queries), so the
two-way interval's claim is tested as stated: conditional on the seeds that were trained. Each check accepts a
coverage within three binomial standard errors of 0.90 over its experiments (0.836-0.964 for 200); the seed-aware
interval targets another draw of the seeds as well (benchmarks/coverage.py measures that target), so against the
conditional one it must only be conservative.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest

from das_lightning.evaluation.intervals import (
    MIN_SEEDS_FOR_SEED_INTERVAL,
    paired_two_way_difference,
    seed_spread_difference,
    seed_spread_lds,
    two_way_bootstrap,
)
from das_lightning.evaluation.shared_factor import remove_shared_factor
from das_lightning_testing.lds_worlds import World, draw, population_targets

NOMINAL = 0.9
EXPERIMENTS = 200
RESAMPLES = 200
NUM_SUBSETS, NUM_QUERIES = 32, 30
TOLERANCE = 3.0 * math.sqrt(NOMINAL * (1 - NOMINAL) / EXPERIMENTS)

WORLDS = {
    1: World(seed_noise=(1.0,)),
    2: World(seed_noise=(0.7, 1.4)),
    4: World(seed_noise=(0.6, 1.0, 1.2, 1.6)),
}


@functools.cache
def coverage(num_seeds: int) -> dict[str, float]:
    """Coverage of each interval over EXPERIMENTS draws of the world with ``num_seeds`` seeds."""
    world = WORLDS[num_seeds]
    targets = population_targets(world, num_subsets=1500, num_queries=600)
    rng = np.random.default_rng(2026 + num_seeds)
    identity = np.eye(NUM_SUBSETS)
    names = ("plain", "seeded", "difference", "seeded_difference", "centred", "centred_diff", "claimed")
    hits: dict[str, list[bool]] = {name: [] for name in names}
    for experiment in range(EXPERIMENTS):
        sample = draw(world, NUM_SUBSETS, NUM_QUERIES, rng)
        a, b = sample.scores
        spread = seed_spread_lds(a, sample.masks, sample.losses_by_seed, RESAMPLES, experiment, NOMINAL)
        averaged = spread.averaged
        hits["plain"].append(averaged.corrected_low <= targets.plain[0] <= averaged.corrected_high)
        hits["seeded"].append(spread.seed_low <= targets.plain[0] <= spread.seed_high)
        difference = seed_spread_difference(
            a, b, sample.masks, sample.losses_by_seed, RESAMPLES, experiment, NOMINAL
        )
        hits["difference"].append(difference.low <= targets.plain_difference <= difference.high)
        hits["seeded_difference"].append(
            difference.seed_low <= targets.plain_difference <= difference.seed_high
        )
        hits["claimed"].append(spread.seed_interval)
        centred_losses = remove_shared_factor(sample.losses_by_seed.mean(axis=0))
        centred_a = remove_shared_factor(sample.masks @ a.T).T
        centred_b = remove_shared_factor(sample.masks @ b.T).T
        centred = two_way_bootstrap(centred_a, identity, centred_losses, RESAMPLES, experiment, NOMINAL)
        hits["centred"].append(centred.corrected_low <= targets.centred[0] <= centred.corrected_high)
        centred_difference = paired_two_way_difference(
            centred_a, centred_b, identity, centred_losses, RESAMPLES, experiment, NOMINAL
        )
        hits["centred_diff"].append(
            centred_difference.corrected_low
            <= targets.centred_difference
            <= centred_difference.corrected_high
        )
    return {name: float(np.mean(values)) for name, values in hits.items()}


@pytest.mark.parametrize("num_seeds", [1, 2, 4])
def test_two_way_interval_covers_the_world_for_its_seeds(num_seeds: int) -> None:
    """Measured (seeded): plain 0.91 / 0.88 / 0.90 at R = 1 / 2 / 4 (see the module docstring for the bounds)."""
    result = coverage(num_seeds)
    for name in ("plain", "centred", "centred_diff"):
        assert abs(result[name] - NOMINAL) <= TOLERANCE, (name, result)


@pytest.mark.parametrize("num_seeds", [1, 2, 4])
def test_paired_differences_cover_for_the_seeds_trained(num_seeds: int) -> None:
    result = coverage(num_seeds)
    assert abs(result["difference"] - NOMINAL) <= TOLERANCE, result
    assert result["claimed"] == float(
        num_seeds >= MIN_SEEDS_FOR_SEED_INTERVAL
    )  # the seed-aware one, where claimed


def test_the_seed_aware_interval_is_conservative_for_the_seeds_trained() -> None:
    """It also covers another draw of the seeds (benchmarks/coverage.py measures that), so against these seeds' own
    value it is at least nominal and at least as often right as the two-way interval."""
    result = coverage(4)
    assert result["seeded"] >= NOMINAL - TOLERANCE, result
    assert result["seeded"] >= result["plain"]
    assert result["seeded_difference"] >= NOMINAL - TOLERANCE, result
