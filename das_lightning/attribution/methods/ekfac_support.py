"""The kronfluence side of EK-FAC influence (used by :mod:`das_lightning.attribution.methods.ekfac`): the diffusion
loss as a kronfluence ``Task``, factor fitting, reading the fitted factors back, and kronfluence's own per-damping
pairwise scores (the reference the one-pass scores of the method entry are tested against).

This module imports kronfluence at the top; the method entry imports it lazily, so the package imports without
kronfluence (``pip install --no-deps 'kronfluence==1.0.1'``).

The loss of one training image x with identity (set_name, index) is the diffusion loss averaged over the method's
draws: its K feature timesteps, each with D noise draws (``features.draws_per_timestep``, antithetic pairs with
``features.antithetic``; D = 1 by default), the noise of the shared rule :func:`~das_lightning.diffusion.rule_noise`:

    L(x) = (1/(K D)) sum_{(t, d)} mean_pixels (eps_theta(x_t, t) - eps_{t,d})^2

so EK-FAC fits the curvature of exactly the loss whose gradients TRAK's features (``normalize: none``) take. The
network is called once per draw on the whole batch (K D calls per batch): kronfluence then sums a module's per-call
gradients into the image's gradient (``has_shared_parameters=True``).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.factor.eigen import load_eigendecomposition, load_lambda_matrices
from kronfluence.task import Task
from kronfluence.utils.constants import (
    ACTIVATION_EIGENVALUES_NAME,
    ACTIVATION_EIGENVECTORS_NAME,
    ALL_MODULE_NAME,
    FACTOR_SAVE_PREFIX,
    GRADIENT_EIGENVALUES_NAME,
    GRADIENT_EIGENVECTORS_NAME,
    LAMBDA_MATRIX_NAME,
    NUM_LAMBDA_PROCESSED,
)
from kronfluence.utils.dataset import DataLoaderKwargs
from kronfluence.utils.state import State
from torch import nn
from torch.utils.data import Dataset

from das_lightning.attribution.grads import draw_noise
from das_lightning.attribution.output_functions import batched_output
from das_lightning.attribution.timesteps import Draw, draw_plan
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
    tracked whole (weight and bias): kronfluence's curvature is per module. A grouped convolution is refused:
    kronfluence's factors average its input over the groups, which is not the gradient our scores use.
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
            if isinstance(module, nn.Conv2d) and module.groups != 1:
                raise ConfigError(
                    f"EK-FAC cannot track the grouped convolution {module_name} (groups={module.groups}): "
                    "kronfluence averages its input over the groups; leave it out with features.param_pattern"
                )
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
    """The diffusion loss over the method's draws for kronfluence (train loss, summed over the batch), and the
    measurement on a query (one of the output functions, averaged over the same draws and noise rule).

    Training images are keyed by ``train_set_name``, queries by ``query_set_name``, and each by the ``index`` its
    dataset gives it (batches are dataset items collated: ``{"image", "index", "label"}``).

    ``sample=True`` (the true Fisher) replaces the target by y = eps_theta.detach() + sqrt(d/2) z with z ~ N(0, I):
    the gradient of mean_pixels (eps_theta - y)^2 is then -sqrt(2/d) J^T z, whose expected outer product is the
    Gauss-Newton matrix J^T (2/d) J of the loss. z is drawn by the noise rule under the set name
    ``<set_name>:fisher`` and the draw's position at its timestep, so the fit does not depend on batch order or
    size (and the two draws of an antithetic pair get two samples).
    """

    # kronfluence 1.0.1's pairwise-score hook, without a per-sample post-process, keeps only ONE of a module's
    # per-draw calls (it overwrites the score and drops the other hooks); with one, it sums them all. The
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
        draws_per_timestep: int = 1,
        antithetic: bool = False,
    ) -> None:
        if len(timesteps) == 0:
            raise ConfigError("EK-FAC needs at least one timestep")
        self.alphas_cumprod = alphas_cumprod.detach()
        self.draws: list[Draw] = draw_plan([int(t) for t in timesteps], int(draws_per_timestep), antithetic)
        self.e_seed = int(e_seed)
        self.train_set_name = train_set_name
        self.query_set_name = query_set_name
        self.measurement = measurement  # a name of attribution/output_functions.py's OUTPUT_FUNCTIONS
        self.tracked_modules = None if tracked_modules is None else list(tracked_modules)
        self.extra_inputs = extra_inputs

    def _predictions(
        self, batch: Mapping[str, torch.Tensor], model: nn.Module, set_name: str
    ) -> Iterator[tuple[Draw, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(draw, timesteps (B,), predicted noise (B, ...), true noise (B, ...)) for each draw, one network call
        each."""
        images = batch["image"]
        indices = [int(i) for i in batch["index"].tolist()]
        device = images.device
        extra = {}
        if self.extra_inputs is not None:
            extra = {key: value.to(device) for key, value in self.extra_inputs(batch).items()}
        alphas_cumprod = self.alphas_cumprod.to(device)
        for draw in self.draws:
            steps = torch.full((images.shape[0],), draw.timestep, dtype=torch.long, device=device)
            # same noise as the features and the LDS ground truth: keyed by the image's identity (and draw)
            noise = draw_noise(
                set_name, indices, [draw] * len(indices), self.e_seed, images.shape[1:], device, images.dtype
            )
            noisy = add_noise(images, noise, steps, alphas_cumprod)
            yield draw, steps, _prediction(model(noisy, steps, **extra)).float(), noise.float()

    def compute_train_loss(
        self, batch: Mapping[str, torch.Tensor], model: nn.Module, sample: bool = False
    ) -> torch.Tensor:
        total = 0.0
        for draw, steps, predicted, noise in self._predictions(batch, model, self.train_set_name):
            target = noise
            if sample:
                pixels = predicted[0].numel()
                sampled = rule_noise(
                    f"{self.train_set_name}:fisher",
                    batch["index"],
                    steps,
                    self.e_seed,
                    predicted.shape[1:],
                    predicted.device,
                    draws=draw.draw,
                )
                target = predicted.detach() + math.sqrt(pixels / 2.0) * sampled
            total = total + (predicted - target).pow(2).flatten(1).mean(dim=1).sum()
        return total / len(self.draws)

    def compute_measurement(self, batch: Mapping[str, torch.Tensor], model: nn.Module) -> torch.Tensor:
        if self.query_set_name is None:
            raise RuntimeError("DiffusionTask.query_set_name must be set before measuring queries")
        total = 0.0
        for _, _, predicted, noise in self._predictions(batch, model, self.query_set_name):
            total = total + batched_output(self.measurement, predicted, noise).sum()
        return total / len(self.draws)

    def get_influence_tracked_modules(self) -> list[str] | None:
        return self.tracked_modules


