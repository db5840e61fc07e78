"""The noise rule and the per-sample diffusion loss, shared by training, feature collection and the LDS
ground truth so that they can never drift apart.

The noise for an image is keyed by the image's identity (its set and dataset index), the timestep and an
``e_seed``, never by its position in a batch: the same image sees the same noise in its attribution features
and in the LDS ground truth, and two different images never share noise (METHOD.md §2).
"""

from __future__ import annotations

from collections.abc import Sequence

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


def rule_noise(
    set_name: str,
    indices: Sequence[int] | torch.Tensor,
    timesteps: Sequence[int] | torch.Tensor,
    e_seed: int,
    shape: Sequence[int],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Noise for each (image, timestep) pair: ``out[b]`` is drawn for ``(set_name, indices[b], timesteps[b], e_seed)``.

    Drawn on the CPU from a generator per pair, so the values are the same on every device, batch size and
    number of processes. ``indices`` and ``timesteps`` have equal length B; returns a (B, *shape) tensor.
    """
    indices = [int(i) for i in (indices.tolist() if torch.is_tensor(indices) else indices)]
    timesteps = [int(t) for t in (timesteps.tolist() if torch.is_tensor(timesteps) else timesteps)]
    if len(indices) != len(timesteps):
        raise ValueError(f"indices ({len(indices)}) and timesteps ({len(timesteps)}) differ in length")
    out = torch.empty((len(indices), *shape), dtype=torch.float32)
    generator = torch.Generator()
    for row, (index, timestep) in enumerate(zip(indices, timesteps, strict=True)):
        generator.manual_seed(derive_seed("noise", set_name, index, timestep, int(e_seed)))
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
