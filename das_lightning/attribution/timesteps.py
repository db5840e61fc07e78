"""Timestep selection and the draw plan: which K of the training timesteps the per-sample gradient is averaged
over (METHOD.md §2), and which noise draws each of them gets (METHOD.md §7)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from das_lightning.errors import ConfigError
from das_lightning.seeding import derive_seed

TIMESTEP_STRATEGIES = ("uniform", "cumulative", "random", "explicit")
# grid: the timesteps of the strategy, fixed; stratified: one jittered timestep in each of K equal strata of [0, T)
SAMPLING_SCHEMES = ("grid", "stratified")


def select_timesteps(
    strategy: str,
    num_timesteps: int,
    total: int = 1000,
    seed: int = 0,
    explicit: list[int] | None = None,
) -> list[int]:
    """The K timesteps of a strategy, sorted ascending.

    ``uniform``: range(0, total, total // K) (the paper's default); ``cumulative``: range(K) (the first K);
    ``random``: K distinct timesteps drawn from ``derive_seed("timesteps", seed, K)``; ``explicit``: ``explicit``
    as given, sorted (``num_timesteps`` is then ignored, so a config default for it does not clash). When K does
    not divide ``total``, ``uniform`` keeps the first K of range(0, total, total // K).
    """
    if strategy not in TIMESTEP_STRATEGIES:
        raise ConfigError(f"unknown timestep strategy {strategy!r}; known: {list(TIMESTEP_STRATEGIES)}")
    if strategy == "explicit":
        if not explicit:
            raise ConfigError("timestep strategy 'explicit' needs a non-empty `explicit` list of timesteps")
        chosen = [int(t) for t in explicit]
        outside = [t for t in chosen if not 0 <= t < total]
        if outside:
            raise ConfigError(f"explicit timesteps {outside} are outside [0, {total})")
        if len(set(chosen)) != len(chosen):
            raise ConfigError(f"explicit timesteps repeat: {chosen}")
        return sorted(chosen)
    if explicit is not None:
        raise ConfigError(f"`explicit` timesteps were given but the strategy is {strategy!r}, not 'explicit'")
    if not 1 <= num_timesteps <= total:
        raise ConfigError(f"num_timesteps must be in [1, {total}], got {num_timesteps}")
    if strategy == "uniform":
        return list(range(0, total, total // num_timesteps))[:num_timesteps]
    if strategy == "cumulative":
        return list(range(num_timesteps))
    generator = torch.Generator().manual_seed(derive_seed("timesteps", seed, num_timesteps))
    return sorted(torch.randperm(total, generator=generator)[:num_timesteps].tolist())


def stratified_timesteps(num_timesteps: int, total: int = 1000, seed: int = 0) -> list[int]:
    """One timestep in each of K strata [k T / K, (k + 1) T / K) (integer bounds), ascending.

    The offset within stratum k comes from ``derive_seed("stratified-timestep", seed, K, k)``: the same K timesteps
    for every image of every set (store rows stay comparable, and queries and training images share them), a
    different jitter for another seed (the feature settings' ``e_seed``).
    """
    if not 1 <= num_timesteps <= total:
        raise ConfigError(f"num_timesteps must be in [1, {total}], got {num_timesteps}")
    chosen = []
    for stratum in range(num_timesteps):
        low, high = stratum * total // num_timesteps, (stratum + 1) * total // num_timesteps
        offset = derive_seed("stratified-timestep", seed, num_timesteps, stratum) % (high - low)
        chosen.append(low + offset)
    return chosen


@dataclass(frozen=True)
class Draw:
    """One (timestep, noise) draw of a feature: its noise is ``sign`` x the noise rule's draw ``noise_id``."""

    timestep: int
    draw: int  # position among the draws of this timestep, 0 .. D-1
    noise_id: int  # the draw id given to the noise rule (diffusion.rule_noise)
    sign: float  # -1 for the second draw of an antithetic pair, else +1


def draw_plan(timesteps: Sequence[int], draws_per_timestep: int = 1, antithetic: bool = False) -> list[Draw]:
    """The draws of a feature, timestep-major: D per timestep.

    Draw d of a timestep uses the noise rule's draw id d; with ``antithetic``, draws 2j and 2j + 1 are the pair
    (eps_j, -eps_j) with eps_j the rule's draw j, so draw 0 is always the one-draw noise of every other stage.
    """
    if draws_per_timestep < 1:
        raise ConfigError(f"draws_per_timestep must be at least 1, got {draws_per_timestep}")
    if antithetic and draws_per_timestep % 2:
        raise ConfigError(
            f"antithetic draws come in pairs (eps, -eps): draws_per_timestep must be even, got {draws_per_timestep}"
        )
    return [
        Draw(
            int(timestep),
            draw,
            draw // 2 if antithetic else draw,
            -1.0 if antithetic and draw % 2 else 1.0,
        )
        for timestep in timesteps
        for draw in range(draws_per_timestep)
    ]
