"""Several (t, eps) draws per feature (METHOD.md §7): the noise rule per draw, antithetic pairs, stratified
timesteps, per-draw and per-timestep normalisation, and stores of other draws beside today's."""

from __future__ import annotations

import copy
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from torch.func import grad, vmap

from das_lightning.attribution.features import (
    CollectionDevice,
    FeatureSettings,
    collect_features,
    feature_manifest,
    make_gradients,
    make_projector,
    settings_suffix,
)
from das_lightning.attribution.grads import (
    PerSampleGradients,
    average_draws,
    draw_noise,
    reference_draw_gradients,
    reference_flat_gradients,
)
from das_lightning.attribution.projectors import ProjectorSettings
from das_lightning.attribution.timesteps import draw_plan, stratified_timesteps
from das_lightning.data.base import ModelSpaceDataset
from das_lightning.diffusion import make_scheduler, rule_noise
from das_lightning.errors import ConfigError
from das_lightning.manifest import ManifestMismatchError
from das_lightning.seeding import derive_seed

from conftest import tiny_unet

TIMESTEPS = [7, 480, 950]
SHAPE = (3, 8, 8)


@pytest.fixture(scope="module")
def unet() -> UNet2DModel:
    return tiny_unet().eval()


@pytest.fixture(scope="module")
def alphas_cumprod() -> torch.Tensor:
    return make_scheduler().alphas_cumprod


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(1))


def assert_close_relative(actual: torch.Tensor, expected: torch.Tensor, tolerance: float = 1e-5) -> None:
    """Equal up to float rounding, relative to the largest entry of each row."""
    scale = expected.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12)
    assert ((actual - expected).abs() / scale).max() < tolerance


# --- the one-draw code before draws existed, kept verbatim as the yardstick for bit-for-bit equality ------------


def legacy_noise(set_name: str, indices: list[int], timesteps: list[int], e_seed: int) -> torch.Tensor:
    out = torch.empty((len(indices), *SHAPE), dtype=torch.float32)
    generator = torch.Generator()
    for row, (index, timestep) in enumerate(zip(indices, timesteps, strict=True)):
        generator.manual_seed(derive_seed("noise", set_name, index, timestep, int(e_seed)))
        out[row] = torch.randn(SHAPE, generator=generator)
    return out


def legacy_features(
    computer: PerSampleGradients, images: torch.Tensor, indices: list[int], set_name: str, timestep_batch: int
) -> torch.Tensor:
    """PerSampleGradients._batch_gradients as it was with one noise draw per timestep (commit 49db982)."""
    batch = images.shape[0]
    features = torch.zeros(batch, computer.num_parameters, dtype=torch.float32)
    per_pair_grad = vmap(grad(computer._sample_output), in_dims=(None, None, 0, 0, 0, 0))
    scale_all = 1.0 / len(computer.timesteps)
    differentiated, constant = computer._split_state()
    for start in range(0, len(computer.timesteps), timestep_batch):
        chunk = computer.timesteps[start : start + timestep_batch]
        pair_timesteps = torch.tensor(chunk, dtype=torch.long).repeat_interleave(batch)
        noise = legacy_noise(set_name, indices * len(chunk), pair_timesteps.tolist(), computer.e_seed)
        gradients = per_pair_grad(
            differentiated, constant, images.repeat(len(chunk), 1, 1, 1), noise, pair_timesteps, {}
        )
        gradients = {
            name: gradients[name].reshape(len(chunk), batch, -1) for name in computer.parameter_names
        }
        if computer.normalize_per_timestep:
            squared_norms = sum(g.float().pow(2).sum(-1) for g in gradients.values())
            weights = scale_all / squared_norms.sqrt().clamp_min(torch.finfo(torch.float32).tiny)
        else:
            weights = torch.full((len(chunk), batch), scale_all)
        for name, gradient in gradients.items():
            features[:, computer.parameter_slices[name]] += torch.einsum(
                "tbn,tb->bn", gradient.float(), weights
            )
    return features


# --- the noise rule per draw -----------------------------------------------------------------------------------


