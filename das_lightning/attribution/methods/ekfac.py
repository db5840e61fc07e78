"""EK-FAC influence (kronfluence, Grosse et al. 2023) on the diffusion loss: tau(q, i) = g_q^T (G + lambda I)^-1 g_i.

- g_i: the gradient of training image i's diffusion loss, averaged over the method's feature timesteps
  (``features.timestep_list()``) with the shared noise rule (``features.e_seed``): TRAK's loss, unprojected.
- g_q: the gradient of the measurement on the query, averaged over the same timesteps with the query set's own
  noise: ``loss`` (TRAK), ``mean`` of eps_theta (DAS's output) or ``square_norm``, the mean of eps_theta^2 (D-TRAK).
- G: kronfluence's approximation (``ekfac_strategy``: ekfac | kfac | diagonal | identity) of the curvature of the
  training loss over the tracked modules (every Linear and Conv2d, or those matching ``features.param_pattern``),
  block-diagonal across modules; ``ekfac_fisher=sampled`` fits it with targets drawn from the model (the
  Gauss-Newton matrix), ``empirical`` with the true noise (the empirical Fisher).
- lambda = c x unit for each c of ``method.lambda_scales``, unit = the mean eigenvalue of the fitted G (as
  :mod:`das_lightning.lambdas` does for the kernel methods; 1 for ``identity``, which is undamped).

Sign: kronfluence's score is positive when upweighting x_i lowers the query's measurement (a step along
-G^-1 g_i changes it by -g_q^T G^-1 g_i). For ``loss`` that is TRAK's sign (phi_q^T K^-1 phi_i, higher = the kept
sample lowers the query loss, METHOD.md §3), so the scores are taken as kronfluence gives them.
``method.square=true`` squares them (ekfac_das, ekfac_squared).

Factors are fitted once per run folder and settings, under ``<features_dir>/ekfac/<strategy>-<fisher>/`` with a
manifest of what made them (checkpoint, timesteps, e_seed, tracked modules, train set); an interrupted fit resumes
stage by stage, a fit made with other settings is refused with the differing keys named. Each query set's scores
for each c are kept beside them (named by the query set's identity and the measurement) and reused.

One process only: kronfluence runs DDP when launched by torchrun, and the attribute stage launches ranks through
Lightning for feature collection only; a trainer with several devices is refused.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from das_lightning.attribution.context import ScoringContext
from das_lightning.attribution.features import CollectionDevice
from das_lightning.attribution.kernel_solver import signed_square
from das_lightning.attribution.methods.base import Method, MethodScores, register
from das_lightning.attribution.settings import EKFACSettings
from das_lightning.data import dataset_identity
from das_lightning.errors import ConfigError
from das_lightning.manifest import check_or_write_manifest, hash_file

INSTALL = "pip install --no-deps 'kronfluence==1.0.1'"
# method.measurement -> the output function of attribution/output_functions.py differentiated on a query
MEASUREMENTS = {"loss": "loss", "mean": "mean", "square_norm": "square"}
STRATEGIES = ("ekfac", "kfac", "diagonal", "identity")
FISHERS = ("sampled", "empirical")
# method.square: the power of the influence score
READOUT_POWERS = {
    "linear": lambda s: s,
    "square": np.square,
    "signed_square": signed_square,
}


def require_kronfluence() -> None:
    """A clear error naming the install command when kronfluence is missing."""
    try:
        import kronfluence  # noqa: F401
    except ImportError as error:
        raise ConfigError(f"method.kind=ekfac needs kronfluence: {INSTALL}") from error


def refuse_several_processes(device: CollectionDevice) -> None:
    """EK-FAC runs in one process: a trainer with several devices or nodes is refused (see the module doc)."""
    devices = device.devices
    if isinstance(devices, list | tuple):
        count: int | None = len(devices)
    elif str(devices).lstrip("-").isdigit():
        count = int(devices)
    else:  # "auto": every visible GPU on a GPU accelerator, one process on the CPU
        gpus = torch.cuda.device_count() if device.accelerator in ("gpu", "cuda", "auto") else 0
        count = max(1, gpus)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if count == -1 or (count or 1) > 1 or int(device.num_nodes) > 1 or distributed:
        raise ConfigError(
            "method.kind=ekfac runs in one process: kronfluence's DDP needs torch.distributed set up by torchrun, "
            "which the attribute stage does not do (its ranks serve feature collection only); use trainer=gpu "
            "or trainer=cpu (or trainer.devices=1)"
        )


@register("ekfac")
class EKFAC(Method):
    """EK-FAC influence g_q^T (G + lambda I)^-1 g_i on the lambda grid (squared with ``method.square``)."""

    settings_class = EKFACSettings

    def validate(self) -> None:
        settings = self.settings
        if settings.measurement not in MEASUREMENTS:
            raise ConfigError(
                f"method.measurement must be one of {sorted(MEASUREMENTS)}, not {settings.measurement!r}"
            )
        if settings.ekfac_strategy not in STRATEGIES:
            raise ConfigError(
                f"method.ekfac_strategy must be one of {list(STRATEGIES)}, not {settings.ekfac_strategy!r}"
            )
        if settings.ekfac_fisher not in FISHERS:
            raise ConfigError(
                f"method.ekfac_fisher must be one of {list(FISHERS)}, not {settings.ekfac_fisher!r}"
            )
        if int(settings.features.batch_size) < 1:
            raise ConfigError(
                f"method.features.batch_size must be positive, got {settings.features.batch_size}"
            )

    def check_available(self) -> None:
        require_kronfluence()

    @property
    def analysis_name(self) -> str:
        """The factor folder's name: factors of other settings (timesteps, checkpoint, ...) are refused there."""
        return f"{self.settings.ekfac_strategy}-{self.settings.ekfac_fisher}"

    def factors_folder(self, context: ScoringContext) -> Path:
        return Path(context.inputs.features_dir) / "ekfac" / self.analysis_name

    def factor_manifest(self, context: ScoringContext, tracked: list[str]) -> dict[str, Any]:
        """Everything that determines the fitted factors."""
        features = self.settings.features
        model = context.inputs.model
        return {
            "checkpoint": hash_file(model.weights_file),
            "train_set": dataset_identity(context.inputs.train_set),
            "timesteps": features.timestep_list(),
            "e_seed": int(features.e_seed),
            "strategy": self.settings.ekfac_strategy,
            "fisher": self.settings.ekfac_fisher,
            "tracked_modules": tracked,
        }

    def _fitted(self, context: ScoringContext) -> dict[str, Any]:
        """The analyzer with its factors fitted (or reused), and the damping unit; made once per run."""
        return context.shared("ekfac-factors", lambda: self._fit(context))

    def _fit(self, context: ScoringContext) -> dict[str, Any]:
        require_kronfluence()
        refuse_several_processes(context.device)
        from das_lightning.attribution.methods import ekfac_support

        settings, features, model = self.settings, self.settings.features, context.inputs.model
        tracked = ekfac_support.tracked_module_names(model.network, features.param_pattern)
        folder = self.factors_folder(context)
        folder.mkdir(parents=True, exist_ok=True)
        check_or_write_manifest(folder, self.factor_manifest(context, tracked))
        train_set = model.model_space(context.inputs.train_set)
        task = ekfac_support.DiffusionTask(
            model.alphas_cumprod,
            features.timestep_list(),
            features.e_seed,
            train_set.set_name,
            measurement=MEASUREMENTS[settings.measurement],
            tracked_modules=tracked,
            extra_inputs=model.extra_inputs,
        )
        analyzer = ekfac_support.make_analyzer(
            model.network,
            task,
            folder.parent,
            folder.name,
            cpu=context.device.torch_device().type == "cpu",
            progress_bar=context.device.enable_progress_bar,
        )
        ekfac_support.fit_factors(
            analyzer, train_set, settings.ekfac_strategy, settings.ekfac_fisher, features.batch_size
        )
        eigenvalues = ekfac_support.curvature_eigenvalues(analyzer, settings.ekfac_strategy)
        if eigenvalues is None:  # identity: G = I, no damping
            unit, spectrum = 1.0, (1.0, 1.0)
        else:
            unit = float(eigenvalues.mean())
            spectrum = (float(eigenvalues.min()) / unit, float(eigenvalues.max()) / unit)
        return {"analyzer": analyzer, "train_set": train_set, "unit": unit, "spectrum": spectrum}

    def scores(self, context: ScoringContext, query_set: str) -> MethodScores:
        settings = self.settings
        fitted = self._fitted(context)
        analyzer, unit = fitted["analyzer"], fitted["unit"]
        queries = context.inputs.model.model_space(context.inputs.query_sets[query_set])
        analyzer.task.query_set_name = queries.set_name  # the queries' own noise
        from das_lightning.attribution.methods import ekfac_support

        identity = json.dumps(
            {**dataset_identity(queries), "measurement": settings.measurement}, sort_keys=True
        )
        # a folder name safe for any query set key, unique to the queries' identity and the measurement
        safe_name = re.sub(r"[^\w.-]", "_", query_set)
        key = f"{safe_name}-{hashlib.sha256(identity.encode()).hexdigest()[:12]}"
        by_scale: dict[float | None, np.ndarray] = {}
        undamped = None
        for c in (float(value) for value in settings.lambda_scales):
            if settings.ekfac_strategy == "identity":  # G = I: one pass serves every c
                if undamped is None:
                    undamped = ekfac_support.pairwise_scores(
                        analyzer, key, queries, fitted["train_set"], 0.0, settings.features.batch_size
                    )
                scores = undamped
            else:
                scores = ekfac_support.pairwise_scores(
                    analyzer,
                    f"{key}-c{c:g}",
                    queries,
                    fitted["train_set"],
                    c * unit,
                    settings.features.batch_size,
                )
            scores = scores.double().cpu().numpy()  # (queries, train)
            by_scale[c] = READOUT_POWERS[settings.square](scores)
        return MethodScores(by_scale, unit, fitted["spectrum"])

    def headers(self) -> tuple[str, str, str]:
        """A squared score ranks by the size of a change, not its sign."""
        if self.settings.square == "square":
            return ("query", "largest change", "smallest change")
        return super().headers()
