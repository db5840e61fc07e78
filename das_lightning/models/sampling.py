"""DDIM generation of query images, one seed per image, so image j is the same whatever the batch size."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from diffusers import DDIMScheduler

from das_lightning.diffusion import make_scheduler
from das_lightning.seeding import derive_seed


@dataclass(frozen=True)
class SamplerSettings:
    """Everything that decides a generated set; stored with it (METHOD.md §4: DDIM 50 steps, eta 0)."""

    num_inference_steps: int = 50
    eta: float = 0.0
    seed: int = 0
    # a DDIM scheduler made from a DDPM config would inherit clip_sample=True and "leading" spacing: say it
    clip_sample: bool = True
    timestep_spacing: str = "leading"

    def describe(self) -> dict:
        return {"sampler": "ddim", **asdict(self)}


def initial_noise(num_images: int, shape: tuple[int, ...], seed: int, start: int = 0) -> torch.Tensor:
    """x_T for images start..start+num_images-1, each from its own generator keyed by (seed, image number)."""
    noise = torch.empty((num_images, *shape))
    generator = torch.Generator()
    for row in range(num_images):
        generator.manual_seed(derive_seed("generate", seed, start + row))
        noise[row] = torch.randn(shape, generator=generator)
    return noise


@torch.no_grad()
def ddim_sample(
    unet: torch.nn.Module,
    num_images: int,
    settings: SamplerSettings = SamplerSettings(),
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    trajectory: bool = False,
    first_index: int = 0,
) -> torch.Tensor | tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]:
    """Generate images ``first_index .. first_index + num_images - 1`` in [-1, 1] (float32, CPU).

    Image j depends only on (settings, j): regenerating one image of a set gives that image again.
    With ``trajectory=True`` also returns the list of (timestep, x_t) visited, for Journey-TRAK.
    """
    config = unet.config
    if getattr(config, "cross_attention_dim", None) is not None:
        # a text-conditioned UNet needs prompts and lives in latent space: sample it with its own pipeline
        raise ValueError(
            f"ddim_sample generates with unconditioned pixel-space UNets, not a {type(unet).__name__}; "
            "set generate.num_images=0 and use validation queries"
        )
    shape = (config.in_channels, config.sample_size, config.sample_size)
    scheduler = DDIMScheduler.from_config(
        make_scheduler().config, clip_sample=settings.clip_sample, timestep_spacing=settings.timestep_spacing
    )
    scheduler.set_timesteps(settings.num_inference_steps)
    was_training = unet.training
    unet.eval()
    images, visited = [], []
    for start in range(0, num_images, batch_size):
        count = min(batch_size, num_images - start)
        sample = initial_noise(count, shape, settings.seed, first_index + start).to(device)
        steps = []
        for timestep in scheduler.timesteps:
            if trajectory:
                steps.append((int(timestep), sample.detach().cpu()))
            model_output = unet(sample, timestep.to(device)).sample
            sample = scheduler.step(model_output, timestep, sample, eta=settings.eta).prev_sample
        images.append(sample.clamp(-1, 1).float().cpu())
        visited.append(steps)
    unet.train(was_training)
    result = torch.cat(images)
    if not trajectory:
        return result
    merged = [(steps[0], torch.cat([batch[i][1] for batch in visited])) for i, steps in enumerate(visited[0])]
    return result, merged