def test_draw_zero_is_the_one_draw_noise_and_every_draw_has_its_own_key() -> None:
    indices, timesteps = [5, 9, 5], [480, 480, 7]
    today = legacy_noise("train", indices, timesteps, 2)
    assert torch.equal(rule_noise("train", indices, timesteps, 2, SHAPE), today)  # the ground truth's noise
    assert torch.equal(rule_noise("train", indices, timesteps, 2, SHAPE, draws=[0, 0, 0]), today)
    second = rule_noise("train", indices, timesteps, 2, SHAPE, draws=1)
    assert not torch.isclose(second, today).all(dim=(1, 2, 3)).any()
    # a later draw is not another e_seed's first draw, nor another timestep's, and is keyed by identity alone
    assert not torch.equal(second, rule_noise("train", indices, timesteps, 3, SHAPE))
    alone = rule_noise("train", indices[1:2], timesteps[1:2], 2, SHAPE, draws=[1])
    assert torch.equal(alone[0], second[1])


def test_antithetic_pairs_use_exactly_negated_noise() -> None:
    plan = draw_plan(TIMESTEPS, draws_per_timestep=4, antithetic=True)
    assert [draw.noise_id for draw in plan[:4]] == [0, 0, 1, 1]
    noise = draw_noise("train", [3] * len(plan), plan, 0, SHAPE)
    assert torch.equal(noise[1::2], -noise[0::2])  # draw 2j + 1 = -(draw 2j), bit for bit
    assert not torch.allclose(noise[2], noise[0]) and not torch.allclose(noise[2], -noise[0])  # two pairs
    # draw 0 of every timestep is the one-draw noise
    assert torch.equal(noise[0::4], legacy_noise("train", [3] * 3, TIMESTEPS, 0))
    with pytest.raises(ConfigError, match="even"):
        draw_plan(TIMESTEPS, draws_per_timestep=3, antithetic=True)


