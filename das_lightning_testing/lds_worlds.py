"""Simulated LDS worlds for coverage checks (tests/test_coverage.py, benchmarks/coverage.py).

A world is NOT the model any interval correction assumes: real subset masks over N training rows, attributions that
share a component across queries (so the losses carry one subset ranking common to all queries, as generated
queries do), a per-model quality factor shared by every query, and training seeds that differ in how noisy their
models are (a seed effect that moves the LDS itself). The target of an interval is the world's population value:
the same quantity with a very large number of subsets and queries, computed by brute force on the same seeds.

Losses of seed r, subset k, query q (lower is better, so minus the kept rows' true attribution):
    L[r, k, q] = -(mask_k . tau_q) / sqrt(N / 4) + quality * u[r, k] + seed_noise[r] * e[r, k, q]
with tau_q = sqrt(shared) * common + sqrt(1 - shared) * specific_q, u and e standard normal. Method m's scores are
tau_q + method_noise[m] * standard normal.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class World:
    num_train: int = 200
    shared: float = 0.5  # share of the attributions' variance common to every query
    quality: float = 0.5  # per-model quality factor (seed x subset), shared by all queries
    seed_noise: tuple[float, ...] = (1.0,)  # per training seed: its models' noise level (len = R)
    method_noise: tuple[float, ...] = (1.0, 2.0)  # per method
    common_seed: int = 0  # the world's fixed common attribution and its fixed seeds

    @property
    def num_seeds(self) -> int:
        return len(self.seed_noise)


@dataclass(frozen=True)
class Experiment:
    scores: list[np.ndarray]  # per method: Q x N
    masks: np.ndarray  # M x N bool
    losses_by_seed: np.ndarray  # R x M x Q


def _common(world: World) -> np.ndarray:
    return np.random.default_rng([world.common_seed, 7]).normal(size=world.num_train)


def draw(world: World, num_subsets: int, num_queries: int, rng: np.random.Generator) -> Experiment:
    """One experiment of the world: fresh subsets, queries, model noise and quality; the world's seeds."""
    size = world.num_train
    common = _common(world)
    specific = rng.normal(size=(num_queries, size))
    tau = np.sqrt(world.shared) * common + np.sqrt(1.0 - world.shared) * specific  # Q x N
    masks = rng.random((num_subsets, size)) < 0.5
    signal = -(masks @ tau.T) / np.sqrt(size / 4.0)  # M x Q
    losses = np.stack(
        [
            signal
            + world.quality * rng.normal(size=(num_subsets, 1))
            + noise * rng.normal(size=(num_subsets, num_queries))
            for noise in world.seed_noise
        ]
    )
    scores = [tau + noise * rng.normal(size=tau.shape) for noise in world.method_noise]
    return Experiment(scores, masks, losses)


@dataclass(frozen=True)
class Targets:
    """Population values (fractions) of a world, for its seeds: per method the plain and centred LDS against the
    seed-averaged losses, and the paired differences method 0 - method 1."""

    plain: tuple[float, ...]
    centred: tuple[float, ...]

    @property
    def plain_difference(self) -> float:
        return self.plain[0] - self.plain[1]

    @property
    def centred_difference(self) -> float:
        return self.centred[0] - self.centred[1]


def population_targets(
    world: World, num_subsets: int = 4000, num_queries: int = 2000, seed: int = 99
) -> Targets:
    """The world's values with many subsets and queries (brute force; a few seconds)."""
    import torch

    from das_lightning.evaluation.lds import lds_from_predictions, nanmean_with_count
    from das_lightning.evaluation.shared_factor import remove_shared_factor

    experiment = draw(world, num_subsets, num_queries, np.random.default_rng([seed, world.common_seed]))
    losses = experiment.losses_by_seed.mean(axis=0)
    centred_losses = torch.as_tensor(remove_shared_factor(losses))
    plain, centred = [], []
    for scores in experiment.scores:
        predicted = experiment.masks @ scores.T  # M x Q
        plain.append(
            nanmean_with_count(lds_from_predictions(torch.as_tensor(predicted), torch.as_tensor(losses)))[0]
        )
        centred.append(
            nanmean_with_count(
                lds_from_predictions(torch.as_tensor(remove_shared_factor(predicted)), centred_losses)
            )[0]
        )
    return Targets(tuple(plain), tuple(centred))
