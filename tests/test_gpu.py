"""The CUDA path: features equal the CPU's for the same seed, the dense projector's matrix is built once per run,
bfloat16 frozen weights give finite LoRA features, and ``trainer=gpu`` trains the tiny model.

Marked ``gpu`` (excluded from the default run) and skipped without a CUDA device; ``benchmarks/gpu_check.py`` runs
them first (``pytest -m gpu``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from das_lightning.attribution import features as features_module
from das_lightning.attribution.features import CollectionDevice, FeatureSettings, collect_features
from das_lightning.attribution.grads import PerSampleGradients
from das_lightning.attribution.projectors import DenseProjector, ProjectorSettings, build_projector
from das_lightning.data import build_dataset
from das_lightning.diffusion import make_scheduler
from das_lightning.models.unet import build_unet
from das_lightning_testing.tiny_sd import build_tiny_sd_pipeline, lora_step_and_features

from conftest import TINY_TRAIN, run_entry

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# float32 on both devices with TF32 off: the devices differ only in the order of float32 sums, which the backward
# pass of a UNet amplifies to ~1e-6..1e-5 of the largest entry; 1e-4 of it leaves a margin
RELATIVE_TO_LARGEST = 1e-4
# TF32 (cuDNN's default for convolutions on Ampere and later) rounds inputs to 10 mantissa bits: rows keep their
# direction, not their float32 digits
TF32_MIN_COSINE = 0.999


@pytest.fixture
def float32_only() -> Iterator[None]:
    """TF32 off for matmuls and cuDNN convolutions while a test compares CUDA with the CPU."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _tiny_workload() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = build_unet("tiny", 16, 1).eval()
    images = torch.rand((6, 1, 16, 16), generator=torch.Generator().manual_seed(1)) * 2 - 1
    return model, make_scheduler().alphas_cumprod, images


def _features(model, alphas_cumprod, images, device) -> torch.Tensor:
    gradients = PerSampleGradients(
        copy.deepcopy(model).to(device), alphas_cumprod, "mean", [50, 300, 600, 900], True
    )
    return gradients.flat_gradients(images.to(device), list(range(len(images))), "gpu-check")


def _assert_close_to_largest(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual.cpu(), expected, rtol=1e-3, atol=RELATIVE_TO_LARGEST * scale)


def test_cuda_features_equal_cpu_features_for_the_same_seed(float32_only: None) -> None:
    model, alphas_cumprod, images = _tiny_workload()
    cpu = _features(model, alphas_cumprod, images, "cpu")
    cuda = _features(model, alphas_cumprod, images, "cuda")
    assert cuda.device.type == "cuda"
    _assert_close_to_largest(cuda, cpu)
    # the projectors draw their matrices on the CPU from the seed: the same matrix on every device
    for kind, options in [("dense", {"distribution": "rademacher"}), ("sparse", {"nnz_per_param": 4})]:
        on_cpu = build_projector(kind, cpu.shape[1], 256, seed=3, device="cpu", **options).project(cpu)
        on_cuda = build_projector(kind, cpu.shape[1], 256, seed=3, device="cuda", **options).project(cuda)
        assert on_cuda.device.type == "cuda"
        _assert_close_to_largest(on_cuda, on_cpu)


def test_cuda_features_with_tf32_keep_their_direction() -> None:
    model, alphas_cumprod, images = _tiny_workload()
    cpu = _features(model, alphas_cumprod, images, "cpu")
    cuda = _features(model, alphas_cumprod, images, "cuda").cpu()
    assert torch.nn.functional.cosine_similarity(cuda, cpu, dim=1).min() > TF32_MIN_COSINE


def test_collection_on_cuda_builds_the_dense_matrix_once_and_matches_the_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, float32_only: None
) -> None:
    dataset = build_dataset("fashion2", "train", None, image_size=8, num_train=48)
    torch.manual_seed(0)
    unet = build_unet("tiny", 8, 1)
    alphas_cumprod = make_scheduler().alphas_cumprod
    settings = FeatureSettings(
        num_timesteps=3, projector=ProjectorSettings(dim=64), batch_size=8
    )  # 6 batches
    builds: list[torch.device] = []
    build = DenseProjector.matrix
    monkeypatch.setattr(
        DenseProjector,
        "matrix",
        lambda self, device="cpu": builds.append(torch.device(device)) or build(self, device),
    )
    stores = {}
    for accelerator in ("gpu", "cpu"):
        monkeypatch.setattr(features_module, "_last_projector", {})  # a fresh projector for each run
        builds.clear()
        store = collect_features(
            copy.deepcopy(unet),
            alphas_cumprod,
            dataset,
            "gpu-check",
            tmp_path / accelerator,
            settings,
            CollectionDevice(accelerator=accelerator, enable_progress_bar=False),
        )
        assert store.is_complete
        # once per run, not once per batch ("cuda" requested, cuda:0 held: the bug this guards)
        assert len(builds) == 1, builds
        assert builds[0].type == {"gpu": "cuda", "cpu": "cpu"}[accelerator]
        stores[accelerator] = np.asarray(store.features, dtype=np.float32)
    scale = float(np.abs(stores["cpu"]).max())
    np.testing.assert_allclose(stores["gpu"], stores["cpu"], rtol=1e-3, atol=RELATIVE_TO_LARGEST * scale)


def test_bf16_frozen_weights_give_finite_lora_features(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = build_tiny_sd_pipeline(tmp_path / "tiny-sd", image_size=64, vae_channels=(8, 8, 16, 16))
    result = lora_step_and_features(folder, "cuda", image_size=64, frozen_dtype="bfloat16", dim=128)
    assert result.frozen_dtypes == ["bfloat16"] and result.lora_dtypes == ["float32"]
    assert np.isfinite(result.loss)
    assert result.features.shape == (4, 128)
    assert torch.isfinite(result.features).all()
    assert (result.features.norm(dim=1) > 0).all()


def test_train_entry_with_trainer_gpu_trains_the_tiny_model(tmp_path: Path) -> None:
    result = run_entry("train.py", "trainer=gpu", f"paths.root={tmp_path}", *TINY_TRAIN, cwd=tmp_path)
    assert (
        "used: True" in result.stdout + result.stderr
    )  # Lightning: "GPU available: True (cuda), used: True"
    run = tmp_path / "fashion2" / "tiny" / "full" / "seed0"
    steps = next(value for value in TINY_TRAIN if value.startswith("train.max_steps=")).split("=")[1]
    assert (run / "unet" / "DONE").read_text().strip() == steps
    weights = load_file(str(run / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())
    assert (run / "queries" / "generated_grid.png").exists()