class LinearDenoiser(torch.nn.Module):
    """eps_theta(x_t) = W x_t (a 1x1 convolution without bias): its mean output's gradient is linear in x_t."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 3, 1, bias=False)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.conv(sample)


def test_antithetic_noise_cancels_in_the_gradients(
    alphas_cumprod: torch.Tensor, images: torch.Tensor
) -> None:
    """For a gradient linear in x_t, g(eps) + g(-eps) = 2 g(0): an antithetic feature is the noise-free one exactly
    when its pairs see exactly negated noise (and a feature of independent draws is not)."""
    model = LinearDenoiser()
    indices = [0, 1, 2, 3]

    def features(**draws) -> torch.Tensor:
        computer = PerSampleGradients(
            model, alphas_cumprod, "mean", TIMESTEPS, False, normalize="none", **draws
        )
        return computer.flat_gradients(images, indices, "train")

    noise_free = torch.zeros(4, 9)
    for timestep in TIMESTEPS:
        weight = model.conv.weight.detach().clone().requires_grad_()
        clean = alphas_cumprod[timestep].sqrt() * images
        for row in range(4):
            (gradient,) = torch.autograd.grad(
                torch.nn.functional.conv2d(clean[row : row + 1], weight).mean(), weight
            )
            noise_free[row] += gradient.flatten() / len(TIMESTEPS)
    antithetic = features(draws_per_timestep=2, antithetic=True)
    independent = features(draws_per_timestep=2)
    torch.testing.assert_close(antithetic, noise_free, rtol=1e-5, atol=1e-7)
    assert (independent - noise_free).abs().max() > 100 * (antithetic - noise_free).abs().max()


# --- stratified timesteps ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_timesteps", [1, 3, 7, 10, 100, 1000])
def test_stratified_timesteps_lie_one_per_stratum_and_follow_the_seed(num_timesteps: int) -> None:
    chosen = stratified_timesteps(num_timesteps, total=1000, seed=4)
    assert len(chosen) == num_timesteps
    for stratum, timestep in enumerate(chosen):
        assert stratum * 1000 // num_timesteps <= timestep < (stratum + 1) * 1000 // num_timesteps
    assert chosen == stratified_timesteps(num_timesteps, total=1000, seed=4)
    if 1 < num_timesteps < 1000:  # 1000 strata of width one leave no room for jitter
        assert chosen != stratified_timesteps(num_timesteps, total=1000, seed=5)
    settings = FeatureSettings(num_timesteps=num_timesteps, sampling="stratified", e_seed=4)
    assert settings.timestep_list() == chosen  # keyed by the features' e_seed


def test_stratified_jitter_is_spread_over_the_strata() -> None:
    """Offsets within the strata of width 100 over many seeds: not stuck at one place (a jitter, not a grid)."""
    offsets = np.array([t % 100 for seed in range(50) for t in stratified_timesteps(10, seed=seed)])
    assert offsets.min() < 10 and offsets.max() > 90 and 35 < offsets.mean() < 65


# --- normalisation ------------------------------------------------------------------------------------------------


def test_per_draw_normalisation_averages_unit_draw_gradients(
    unet: UNet2DModel, alphas_cumprod: torch.Tensor, images: torch.Tensor
) -> None:
    """On unprojected gradients: each (t, eps) draw's gradient is unit-normalised before the average."""
    indices = [4, 7]
    computer = PerSampleGradients(
        unet, alphas_cumprod, "mean", TIMESTEPS[:2], True, draws_per_timestep=3, normalize="draw"
    )
    fast = computer.flat_gradients(images[:2], indices, "train")
    raw = reference_draw_gradients(
        unet, alphas_cumprod, "mean", computer.draws, images[:2], indices, "train", computer.parameter_names
    )  # (2 images, 6 draws, P), unnormalised
    norms = raw.norm(dim=-1)
    assert norms.max() / norms.min() > 1.1  # the draws' sizes differ, so normalising them is not a no-op
    unit = raw / norms[..., None]
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones_like(norms))
    assert_close_relative(fast, unit.mean(dim=1))
    # per timestep (DAS) normalises the sum of a timestep's draws instead: another feature
    per_timestep = PerSampleGradients(
        unet, alphas_cumprod, "mean", TIMESTEPS[:2], True, draws_per_timestep=3, normalize="timestep"
    ).flat_gradients(images[:2], indices, "train")
    summed = raw.reshape(2, 2, 3, -1).sum(2)
    assert_close_relative(per_timestep, (summed / summed.norm(dim=-1, keepdim=True)).mean(dim=1))
    assert not torch.allclose(per_timestep, fast, rtol=1e-3)
    unnormalised = PerSampleGradients(
        unet, alphas_cumprod, "mean", TIMESTEPS[:2], False, draws_per_timestep=3
    ).flat_gradients(images[:2], indices, "train")
    assert_close_relative(unnormalised, raw.mean(dim=1))


@pytest.mark.parametrize(
    "draws",
    [
        {"draws_per_timestep": 3, "normalize": "timestep"},  # a timestep's draws straddle two calls
        {"draws_per_timestep": 2, "antithetic": True, "normalize": "draw"},
        {"draws_per_timestep": 2, "normalize": "none"},
    ],
)
def test_same_features_whatever_the_batch_size(
    unet: UNet2DModel, alphas_cumprod: torch.Tensor, images: torch.Tensor, draws: dict
) -> None:
    indices = torch.tensor([0, 5, 2, 9])

    def computer(timestep_batch: int | None) -> PerSampleGradients:
        return PerSampleGradients(
            unet, alphas_cumprod, "loss", TIMESTEPS, False, timestep_batch=timestep_batch, **draws
        )

    together = computer(None).flat_gradients(images, indices, "train")
    for timestep_batch in (2, 4):
        for size in (1, 3):
            parts = [
                computer(timestep_batch).flat_gradients(images[s : s + size], indices[s : s + size], "train")
                for s in range(0, 4, size)
            ]
            assert_close_relative(torch.cat(parts), together)
    order = torch.tensor([3, 1, 0, 2])
    assert_close_relative(computer(2).flat_gradients(images[order], indices[order], "train"), together[order])
    slow = reference_flat_gradients(
        unet, alphas_cumprod, "loss", TIMESTEPS, False, images, indices, "train",
        computer(None).parameter_names, **draws,
    )  # fmt: skip
    assert_close_relative(together, slow)


