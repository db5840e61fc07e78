"""Kernel methods: TRAK, D-TRAK, relative and renormalized influence, and DAS (METHOD.md §2).

Each scores phi_q^T (K + lambda I)^-1 phi_i through one readout of :func:`scores.kernel_scores`, for every lambda
of the grid at once; the factorisation of K is shared by every query set (the context caches the solver)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch

from das_lightning.attribution.context import AttributionInputs, ScoringContext
from das_lightning.attribution.features import FeatureSettings
from das_lightning.attribution.kernel_solver import (
    DASReadout,
    InnerProduct,
    KernelSolver,
    Readout,
    RelativeInfluence,
    kernel_scores,
    magnitude_residuals,
    powered,
    residual_weights,
)
from das_lightning.attribution.methods.base import Method, MethodScores, register
from das_lightning.attribution.rows import RowView, normalized_rows
from das_lightning.attribution.settings import DASSettings, KernelSettings
from das_lightning.clip import dataset_images
from das_lightning.diffusion import query_losses
from das_lightning.errors import ConfigError
from das_lightning.models.adapters import dataset_extra


class KernelMethod(Method):
    """phi_q^T (K + lambda I)^-1 phi_i, finished by :meth:`readout`, on the lambda grid.

    ``method.square`` sets the readout's power: ``square`` (the *_squared variants: trak_squared, dtrak_squared,
    relatif_squared) or ``signed_square``: SNR-LDS measured that squaring raises a kernel method's LDS, so this
    separates what DAS's square contributes from what its features, leverage and residual do."""

    settings_class = KernelSettings
    normalized_rows = False  # renormalized influence: unit rows for the kernel and the queries

    def signed_readout(self, context: ScoringContext) -> Readout:
        """The method's score before ``method.square``."""
        return InnerProduct()

    def readout(self, context: ScoringContext) -> Readout:
        return powered(self.signed_readout(context), self.settings.square)

    def headers(self) -> tuple[str, str, str]:
        """A squared score ranks by the size of a change, not its sign."""
        if self.settings.square == "square":
            return ("query", "largest change", "smallest change")
        return super().headers()

    def on_grid(self, solver: KernelSolver, score) -> MethodScores:
        """The scores of ``score`` (a kernel scorer called with absolute lambdas) at lambda = c x the kernel's unit
        for each c of the method's grid, with that unit and the kernel's relative spectrum."""
        unit = solver.lambda_unit
        scales = [float(c) for c in self.settings.lambda_scales]
        by_lambda = score([c * unit for c in scales])
        return MethodScores({c: by_lambda[c * unit] for c in scales}, unit, tuple(solver.relative_spectrum()))

    def train_psi(self, context: ScoringContext) -> Any:
        return None

    def scores(self, context: ScoringContext, query_set: str) -> MethodScores:
        readout, psi = self.readout(context), self.train_psi(context)
        train = context.train_store().features
        queries = context.query_store(query_set).features
        if self.normalized_rows:
            train, queries = normalized_rows(train), normalized_rows(queries)
        solver = context.solver(self.normalized_rows)
        mask = context.mask(query_set)
        return self.on_grid(
            solver,
            lambda lambdas: kernel_scores(
                queries,
                train,
                lambdas,
                readout,
                solver=solver,
                mask=mask,
                block_size=self.settings.block_size,
                train_psi=psi,
            ),
        )


@register("trak")
class TRAK(KernelMethod):
    """TRAK (features of the loss): phi_q^T (K + lambda I)^-1 phi_i."""


@register("dtrak")
class DTRAK(KernelMethod):
    """D-TRAK: TRAK's score on features of mean(eps_theta^2) (the output function lives in the YAML)."""


@register("relatif")
class RelatIF(KernelMethod):
    """Relative influence: TRAK / sqrt(phi_i^T (K + lambda I)^-1 phi_i)."""

    def signed_readout(self, context: ScoringContext) -> Readout:
        return RelativeInfluence()


