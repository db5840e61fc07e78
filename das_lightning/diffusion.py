"""The noise rule and the per-sample diffusion loss, shared by training, feature collection and the LDS
ground truth so that they can never drift apart.

The noise for an image is keyed by the image's identity (its set and dataset index), the timestep and an
``e_seed``, never by its position in a batch: two different images never share noise (METHOD.md §2). Features that
average several noise draws per timestep (METHOD.md §7) key each draw by its draw id too; draw 0 is the noise every
feature has always used (:func:`noise_seed`, unchanged, so feature stores and DAS residuals stay byte-identical).

Two named streams give the LDS ground truth its noise (``lds.noise``, :func:`ground_truth_noise_seed`):

- ``disjoint`` (the default): seeds whose first key is :data:`GROUND_TRUTH_NOISE_DOMAIN`, where every feature
  seed's first key is ``"noise"`` (:func:`noise_seed`). :func:`das_lightning.seeding.derive_seed` hashes the keys'
  text in order, the first key's text ending at a separator character that neither first key holds, so no set name,
  index, timestep, e_seed or draw id that a feature setting can choose reproduces a disjoint seed.
- ``coupled``: draw 0 of the features' rule, as every ground truth measured before ``lds.noise`` existed (caches and
  bundles without the key read as coupled). The paper's protocol, but it favours some feature settings: with the
  ground truth on t in {0, 50, ..., 950} x e_seeds {0, 1, 2}, grid features at e_seed 0 reuse 10 of a query's 60
  ground-truth draws and stratified features none (METHOD.md §8, "Noise overlap").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from diffusers import DDPMScheduler

from das_lightning.errors import ConfigError
from das_lightning.seeding import derive_seed

NUM_TRAIN_TIMESTEPS = 1000
# lds.noise, the ground truth's stream; caches and bundles made before lds.noise were measured "coupled"
NOISE_STREAMS = ("disjoint", "coupled")
DEFAULT_GROUND_TRUTH_NOISE = "disjoint"
LEGACY_GROUND_TRUTH_NOISE = "coupled"
# the first key of every disjoint seed; no feature seed has it (theirs is "noise")
GROUND_TRUTH_NOISE_DOMAIN = "noise/lds-ground-truth"


def make_scheduler(
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
    beta_schedule: str = "linear",
    beta_start: float = 1e-4,
    beta_end: float = 2e-2,
    prediction_type: str = "epsilon",
) -> DDPMScheduler:
    """The DDPM training scheduler of the paper (1000 steps, linear betas, epsilon prediction)."""
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        beta_start=beta_start,
        beta_end=beta_end,
        prediction_type=prediction_type,
    )


def noise_seed(set_name: str, index: int, timestep: int, e_seed: int, draw: int = 0) -> int:
    """The seed of one noise draw: draw 0 is keyed by (set, index, t, e_seed) as it always was (existing feature
    stores and ground truths stay valid); draw d > 0 adds its id, so no two draws of one image share noise."""
    if draw < 0:
        raise ValueError(f"draw ids are non-negative, got {draw}")
    if draw == 0:
        return derive_seed("noise", set_name, index, timestep, int(e_seed))
    return derive_seed("noise", set_name, index, timestep, int(e_seed), int(draw))


def check_noise_stream(stream: str) -> str:
    """``stream`` when it names a ground-truth noise stream (:data:`NOISE_STREAMS`); a ConfigError otherwise."""
    if stream not in NOISE_STREAMS:
        raise ConfigError(
            f"lds.noise must be one of {list(NOISE_STREAMS)} (disjoint: the ground truth's own noise, which no "
            f"feature setting reproduces; coupled: the features' draw 0, as before lds.noise), not {stream!r}"
        )
    return stream


def ground_truth_noise_seed(set_name: str, index: int, timestep: int, e_seed: int, stream: str) -> int:
    """The seed of the LDS ground truth's noise for (set, index, t, e_seed) under ``stream`` (see the module's
    docstring): ``coupled`` is the features' draw 0, ``disjoint`` the same identity keyed under its own domain."""
    if check_noise_stream(stream) == "coupled":
        return noise_seed(set_name, index, timestep, e_seed)
    return derive_seed(GROUND_TRUTH_NOISE_DOMAIN, set_name, index, timestep, int(e_seed))