def test_average_draws_with_one_draw_is_the_same_for_both_normalisations() -> None:
    per_draw = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(average_draws(per_draw, 1, "draw"), average_draws(per_draw, 1, "timestep"))


# --- the defaults are today's features, manifests and folders ------------------------------------------------


@pytest.mark.parametrize(
    ("output_function", "legacy_switch"), [("mean", True), ("loss", False), ("square", False)]
)
@pytest.mark.parametrize("timestep_batch", [1, 2, 3])
def test_defaults_reproduce_the_one_draw_features_bit_for_bit(
    unet: UNet2DModel,
    alphas_cumprod: torch.Tensor,
    images: torch.Tensor,
    output_function: str,
    legacy_switch: bool,
    timestep_batch: int,
) -> None:
    indices = [6, 1, 3]
    legacy = PerSampleGradients(
        unet,
        alphas_cumprod,
        output_function,
        TIMESTEPS,
        legacy_switch,
        e_seed=1,
        timestep_batch=timestep_batch,
    )
    expected = legacy_features(legacy, images[:3], indices, "train", timestep_batch)
    # the older switch, the new field, and "draw" with one draw (the same feature) all give today's bits
    for settings in (
        FeatureSettings(output_function=output_function, normalize_per_timestep=legacy_switch),
        FeatureSettings(output_function=output_function, normalize="timestep" if legacy_switch else "none"),
        FeatureSettings(output_function=output_function, normalize="draw" if legacy_switch else "none"),
    ):
        explicit = {"timesteps": TIMESTEPS, "timestep_strategy": "explicit", "timestep_batch": timestep_batch}
        settings = FeatureSettings(**{**asdict(settings), **explicit, "e_seed": 1})
        computer = make_gradients(unet, alphas_cumprod, settings)
        assert torch.equal(computer.flat_gradients(images[:3], indices, "train"), expected)


def old_manifest_keys() -> tuple[set[str], set[str]]:
    """The keys of the "features" and "gradients" sections of a store manifest before draws existed."""
    features = {
        "name", "output_function", "timestep_strategy", "num_timesteps", "timesteps", "normalize_per_timestep",
        "param_pattern", "e_seed", "dtype", "projector", "projector_distribution", "projector_dim",
        "projector_seed", "projector_options",
    }  # fmt: skip
    gradients = {
        "output_function", "timesteps", "normalize_per_timestep", "e_seed", "num_parameters",
        "num_parameter_tensors",
    }  # fmt: skip
    return features, gradients


def probe_dataset(count: int = 5) -> ModelSpaceDataset:
    tensors = torch.randn(count, *SHAPE, generator=torch.Generator().manual_seed(2))
    return ModelSpaceDataset("probe:train", tensors, np.zeros(count, dtype=np.int64), ["a"])


def manifest_of(settings: FeatureSettings, unet: UNet2DModel, alphas_cumprod: torch.Tensor) -> dict:
    gradients = make_gradients(unet, alphas_cumprod, settings)
    projector = make_projector(settings, gradients.num_parameters)
    return feature_manifest("ckpt", probe_dataset(), settings, gradients, projector)


def test_draw_settings_enter_the_manifest_only_when_not_the_defaults(
    unet: UNet2DModel, alphas_cumprod: torch.Tensor
) -> None:
    features_keys, gradients_keys = old_manifest_keys()
    small = {"projector": ProjectorSettings(dim=8), "num_timesteps": 2}
    for legacy_switch in (True, False):
        default = manifest_of(
            FeatureSettings(normalize_per_timestep=legacy_switch, **small), unet, alphas_cumprod
        )
        assert set(default["features"]) == features_keys and set(default["gradients"]) == gradients_keys
        assert default["features"]["normalize_per_timestep"] is legacy_switch
        assert default["gradients"]["normalize_per_timestep"] is legacy_switch
    swept = manifest_of(
        FeatureSettings(
            draws_per_timestep=4, antithetic=True, sampling="stratified", normalize="draw", **small
        ),
        unet,
        alphas_cumprod,
    )
    added = {"draws_per_timestep": 4, "antithetic": True, "sampling": "stratified", "normalize": "draw"}
    assert {key: swept["features"][key] for key in added} == added
    assert swept["gradients"]["draws_per_timestep"] == 4 and swept["gradients"]["antithetic"] is True
    assert swept["gradients"]["timesteps"] == stratified_timesteps(2)


