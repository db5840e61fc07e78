"""Per-sample gradients: the unprojected feature of each image (METHOD.md §2).

For an image x with dataset identity (set_name, index), timesteps T (K of them) and output function f:

    g_t(x) = grad_theta f(eps_theta(sqrt(abar_t) x + sqrt(1 - abar_t) eps_t, t), eps_t)
    feature(x) = (1/K) sum_{t in T} g_t(x) [/ ||g_t(x)|| when normalize_per_timestep]  (a flat P-vector)

eps_t comes from the shared noise rule :func:`das_lightning.diffusion.rule_noise`, keyed by the image's set and
index, never by its batch position, so a feature does not depend on what it was batched with.

Flat layout: the selected parameters in MODEL ORDER (the order of ``model.named_parameters()``), each flattened
row-major, concatenated; ``parameter_names`` and ``parameter_slices`` give the layout.

The fast path is ``torch.func.vmap(torch.func.grad(...))`` over (sample, timestep) pairs through
``torch.func.functional_call``; :func:`reference_flat_gradients` is the obvious one-sample loop, kept for tests.
Dropout must be off for a gradient to be a function of the image alone: both run the model in eval mode
(restoring the caller's mode afterwards).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch.func import functional_call, grad, vmap

from das_lightning.attribution.output_functions import get_output_function
from das_lightning.diffusion import add_noise, rule_noise
from das_lightning.errors import ConfigError
from das_lightning.models.attention import use_vmap_friendly_attention

ParamFilter = Callable[[str], bool]

# With timestep_batch=None, one vmap call covers about this many (sample, timestep) pairs. Measured on the tiny
# 16 px UNet (CPU time, 1 thread, K = 10): every chunking cost 1.0-1.9x the K batched forward+backward passes;
# one call over B x K pairs was best up to ~300 pairs, a loop over single timesteps was worst below 64.
AUTO_PAIRS_PER_CALL = 128
# vmap(grad) materialises a P-vector per pair: bound them too (35.7M-parameter UNet: 143 MB per pair).
AUTO_PAIR_GRADIENT_BYTES = 4 << 30
# ... and the peak memory of a call, estimated as PEAK_PER_SAVED_BYTE x the activations a pair saves for its backward
# (measured once per model, see PerSampleGradients.saved_bytes_per_pair). Measured on the 1.1M-parameter 32 px UNet
# (batch 32, K = 10, 1 thread): 14.8 MiB saved per pair; 128 pairs per call peaked at 6.7 GB RSS in 56-61 s,
# 32 pairs at 2.2 GB in 24-30 s (the peak is 3.3-4.5x the saved bytes).
AUTO_PAIR_ACTIVATION_BYTES = 2 << 30
PEAK_PER_SAVED_BYTE = 4


def select_parameters(model: torch.nn.Module, pattern: str | None = None) -> list[str]:
    """Names of the parameters to differentiate, in model order.

    ``pattern=None``: every parameter with ``requires_grad``. Otherwise every parameter whose name matches the
    regular expression (``re.search``), whether or not it requires grad: e.g. ``"lora_"`` selects only the LoRA
    weights of a PEFT model, ``"^(down|mid)_blocks"`` the encoder half of a UNet.
    """
    if pattern is None:
        names = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    else:
        regex = re.compile(pattern)
        names = [name for name, _ in model.named_parameters() if regex.search(name)]
    if not names:
        raise ConfigError(f"no parameter of {type(model).__name__} is selected by pattern {pattern!r}")
    return names


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Dropout off while gradients are taken; the caller's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _prediction(output: object) -> torch.Tensor:
    """The predicted noise from a diffusers output (``.sample``) or a plain tensor."""
    return output.sample if hasattr(output, "sample") else output  # type: ignore[return-value]


class PerSampleGradients:
    """Per-sample, timestep-averaged gradients of an output function of a noise-prediction model.

    Args:
        model: the noise-prediction network (e.g. a diffusers ``UNet2DModel``); called as
            ``model(noisy, timesteps, **unet_kwargs, **extra)``. Its attention processors are replaced in place
            by :class:`~das_lightning.models.attention.MatmulAttnProcessor` (same maths, traceable by vmap).
        alphas_cumprod: the scheduler's abar_t, shape (num_train_timesteps,).
        output_function: a name in :data:`~das_lightning.attribution.output_functions.OUTPUT_FUNCTIONS`.
        timesteps: the K timesteps to average over (see :func:`~das_lightning.attribution.timesteps.select_timesteps`).
        normalize_per_timestep: divide each g_t by its L2 norm before averaging (DAS: on; TRAK, D-TRAK: off).
        param_filter: which parameters to differentiate: ``None`` (all with ``requires_grad``), a regex as in
            :func:`select_parameters`, or a predicate on parameter names.
        e_seed: the noise seed passed to the noise rule.
        unet_kwargs: constant keyword arguments for every model call (not per sample).
        timestep_batch: how many timesteps are vmapped together with the samples in one call; larger is faster
            until memory runs out (activations and a P-vector per pair, B x timestep_batch pairs). ``None``:
            about ``AUTO_PAIRS_PER_CALL`` pairs per call, with at most ``AUTO_PAIR_GRADIENT_BYTES`` of pair
            gradients and an estimated peak of ``activation_bytes``; when even one timestep of the whole batch
            would exceed them, the batch itself is split. The result does not depend on it (up to rounding).
        activation_bytes: the memory budget of one call (default ``AUTO_PAIR_ACTIVATION_BYTES``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        alphas_cumprod: torch.Tensor,
        output_function: str,
        timesteps: Sequence[int],
        normalize_per_timestep: bool,
        param_filter: ParamFilter | str | None = None,
        e_seed: int = 0,
        unet_kwargs: Mapping[str, object] | None = None,
        timestep_batch: int | None = None,
        activation_bytes: int = AUTO_PAIR_ACTIVATION_BYTES,
    ) -> None:
        if len(timesteps) == 0:
            raise ConfigError("at least one timestep is needed")
        if timestep_batch is not None and timestep_batch < 1:
            raise ConfigError(f"timestep_batch must be positive, got {timestep_batch}")
        self.model = model
        self.alphas_cumprod = alphas_cumprod.detach()
        self.output_function_name = output_function
        self.output_function = get_output_function(output_function)
        self.timesteps = [int(t) for t in timesteps]
        self.normalize_per_timestep = normalize_per_timestep
        self.e_seed = int(e_seed)
        self.unet_kwargs = dict(unet_kwargs or {})
        self.timestep_batch = timestep_batch
        self.activation_bytes = int(activation_bytes)
        self._saved_bytes_per_pair: int | None = None

        if param_filter is None or isinstance(param_filter, str):
            self.parameter_names = select_parameters(model, param_filter)
        else:
            self.parameter_names = [name for name, _ in model.named_parameters() if param_filter(name)]
            if not self.parameter_names:
                raise ConfigError("param_filter selects no parameter")
        parameters = dict(model.named_parameters())
        self.parameter_slices: dict[str, slice] = {}
        offset = 0
        for name in self.parameter_names:
            size = parameters[name].numel()
            self.parameter_slices[name] = slice(offset, offset + size)
            offset += size
        self.num_parameters = offset
        use_vmap_friendly_attention(model)

    def describe(self) -> dict[str, object]:
        """The settings that determine the gradients, for manifests."""
        return {
            "output_function": self.output_function_name,
            "timesteps": self.timesteps,
            "normalize_per_timestep": self.normalize_per_timestep,
            "e_seed": self.e_seed,
            "num_parameters": self.num_parameters,
            "num_parameter_tensors": len(self.parameter_names),
        }

    def _split_state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(differentiated parameters, everything else held constant), read from the model now."""
        selected = set(self.parameter_names)
        differentiated, constant = {}, {}
        for name, parameter in self.model.named_parameters():
            (differentiated if name in selected else constant)[name] = parameter.detach()
        for name, buffer in self.model.named_buffers():
            constant[name] = buffer
        return differentiated, constant

    def _sample_output(
        self,
        differentiated: dict[str, torch.Tensor],
        constant: dict[str, torch.Tensor],
        image: torch.Tensor,
        noise: torch.Tensor,
        timestep: torch.Tensor,
        extra: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """f(eps_theta(x_t, t), eps) for ONE (image, timestep) pair; the model sees a batch of one."""
        timesteps = timestep.unsqueeze(0)
        noisy = add_noise(image.unsqueeze(0), noise.unsqueeze(0), timesteps, self.alphas_cumprod)
        kwargs = {**self.unet_kwargs, **{key: value.unsqueeze(0) for key, value in extra.items()}}
        output = functional_call(
            self.model, (differentiated, constant), (noisy, timesteps), kwargs, strict=False
        )
        return self.output_function(_prediction(output)[0].float(), noise.float())

    def saved_bytes_per_pair(self, image: torch.Tensor, extra: Mapping[str, torch.Tensor]) -> int:
        """Bytes of activations one (image, timestep) pair keeps for its backward pass (measured once on a real
        forward pass; the parameters themselves, shared by all pairs, are not counted)."""
        if self._saved_bytes_per_pair is None:
            differentiated, constant = self._split_state()
            leaves = {name: value.clone().requires_grad_() for name, value in differentiated.items()}
            shared = {value.data_ptr() for value in (*leaves.values(), *constant.values())}
            total = 0

            def count(tensor: torch.Tensor) -> torch.Tensor:
                nonlocal total
                if tensor.data_ptr() not in shared:
                    total += tensor.numel() * tensor.element_size()
                return tensor

            timestep = torch.tensor(self.timesteps[0], device=image.device)
            with _eval_mode(self.model), torch.enable_grad():
                with torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor):
                    self._sample_output(
                        leaves, constant, image, torch.zeros_like(image), timestep, dict(extra)
                    )
            self._saved_bytes_per_pair = max(total, 1)
        return self._saved_bytes_per_pair

    def pairs_per_call(self, image: torch.Tensor, extra: Mapping[str, torch.Tensor]) -> int:
        """How many (sample, timestep) pairs one vmap call may hold under the automatic budgets."""
        by_gradients = AUTO_PAIR_GRADIENT_BYTES // (4 * self.num_parameters)
        by_activations = self.activation_bytes // (
            PEAK_PER_SAVED_BYTE * self.saved_bytes_per_pair(image, extra)
        )
        return max(1, min(AUTO_PAIRS_PER_CALL, by_gradients, by_activations))

    def flat_gradients(
        self,
        images: torch.Tensor,
        indices: torch.Tensor | Sequence[int],
        set_name: str,
        extra: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Features (B, P), float32, for images (B, C, H, W) whose dataset indices in ``set_name`` are ``indices``.

        ``extra`` holds per-sample model inputs with a leading batch dimension (e.g. ``encoder_hidden_states``
        (B, L, D) or ``class_labels`` (B,)).
        """
        batch = images.shape[0]
        index_list = [int(i) for i in (indices.tolist() if torch.is_tensor(indices) else indices)]
        if len(index_list) != batch:
            raise ConfigError(f"{batch} images but {len(index_list)} indices")
        extra = dict(extra or {})
        if self.timestep_batch is not None:
            return self._batch_gradients(images, index_list, set_name, extra, self.timestep_batch)
        pairs = self.pairs_per_call(images[0], {key: value[0] for key, value in extra.items()})
        if batch <= pairs:
            return self._batch_gradients(images, index_list, set_name, extra, max(1, pairs // batch))
        # even one timestep of the whole batch is over budget: features are per sample, so split the batch
        return torch.cat(
            [
                self._batch_gradients(
                    images[start : start + pairs],
                    index_list[start : start + pairs],
                    set_name,
                    {key: value[start : start + pairs] for key, value in extra.items()},
                    1,
                )
                for start in range(0, batch, pairs)
            ]
        )

    def _batch_gradients(
        self,
        images: torch.Tensor,
        index_list: list[int],
        set_name: str,
        extra: dict[str, torch.Tensor],
        timestep_batch: int,
    ) -> torch.Tensor:
        device = images.device
        batch = images.shape[0]
        features = torch.zeros(batch, self.num_parameters, dtype=torch.float32, device=device)
        per_pair_grad = vmap(grad(self._sample_output), in_dims=(None, None, 0, 0, 0, 0))
        scale_all = 1.0 / len(self.timesteps)
        with _eval_mode(self.model):
            differentiated, constant = self._split_state()
            for start in range(0, len(self.timesteps), timestep_batch):
                chunk = self.timesteps[start : start + timestep_batch]
                # pairs are timestep-major: pair j * B + b is (image b, timestep chunk[j])
                pair_timesteps = torch.tensor(chunk, dtype=torch.long).repeat_interleave(batch)
                pair_indices = index_list * len(chunk)
                noise = rule_noise(
                    set_name,
                    pair_indices,
                    pair_timesteps,
                    self.e_seed,
                    images.shape[1:],
                    device,
                    images.dtype,
                )
                pair_extra = {
                    key: value.repeat(len(chunk), *([1] * (value.dim() - 1))) for key, value in extra.items()
                }
                gradients = per_pair_grad(
                    differentiated,
                    constant,
                    images.repeat(len(chunk), *([1] * (images.dim() - 1))),
                    noise,
                    pair_timesteps.to(device),
                    pair_extra,
                )
                # view each gradient as (timesteps in chunk, B, numel)
                gradients = {
                    name: gradients[name].reshape(len(chunk), batch, -1) for name in self.parameter_names
                }
                if self.normalize_per_timestep:
                    squared_norms = sum(g.float().pow(2).sum(-1) for g in gradients.values())
                    weights = scale_all / squared_norms.sqrt().clamp_min(torch.finfo(torch.float32).tiny)
                else:
                    weights = torch.full((len(chunk), batch), scale_all, device=device)
                for name, gradient in gradients.items():
                    features[:, self.parameter_slices[name]] += torch.einsum(
                        "tbn,tb->bn", gradient.float(), weights
                    )
        return features


def reference_flat_gradients(
    model: torch.nn.Module,
    alphas_cumprod: torch.Tensor,
    output_function: str,
    timesteps: Sequence[int],
    normalize_per_timestep: bool,
    images: torch.Tensor,
    indices: torch.Tensor | Sequence[int],
    set_name: str,
    parameter_names: Sequence[str],
    e_seed: int = 0,
    unet_kwargs: Mapping[str, object] | None = None,
    extra: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The same features as :meth:`PerSampleGradients.flat_gradients`, one sample and one timestep at a time
    with ``torch.autograd.grad``: slow and obvious, the yardstick for the fast path."""
    output_fn = get_output_function(output_function)
    parameters = dict(model.named_parameters())
    selected = [parameters[name] for name in parameter_names]
    index_list = [int(i) for i in (indices.tolist() if torch.is_tensor(indices) else indices)]
    extra = dict(extra or {})
    rows = []
    with _eval_mode(model):
        for row, index in enumerate(index_list):
            image = images[row : row + 1]
            feature = torch.zeros(sum(p.numel() for p in selected), dtype=torch.float32, device=images.device)
            for timestep in timesteps:
                timestep_tensor = torch.tensor([int(timestep)], device=images.device)
                noise = rule_noise(
                    set_name, [index], [int(timestep)], e_seed, image.shape[1:], images.device, images.dtype
                )
                noisy = add_noise(image, noise, timestep_tensor, alphas_cumprod)
                kwargs = {
                    **(unet_kwargs or {}),
                    **{key: value[row : row + 1] for key, value in extra.items()},
                }
                prediction = _prediction(model(noisy, timestep_tensor, **kwargs))
                value = output_fn(prediction[0].float(), noise[0].float())
                gradient = torch.cat(
                    [
                        g.reshape(-1).float()
                        for g in torch.autograd.grad(
                            value, selected, allow_unused=True, materialize_grads=True
                        )
                    ]
                )
                if normalize_per_timestep:
                    gradient = gradient / gradient.norm().clamp_min(torch.finfo(torch.float32).tiny)
                feature += gradient / len(timesteps)
            rows.append(feature)
    return torch.stack(rows)