def _seeded_noise(
    seeds: Sequence[int], shape: Sequence[int], device: torch.device | str, dtype: torch.dtype
) -> torch.Tensor:
    """One standard normal (*shape) tensor per seed, drawn on the CPU (the same values on every device)."""
    out = torch.empty((len(seeds), *shape), dtype=torch.float32)
    generator = torch.Generator()
    for row, seed in enumerate(seeds):
        generator.manual_seed(seed)
        out[row] = torch.randn(tuple(shape), generator=generator)
    return out.to(device=device, dtype=dtype)


def rule_noise(
    set_name: str,
    indices: Sequence[int] | torch.Tensor,
    timesteps: Sequence[int] | torch.Tensor,
    e_seed: int,
    shape: Sequence[int],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    draws: int | Sequence[int] | torch.Tensor = 0,
) -> torch.Tensor:
    """Noise for each (image, timestep) pair: ``out[b]`` is drawn for ``(set_name, indices[b], timesteps[b], e_seed)``
    and the draw id ``draws[b]`` (one id for every row when an int; see :func:`noise_seed`).

    Drawn on the CPU from a generator per pair, so the values are the same on every device, batch size and
    number of processes. ``indices`` and ``timesteps`` have equal length B; returns a (B, *shape) tensor.
    """
    indices = [int(i) for i in (indices.tolist() if torch.is_tensor(indices) else indices)]
    timesteps = [int(t) for t in (timesteps.tolist() if torch.is_tensor(timesteps) else timesteps)]
    if len(indices) != len(timesteps):
        raise ValueError(f"indices ({len(indices)}) and timesteps ({len(timesteps)}) differ in length")
    if isinstance(draws, int):
        draw_ids = [draws] * len(indices)
    else:
        draw_ids = [int(d) for d in (draws.tolist() if torch.is_tensor(draws) else draws)]
        if len(draw_ids) != len(indices):
            raise ValueError(f"indices ({len(indices)}) and draws ({len(draw_ids)}) differ in length")
    seeds = [
        noise_seed(set_name, index, timestep, e_seed, draw)
        for index, timestep, draw in zip(indices, timesteps, draw_ids, strict=True)
    ]
    return _seeded_noise(seeds, shape, device, dtype)