def test_the_older_switch_keeps_working() -> None:
    assert FeatureSettings().normalize == "timestep"
    assert FeatureSettings(normalize_per_timestep=False, normalize="draw").normalize == "none"
    assert FeatureSettings(normalize_per_timestep=True, normalize="none").normalize == "timestep"
    assert FeatureSettings(normalize_per_timestep=True, normalize="draw").normalize == "draw"
    # DAS's exact residual copies the settings and switches normalisation off: a true gradient, same draws
    das = FeatureSettings(draws_per_timestep=4, antithetic=True, normalize="draw")
    psi = FeatureSettings(**{**asdict(das), "output_function": "loss", "normalize_per_timestep": False})
    assert psi.normalize == "none" and psi.draws_per_timestep == 4 and psi.antithetic
    assert FeatureSettings(**asdict(das)) == das  # copies keep the draws


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"normalize": "sometimes"}, "normalize"),
        ({"sampling": "sobol"}, "sampling"),
        ({"draws_per_timestep": 0}, "at least 1"),
        ({"draws_per_timestep": 3, "antithetic": True}, "even"),
        ({"sampling": "stratified", "timestep_strategy": "cumulative"}, "stratified"),
        ({"sampling": "stratified", "timestep_strategy": "explicit", "timesteps": [3]}, "stratified"),
    ],
)
def test_bad_draw_settings_are_refused(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        FeatureSettings(**changes)


def test_stores_of_other_draws_live_beside_todays_and_are_reused(
    unet: UNet2DModel, alphas_cumprod: torch.Tensor, tmp_path: Path
) -> None:
    dataset = probe_dataset()
    base = {"num_timesteps": 2, "batch_size": 2, "projector": ProjectorSettings(dim=16)}
    device = CollectionDevice(enable_progress_bar=False)
    folder = tmp_path / "features" / "das" / "train"

    def collect(checkpoint: str = "ckpt", **draws):
        settings = FeatureSettings(**base, **draws)
        return collect_features(
            copy.deepcopy(unet), alphas_cumprod, dataset, checkpoint, folder, settings, device
        )

    today = collect()
    assert today.folder == folder  # one-draw settings: the folder given, as before
    draws = collect(draws_per_timestep=2, antithetic=True)
    stratified = collect(sampling="stratified")
    assert draws.folder.name == "train" and draws.folder.parent.name.startswith("das-")
    # the home holds the one-draw store: other draws go beside it, under the hash of all their settings
    assert draws.folder.parent.name == "das" + settings_suffix(
        FeatureSettings(**base, draws_per_timestep=2, antithetic=True)
    )
    assert len({today.folder, draws.folder, stratified.folder}) == 3
    assert not np.allclose(np.asarray(today.features), np.asarray(draws.features))
    manifest = json.loads((draws.folder / "manifest.json").read_text())
    assert manifest["features"]["draws_per_timestep"] == 2 and manifest["features"]["antithetic"] is True
    # each is found again where it was made, and reused, not recomputed
    stamp = (draws.folder / "features.npy").stat().st_mtime_ns
    assert collect(draws_per_timestep=2, antithetic=True).folder == draws.folder
    assert (draws.folder / "features.npy").stat().st_mtime_ns == stamp
    assert (
        collect(normalize="draw").folder == folder
    )  # one draw per t: per draw is per timestep, today's store
    # within one folder, other settings are still refused, naming what differs
    with pytest.raises(ManifestMismatchError, match="checkpoint"):
        collect("another-checkpoint", draws_per_timestep=2, antithetic=True)