def factor_arguments(strategy: str, fisher: str) -> FactorArguments:
    """kronfluence's factor settings: ``has_shared_parameters`` because a module runs once per draw."""
    return FactorArguments(
        strategy=strategy,
        use_empirical_fisher=fisher == "empirical",
        has_shared_parameters=True,
    )


@contextmanager
def _one_process_state() -> Iterator[None]:
    """kronfluence's process state, made for this process alone.

    kronfluence runs its own DDP (all-reduces inside the fit) when ``LOCAL_RANK`` is set on a GPU machine, which
    Lightning sets in every rank it launches; the attribute stage fits on one rank while the others wait, so
    kronfluence must see one process. Its state is a process-wide singleton, remade here without LOCAL_RANK."""
    local_rank = os.environ.pop("LOCAL_RANK", None)
    State._reset_state()
    try:
        yield
    finally:
        if local_rank is not None:
            os.environ["LOCAL_RANK"] = local_rank


def make_analyzer(
    network: nn.Module,
    task: DiffusionTask,
    output_dir: Path,
    analysis_name: str,
    cpu: bool,
    progress_bar: bool = False,
) -> Analyzer:
    """An analyzer of a COPY of ``network`` (kronfluence wraps modules in place and freezes parameters), running
    in this process alone (see :func:`_one_process_state`)."""
    import copy

    prepared = prepare_model(copy.deepcopy(network), task)
    with _one_process_state():
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


def load_factors(analysis_folder: Path, strategy: str) -> dict[str, dict[str, torch.Tensor | None]]:
    """The fitted curvature of each tracked module, read from the fit's files (no analyzer needed):

    ``{module: {"activation_eigenvectors", "gradient_eigenvectors", "eigenvalues"}}``, eigenvalues (d_out,
    d_in [+ 1 bias column]) in float64 and already per example as kronfluence damps them (the Lambda matrix over
    the number of examples for ekfac and diagonal, the outer product of the two covariances' eigenvalues for kfac),
    eigenvectors None where the strategy does not rotate (diagonal). ``{}`` for identity."""
    if strategy == "identity":
        return {}
    folder = Path(analysis_folder) / (FACTOR_SAVE_PREFIX + FACTORS_NAME)
    factors: dict[str, dict[str, torch.Tensor | None]] = {}
    if strategy in ("ekfac", "kfac"):
        eigen = load_eigendecomposition(folder)
        for name in eigen[ACTIVATION_EIGENVECTORS_NAME]:
            factors[name] = {
                "activation_eigenvectors": eigen[ACTIVATION_EIGENVECTORS_NAME][name],
                "gradient_eigenvectors": eigen[GRADIENT_EIGENVECTORS_NAME][name],
                # kronfluence's kfac: kron(activation eigenvalues (row), gradient eigenvalues (column))
                "eigenvalues": torch.outer(
                    eigen[GRADIENT_EIGENVALUES_NAME][name].double(),
                    eigen[ACTIVATION_EIGENVALUES_NAME][name].double(),
                ),
            }
    if strategy in ("ekfac", "diagonal"):
        lambdas = load_lambda_matrices(folder)
        for name, matrix in lambdas[LAMBDA_MATRIX_NAME].items():
            entry = factors.setdefault(name, {"activation_eigenvectors": None, "gradient_eigenvectors": None})
            entry["eigenvalues"] = matrix.double() / lambdas[NUM_LAMBDA_PROCESSED][name].double()
    return factors


def pairwise_scores(
    analyzer: Analyzer,
    scores_name: str,
    query_set: Dataset,
    train_set: Dataset,
    damping: float,
    batch_size: int,
) -> torch.Tensor:
    """kronfluence's own (queries, train) scores g_q^T (G + damping I)^-1 g_i: one pass over the training set per
    damping value. The method scores with its one-pass path; this is the reference it is tested against (and what
    benchmarks time it against)."""
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