@register("renorm")
class RenormalizedInfluence(KernelMethod):
    """Renormalized influence: TRAK on phi / ||phi|| for queries and train (kernel of the unit rows)."""

    normalized_rows = True


# DAS residual variants (METHOD.md §2 and docs/benchmarks.md, LDS at CPU scale)
RESIDUALS = {
    "none": "r_i = 1",
    "normalized": "the authors' r_i: sqrt of the per-timestep loss, unit-normalised over t, averaged over t",
    "magnitude": "r_i = sqrt(mean_t L_t(x_i)) relative to its mean over the training images",
    "exact": "Sherman-Morrison with psi_i, the projected gradient of x_i's own training loss",
}
RESIDUAL_WEIGHTS = {"normalized": residual_weights, "magnitude": magnitude_residuals}


@register("das")
class DAS(KernelMethod):
    """DAS: (phi_q^T (K + lambda I)^-1 phi_i * r_i / (1 - h_ii))^2 with the residual of ``method.residual``."""

    settings_class = DASSettings

    def validate(self) -> None:
        settings = self.settings
        if settings.residual not in RESIDUALS:
            raise ConfigError(
                f"method.residual must be one of {sorted(RESIDUALS)}, not {settings.residual!r}"
            )
        if settings.residual == "exact" and not settings.leverage:
            raise ConfigError(
                "method.residual=exact is the exact leave-one-out: it needs method.leverage=true"
            )
        if settings.residual_timesteps < 1:
            raise ConfigError(
                f"method.residual_timesteps must be at least 1, got {settings.residual_timesteps}"
            )

    def signed_readout(self, context: ScoringContext) -> Readout:
        """The signed change (the exact residual's is the whole Sherman-Morrison change); squared by default."""
        settings = self.settings
        residuals = None
        if settings.residual in RESIDUAL_WEIGHTS:
            losses = context.shared(
                "das-residual-losses",
                lambda: das_residual_losses(
                    context.inputs,
                    settings.residual_timesteps,
                    settings.features.e_seed,
                    context.device.torch_device(),
                ),
            )
            residuals = RESIDUAL_WEIGHTS[settings.residual](losses)
        return DASReadout(residuals, settings.leverage, square=False, exact=settings.residual == "exact")

    def train_psi(self, context: ScoringContext) -> Any:
        if self.settings.residual != "exact":
            return None
        # psi_i is minus the gradient of x_i's own loss
        return RowView(context.train_store(psi_settings(self.settings.features)).features, torch.neg)


def das_residual_losses(
    inputs: AttributionInputs, num_timesteps: int, e_seed: int, device: torch.device | None = None
) -> torch.Tensor:
    """Each training image's per-timestep loss (N x T) under the shared noise rule, on a uniform grid of
    ``num_timesteps`` of the model's training timesteps: what the normalized and magnitude residuals are made of."""
    model = inputs.model
    train_set = model.model_space(inputs.train_set)
    images = dataset_images(train_set)
    indices = list(range(len(train_set)))
    extra = dataset_extra(model.extra_inputs, train_set)
    total = len(model.alphas_cumprod)  # the model's own number of training timesteps
    step = max(1, total // num_timesteps)
    home = next(model.network.parameters()).device
    device = device or home
    model.network.to(device)
    per_timestep = [
        query_losses(
            model.network,
            model.alphas_cumprod,
            images,
            indices,
            train_set.set_name,
            [t],
            [e_seed],
            batch_size=512,
            device=device,
            extra=extra,
        )
        for t in range(0, total, step)
    ]
    model.network.to(home)
    return torch.stack(per_timestep, dim=1)


def psi_settings(features: FeatureSettings) -> FeatureSettings:
    """The features of each train sample's own loss (residual=exact): TRAK's loss gradient with the same
    timesteps, noise rule and projector as ``features``, without per-timestep normalisation (a true gradient)."""
    return FeatureSettings(
        **{
            **asdict(features),
            "name": f"{features.name}-psi",
            "output_function": "loss",
            "normalize_per_timestep": False,
        }
    )
