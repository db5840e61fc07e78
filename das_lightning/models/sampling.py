"""DDIM generation of query images, one seed per image, so image j is the same whatever the batch size.

One sampler for every model kind: a pixel DDPM samples images, a latent model samples latents that its VAE decodes,
and a class- or prompt-conditioned model conditions image j on class j mod num_classes (its label, stored with it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from diffusers import DDIMScheduler

from das_lightning.models.adapters import MeasuredModel
from das_lightning.seeding import derive_seed


@dataclass(frozen=True)
class SamplerSettings:
    """Everything that decides a generated set; stored with it (METHOD.md §4: DDIM 50 steps, eta 0)."""

    num_inference_steps: int = 50
    eta: float = 0.0
    seed: int = 0
    # None: as the model's training schedule says (pixel DDPM: clip x_0 to [-1, 1]; latent models: never clip)
    clip_sample: bool | None = None
    timestep_spacing: str = "leading"

    def describe(self) -> dict:
        return {"sampler": "ddim", **asdict(self)}


@dataclass
class Generated:
    """Images in [-1, 1] (float32, CPU) with the class each was conditioned on (0 for unconditioned models);
    ``trajectory``: the (timestep, x_t) visited in the network's space, when asked for."""

    images: torch.Tensor
    labels: torch.Tensor
    trajectory: list[tuple[int, torch.Tensor]] = field(default_factory=list)


def generation_labels(num_classes: int, first_index: int, count: int) -> torch.Tensor:
    """Class of images first_index .. first_index + count - 1: j mod num_classes (all 0 when unconditioned)."""
    indices = torch.arange(first_index, first_index + count)
    return indices % num_classes if num_classes > 0 else torch.zeros(count, dtype=torch.long)


def initial_noise(num_images: int, shape: tuple[int, ...], seed: int, start: int = 0) -> torch.Tensor:
    """x_T for images start..start+num_images-1, each from its own generator keyed by (seed, image number)."""
    noise = torch.empty((num_images, *shape))
    generator = torch.Generator()
    for row in range(num_images):
        generator.manual_seed(derive_seed("generate", seed, start + row))
        noise[row] = torch.randn(shape, generator=generator)
    return noise


def ddim_scheduler(model: MeasuredModel, settings: SamplerSettings) -> DDIMScheduler:
    """A DDIM scheduler on the model's own training schedule, set to ``settings``' steps."""
    overrides = {"timestep_spacing": settings.timestep_spacing}
    if settings.clip_sample is not None:
        overrides["clip_sample"] = settings.clip_sample
    # without the config's private keys: "_use_default_values" would make from_config drop values set on purpose
    # (a latent model's clip_sample=False came back as DDIM's default True, clipping latents to [-1, 1])
    config = {key: value for key, value in model.scheduler_config.items() if not key.startswith("_")}
    scheduler = DDIMScheduler.from_config(config, **overrides)
    scheduler.set_timesteps(settings.num_inference_steps)
    return scheduler


def conditioning(model: MeasuredModel, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The network's extra inputs for images of these classes (none for unconditioned models)."""
    if model.extra_inputs is None:
        return {}
    return dict(model.extra_inputs({"index": torch.arange(len(labels)), "label": labels}))


@torch.no_grad()
def ddim_sample(
    model: MeasuredModel,
    num_images: int,
    settings: SamplerSettings = SamplerSettings(),
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    trajectory: bool = False,
    first_index: int = 0,
) -> Generated:
    """Generate images ``first_index .. first_index + num_images - 1``.

    Image j depends only on (model, settings, j): regenerating one image of a set gives that image again.
    With ``trajectory=True`` the result also holds the (timestep, x_t) visited, for Journey-TRAK.
    """
    network = model.network
    config = network.config
    shape = (config.in_channels, config.sample_size, config.sample_size)
    scheduler = ddim_scheduler(model, settings)
    was_training = network.training
    network.eval()
    images, visited = [], []
    labels = generation_labels(model.num_classes, first_index, num_images)
    dtype = next(network.parameters()).dtype
    for start in range(0, num_images, batch_size):
        count = min(batch_size, num_images - start)
        sample = initial_noise(count, shape, settings.seed, first_index + start).to(device)
        extra = {
            key: value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
            for key, value in conditioning(model, labels[start : start + count].to(device)).items()
        }
        steps = []
        for timestep in scheduler.timesteps:
            if trajectory:
                steps.append((int(timestep), sample.detach().cpu()))
            model_output = network(sample.to(dtype), timestep.to(device), **extra).sample.float()
            sample = scheduler.step(model_output, timestep, sample, eta=settings.eta).prev_sample
        decoded = model.decode(sample) if model.decode is not None else sample
        images.append(decoded.clamp(-1, 1).float().cpu())
        visited.append(steps)
    network.train(was_training)
    merged = (
        [(steps[0], torch.cat([batch[i][1] for batch in visited])) for i, steps in enumerate(visited[0])]
        if trajectory and visited
        else []
    )
    return Generated(torch.cat(images), labels, merged)
