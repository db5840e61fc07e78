"""Per-sample gradients: the unprojected feature of each image (METHOD.md §2).

For an image x with dataset identity (set_name, index), timesteps T (K of them), D noise draws per timestep and
output function f (METHOD.md §2 and §7):

    g_{t,d}(x) = grad_theta f(eps_theta(sqrt(abar_t) x + sqrt(1 - abar_t) eps_{t,d}, t), eps_{t,d})
    feature(x) = (1/K) sum_t u(sum_d g_{t,d}(x))                    normalize = "timestep" (DAS), u(v) = v / ||v||
               = (1/(K D)) sum_{t,d} u(g_{t,d}(x))                  normalize = "draw" (SNR-LDS)
               = (1/(K D)) sum_{t,d} g_{t,d}(x)                     normalize = "none" (TRAK, D-TRAK)

(a flat P-vector). With D = 1 the first two are the same feature. eps_{t,d} comes from the shared noise rule
:func:`das_lightning.diffusion.rule_noise`, keyed by the image's set and index, the timestep and the draw's noise
id (:func:`~das_lightning.attribution.timesteps.draw_plan`: draw 0 is the one-draw noise of every other stage;
antithetic draws 2j + 1 are exactly -eps of draw 2j), never by its batch position, so a feature does not depend on
what it was batched with.

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
from das_lightning.attribution.timesteps import Draw, draw_plan
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
# how the gradients of the draws are normalised before they are averaged (see the module docstring)
NORMALIZATIONS = ("timestep", "draw", "none")


def resolve_normalize(
    normalize: str | None, normalize_per_timestep: bool | None, draws_per_timestep: int = 1
) -> str:
    """The normalisation in force: ``normalize`` when given, else the older switch ``normalize_per_timestep``
    (true: "timestep", false: "none"). With one draw per timestep, "draw" is "timestep" (the same feature), and
    is reported as such so that both name one store."""
    if normalize is None:
        normalize = "none" if normalize_per_timestep is False else "timestep"
    if normalize not in NORMALIZATIONS:
        raise ConfigError(f"normalize must be one of {list(NORMALIZATIONS)}, not {normalize!r}")
    return "timestep" if normalize == "draw" and draws_per_timestep == 1 else normalize


def draw_noise(
    set_name: str,
    indices: Sequence[int],
    draws: Sequence[Draw],
    e_seed: int,
    shape: Sequence[int],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The noise of row b = image ``indices[b]`` under draw ``draws[b]`` (noise rule draw ``noise_id``, times its
    sign): (B, *shape). Antithetic partners are negated exactly (a sign flip rounds nothing)."""
    noise = rule_noise(
        set_name,
        indices,
        [draw.timestep for draw in draws],
        e_seed,
        shape,
        device,
        dtype,
        draws=[draw.noise_id for draw in draws],
    )
    negated = torch.tensor([draw.sign < 0 for draw in draws], device=noise.device)
    if bool(negated.any()):
        noise[negated] = -noise[negated]
    return noise


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
        normalize_per_timestep: divide each g_t by its L2 norm before averaging (DAS: on; TRAK, D-TRAK: off); the
            older switch, used when ``normalize`` is None.
        param_filter: which parameters to differentiate: ``None`` (all with ``requires_grad``), a regex as in
            :func:`select_parameters`, or a predicate on parameter names.
        e_seed: the noise seed passed to the noise rule.
        unet_kwargs: constant keyword arguments for every model call (not per sample).
        timestep_batch: how many draws (timestep, noise) are vmapped together with the samples in one call (with
            one draw per timestep: how many timesteps); larger is faster
            until memory runs out (activations and a P-vector per pair, B x timestep_batch pairs). ``None``:
            about ``AUTO_PAIRS_PER_CALL`` pairs per call, with at most ``AUTO_PAIR_GRADIENT_BYTES`` of pair
            gradients and an estimated peak of ``activation_bytes``; when even one timestep of the whole batch
            would exceed them, the batch itself is split. The result does not depend on it (up to rounding).
        activation_bytes: the memory budget of one call (default ``AUTO_PAIR_ACTIVATION_BYTES``).
        draws_per_timestep: D, the noise draws averaged at each timestep (1: one eps per t, as always).
        antithetic: draws in pairs (eps, -eps); D must be even.
        normalize: "timestep", "draw" or "none" (see the module docstring); None follows ``normalize_per_timestep``.
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
        *,
        draws_per_timestep: int = 1,
        antithetic: bool = False,
        normalize: str | None = None,
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
        self.draws_per_timestep = int(draws_per_timestep)
        self.antithetic = bool(antithetic)
        self.draws = draw_plan(self.timesteps, self.draws_per_timestep, self.antithetic)
        self.normalize = resolve_normalize(normalize, normalize_per_timestep, self.draws_per_timestep)
        self.normalize_per_timestep = self.normalize == "timestep"
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

    @property
    def num_draws(self) -> int:
        """K x D: the (timestep, noise) draws averaged into each feature."""
        return len(self.draws)

    def describe(self) -> dict[str, object]:
        """The settings that determine the gradients, for manifests. The draw settings appear only when they are
        not the one-draw defaults, so stores made before draws existed keep their manifest."""
        described: dict[str, object] = {
            "output_function": self.output_function_name,
            "timesteps": self.timesteps,
            "normalize_per_timestep": self.normalize_per_timestep,
            "e_seed": self.e_seed,
            "num_parameters": self.num_parameters,
            "num_parameter_tensors": len(self.parameter_names),
        }
        if self.draws_per_timestep != 1:
            described["draws_per_timestep"] = self.draws_per_timestep
        if self.antithetic:
            described["antithetic"] = True
        if self.normalize == "draw":
            described["normalize"] = "draw"
        return described

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
        budget = (
            None
            if self.timestep_batch is not None
            else self.pairs_per_call(images[0], {key: value[0] for key, value in extra.items()})
        )
        images_per_call, draws_per_call = vmap_chunks(batch, budget, self.timestep_batch)
        if images_per_call >= batch:
            return self._batch_gradients(images, index_list, set_name, extra, draws_per_call)
        # features are per sample, so a batch over budget is split into parts of images_per_call images
        return torch.cat(
            [
                self._batch_gradients(
                    images[start : start + images_per_call],
                    index_list[start : start + images_per_call],
                    set_name,
                    {key: value[start : start + images_per_call] for key, value in extra.items()},
                    draws_per_call,
                )
                for start in range(0, batch, images_per_call)
            ]
        )

    def _batch_gradients(
        self,
        images: torch.Tensor,
        index_list: list[int],
        set_name: str,
        extra: dict[str, torch.Tensor],
        draws_per_call: int,
    ) -> torch.Tensor:
        device = images.device
        batch = images.shape[0]
        features = torch.zeros(batch, self.num_parameters, dtype=torch.float32, device=device)
        per_pair_grad = vmap(grad(self._sample_output), in_dims=(None, None, 0, 0, 0, 0))
        per_draw = self.draws_per_timestep
        scale_all = 1.0 / (len(self.timesteps) * per_draw)
        # "timestep" with several draws: the draws of one timestep are summed, then unit-normalised; a timestep
        # whose draws straddle two calls is carried over (its position in the plan, its partial sums)
        summed_per_timestep = self.normalize == "timestep" and per_draw > 1
        carried: tuple[int, dict[str, torch.Tensor]] | None = None
        with _eval_mode(self.model):
            differentiated, constant = self._split_state()
            for start in range(0, len(self.draws), draws_per_call):
                chunk = self.draws[start : start + draws_per_call]
                # pairs are draw-major: pair j * B + b is (image b, draw chunk[j])
                pair_draws = [draw for draw in chunk for _ in range(batch)]
                pair_timesteps = torch.tensor([draw.timestep for draw in pair_draws], dtype=torch.long)
                noise = draw_noise(
                    set_name,
                    index_list * len(chunk),
                    pair_draws,
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
                # view each gradient as (draws in chunk, B, numel)
                gradients = {
                    name: gradients[name].reshape(len(chunk), batch, -1) for name in self.parameter_names
                }
                if summed_per_timestep:
                    carried = self._add_timestep_sums(features, gradients, start, carried)
                    continue
                if self.normalize == "none":
                    weights = torch.full((len(chunk), batch), scale_all, device=device)
                else:  # "draw", or "timestep" with one draw per timestep: each draw's gradient unit-normalised
                    squared_norms = sum(g.float().pow(2).sum(-1) for g in gradients.values())
                    weights = scale_all / squared_norms.sqrt().clamp_min(torch.finfo(torch.float32).tiny)
                for name, gradient in gradients.items():
                    features[:, self.parameter_slices[name]] += torch.einsum(
                        "tbn,tb->bn", gradient.float(), weights
                    )
        if carried is not None:
            raise RuntimeError("a timestep's draws were not all computed")  # the plan is timestep-major
        return features

    def _add_timestep_sums(
        self,
        features: torch.Tensor,
        gradients: dict[str, torch.Tensor],
        start: int,
        carried: tuple[int, dict[str, torch.Tensor]] | None,
    ) -> tuple[int, dict[str, torch.Tensor]] | None:
        """Add (1/K) u(sum_d g_{t,d}) to ``features`` for every timestep whose last draw is in this chunk (draws
        ``start`` ..); returns the partial sums of a timestep whose draws go on in the next chunk."""
        per_draw = self.draws_per_timestep
        scale = 1.0 / len(self.timesteps)
        chunk_size = next(iter(gradients.values())).shape[0]
        position = start
        while position < start + chunk_size:
            timestep_position = position // per_draw
            stop = min((timestep_position + 1) * per_draw, start + chunk_size)
            rows = slice(position - start, stop - start)
            sums = {name: gradient[rows].float().sum(0) for name, gradient in gradients.items()}  # (B, numel)
            if carried is not None:
                if carried[0] != timestep_position:
                    raise RuntimeError("draws of a timestep were computed out of order")
                sums = {name: carried[1][name] + value for name, value in sums.items()}
                carried = None
            if stop < (timestep_position + 1) * per_draw:  # more draws of this timestep in the next chunk
                carried = (timestep_position, sums)
            else:
                norms = sum(value.pow(2).sum(-1) for value in sums.values()).sqrt()
                weights = scale / norms.clamp_min(torch.finfo(torch.float32).tiny)  # (B,)
                for name, value in sums.items():
                    features[:, self.parameter_slices[name]] += value * weights[:, None]
            position = stop
        return carried


def vmap_chunks(batch: int, budget_pairs: int | None, timestep_batch: int | None) -> tuple[int, int]:
    """(images, draws) per vmap call of a batch of ``batch`` images: ``timestep_batch`` draws of the whole batch
    when it is set; else as many draws of the whole batch as ``budget_pairs`` (image, draw) pairs allow (at least
    one); else, when even one draw of the batch is over budget, ``budget_pairs`` images one draw at a time.
    :meth:`PerSampleGradients.flat_gradients` calls it, and so does the plan (das_lightning/plan.py)."""
    if timestep_batch is not None:
        return batch, int(timestep_batch)
    if budget_pairs is None:
        raise ValueError("vmap_chunks needs budget_pairs when timestep_batch is not set")
    if batch <= budget_pairs:
        return batch, max(1, budget_pairs // batch)
    return budget_pairs, 1


def reference_draw_gradients(
    model: torch.nn.Module,
    alphas_cumprod: torch.Tensor,
    output_function: str,
    draws: Sequence[Draw],
    images: torch.Tensor,
    indices: torch.Tensor | Sequence[int],
    set_name: str,
    parameter_names: Sequence[str],
    e_seed: int = 0,
    unet_kwargs: Mapping[str, object] | None = None,
    extra: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The unnormalised gradient g_{t,d} of every image under every draw, (B, len(draws), P), one sample and one
    draw at a time with ``torch.autograd.grad``: slow and obvious, the yardstick for the fast path."""
    output_fn = get_output_function(output_function)
    parameters = dict(model.named_parameters())
    selected = [parameters[name] for name in parameter_names]
    index_list = [int(i) for i in (indices.tolist() if torch.is_tensor(indices) else indices)]
    extra = dict(extra or {})
    rows = []
    with _eval_mode(model):
        for row, index in enumerate(index_list):
            image = images[row : row + 1]
            per_draw = []
            for draw in draws:
                timestep_tensor = torch.tensor([draw.timestep], device=images.device)
                noise = draw.sign * rule_noise(
                    set_name,
                    [index],
                    [draw.timestep],
                    e_seed,
                    image.shape[1:],
                    images.device,
                    images.dtype,
                    draws=draw.noise_id,
                )
                noisy = add_noise(image, noise, timestep_tensor, alphas_cumprod)
                kwargs = {
                    **(unet_kwargs or {}),
                    **{key: value[row : row + 1] for key, value in extra.items()},
                }
                prediction = _prediction(model(noisy, timestep_tensor, **kwargs))
                value = output_fn(prediction[0].float(), noise[0].float())
                per_draw.append(
                    torch.cat(
                        [
                            g.reshape(-1).float()
                            for g in torch.autograd.grad(
                                value, selected, allow_unused=True, materialize_grads=True
                            )
                        ]
                    )
                )
            rows.append(torch.stack(per_draw))
    return torch.stack(rows)


def average_draws(per_draw: torch.Tensor, draws_per_timestep: int, normalize: str) -> torch.Tensor:
    """The feature of per-draw gradients (B, K x D, P), timestep-major, under a normalisation (module docstring)."""
    tiny = torch.finfo(torch.float32).tiny
    batch, num_draws, size = per_draw.shape
    if normalize == "none":
        return per_draw.sum(1) / num_draws
    if normalize == "draw":
        return (per_draw / per_draw.norm(dim=-1, keepdim=True).clamp_min(tiny)).sum(1) / num_draws
    if normalize != "timestep":
        raise ConfigError(f"normalize must be one of {list(NORMALIZATIONS)}, not {normalize!r}")
    summed = per_draw.reshape(batch, num_draws // draws_per_timestep, draws_per_timestep, size).sum(2)
    return (summed / summed.norm(dim=-1, keepdim=True).clamp_min(tiny)).sum(1) / summed.shape[1]


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
    *,
    draws_per_timestep: int = 1,
    antithetic: bool = False,
    normalize: str | None = None,
) -> torch.Tensor:
    """The same features as :meth:`PerSampleGradients.flat_gradients`: :func:`reference_draw_gradients`
    averaged by :func:`average_draws`, slow and obvious, the yardstick for the fast path."""
    draws = draw_plan([int(t) for t in timesteps], draws_per_timestep, antithetic)
    per_draw = reference_draw_gradients(
        model,
        alphas_cumprod,
        output_function,
        draws,
        images,
        indices,
        set_name,
        parameter_names,
        e_seed,
        unet_kwargs,
        extra,
    )
    return average_draws(
        per_draw, draws_per_timestep, resolve_normalize(normalize, normalize_per_timestep, draws_per_timestep)
    )
