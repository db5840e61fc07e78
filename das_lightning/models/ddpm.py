"""The DDPM LightningModule: epsilon-prediction training of a diffusers UNet with the paper's recipe
(AdamW, cosine schedule with warm-up, gradient clipping via the Trainer, optional EMA)."""

from __future__ import annotations

import copy
import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import lightning as L
import torch
from diffusers.optimization import get_cosine_schedule_with_warmup
from safetensors import SafetensorError
from typing_extensions import override

from das_lightning.diffusion import NUM_TRAIN_TIMESTEPS, make_scheduler
from das_lightning.errors import ConfigError, NumericalError
from das_lightning.manifest import CorruptArtifactError, atomic_write_text
from das_lightning.seeding import derive_seed

if TYPE_CHECKING:
    from das_lightning.data import ImageDataset

# what to change when training diverges (overrides of train.py; tests check that they compose)
NAN_LOSS_ADVICE = (
    "lower the learning rate (train.optimizer.lr=...) or train in full precision (trainer.precision=32-true)"
)

# In a trained-model folder: names the function that loads it, for models that are not a plain UNet2DModel
TRAINED_LOADER_FILE = "das_loader.json"


def write_trained_loader(folder: Path, loader: str) -> None:
    """Record in a trained-model folder which function (``"package.module:function"``) loads it back."""
    atomic_write_text(Path(folder) / TRAINED_LOADER_FILE, json.dumps({"loader": loader}))


def load_trained_network(folder: Path) -> torch.nn.Module:
    """The network saved by :meth:`DiffusionModule.save_trained` in ``folder``: a diffusers ``UNet2DModel``
    unless the folder names its own loader (e.g. a LoRA run: pretrained pipeline + adapters)."""
    marker = Path(folder) / TRAINED_LOADER_FILE
    try:
        if marker.exists():
            loader = json.loads(marker.read_text())["loader"]
            module_name, function_name = loader.split(":")
            # only our own loaders: a folder from elsewhere must not be able to name any importable function
            if not module_name.startswith("das_lightning.") or function_name.startswith("_"):
                raise ConfigError(f"{marker} names loader {loader!r}; only das_lightning loaders are allowed")
            return getattr(importlib.import_module(module_name), function_name)(folder)
        from diffusers import UNet2DModel

        check_weights_fit_config(Path(folder))
        return UNet2DModel.from_pretrained(str(folder), use_safetensors=True)
    except FileNotFoundError:
        raise  # already one clear message (e.g. a pretrained component that is not in the local cache)
    except (SafetensorError, OSError, json.JSONDecodeError) as error:
        raise CorruptArtifactError(
            f"cannot load the model in {folder}: a file there is truncated or damaged ({type(error).__name__}: "
            f"{str(error).strip().splitlines()[0] if str(error).strip() else 'no detail'}); delete {folder} and "
            "rerun `python train.py` with the same settings to retrain it (a model trained elsewhere: replace "
            "its files)"
        ) from error


def check_weights_fit_config(folder: Path) -> None:
    """Refuse a ``UNet2DModel`` folder whose safetensors weights are not exactly the network its ``config.json``
    builds. diffusers only logs a warning for weights it drops (e.g. the mid-block attention GroupNorm of a
    diffusers < 0.18 ``scale_shift`` model read by a newer diffusers) and would measure another network."""
    from diffusers import UNet2DModel
    from safetensors import safe_open

    weights = folder / "diffusion_pytorch_model.safetensors"
    if not (folder / "config.json").exists() or not weights.exists():
        return  # diffusers' own error names what is missing (or the shards of a sharded checkpoint)
    with torch.device("meta"):  # the network's names and shapes, no memory
        skeleton = UNet2DModel.from_config(UNet2DModel.load_config(str(folder)))
    with safe_open(str(weights), framework="pt") as handle:
        stored = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}  # header only
    # the attention names of diffusers < 0.15 (query/key/value/proj_attn), renamed on load as diffusers does
    stored = skeleton._fix_state_dict_keys_on_load(stored)
    expected = {name: tuple(tensor.shape) for name, tensor in skeleton.state_dict().items()}
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    resized = sorted(name for name in set(expected) & set(stored) if expected[name] != stored[name])
    if not (missing or unexpected or resized):
        return
    problems = [
        f"{label} ({len(names)}): {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}"
        for label, names in (
            ("missing", missing),
            ("not in the network", unexpected),
            ("other shape", resized),
        )
        if names
    ]
    hint = ""
    if any(".attentions.0.group_norm." in name for name in unexpected) and (
        skeleton.config.resnet_time_scale_shift != "default"
    ):
        hint = (
            "; a scale_shift model saved by diffusers < 0.18 has a mid-block attention GroupNorm: add "
            f'"attn_norm_num_groups": {skeleton.config.norm_num_groups} to its config.json (conf/model/cifar_das.yaml)'
        )
    raise CorruptArtifactError(
        f"{weights} does not hold the network {folder / 'config.json'} describes: "
        + "; ".join(problems)
        + hint
    )


