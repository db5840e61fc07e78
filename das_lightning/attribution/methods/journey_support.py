"""Journey-TRAK inputs: the generated queries' own sampling trajectories, replayed with the same sampler."""

from __future__ import annotations

import torch

from das_lightning.artifacts import stored_sampler
from das_lightning.models.adapters import MeasuredModel
from das_lightning.models.sampling import conditioning, ddim_sample
from das_lightning.paths import RunPaths


def predicted_clean_steps(
    model: MeasuredModel, paths: RunPaths, num_queries: int, num_steps: int, batch_size: int = 64
) -> list[tuple[int, torch.Tensor]]:
    """For ``num_steps`` evenly spaced denoising steps: (t, predicted x_0 of every query at that step).

    The trajectory is replayed from the settings stored with the generated set, so step states belong to exactly
    the images that were attributed, each conditioned as when it was generated. The states are in the network's
    space (pixels, or latents of a latent model); each step's query feature is the loss gradient at (x0_hat_t, t).
    """
    device = next(model.network.parameters()).device
    generated = ddim_sample(
        model, num_queries, stored_sampler(paths), batch_size=batch_size, device=device, trajectory=True
    )
    extra = {key: value.to(device) for key, value in conditioning(model, generated.labels.to(device)).items()}
    alphas_cumprod = model.alphas_cumprod.to(device)
    visited = generated.trajectory
    chosen = (
        torch.linspace(0, len(visited) - 1, min(num_steps, len(visited))).round().long().unique().tolist()
    )
    steps = []
    with torch.no_grad():
        for position in chosen:
            timestep, states = visited[position]
            abar = alphas_cumprod[timestep]
            predicted = []
            for start in range(0, len(states), batch_size):
                state = states[start : start + batch_size].to(device)
                rows = {key: value[start : start + batch_size] for key, value in extra.items()}
                steps_in = torch.full((state.shape[0],), timestep, device=device)
                predicted_noise = model.network(state, steps_in, **rows).sample.float()
                predicted.append(((state - (1 - abar).sqrt() * predicted_noise) / abar.sqrt()).cpu())
            predicted_clean = torch.cat(predicted)
            if model.decode is None:  # pixels live in [-1, 1]; latents have no such bound
                predicted_clean = predicted_clean.clamp(-1, 1)
            steps.append((timestep, predicted_clean))
    return steps
