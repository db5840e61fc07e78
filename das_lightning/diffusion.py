"""The noise rule and the per-sample diffusion loss, shared by training, feature collection and the LDS
ground truth so that they can never drift apart.

The noise for an image is keyed by the image's identity (its set and dataset index), the timestep and an
``e_seed``, never by its position in a batch: the same image sees the same noise in its attribution features
and in the LDS ground truth, and two different images never share noise (METHOD.md §2). Features that average
several noise draws per timestep (METHOD.md §7) key each draw by its draw id too; draw 0 is the noise every
stage has always used, so the ground truth (one draw) and one-draw features still see the same noise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from diffusers import DDPMScheduler

from das_lightning.seeding import derive_seed

NUM_TRAIN_TIMESTEPS = 1000


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
    out = torch.empty((len(indices), *shape), dtype=torch.float32)
    generator = torch.Generator()
    for row, (index, timestep, draw) in enumerate(zip(indices, timesteps, draw_ids, strict=True)):
        generator.manual_seed(noise_seed(set_name, index, timestep, e_seed, draw))
        out[row] = torch.randn(tuple(shape), generator=generator)
    return out.to(device=device, dtype=dtype)


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
) -> torch.Tensor:
    """The loss of ``unet`` on each image under the noise rule (the LDS ground truth, DAS residuals): images (Q, C, H, W) in [-1, 1] -> (Q,) float64.

    Every (query, timestep, e_seed) triple is one row of a UNet batch of up to ``batch_size`` rows; the noise of a row
    depends only on (set_name, indices[q], t, e_seed), so the result does not depend on batch size or query order.
    ``extra`` holds per-query network inputs indexed like ``images`` (e.g. ``encoder_hidden_states`` (Q, L, D)).
    """
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
            # rule_noise takes one e_seed: draw each e_seed's rows and scatter them back into batch order
            noise = torch.empty((queries.numel(), *images.shape[1:]), dtype=torch.float32)
            for e_seed in seeds.unique().tolist():
                chosen = seeds == e_seed
                noise[chosen] = rule_noise(
                    set_name,
                    [index_list[q] for q in queries[chosen].tolist()],
                    steps[chosen],
                    e_seed,
                    images.shape[1:],
                )
            clean = images[queries].to(device=device, dtype=torch.float32)
            row_extra = {key: value[queries].to(device) for key, value in extra.items()}
            losses = per_sample_loss(
                unet, clean, noise.to(device), steps.to(device), alphas_cumprod, **row_extra
            )  # (B,)
            totals.index_add_(0, queries, losses.double().cpu())
    finally:
        unet.train(was_training)
    return totals / (len(timestep_list) * len(e_seed_list))