@dataclass
class OptimizerSettings:
    """AdamW + cosine-with-warm-up settings; defaults are the paper's (METHOD.md §4)."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.95, 0.999)
    weight_decay: float = 1e-6
    warmup_steps: int = 500
    total_steps: int = 8000
    ema_decay: float | None = None


class DiffusionModule(L.LightningModule):
    """Trains ``unet`` to predict the noise added at a uniformly drawn timestep (L_simple).

    Training noise comes from a generator owned by the module (seeded from ``seed`` and the rank, saved in
    checkpoints), not from the noise rule: the noise rule is for measuring, training needs fresh noise.
    """

    def __init__(self, unet: torch.nn.Module, optimizer: OptimizerSettings, seed: int = 0):
        super().__init__()
        self.unet = unet
        self.optimizer_settings = optimizer
        self.seed = seed
        self.noise_scheduler = make_scheduler()
        self.register_buffer("alphas_cumprod", self.noise_scheduler.alphas_cumprod.clone(), persistent=False)
        self.ema_unet = None
        if optimizer.ema_decay is not None:
            self.ema_unet = copy.deepcopy(unet).requires_grad_(False)
        self._noise_generator: torch.Generator | None = None
        self._pending_generator_state: torch.Tensor | None = None

    @property
    def sampling_unet(self) -> torch.nn.Module:
        """The weights users load and sample from: the EMA copy when EMA is on."""
        return self.ema_unet if self.ema_unet is not None else self.unet

    def _generator(self) -> torch.Generator:
        if self._noise_generator is None:
            self._noise_generator = torch.Generator(device="cpu")
            self._noise_generator.manual_seed(derive_seed("train-noise", self.seed, self.global_rank))
            if self._pending_generator_state is not None:
                self._noise_generator.set_state(self._pending_generator_state)
        return self._noise_generator

    def model_inputs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """What the denoiser sees for a data batch: (clean input x_0, extra keyword inputs).

        Pixel-space DDPM: the image itself and nothing else. Latent and text-conditioned models override this
        (VAE latents, text embeddings), and the rest of the training loop stays as it is.
        """
        return batch["image"], {}

    def diffusion_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        images, unet_kwargs = self.model_inputs(batch)
        generator = self._generator()
        batch_size = images.shape[0]
        # drawn on the CPU so a run is reproducible on any device
        noise = torch.randn(images.shape, generator=generator).to(images)
        timesteps = torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch_size,), generator=generator).to(
            images.device
        )
        abar = self.alphas_cumprod[timesteps].view(-1, 1, 1, 1).to(images.dtype)
        noisy = abar.sqrt() * images + (1 - abar).sqrt() * noise
        predicted = self.unet(noisy, timesteps, **unet_kwargs).sample
        return torch.nn.functional.mse_loss(predicted.float(), noise.float())

    @override
    def on_train_start(self) -> None:
        self.unet.train()  # dropout on while training, whatever mode the network arrived in

    @override
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.diffusion_loss(batch)
        if not torch.isfinite(loss):
            raise NumericalError(
                f"training loss is {loss.item()} at step {self.global_step}; {NAN_LOSS_ADVICE}"
            )
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    @override
    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.ema_unet is not None:
            decay = self.optimizer_settings.ema_decay
            with torch.no_grad():
                for ema_param, param in zip(self.ema_unet.parameters(), self.unet.parameters(), strict=True):
                    ema_param.lerp_(param.detach(), 1.0 - decay)

    @override
    def configure_optimizers(self):
        settings = self.optimizer_settings
        optimizer = torch.optim.AdamW(
            self.trainable_parameters(),
            lr=settings.lr,
            betas=tuple(settings.betas),
            weight_decay=settings.weight_decay,
        )
        schedule = get_cosine_schedule_with_warmup(optimizer, settings.warmup_steps, settings.total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """What the optimizer updates (all UNet weights here; LoRA adapters only for the LoRA model)."""
        return [parameter for parameter in self.unet.parameters() if parameter.requires_grad]

    def prepare_training_set(self, dataset: ImageDataset) -> ImageDataset:
        """Hook, called once before training: the set to train on, derived from ``dataset`` (same indices).

        Pixel DDPM trains on ``dataset`` itself; a latent model returns its cached latents, a text-conditioned
        model reads the class names it builds prompts from.
        """
        return dataset

    def save_trained(self, folder: str) -> None:
        """Write the weights users load (diffusers format, safetensors)."""
        self.sampling_unet.save_pretrained(folder, safe_serialization=True)

    def snapshot_state(self) -> dict[str, torch.Tensor]:
        """The weights a TracIn snapshot keeps: those training changes (all of the UNet here), on the CPU."""
        return {
            name: tensor.detach().cpu().contiguous()
            for name, tensor in self.sampling_unet.state_dict().items()
        }

    @override
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["train_noise_generator_state"] = self._generator().get_state()

    @override
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._pending_generator_state = checkpoint.get("train_noise_generator_state")
        self._noise_generator = None
