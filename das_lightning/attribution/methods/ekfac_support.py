"""The kronfluence side of EK-FAC influence: the diffusion loss as a kronfluence ``Task``, factor fitting, the
curvature's scale, and pairwise scores (used by :mod:`das_lightning.attribution.methods.ekfac`).

This module imports kronfluence at the top; the method entry imports it lazily, so the package imports without
kronfluence (``pip install --no-deps 'kronfluence==1.0.1'``).

The loss of one training image x with identity (set_name, index) is the diffusion loss averaged over the method's
K feature timesteps, with the noise of the shared rule :func:`~das_lightning.diffusion.rule_noise`:

    L(x) = (1/K) sum_{t in T} mean_pixels (eps_theta(x_t, t) - eps_t)^2,   eps_t = rule_noise(set_name, index, t, e_seed)

so EK-FAC differentiates exactly what TRAK's features differentiate. The network is called once per timestep on
the whole batch (K calls per batch): kronfluence then sums a module's K per-call gradients into the image's
gradient (``has_shared_parameters=True``) and keeps one score row per image.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.task import Task
from kronfluence.utils.constants import (
    ACTIVATION_EIGENVALUES_NAME,
    ALL_MODULE_NAME,
    GRADIENT_EIGENVALUES_NAME,
    LAMBDA_MATRIX_NAME,
    NUM_LAMBDA_PROCESSED,
)
from kronfluence.utils.dataset import DataLoaderKwargs
from torch import nn
from torch.utils.data import Dataset

from das_lightning.attribution.output_functions import batched_output
from das_lightning.diffusion import add_noise, rule_noise
from das_lightning.errors import ConfigError

# kronfluence wraps exactly these module types (TrackedModule.SUPPORTED_MODULES, looked up by exact type)
TRACKED_TYPES = (nn.Linear, nn.Conv2d)
FACTORS_NAME = "fit"  # one fit per analysis folder; the folder's name says which settings made it

ExtraInputs = Callable[[Mapping[str, Any]], Mapping[str, torch.Tensor]]


def tracked_module_names(network: nn.Module, param_pattern: str | None = None) -> list[str]:
    """The Linear and Conv2d modules whose influence is measured, in model order.

    ``param_pattern=None``: every such module with a parameter that requires grad (as
    :func:`~das_lightning.attribution.grads.select_parameters`). Otherwise every such module with a parameter whose
    full name matches the regular expression (``re.search``), e.g. ``lora_`` for the LoRA weights. A module is
    tracked whole (weight and bias): kronfluence's curvature is per module.
    """
    regex = None if param_pattern is None else re.compile(param_pattern)
    names = []
    for module_name, module in network.named_modules():
        if type(module) not in TRACKED_TYPES:
            continue
        parameters = list(module.named_parameters())
        if regex is None:
            selected = any(parameter.requires_grad for _, parameter in parameters)
        else:
            selected = any(regex.search(f"{module_name}.{name}") for name, _ in parameters)
        if selected:
            names.append(module_name)
    if not names:
        raise ConfigError(
            f"no Linear or Conv2d module of {type(network).__name__} is selected by param_pattern {param_pattern!r}"
        )
    return names


def tracked_parameter_names(network: nn.Module, module_names: Sequence[str]) -> list[str]:
    """The parameters (weights and biases) of ``module_names``, in model order: the layout of the gradient whose
    products EK-FAC's scores approximate."""
    prefixes = tuple(f"{name}." for name in module_names)
    return [name for name, _ in network.named_parameters() if name.startswith(prefixes)]


def _prediction(output: Any) -> torch.Tensor:
    return output.sample if hasattr(output, "sample") else output


