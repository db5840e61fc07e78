"""Properties of the LDS ground truth: equal to a hand loop over the shared noise rule, independent of batching,
query order and the number of processes, and cached only under matching settings."""

from __future__ import annotations

import lightning
import pytest
import torch
from diffusers import UNet2DModel
from torch.utils.data import DataLoader, Dataset

from das_lightning.diffusion import ground_truth_noise, make_scheduler, per_sample_loss, rule_noise
from das_lightning.evaluation.ground_truth import (
    GroundTruthModule,
    LossPredictionWriter,
    cached_query_losses,
    gather_predictions,
    ground_truth_manifest,
    query_losses,
    read_prediction_files,
)
from das_lightning.manifest import ManifestMismatchError

from conftest import tiny_unet

SET_NAME = "val"
TIMESTEPS = [0, 137, 500, 999]
E_SEEDS = [0, 2]


def query_images(num_queries: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.rand((num_queries, 3, 8, 8), generator=generator) * 2 - 1
    indices = torch.tensor([40, 3, 17, 8, 25, 11, 30][:num_queries])  # dataset indices, not positions
    return images, indices


class QueryDataset(Dataset):
    """The data contract: {"index": dataset index, "image": (C, H, W) in [-1, 1]}."""

    def __init__(self, images: torch.Tensor, indices: torch.Tensor):
        self.images, self.indices = images, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        return {"index": self.indices[position], "image": self.images[position]}


@pytest.fixture(scope="module")
def setup() -> tuple[UNet2DModel, torch.Tensor, torch.Tensor, torch.Tensor]:
    images, indices = query_images()
    return tiny_unet().eval(), make_scheduler().alphas_cumprod, images, indices


def hand_loop(unet, alphas_cumprod, images, indices, noise_stream: str = "coupled") -> torch.Tensor:
    """One (query, timestep, e_seed) at a time, straight from the definition (coupled: the features' rule)."""
    losses = []
    with torch.no_grad():
        for image, index in zip(images, indices.tolist(), strict=True):
            per_pair = []
            for timestep in TIMESTEPS:
                for e_seed in E_SEEDS:
                    if noise_stream == "coupled":
                        noise = rule_noise(SET_NAME, [index], [timestep], e_seed, image.shape)
                    else:
                        noise = ground_truth_noise(SET_NAME, [index], [timestep], e_seed, image.shape)
                    loss = per_sample_loss(unet, image[None], noise, torch.tensor([timestep]), alphas_cumprod)
                    per_pair.append(loss.item())
            losses.append(sum(per_pair) / len(per_pair))
    return torch.tensor(losses, dtype=torch.float64)


def compute(
    unet, alphas_cumprod, images, indices, batch_size: int = 5, noise: str = "coupled"
) -> torch.Tensor:
    return query_losses(
        unet,
        alphas_cumprod,
        images,
        indices,
        SET_NAME,
        TIMESTEPS,
        E_SEEDS,
        batch_size=batch_size,
        noise=noise,
    )


@pytest.mark.parametrize("noise", ["coupled", "disjoint"])
def test_equals_hand_loop_over_the_noise_rule(setup, noise: str) -> None:
    unet, alphas_cumprod, images, indices = setup
    torch.testing.assert_close(
        compute(*setup, noise=noise),
        hand_loop(unet, alphas_cumprod, images, indices, noise),
        atol=1e-6,
        rtol=1e-6,
    )


def test_independent_of_batch_size_and_query_order(setup) -> None:
    unet, alphas_cumprod, images, indices = setup
    reference = compute(*setup, batch_size=5)
    for batch_size in (1, 3, 40):
        torch.testing.assert_close(compute(*setup, batch_size=batch_size), reference, atol=1e-6, rtol=1e-6)
    order = torch.tensor([3, 0, 4, 2, 1])
    reordered = compute(unet, alphas_cumprod, images[order], indices[order], batch_size=3)
    torch.testing.assert_close(reordered, reference[order], atol=1e-6, rtol=1e-6)


def test_noise_follows_the_dataset_index_not_the_position(setup) -> None:
    unet, alphas_cumprod, images, indices = setup
    same_images_other_indices = compute(unet, alphas_cumprod, images, indices + 1000)
    assert not torch.allclose(same_images_other_indices, compute(*setup), atol=1e-4)


def predict_losses(devices: int, folder, setup) -> torch.Tensor:
    unet, alphas_cumprod, images, indices = setup
    module = GroundTruthModule(unet, alphas_cumprod, TIMESTEPS, E_SEEDS, SET_NAME, pair_batch_size=6)
    trainer = lightning.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        callbacks=[LossPredictionWriter(folder)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=folder,
    )
    # 5 queries over 2 ranks: uneven shards (Lightning's predict sampler does not pad; a padding sampler's
    # duplicates are covered by test_gather_dedupes_and_refuses_missing_or_conflicting_rows)
    trainer.predict(module, DataLoader(QueryDataset(images, indices), batch_size=2), return_predictions=False)
    outputs = read_prediction_files(folder, devices)
    assert len(outputs) == devices
    return gather_predictions(outputs, indices)


def test_same_result_with_one_or_two_processes(setup, tmp_path) -> None:
    one = predict_losses(1, tmp_path / "one", setup)
    two = predict_losses(2, tmp_path / "two", setup)
    torch.testing.assert_close(one, compute(*setup, noise="disjoint"), atol=1e-6, rtol=1e-6)  # the default
    torch.testing.assert_close(two, one, atol=1e-6, rtol=1e-6)


def test_gather_dedupes_and_refuses_missing_or_conflicting_rows() -> None:
    outputs = [
        {"index": torch.tensor([7, 2]), "loss": torch.tensor([0.7, 0.2])},
        [{"index": torch.tensor([5, 7]), "loss": torch.tensor([0.5, 0.7])}],  # padded duplicate of 7
    ]
    torch.testing.assert_close(
        gather_predictions(outputs), torch.tensor([0.2, 0.5, 0.7], dtype=torch.float64)
    )
    torch.testing.assert_close(
        gather_predictions(outputs, [7, 5]), torch.tensor([0.7, 0.5], dtype=torch.float64)
    )
    with pytest.raises(KeyError):
        gather_predictions(outputs, [7, 9])
    with pytest.raises(ValueError, match="two different losses"):
        gather_predictions([*outputs, {"index": torch.tensor([2]), "loss": torch.tensor([0.3])}])


def test_cache_computes_once_and_refuses_other_settings(tmp_path) -> None:
    manifest = ground_truth_manifest("ckpt-sha-abc", SET_NAME, [40, 3, 17], TIMESTEPS, E_SEEDS)
    calls = []

    def compute_losses() -> torch.Tensor:
        calls.append(1)
        return torch.tensor([0.1, 0.2, 0.3])

    first = cached_query_losses(tmp_path, manifest, compute_losses)
    again = cached_query_losses(tmp_path, manifest, compute_losses)
    assert len(calls) == 1
    torch.testing.assert_close(again, first)
    assert (tmp_path / "losses.safetensors").read_bytes()[:8] != b"\x80\x04\x95"  # not a pickle
    other = ground_truth_manifest("ckpt-sha-abc", SET_NAME, [40, 3, 17], TIMESTEPS[:2], E_SEEDS)
    with pytest.raises(ManifestMismatchError, match="timesteps"):
        cached_query_losses(tmp_path, other, compute_losses)
