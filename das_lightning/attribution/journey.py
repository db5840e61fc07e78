"""Journey-TRAK inputs: the generated queries' own sampling trajectories, replayed with the same sampler."""

from __future__ import annotations

import torch

from das_lightning.diffusion import make_scheduler
from das_lightning.manifest import read_manifest
from das_lightning.models.sampling import SamplerSettings, ddim_sample
from das_lightning.paths import RunPaths


def predicted_clean_steps(
    unet: torch.nn.Module, paths: RunPaths, num_queries: int, num_steps: int
) -> list[tuple[int, torch.Tensor]]:
    """For ``num_steps`` evenly spaced denoising steps: (t, predicted x_0 of every query at that step).

    The trajectory is replayed from the settings stored with the generated set, so step states belong to exactly
    the images that were attributed. Each step's query feature is then the loss gradient at (x0_hat_t, t).
    """
    manifest = read_manifest(paths.queries_dir)
    if manifest is None:
        raise FileNotFoundError(
            f"no generated queries at {paths.queries_dir}: train the full model with generation on"
        )
    sampler = SamplerSettings(**{key: manifest[key] for key in SamplerSettings.__dataclass_fields__})
    _, visited = ddim_sample(unet, num_queries, sampler, trajectory=True)
    alphas_cumprod = make_scheduler().alphas_cumprod
    chosen = (
        torch.linspace(0, len(visited) - 1, min(num_steps, len(visited))).round().long().unique().tolist()
    )
    steps = []
    with torch.no_grad():
        for position in chosen:
            timestep, state = visited[position]
            predicted_noise = unet(state, torch.full((state.shape[0],), timestep)).sample
            abar = alphas_cumprod[timestep]
            predicted_clean = (state - (1 - abar).sqrt() * predicted_noise) / abar.sqrt()
            steps.append((timestep, predicted_clean.clamp(-1, 1)))
    return steps
