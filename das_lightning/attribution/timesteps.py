"""Timestep selection: which K of the training timesteps the per-sample gradient is averaged over (METHOD.md §2)."""

from __future__ import annotations

import torch

from das_lightning.errors import ConfigError
from das_lightning.seeding import derive_seed

TIMESTEP_STRATEGIES = ("uniform", "cumulative", "random", "explicit")


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
