"""Per-sample gradients, output functions, timestep selection and the vmap-friendly attention processor."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from das_lightning.attribution.grads import (
    PEAK_PER_SAVED_BYTE,
    PerSampleGradients,
    reference_flat_gradients,
    select_parameters,
)
from das_lightning.attribution.output_functions import OUTPUT_FUNCTIONS, batched_output, get_output_function
from das_lightning.attribution.timesteps import select_timesteps
from das_lightning.diffusion import make_scheduler
from das_lightning.models.attention import MatmulAttnProcessor, use_vmap_friendly_attention

from conftest import tiny_unet

TIMESTEPS = [7, 480, 950]


def tiny_conditional_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12,
        attention_head_dim=4,
        norm_num_groups=4,
    )


@pytest.fixture(scope="module")
def unet() -> UNet2DModel:
    return tiny_unet().eval()


@pytest.fixture(scope="module")
def alphas_cumprod() -> torch.Tensor:
    return make_scheduler().alphas_cumprod


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def assert_close_relative(actual: torch.Tensor, expected: torch.Tensor, tolerance: float = 1e-5) -> None:
    """Equal up to float rounding, relative to the largest entry of each row."""
    scale = expected.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12)
    assert ((actual - expected).abs() / scale).max() < tolerance


# --- output functions and timesteps ---------------------------------------------------------------------------


def test_output_functions_match_their_formulas() -> None:
    generator = torch.Generator().manual_seed(0)
    predicted, true = (
        torch.randn(2, 3, 4, 4, generator=generator),
        torch.randn(2, 3, 4, 4, generator=generator),
    )
    expected = {
        "loss": ((predicted - true) ** 2).mean(dim=(1, 2, 3)),
        "square": (predicted**2).mean(dim=(1, 2, 3)),
        "mean": predicted.mean(dim=(1, 2, 3)),
        "abs_mean": predicted.abs().mean(dim=(1, 2, 3)),
        "l2": predicted.flatten(1).norm(dim=1),
    }
    assert set(expected) == set(OUTPUT_FUNCTIONS)
    for name, values in expected.items():
        torch.testing.assert_close(batched_output(name, predicted, true), values)
        torch.testing.assert_close(get_output_function(name)(predicted[1], true[1]), values[1])


def test_unknown_output_function_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="abs_mean"):
        get_output_function("median")


def test_timestep_strategies() -> None:
    assert select_timesteps("uniform", 10) == list(range(0, 1000, 100))
    assert select_timesteps("uniform", 3) == [0, 333, 666]
    assert select_timesteps("cumulative", 4) == [0, 1, 2, 3]
    assert select_timesteps("explicit", 10, explicit=[900, 5]) == [5, 900]
    drawn = select_timesteps("random", 16, seed=3)
    assert drawn == sorted(set(drawn)) and len(drawn) == 16 and all(0 <= t < 1000 for t in drawn)
    assert drawn == select_timesteps("random", 16, seed=3)
    assert drawn != select_timesteps("random", 16, seed=4)


@pytest.mark.parametrize(
    ("strategy", "kwargs", "message"),
    [
        ("spiral", {}, "unknown timestep strategy"),
        ("explicit", {"explicit": [3, 1000]}, "outside"),
        ("explicit", {}, "non-empty"),
        ("uniform", {"num_timesteps": 0}, "num_timesteps"),
    ],
)
def test_timestep_errors(strategy: str, kwargs: dict, message: str) -> None:
    kwargs.setdefault("num_timesteps", 3)
    with pytest.raises(ValueError, match=message):
        select_timesteps(strategy, **kwargs)


# --- attention processor -------------------------------------------------------------------------------------


def processors(model: torch.nn.Module) -> list[object]:
    return [module.processor for module in model.modules() if isinstance(module, Attention)]


def test_matmul_attention_matches_default_unconditional() -> None:
    model = tiny_unet(seed=5).eval()
    assert all(isinstance(p, AttnProcessor2_0) for p in processors(model))  # diffusers' fused default
    sample = torch.randn(3, 3, 8, 8)
    timesteps = torch.tensor([1, 400, 999])
    with torch.no_grad():
        expected = model(sample, timesteps).sample
        assert use_vmap_friendly_attention(model) == 4
        actual = model(sample, timesteps).sample
    assert all(isinstance(p, MatmulAttnProcessor) for p in processors(model))
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_matmul_attention_matches_default_cross_attention_with_mask() -> None:
    model = tiny_conditional_unet(seed=6).eval()
    model.set_attn_processor(AttnProcessor2_0())
    sample, context = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 12)
    timesteps = torch.tensor([3, 700])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        expected = model(sample, timesteps, context).sample
        expected_masked = model(sample, timesteps, context, encoder_attention_mask=mask).sample
        use_vmap_friendly_attention(model)
        actual = model(sample, timesteps, context).sample
        actual_masked = model(sample, timesteps, context, encoder_attention_mask=mask).sample
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(actual_masked, expected_masked, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(
        expected, expected_masked
    )  # the mask matters, so the masked check means something


# --- per-sample gradients ------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("output_function", sorted(OUTPUT_FUNCTIONS))
def test_vmap_gradients_equal_one_sample_loop(
    unet: UNet2DModel,
    alphas_cumprod: torch.Tensor,
    images: torch.Tensor,
    output_function: str,
    normalize: bool,
) -> None:
    computer = PerSampleGradients(unet, alphas_cumprod, output_function, TIMESTEPS[1:], normalize, e_seed=2)
    indices = torch.tensor([11, 3])
    fast = computer.flat_gradients(images[:2], indices, "train")
    slow = reference_flat_gradients(
        unet, alphas_cumprod, output_function, TIMESTEPS[1:], normalize, images[:2], indices, "train",
        computer.parameter_names, e_seed=2,
    )  # fmt: skip
    assert fast.shape == (2, computer.num_parameters)
    assert_close_relative(fast, slow)
    if normalize:  # an average of K unit vectors has norm at most 1
        assert (fast.norm(dim=1) <= 1 + 1e-5).all()


def test_features_independent_of_batch_size_order_and_timestep_batch(
    unet: UNet2DModel, alphas_cumprod: torch.Tensor, images: torch.Tensor
) -> None:
    images, indices = images[:3], torch.tensor([0, 1, 2])
    computer = PerSampleGradients(unet, alphas_cumprod, "mean", TIMESTEPS, True, timestep_batch=3)
    together = computer.flat_gradients(images, indices, "train")
    order = torch.tensor([2, 0, 1])
    shuffled = computer.flat_gradients(images[order], indices[order], "train")
    alone = torch.cat(
        [computer.flat_gradients(images[j : j + 1], indices[j : j + 1], "train") for j in range(3)]
    )
    looped = PerSampleGradients(unet, alphas_cumprod, "mean", TIMESTEPS, True, timestep_batch=1)
    assert_close_relative(shuffled, together[order])
    assert_close_relative(alone, together)
    assert_close_relative(looped.flat_gradients(images, indices, "train"), together)


def test_noise_is_keyed_by_set_and_index_not_batch_position(
    unet: UNet2DModel, alphas_cumprod: torch.Tensor, images: torch.Tensor
) -> None:
    computer = PerSampleGradients(unet, alphas_cumprod, "loss", TIMESTEPS, False)
    same_image_twice = images[:1].repeat(2, 1, 1, 1)
    # the same image under two identities gets two different noises, hence different gradients
    two_indices = computer.flat_gradients(same_image_twice, torch.tensor([5, 6]), "train")
    assert not torch.allclose(two_indices[0], two_indices[1], rtol=1e-3)
    query = computer.flat_gradients(images[:1], torch.tensor([5]), "query")
    assert not torch.allclose(query[0], two_indices[0], rtol=1e-3)
    # ... and the same identity gets the same noise at any batch position
    same_identity = computer.flat_gradients(same_image_twice, torch.tensor([5, 5]), "train")
    assert_close_relative(same_identity[1:], same_identity[:1])
    assert_close_relative(same_identity[:1], two_indices[:1])


def test_parameter_selection_gives_the_matching_columns(
    unet: UNet2DModel, alphas_cumprod: torch.Tensor, images: torch.Tensor
) -> None:
    indices = torch.tensor([0, 1])
    full = PerSampleGradients(unet, alphas_cumprod, "square", TIMESTEPS[:2], False)
    attention_only = PerSampleGradients(
        unet, alphas_cumprod, "square", TIMESTEPS[:2], False, param_filter="attentions"
    )
    names = select_parameters(unet, "attentions")
    assert attention_only.parameter_names == names and all("attentions" in name for name in names)
    # model order, and P is the number of selected entries
    assert full.parameter_names == [name for name, _ in unet.named_parameters()]
    assert attention_only.num_parameters == sum(dict(unet.named_parameters())[n].numel() for n in names)
    full_features = full.flat_gradients(images[:2], indices, "train")
    selected = attention_only.flat_gradients(images[:2], indices, "train")
    columns = torch.cat([full_features[:, full.parameter_slices[name]] for name in names], dim=1)
    assert_close_relative(selected, columns)
    with pytest.raises(ValueError, match="no parameter"):
        select_parameters(unet, "lora_")


def test_dropout_is_off_and_train_mode_restored(alphas_cumprod: torch.Tensor, images: torch.Tensor) -> None:
    model = tiny_unet(dropout=0.5).train()
    computer = PerSampleGradients(model, alphas_cumprod, "mean", TIMESTEPS[:2], True)
    first = computer.flat_gradients(images[:2], [0, 1], "train")
    second = computer.flat_gradients(images[:2], [0, 1], "train")
    assert model.training
    torch.testing.assert_close(first, second)


def conditional_inputs(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents (count, 4, 8, 8), text context (count, 5, 12)) for :func:`tiny_conditional_unet`."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 4, 8, 8, generator=generator), torch.randn(count, 5, 12, generator=generator)


def test_conditional_model_with_per_sample_extra(alphas_cumprod: torch.Tensor) -> None:
    model = tiny_conditional_unet().eval()
    latents, context = conditional_inputs(3, seed=3)
    indices = torch.tensor([4, 9, 1])
    computer = PerSampleGradients(model, alphas_cumprod, "mean", TIMESTEPS[:2], True, param_filter="attn2")
    fast = computer.flat_gradients(latents, indices, "train", extra={"encoder_hidden_states": context})
    slow = reference_flat_gradients(
        model, alphas_cumprod, "mean", TIMESTEPS[:2], True, latents, indices, "train", computer.parameter_names,
        extra={"encoder_hidden_states": context},
    )  # fmt: skip
    assert_close_relative(fast, slow)
    # the per-sample context reaches its own sample: swapping contexts changes the features
    swapped = computer.flat_gradients(
        latents, indices, "train", extra={"encoder_hidden_states": context.flip(0)}
    )
    assert not torch.allclose(swapped[0], fast[0], rtol=1e-3)


def test_memory_budget_splits_the_batch_without_changing_features(alphas_cumprod: torch.Tensor) -> None:
    model = tiny_conditional_unet().eval()
    latents, context = conditional_inputs(5, seed=5)
    indices, extra = torch.tensor([7, 2, 9, 0, 4]), {"encoder_hidden_states": context}
    roomy = PerSampleGradients(model, alphas_cumprod, "mean", TIMESTEPS[:3], True)
    saved = roomy.saved_bytes_per_pair(latents[0], {"encoder_hidden_states": context[0]})
    assert saved > 0
    # a budget of two pairs per call: the 5-sample batch goes in chunks of 2, 2 and 1, per-sample context kept
    tight = PerSampleGradients(
        model, alphas_cumprod, "mean", TIMESTEPS[:3], True, activation_bytes=2 * PEAK_PER_SAVED_BYTE * saved
    )
    assert tight.pairs_per_call(latents[0], {"encoder_hidden_states": context[0]}) == 2
    assert roomy.pairs_per_call(latents[0], {"encoder_hidden_states": context[0]}) > 5 * 3
    assert_close_relative(
        tight.flat_gradients(latents, indices, "train", extra=extra),
        roomy.flat_gradients(latents, indices, "train", extra=extra),
    )
