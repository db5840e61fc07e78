"""Kernel methods: TRAK, D-TRAK, relative and renormalized influence, and DAS (METHOD.md §2).

Each scores phi_q^T (K + lambda I)^-1 phi_i through one readout of :func:`scores.kernel_scores`, for every lambda
of the grid at once; the factorisation of K is shared by every query set (the context caches the solver)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from das_lightning.attribution import scores as scoring
from das_lightning.attribution.context import AttributionInputs, ScoringContext
from das_lightning.attribution.features import FeatureSettings
from das_lightning.attribution.methods.base import Method, register
from das_lightning.clip import dataset_images
from das_lightning.diffusion import query_losses
from das_lightning.errors import ConfigError
from das_lightning.models.adapters import dataset_extra


class KernelMethod(Method):
    """phi_q^T (K + lambda I)^-1 phi_i, finished by :meth:`readout`, on the lambda grid.

    ``method.square=true`` squares the readout (the *_squared variants: trak_squared, dtrak_squared,
    relatif_squared): SNR-LDS measured that squaring raises a kernel method's LDS, so this separates what DAS's
    square contributes from what its features, leverage and residual do."""

    has_lambda = True
    normalized_rows = False  # renormalized influence: unit rows for the kernel and the queries

    def signed_readout(self, context: ScoringContext) -> scoring.Readout:
        """The method's score before ``method.square``."""
        return scoring.InnerProduct()

    def readout(self, context: ScoringContext) -> scoring.Readout:
        signed = self.signed_readout(context)
        return scoring.Squared(signed) if self.settings.square else signed

    def headers(self) -> tuple[str, str, str]:
        """A squared score ranks by the size of a change, not its sign."""
        if self.settings.square:
            return ("query", "largest change", "smallest change")
        return super().headers()

    def train_psi(self, context: ScoringContext) -> Any:
        return None

    def scores(self, context: ScoringContext, query_set: str) -> dict[float | None, np.ndarray]:
        readout, psi = self.readout(context), self.train_psi(context)
        train = context.train_store().features
        queries = context.query_store(query_set).features
        if self.normalized_rows:
            train, queries = scoring.normalized_rows(train), scoring.normalized_rows(queries)
        solver = context.solver(self.normalized_rows)
        mask = context.mask(query_set)
        return context.by_scale(
            solver,
            lambda lambdas: scoring.kernel_scores(
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

    def signed_readout(self, context: ScoringContext) -> scoring.Readout:
        return scoring.RelativeInfluence()


@register("renorm")
class RenormalizedInfluence(KernelMethod):
    """Renormalized influence: TRAK on phi / ||phi|| for queries and train (kernel of the unit rows)."""

    normalized_rows = True


# DAS residual variants (METHOD.md §2 and the README's LDS section)
RESIDUALS = {
    "none": "r_i = 1",
    "normalized": "the authors' r_i: sqrt of the per-timestep loss, unit-normalised over t, averaged over t",
    "magnitude": "r_i = sqrt(mean_t L_t(x_i)) relative to its mean over the training images",
    "exact": "Sherman-Morrison with psi_i, the projected gradient of x_i's own training loss",
}
RESIDUAL_WEIGHTS = {"normalized": scoring.residual_weights, "magnitude": scoring.magnitude_residuals}


@register("das")
class DAS(KernelMethod):
    """DAS: (phi_q^T (K + lambda I)^-1 phi_i * r_i / (1 - h_ii))^2 with the residual of ``method.residual``."""

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

    def readout(self, context: ScoringContext) -> scoring.Readout:
        """DAS squares inside its own readout (the exact residual squares the whole Sherman-Morrison change)."""
        settings = self.settings
        residuals = None
        if settings.residual in RESIDUAL_WEIGHTS:
            if "residual_losses" not in context.cache:
                context.cache["residual_losses"] = das_residual_losses(
                    context.inputs,
                    settings.residual_timesteps,
                    settings.features.e_seed,
                    context.device.torch_device(),
                )
            residuals = RESIDUAL_WEIGHTS[settings.residual](context.cache["residual_losses"])
        return scoring.DASReadout(
            residuals, settings.leverage, settings.square, exact=settings.residual == "exact"
        )

    def train_psi(self, context: ScoringContext) -> Any:
        if self.settings.residual != "exact":
            return None
        # psi_i is minus the gradient of x_i's own loss
        return scoring.RowView(context.train_store(psi_settings(self.settings.features)).features, torch.neg)


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