def ground_truth_noise(
    set_name: str,
    indices: Sequence[int] | torch.Tensor,
    timesteps: Sequence[int] | torch.Tensor,
    e_seed: int,
    shape: Sequence[int],
    stream: str = DEFAULT_GROUND_TRUTH_NOISE,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The LDS ground truth's noise, (B, *shape): ``out[b]`` for ``(set_name, indices[b], timesteps[b], e_seed)``
    under ``stream`` (:func:`ground_truth_noise_seed`); ``coupled`` equals :func:`rule_noise` byte for byte."""
    indices, timesteps = as_index_list(indices), as_index_list(timesteps)
    if len(indices) != len(timesteps):
        raise ValueError(f"indices ({len(indices)}) and timesteps ({len(timesteps)}) differ in length")
    seeds = [
        ground_truth_noise_seed(set_name, index, timestep, e_seed, stream)
        for index, timestep in zip(indices, timesteps, strict=True)
    ]
    return _seeded_noise(seeds, shape, device, dtype)


def add_noise(
    clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, for per-sample timesteps (B,)."""
    abar = alphas_cumprod.to(device=clean.device, dtype=clean.dtype)[timesteps.long()]
    abar = abar.view(-1, *([1] * (clean.dim() - 1)))
    return abar.sqrt() * clean + (1.0 - abar).sqrt() * noise


def per_sample_loss(
    unet: torch.nn.Module,
    clean: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    **unet_kwargs,
) -> torch.Tensor:
    """L_simple per sample: mean over pixels of (eps_theta(x_t, t) - eps)^2. Returns shape (B,)."""
    noisy = add_noise(clean, noise, timesteps, alphas_cumprod)
    predicted = unet(noisy, timesteps, **unet_kwargs).sample
    return (predicted.float() - noise.float()).pow(2).flatten(1).mean(dim=1)


def as_index_list(indices: Sequence[int] | torch.Tensor) -> list[int]:
    return [int(i) for i in (indices.tolist() if torch.is_tensor(indices) else indices)]


@torch.no_grad()
def query_losses(
    unet: torch.nn.Module,
    alphas_cumprod: torch.Tensor,
    images: torch.Tensor,
    indices: Sequence[int] | torch.Tensor,
    set_name: str,
    timesteps: Sequence[int],
    e_seeds: Sequence[int],
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    extra: Mapping[str, torch.Tensor] | None = None,
    noise: str = "coupled",
) -> torch.Tensor:
    """The loss of ``unet`` on each image under the noise rule (the LDS ground truth, DAS residuals): images (Q, C, H, W) in [-1, 1] -> (Q,) float64.

    Every (query, timestep, e_seed) triple is one row of a UNet batch of up to ``batch_size`` rows; the noise of a row
    depends only on (set_name, indices[q], t, e_seed), so the result does not depend on batch size or query order.
    ``extra`` holds per-query network inputs indexed like ``images`` (e.g. ``encoder_hidden_states`` (Q, L, D)).
    ``noise`` is the stream (:func:`ground_truth_noise_seed`): ``coupled``, the features' draw 0, is what DAS
    residuals use; the LDS ground truth passes ``lds.noise`` (default ``disjoint``, see GroundTruthModule).
    """
    check_noise_stream(noise)
    index_list = as_index_list(indices)
    num_queries = images.shape[0]
    if len(index_list) != num_queries:
        raise ValueError(f"{len(index_list)} indices for {num_queries} images")
    timestep_list, e_seed_list = [int(t) for t in timesteps], [int(e) for e in e_seeds]
    if not timestep_list or not e_seed_list:
        raise ValueError("need at least one timestep and one e_seed")
    extra = dict(extra or {})
    for key, value in extra.items():
        if value.shape[0] != num_queries:
            raise ValueError(f"extra {key!r} has {value.shape[0]} rows for {num_queries} queries")
    was_training = unet.training
    unet.eval()
    alphas_cumprod = alphas_cumprod.to(device)
    # all (query, timestep, e_seed) triples, flattened: row r -> query r // (T*E), then t, then e_seed
    query_of_row = torch.arange(num_queries).repeat_interleave(len(timestep_list) * len(e_seed_list))
    timestep_of_row = torch.tensor(timestep_list).repeat_interleave(len(e_seed_list)).repeat(num_queries)
    e_seed_of_row = torch.tensor(e_seed_list).repeat(num_queries * len(timestep_list))
    totals = torch.zeros(num_queries, dtype=torch.float64)
    try:
        for start in range(0, query_of_row.numel(), batch_size):
            rows = slice(start, start + batch_size)
            queries, steps, seeds = query_of_row[rows], timestep_of_row[rows], e_seed_of_row[rows]
            # the noise takes one e_seed: draw each e_seed's rows and scatter them back into batch order
            drawn = torch.empty((queries.numel(), *images.shape[1:]), dtype=torch.float32)
            for e_seed in seeds.unique().tolist():
                chosen = seeds == e_seed
                drawn[chosen] = ground_truth_noise(
                    set_name,
                    [index_list[q] for q in queries[chosen].tolist()],
                    steps[chosen],
                    e_seed,
                    images.shape[1:],
                    stream=noise,
                )
            clean = images[queries].to(device=device, dtype=torch.float32)
            row_extra = {key: value[queries].to(device) for key, value in extra.items()}
            losses = per_sample_loss(
                unet, clean, drawn.to(device), steps.to(device), alphas_cumprod, **row_extra
            )  # (B,)
            totals.index_add_(0, queries, losses.double().cpu())
    finally:
        unet.train(was_training)
    return totals / (len(timestep_list) * len(e_seed_list))