class DiffusionTask(Task):
    """The diffusion loss over the method's timesteps for kronfluence (train loss, summed over the batch), and the
    measurement on a query (one of the output functions, averaged over the same timesteps and noise rule).

    Training images are keyed by ``train_set_name``, queries by ``query_set_name``, and each by the ``index`` its
    dataset gives it (batches are dataset items collated: ``{"image", "index", "label"}``).

    ``sample=True`` (the true Fisher) replaces the target by y = eps_theta.detach() + sqrt(d/2) z with z ~ N(0, I):
    the gradient of mean_pixels (eps_theta - y)^2 is then -sqrt(2/d) J^T z, whose expected outer product is the
    Gauss-Newton matrix J^T (2/d) J of the loss. z is drawn by the noise rule under the set name
    ``<set_name>:fisher``, so the fit does not depend on batch order or size.
    """

    # kronfluence 1.0.1's pairwise-score hook, without a per-sample post-process, keeps only ONE of a module's K
    # per-timestep calls (it overwrites the score and drops the other hooks); with one, it sums all K. The
    # post-process itself is the identity. tests/test_ekfac.py checks the sum against our own gradients.
    enable_post_process_per_sample_gradient = True

    def __init__(
        self,
        alphas_cumprod: torch.Tensor,
        timesteps: Sequence[int],
        e_seed: int,
        train_set_name: str,
        query_set_name: str | None = None,
        measurement: str = "loss",
        tracked_modules: Sequence[str] | None = None,
        extra_inputs: ExtraInputs | None = None,
    ) -> None:
        if len(timesteps) == 0:
            raise ConfigError("EK-FAC needs at least one timestep")
        self.alphas_cumprod = alphas_cumprod.detach()
        self.timesteps = [int(t) for t in timesteps]
        self.e_seed = int(e_seed)
        self.train_set_name = train_set_name
        self.query_set_name = query_set_name
        self.measurement = measurement  # a name of attribution/output_functions.py's OUTPUT_FUNCTIONS
        self.tracked_modules = None if tracked_modules is None else list(tracked_modules)
        self.extra_inputs = extra_inputs

    def _predictions(
        self, batch: Mapping[str, torch.Tensor], model: nn.Module, set_name: str
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(timesteps (B,), predicted noise (B, ...), true noise (B, ...)) for each timestep, one network call each."""
        images = batch["image"]
        indices = batch["index"]
        device = images.device
        extra = {}
        if self.extra_inputs is not None:
            extra = {key: value.to(device) for key, value in self.extra_inputs(batch).items()}
        alphas_cumprod = self.alphas_cumprod.to(device)
        for timestep in self.timesteps:
            steps = torch.full((images.shape[0],), timestep, dtype=torch.long, device=device)
            # same noise as the features and the LDS ground truth: keyed by the image's identity
            noise = rule_noise(set_name, indices, steps, self.e_seed, images.shape[1:], device, images.dtype)
            noisy = add_noise(images, noise, steps, alphas_cumprod)
            yield steps, _prediction(model(noisy, steps, **extra)).float(), noise.float()

    def compute_train_loss(
        self, batch: Mapping[str, torch.Tensor], model: nn.Module, sample: bool = False
    ) -> torch.Tensor:
        total = 0.0
        for steps, predicted, noise in self._predictions(batch, model, self.train_set_name):
            target = noise
            if sample:
                pixels = predicted[0].numel()
                draw = rule_noise(
                    f"{self.train_set_name}:fisher",
                    batch["index"],
                    steps,
                    self.e_seed,
                    predicted.shape[1:],
                    predicted.device,
                )
                target = predicted.detach() + math.sqrt(pixels / 2.0) * draw
            total = total + (predicted - target).pow(2).flatten(1).mean(dim=1).sum()
        return total / len(self.timesteps)

    def compute_measurement(self, batch: Mapping[str, torch.Tensor], model: nn.Module) -> torch.Tensor:
        if self.query_set_name is None:
            raise RuntimeError("DiffusionTask.query_set_name must be set before measuring queries")
        total = 0.0
        for _, predicted, noise in self._predictions(batch, model, self.query_set_name):
            total = total + batched_output(self.measurement, predicted, noise).sum()
        return total / len(self.timesteps)

    def get_influence_tracked_modules(self) -> list[str] | None:
        return self.tracked_modules


def factor_arguments(strategy: str, fisher: str) -> FactorArguments:
    """kronfluence's factor settings: ``has_shared_parameters`` because a module runs once per timestep."""
    return FactorArguments(
        strategy=strategy,
        use_empirical_fisher=fisher == "empirical",
        has_shared_parameters=True,
    )


def make_analyzer(
    network: nn.Module,
    task: DiffusionTask,
    output_dir: Path,
    analysis_name: str,
    cpu: bool,
    progress_bar: bool = False,
) -> Analyzer:
    """An analyzer of a COPY of ``network`` (kronfluence wraps modules in place and freezes parameters)."""
    import copy

    prepared = prepare_model(copy.deepcopy(network), task)
    return Analyzer(
        analysis_name=analysis_name,
        model=prepared,
        task=task,
        cpu=cpu,
        disable_tqdm=not progress_bar,
        output_dir=str(output_dir),
    )


def fit_factors(analyzer: Analyzer, train_set: Dataset, strategy: str, fisher: str, batch_size: int) -> None:
    """Fit (or finish, or reuse) the factors: kronfluence skips each stage whose files are already written."""
    analyzer.fit_all_factors(
        factors_name=FACTORS_NAME,
        dataset=train_set,
        per_device_batch_size=batch_size,
        dataloader_kwargs=DataLoaderKwargs(num_workers=0),
        factor_args=factor_arguments(strategy, fisher),
        overwrite_output_dir=False,
    )


def curvature_eigenvalues(analyzer: Analyzer, strategy: str) -> torch.Tensor | None:
    """Every eigenvalue of the fitted curvature, all tracked modules concatenated (float64); None for ``identity``.

    ekfac and diagonal: the Lambda matrices divided by the number of examples (what kronfluence damps);
    kfac: the Kronecker products of the two covariance eigenvalue vectors."""
    if strategy == "identity":
        return None
    if strategy == "kfac":
        factors = analyzer.load_eigendecomposition(FACTORS_NAME)
        activation, gradient = factors[ACTIVATION_EIGENVALUES_NAME], factors[GRADIENT_EIGENVALUES_NAME]
        return torch.cat(
            [
                torch.outer(gradient[name].double(), activation[name].double()).flatten()
                for name in sorted(activation)
            ]
        )
    factors = analyzer.load_lambda_matrices(FACTORS_NAME)
    lambdas, counts = factors[LAMBDA_MATRIX_NAME], factors[NUM_LAMBDA_PROCESSED]
    return torch.cat([(lambdas[name].double() / counts[name].double()).flatten() for name in sorted(lambdas)])


def pairwise_scores(
    analyzer: Analyzer,
    scores_name: str,
    query_set: Dataset,
    train_set: Dataset,
    damping: float,
    batch_size: int,
) -> torch.Tensor:
    """(queries, train) kronfluence scores g_q^T (G + damping I)^-1 g_i, computed once per name, then reused."""
    analyzer.compute_pairwise_scores(
        scores_name=scores_name,
        factors_name=FACTORS_NAME,
        query_dataset=query_set,
        train_dataset=train_set,
        per_device_query_batch_size=batch_size,
        per_device_train_batch_size=batch_size,
        dataloader_kwargs=DataLoaderKwargs(num_workers=0),
        score_args=ScoreArguments(damping_factor=float(damping)),
        overwrite_output_dir=False,
    )
    return analyzer.load_pairwise_scores(scores_name)[ALL_MODULE_NAME]
