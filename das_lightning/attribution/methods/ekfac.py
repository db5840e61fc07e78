"""EK-FAC influence (kronfluence's curvature, Grosse et al. 2023) on the diffusion loss:
tau(q, i) = g_q^T (G + d I)^-1 g_i.

- g_i: the gradient of training image i's diffusion loss (TRAK's ``loss`` output function, unprojected), and g_q:
  the gradient of the measurement on the query (``loss``, ``mean`` of eps_theta as DAS, or ``square_norm``, the
  mean of eps_theta^2 as D-TRAK). Both are :mod:`~das_lightning.attribution.grads`' per-sample gradients under the
  method's feature settings (``features.*``): the same timesteps, noise rule, and draw settings
  (``draws_per_timestep``, ``sampling``, ``antithetic``, ``normalize``) as a feature store of those settings, so
  EK-FAC sees the gradients the features see.
- G: kronfluence's approximation (``ekfac_strategy``: ekfac | kfac | diagonal | identity) of the curvature of the
  training loss averaged over the same draws, per example, over the tracked modules (every Linear and Conv2d, or
  those matching ``features.param_pattern``), block-diagonal across modules; ``ekfac_fisher=sampled`` fits it with
  targets drawn from the model (the Gauss-Newton matrix), ``empirical`` with the true noise (the empirical Fisher).
  ``normalize`` applies to the gradients only: a normalised gradient is not the gradient of a loss, so the fit
  stays on the loss itself.

The unit of c. The kernel methods score phi_q^T (K + lambda I)^-1 phi_i with K = Phi^T Phi, the SUM over the N
training rows of phi_i phi_i^T, and lambda = c x trace(K) / N (:mod:`das_lightning.lambdas`: trace(K) is the sum of
squared feature norms, N the number of training images; with a projector, of the projected features). G is an
AVERAGE over examples, G ~ K / N for the unprojected gradients (the empirical Fisher's second moment of the very
gradients scored; the sampled Fisher is its expectation under the model's own noise), and

    (G + d I)^-1 = (K / N + d I)^-1 = N (K + N d I)^-1,

so the damping that matches lambda = c x trace(K) / N is d = lambda / N = c x trace(G) / N: the unit is
trace(G) / N, N = len(training set), trace(G) the sum of the fitted curvature's eigenvalues (ekfac and diagonal:
the Lambda matrices over the number of examples; kfac: the products of the two covariances' eigenvalues). At one c
an EK-FAC score is then N x the kernel score of the gradients, when G is their exact second moment
(tests/test_ekfac_one_pass.py checks that on an exactly factorable case). Until issue 18 the unit was the mean
eigenvalue trace(G) / P (P tracked parameters), so an old c was P / N times a new one (about 360 on the benchmark:
P = 0.18M, N = 500); caches made under the old unit are never read (see below). ``identity`` (G = I) is undamped,
as in kronfluence: every c gives g_q . g_i, and the unit is reported as 1.

One pass. G is block-diagonal with per-module eigenbases Q = Q_g (x) Q_a and eigenvalues Lambda, so

    tau_c(q, i) = sum_modules sum_jk (Q_g^T G_q Q_a)_jk (Q_g^T G_i Q_a)_jk / (Lambda_jk + d_c)

(G_x a module's gradient as a d_out x (d_in + 1) matrix, the bias as the last column, a convolution's weight
flattened as kronfluence unfolds it: input channel, then kernel rows and columns). The queries are rotated into the
eigenbasis once; ONE pass over the training set computes each training image's gradient once, rotates it, and
scores every query set against every c (a diagonal weight per c); kronfluence's own scoring would take a pass per
c (``ekfac_support.pairwise_scores``, the reference the tests hold these scores to). When the rotated queries would
exceed ``QUERY_GRADIENT_BYTES`` they are split, one pass per part.

Several processes. The pass runs under the attribute stage's Lightning trainer like feature collection: each rank
scores its own shard of the training images (``ShardedPredictModule``) into a shared score store, and every rank
reads the finished store. The factors are fitted by global rank zero alone (kronfluence in one-process mode) while
the other ranks wait; when the trainer asks for several processes the ranks are started before the fit.

Caches. Factors are fitted once per run folder and settings, under ``<features_dir>/ekfac/<strategy>-<fisher>/``
(``-<hash>`` added for draw settings other than one draw per timestep) with a manifest of what made them
(checkpoint, timesteps, e_seed, tracked modules, train set, draws); an interrupted fit resumes stage by stage, a fit
made with other settings is refused with the differing keys named. Each query set's scores for the whole grid are a
feature store (:class:`~das_lightning.attribution.store.FeatureStore`: row i = training image i, resumable, one
writer per rank) under ``scores/<query set>-<hash>/`` there, the hash and the manifest covering the unit rule
(``UNIT_RULE``), the grid, the query set, the gradients' settings and the fitted eigenvalues: another grid or unit is
another store, never a reused one.

Sign: the score is positive when upweighting x_i lowers the query's measurement (a step along -G^-1 g_i changes it
by -g_q^T G^-1 g_i). For ``loss`` that is TRAK's sign (phi_q^T K^-1 phi_i, higher = the kept sample lowers the
query loss, METHOD.md §3). ``method.square`` squares them (ekfac_das, ekfac_squared) or takes sign(s) s^2.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import warnings
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, Subset
from typing_extensions import override

from das_lightning import __version__
from das_lightning.attribution.collector import ShardedPredictModule
from das_lightning.attribution.context import ScoringContext
from das_lightning.attribution.features import CollectionDevice, make_gradients
from das_lightning.attribution.grads import PerSampleGradients
from das_lightning.attribution.kernel_solver import signed_square
from das_lightning.attribution.methods.base import Method, MethodScores, register
from das_lightning.attribution.settings import EKFACSettings
from das_lightning.attribution.store import FeatureStore, exclusive_writer
from das_lightning.data import ImageDataset, dataset_identity
from das_lightning.distributed import build_trainer, is_global_zero
from das_lightning.errors import ConfigError, NumericalError
from das_lightning.manifest import check_or_write_manifest, hash_file

log = logging.getLogger(__name__)

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
# how c becomes a damping (see the module docstring); in every score store's key and manifest, so scores made under
# another rule (the mean eigenvalue before issue 18) are never reused
UNIT_RULE = "damping = c x trace(G) / N"
# the rotated query gradients one pass holds (Q x P float32); more queries are split into several passes
QUERY_GRADIENT_BYTES = 2 << 30
# the damping grid's diagonals 1 / (Lambda + d) (C x P float32) are kept through the pass up to this size; beyond it
# (48 c x 35.7M parameters is 6.4 GiB) each is recomputed per training batch, one at a time
INVERSE_WEIGHTS_BYTES = 256 << 20
# how long the other ranks wait for rank zero's factor fit (a collective on its own gloo group, so that the
# process group's default timeout, 30 min under Lightning, does not end a long fit)
FIT_WAIT = timedelta(days=2)
# eigenvalues below this fraction of the largest are rounding noise for the reported spectrum (as KernelSolver)
NEGLIGIBLE = 1e-9


def require_kronfluence() -> None:
    """A clear error naming the install command when kronfluence is missing."""
    try:
        import kronfluence  # noqa: F401
    except ImportError as error:
        raise ConfigError(f"method.kind=ekfac needs kronfluence: {INSTALL}") from error


# ---------------------------------------------------------------------------------------------------- curvature


@dataclass
class ModuleCurvature:
    """One tracked module's block of G: (Q_g (x) Q_a) diag(Lambda) (Q_g (x) Q_a)^T on its gradient matrix.

    The gradient matrix is rows x columns = d_out x (d_in + 1 with a bias): the weight's gradient flattened per
    output (a convolution's as input channel, kernel row, kernel column), the bias's as the last column; ``weight``
    and ``bias`` are its parameters' slices in the flat gradient of :class:`PerSampleGradients`."""

    name: str
    weight: slice
    bias: slice | None
    rows: int
    columns: int
    activation_eigenvectors: torch.Tensor | None  # columns x columns (None: no rotation)
    gradient_eigenvectors: torch.Tensor | None  # rows x rows
    eigenvalues: torch.Tensor | None  # rows x columns, per example, float64 (None: identity)

    @property
    def size(self) -> int:
        return self.rows * self.columns

    def to(self, device: torch.device) -> ModuleCurvature:
        def moved(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(device=device, dtype=dtype)

        return replace(
            self,
            activation_eigenvectors=moved(self.activation_eigenvectors, torch.float32),
            gradient_eigenvectors=moved(self.gradient_eigenvectors, torch.float32),
            eigenvalues=moved(self.eigenvalues, torch.float64),
        )


class Curvature:
    """The fitted G of EK-FAC (and kfac, diagonal, identity), block-diagonal over the tracked modules.

    :meth:`to_eigenbasis` maps flat gradients (B, P) to their coordinates in G's eigenbasis, module by module (an
    orthogonal change of basis: inner products are kept); in those coordinates (G + d I)^-1 is the diagonal
    :meth:`inverse_weights`."""

    def __init__(self, strategy: str, modules: list[ModuleCurvature]) -> None:
        self.strategy = strategy
        self.num_parameters = sum(module.size for module in modules)
        # every eigenvalue in the eigenbasis layout, float64, clamped at 0 (kfac's products of eigh's eigenvalues
        # can be -1e-12); None for identity. The modules keep views of it, not copies (P float64 is 0.9 GB at
        # 113.7M parameters)
        self._eigenvalues = (
            None
            if strategy == "identity"
            else torch.cat([module.eigenvalues.flatten() for module in modules]).clamp_min_(0.0)
        )
        if self._eigenvalues is not None:
            views, offset = [], 0
            for module in modules:
                view = self._eigenvalues[offset : offset + module.size].view(module.rows, module.columns)
                views.append(replace(module, eigenvalues=view))
                offset += module.size
            modules = views
        self.modules = modules

    @classmethod
    def from_factors(
        cls,
        strategy: str,
        factors: Mapping[str, Mapping[str, torch.Tensor | None]],
        network: torch.nn.Module,
        module_names: list[str],
        gradients: PerSampleGradients,
    ) -> Curvature:
        """The curvature of ``factors`` (:func:`ekfac_support.load_factors`) laid over ``gradients``' flat layout."""
        modules = []
        for name in module_names:
            module = network.get_submodule(name)
            weight = gradients.parameter_slices[f"{name}.weight"]
            bias = gradients.parameter_slices.get(f"{name}.bias") if module.bias is not None else None
            rows = module.weight.shape[0]
            columns = module.weight[0].numel() + (bias is not None)
            factor = factors.get(name, {})
            if strategy != "identity" and factor.get("eigenvalues") is None:
                raise ConfigError(f"the fitted EK-FAC factors have no module {name}; refit them")
            eigenvalues = None if strategy == "identity" else factor["eigenvalues"].double()
            if eigenvalues is not None and tuple(eigenvalues.shape) != (rows, columns):
                raise ConfigError(
                    f"the fitted factors of {name} are {tuple(eigenvalues.shape)}, its gradient {(rows, columns)}"
                )
            modules.append(
                ModuleCurvature(
                    name,
                    weight,
                    bias,
                    rows,
                    columns,
                    factor.get("activation_eigenvectors"),
                    factor.get("gradient_eigenvectors"),
                    eigenvalues,
                )
            )
        curvature = cls(strategy, modules)
        if curvature.num_parameters != gradients.num_parameters:
            raise ConfigError(
                f"EK-FAC's tracked modules hold {curvature.num_parameters} parameters, the gradients "
                f"{gradients.num_parameters}: every differentiated parameter must belong to a tracked module"
            )
        return curvature

    @property
    def undamped(self) -> bool:
        """identity: G = I, scored undamped (as kronfluence does), so c changes nothing."""
        return self.strategy == "identity"

    def eigenvalues(self) -> torch.Tensor | None:
        """Every eigenvalue of G in the eigenbasis layout (float64, clamped at 0); None for identity."""
        return self._eigenvalues

    def unit_and_spectrum(self, num_train: int) -> tuple[float, tuple[float, float]]:
        """(trace(G) / N, (smallest non-negligible, largest) eigenvalue of G in that unit); (1, (1, 1)) for
        identity."""
        eigenvalues = self.eigenvalues()
        if eigenvalues is None:
            return 1.0, (1.0, 1.0)
        unit = float(eigenvalues.sum()) / num_train
        largest = float(eigenvalues.max())
        if not unit > 0:
            raise NumericalError(
                "the fitted EK-FAC curvature is zero: no damping unit (are the gradients zero?)"
            )
        smallest = float(eigenvalues[eigenvalues > NEGLIGIBLE * largest].min())
        return unit, (smallest / unit, largest / unit)

    def digest(self) -> str:
        """A checksum of the fitted eigenvalues: a score store made from other factors is another store."""
        eigenvalues = self.eigenvalues()
        if eigenvalues is None:
            return "identity"
        return hashlib.blake2b(eigenvalues.numpy().tobytes(), digest_size=8).hexdigest()

    def to(self, device: torch.device) -> Curvature:
        """The curvature on ``device`` (itself when it is there already, eigenvectors in float32)."""
        on_device = self._eigenvalues is None or self._eigenvalues.device == torch.device(device)
        if on_device and all(
            vectors is None or vectors.dtype == torch.float32
            for module in self.modules
            for vectors in (module.gradient_eigenvectors, module.activation_eigenvectors)
        ):
            return self
        return Curvature(self.strategy, [module.to(device) for module in self.modules])

    def to_eigenbasis(self, flat: torch.Tensor) -> torch.Tensor:
        """(B, P) flat gradients -> (B, P) coordinates in G's eigenbasis: per module Q_g^T G_x Q_a, flattened row
        by row (float32, on ``flat``'s device), written module by module into one (B, P) tensor."""
        batch = flat.shape[0]
        rotated = torch.empty(batch, self.num_parameters, dtype=torch.float32, device=flat.device)
        offset = 0
        for module in self.modules:
            matrix = flat[:, module.weight].reshape(batch, module.rows, -1)
            if module.bias is not None:
                matrix = torch.cat([matrix, flat[:, module.bias].reshape(batch, module.rows, 1)], dim=2)
            matrix = matrix.float()
            if module.activation_eigenvectors is not None:
                matrix = module.gradient_eigenvectors.T @ matrix @ module.activation_eigenvectors
            rotated[:, offset : offset + module.size] = matrix.reshape(batch, -1)
            offset += module.size
        return rotated

    def inverse_weights(self, damping: float) -> torch.Tensor:
        """1 / (Lambda + d) in the eigenbasis layout (float32, computed in float64 as kronfluence does)."""
        return (self._eigenvalues + float(damping)).reciprocal().float()


# ------------------------------------------------------------------------------------------------ score stores


@dataclass
class ScoreBlock:
    """The scores of queries ``start:stop`` of one query set against every training image, for every c: a
    feature store of N rows x (C x Q) columns (c-major), written by the pass, read when complete."""

    query_set: str
    queries: ImageDataset  # in model space
    start: int
    stop: int
    store: FeatureStore
    pending: np.ndarray  # bool over the training rows: still to be scored
    rotated: torch.Tensor | None = None  # (Q, P) query gradients in G's eigenbasis, during the pass

    @property
    def num_queries(self) -> int:
        return self.stop - self.start

    def by_scale(self, scales: list[float | None]) -> dict[float | None, np.ndarray]:
        """{c: (queries, train)} of the finished store."""
        rows = np.array(self.store.features)  # read into memory (float32), not a view of the store's file
        cube = rows.reshape(rows.shape[0], len(scales), self.num_queries).transpose(1, 2, 0)
        return {scale: cube[position] for position, scale in enumerate(scales)}


class InfluenceScoreWriter(Callback):
    """The one pass: for each predict batch of training images, their per-sample gradients, rotated into G's
    eigenbasis, scored against every block's rotated queries at every damping, written into the blocks' stores.

    The query gradients are computed when the pass starts, on the rank's device (every rank computes them: they
    are few, and the same on every rank)."""

    def __init__(
        self,
        blocks: list[ScoreBlock],
        curvature: Curvature,
        dampings: list[float | None],
        train_gradients: PerSampleGradients,
        query_gradients: PerSampleGradients,
        train_set_name: str,
        extra_inputs: Callable | None,
        batch_size: int,
    ) -> None:
        self.blocks = blocks
        self.curvature = curvature
        self.dampings = dampings
        self.train_gradients = train_gradients
        self.query_gradients = query_gradients
        self.train_set_name = train_set_name
        self.extra_inputs = extra_inputs
        self.batch_size = batch_size
        self.images = 0
        self.seconds = 0.0
        self._on_device: Curvature | None = None
        self._weights: list[torch.Tensor | None] | None = None  # the grid's diagonals, when kept (see above)

    def _extra(self, batch: Mapping[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
        if self.extra_inputs is None:
            return {}
        return {key: value.to(device) for key, value in self.extra_inputs(batch).items()}

    def _rotated_queries(self, block: ScoreBlock, device: torch.device) -> torch.Tensor:
        loader = DataLoader(
            Subset(block.queries, range(block.start, block.stop)), batch_size=self.batch_size, shuffle=False
        )
        parts = []
        for batch in loader:
            with torch.inference_mode(False), torch.enable_grad():
                flat = self.query_gradients.flat_gradients(
                    batch["image"].to(device),
                    batch["index"],
                    block.queries.set_name,
                    self._extra(batch, device),
                )
            with torch.no_grad():
                parts.append(self._on_device.to_eigenbasis(flat))
        return torch.cat(parts)

    @override
    def on_predict_start(self, trainer, pl_module) -> None:
        self._on_device = self.curvature.to(pl_module.device)
        if len(self.dampings) * self.curvature.num_parameters * 4 <= INVERSE_WEIGHTS_BYTES:
            self._weights = [self._inverse_weights(damping) for damping in self.dampings]
        for block in self.blocks:
            block.rotated = self._rotated_queries(block, pl_module.device)

    @override
    def on_predict_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx: int = 0
    ) -> None:
        started = time.perf_counter()
        indices = batch["index"].cpu().numpy().astype(np.int64)
        device = pl_module.device
        with torch.inference_mode(False), torch.enable_grad():
            flat = self.train_gradients.flat_gradients(
                batch["image"].to(device), indices, self.train_set_name, self._extra(batch, device)
            )
        with torch.no_grad():
            rotated = self._on_device.to_eigenbasis(flat)
            del flat
            blocks = [(block, block.pending[indices]) for block in self.blocks]
            blocks = [(block, keep) for block, keep in blocks if keep.any()]
            scores = [
                torch.empty(int(keep.sum()), len(self.dampings), block.num_queries, device=device)
                for block, keep in blocks
            ]  # (rows, C, Q) per block
            # the diagonal of each damping weighs the (fewer) training rows, one c at a time
            for position, damping in enumerate(self.dampings):
                weight = (
                    self._weights[position] if self._weights is not None else self._inverse_weights(damping)
                )
                weighted = rotated if weight is None else rotated * weight
                for (block, keep), block_scores in zip(blocks, scores, strict=True):
                    # the rows this block still lacks (all of them but on a resumed pass: no copy then)
                    rows = weighted if keep.all() else weighted[torch.as_tensor(keep, device=device)]
                    block_scores[:, position] = rows @ block.rotated.T
                    del rows
                del weighted
            for (block, keep), block_scores in zip(blocks, scores, strict=True):
                block.store.write(indices[keep], block_scores.reshape(len(block_scores), -1).cpu().numpy())
        self.seconds += time.perf_counter() - started
        self.images += len(indices)

    def _inverse_weights(self, damping: float | None) -> torch.Tensor | None:
        return None if damping is None else self._on_device.inverse_weights(damping)

    @override
    def on_predict_end(self, trainer, pl_module) -> None:
        for block in self.blocks:
            block.rotated = None
        self._on_device = None
        self._weights = None


# ------------------------------------------------------------------------------------------------ several ranks

_wait_group: Any = None


def start_ranks(device: CollectionDevice) -> None:
    """Start the DDP world now when the trainer asks for several processes and none runs yet (Lightning launches
    the other ranks at a trainer's first run; they re-run the command up to here), so that rank zero's factor fit
    and the other ranks' wait (:func:`wait_group`) happen among started ranks."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    trainer = build_trainer(device, logger=False, inference_mode=False, use_distributed_sampler=False)
    if trainer.world_size < 2:
        return
    nothing = ShardedPredictModule(torch.nn.Identity(), [], np.zeros(0, dtype=np.int64), 1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*DataLoader.* is zero")
        trainer.predict(nothing, return_predictions=False)


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def wait_group() -> Any:
    """A gloo group of every rank with a long timeout (:data:`FIT_WAIT`), made by every rank at the same point
    (before rank zero starts fitting: making a group is itself collective); None in one process."""
    global _wait_group
    if _world_size() < 2:
        return None
    if _wait_group is None:
        _wait_group = torch.distributed.new_group(backend="gloo", timeout=FIT_WAIT)
    return _wait_group


# ----------------------------------------------------------------------------------------------------- the method


@dataclass
class Fitted:
    """What the fit gives every query set of a run: the curvature, its damping unit and spectrum."""

    curvature: Curvature
    unit: float
    spectrum: tuple[float, float]
    train_set: ImageDataset  # in model space
    factor_manifest: dict[str, Any]


@register("ekfac")
class EKFAC(Method):
    """EK-FAC influence g_q^T (G + d I)^-1 g_i on the lambda grid, d = c x trace(G) / N (squared with
    ``method.square``)."""

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

    def fit_draws(self) -> dict[str, Any]:
        """The draw settings the fitted loss depends on (all but ``normalize``, which acts on gradients only)."""
        return {k: v for k, v in self.settings.features.draw_settings().items() if k != "normalize"}

    @property
    def analysis_name(self) -> str:
        """The factor folder's name: factors of other settings (timesteps, checkpoint, ...) are refused there;
        other draws get their own folder."""
        name = f"{self.settings.ekfac_strategy}-{self.settings.ekfac_fisher}"
        draws = self.fit_draws()
        if draws:
            name += "-" + hashlib.sha256(json.dumps(draws, sort_keys=True).encode()).hexdigest()[:10]
        return name

    def factors_folder(self, context: ScoringContext) -> Path:
        return Path(context.inputs.features_dir) / "ekfac" / self.analysis_name

    def factor_manifest(self, context: ScoringContext, tracked: list[str]) -> dict[str, Any]:
        """Everything that determines the fitted factors (the draws only when not one per timestep, so factors
        fitted before draws existed stay valid)."""
        features = self.settings.features
        model = context.inputs.model
        manifest = {
            "checkpoint": hash_file(model.weights_file),
            "train_set": dataset_identity(context.inputs.train_set),
            "timesteps": features.timestep_list(),
            "e_seed": int(features.e_seed),
            "strategy": self.settings.ekfac_strategy,
            "fisher": self.settings.ekfac_fisher,
            "tracked_modules": tracked,
        }
        draws = self.fit_draws()
        if draws:
            manifest["draws"] = draws
        return manifest

    def gradients(
        self, context: ScoringContext, output_function: str, tracked: list[str]
    ) -> PerSampleGradients:
        """Per-sample gradients of ``output_function`` over the tracked modules' parameters, under the method's
        feature settings (timesteps, noise rule, draws, normalisation, vmap budget): what a feature store of these
        settings would hold before projection."""
        from das_lightning.attribution.methods import ekfac_support

        model = context.inputs.model
        names = ekfac_support.tracked_parameter_names(model.network, tracked)
        exact = "^(?:" + "|".join(re.escape(name) for name in names) + ")$"
        settings = replace(self.settings.features, output_function=output_function, param_pattern=exact)
        return make_gradients(model.network, model.alphas_cumprod, settings)

    def fitted(self, context: ScoringContext) -> Fitted:
        """The fitted curvature and its damping unit; made once per run (and model)."""
        return context.shared("ekfac-factors", lambda: self._fit(context))

    def _fit(self, context: ScoringContext) -> Fitted:
        require_kronfluence()
        from das_lightning.attribution.methods import ekfac_support

        start_ranks(context.device)
        group = wait_group()
        settings, features, model = self.settings, self.settings.features, context.inputs.model
        tracked = ekfac_support.tracked_module_names(model.network, features.param_pattern)
        folder = self.factors_folder(context)
        manifest = self.factor_manifest(context, tracked)
        train_set = model.model_space(context.inputs.train_set)
        if is_global_zero():  # one rank fits; kronfluence resumes an interrupted fit stage by stage
            folder.mkdir(parents=True, exist_ok=True)
            check_or_write_manifest(folder, manifest)
            task = ekfac_support.DiffusionTask(
                model.alphas_cumprod,
                features.timestep_list(),
                features.e_seed,
                train_set.set_name,
                measurement=MEASUREMENTS[settings.measurement],
                tracked_modules=tracked,
                extra_inputs=model.extra_inputs,
                draws_per_timestep=features.draws_per_timestep,
                antithetic=features.antithetic,
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
            del analyzer
        if group is not None:
            torch.distributed.barrier(group=group)
            check_or_write_manifest(folder, manifest)  # the other ranks: the same settings as rank zero's
        factors = ekfac_support.load_factors(folder, settings.ekfac_strategy)
        curvature = Curvature.from_factors(
            settings.ekfac_strategy,
            factors,
            model.network,
            tracked,
            self.gradients(context, "loss", tracked),
        )
        unit, spectrum = curvature.unit_and_spectrum(len(train_set))
        return Fitted(curvature, unit, spectrum, train_set, manifest)

    def scale_rows(self, fitted: Fitted) -> tuple[list[float | None], list[float | None]]:
        """(the c of each row of a score store, the damping of each): the grid, or one undamped row (identity)."""
        if fitted.curvature.undamped:
            return [None], [None]
        scales = sorted(float(c) for c in self.settings.lambda_scales)
        return scales, [c * fitted.unit for c in scales]

    def store_manifest(
        self,
        fitted: Fitted,
        queries: ImageDataset,
        start: int,
        stop: int,
        train_gradients: PerSampleGradients,
        query_gradients: PerSampleGradients,
    ) -> dict[str, Any]:
        """Everything that determines a score store's rows (its folder's hash is of this, too)."""
        scales, dampings = self.scale_rows(fitted)
        return {
            "kind": "ekfac-scores",
            "unit_rule": UNIT_RULE,
            "lambda_scales": scales,
            "lambda_unit": fitted.unit,
            "dampings": dampings,
            "factors": {**fitted.factor_manifest, "eigenvalues_blake2b": fitted.curvature.digest()},
            "queries": {**dataset_identity(queries), "rows": [start, stop]},
            "measurement": self.settings.measurement,
            "train_gradients": train_gradients.describe(),
            "query_gradients": query_gradients.describe(),
            "package_version": __version__,
        }

    def scores(self, context: ScoringContext, query_set: str) -> MethodScores:
        fitted = self.fitted(context)
        every_set = context.shared("ekfac-scores", lambda: self._score_every_set(context, fitted))
        power = READOUT_POWERS[self.settings.square]
        scales = sorted(float(c) for c in self.settings.lambda_scales)
        by_scale = every_set[query_set]
        if fitted.curvature.undamped:  # identity: the one undamped row serves every c
            by_scale = {c: by_scale[None] for c in scales}
        return MethodScores({c: power(by_scale[c]) for c in scales}, fitted.unit, fitted.spectrum)

    def _score_every_set(
        self, context: ScoringContext, fitted: Fitted
    ) -> dict[str, dict[float | None, np.ndarray]]:
        """{query set: {c: (queries, train)}} of every query set of the run, every c: one pass over the training
        set (more only when the queries exceed ``QUERY_GRADIENT_BYTES``), none when the stores are complete."""
        settings, model = self.settings, context.inputs.model
        tracked = fitted.factor_manifest["tracked_modules"]
        train_gradients = self.gradients(context, "loss", tracked)
        query_gradients = self.gradients(context, MEASUREMENTS[settings.measurement], tracked)
        scales, dampings = self.scale_rows(fitted)
        per_pass = queries_per_pass(fitted.curvature.num_parameters)
        num_train = len(fitted.train_set)
        root = self.factors_folder(context) / "scores"
        blocks: dict[str, list[ScoreBlock]] = {}
        with ExitStack() as writers:
            for name, dataset in context.inputs.query_sets.items():
                queries = model.model_space(dataset)
                blocks[name] = []
                for start, stop in query_parts(len(queries), per_pass):
                    manifest = self.store_manifest(
                        fitted, queries, start, stop, train_gradients, query_gradients
                    )
                    key = hashlib.sha256(
                        json.dumps(manifest, sort_keys=True, default=str).encode()
                    ).hexdigest()
                    part = "" if (start, stop) == (0, len(queries)) else f"-q{start}-{stop}"
                    safe_name = re.sub(r"[^\w.-]", "_", name)  # any query set key as a folder name
                    folder = root / f"{safe_name}{part}-{key[:12]}"
                    writers.enter_context(exclusive_writer(folder))
                    store = FeatureStore.open(folder, num_train, len(scales) * (stop - start), manifest)
                    pending = ~store.done_mask()
                    blocks[name].append(ScoreBlock(name, queries, start, stop, store, pending))
            unfinished = [block for parts in blocks.values() for block in parts if block.pending.any()]
            sizes = [block.num_queries for block in unfinished]
            for group in group_passes(sizes, per_pass):
                self._one_pass(
                    context,
                    fitted,
                    [unfinished[position] for position in group],
                    dampings,
                    train_gradients,
                    query_gradients,
                )
        results = {}
        for name, parts in blocks.items():
            pieces = [block.by_scale(scales) for block in parts]
            results[name] = {
                scale: np.concatenate([piece[scale] for piece in pieces], axis=0) for scale in scales
            }
        return results

    def _one_pass(
        self,
        context: ScoringContext,
        fitted: Fitted,
        blocks: list[ScoreBlock],
        dampings: list[float | None],
        train_gradients: PerSampleGradients,
        query_gradients: PerSampleGradients,
    ) -> None:
        """One pass over the training images some block still lacks, sharded over the ranks like feature
        collection; every block complete afterwards."""
        features, model = self.settings.features, context.inputs.model
        pending = np.flatnonzero(np.any([block.pending for block in blocks], axis=0)).astype(np.int64)
        log.info(
            "EK-FAC: scoring %d training images against %d queries at %d dampings in one pass",
            pending.size,
            sum(block.num_queries for block in blocks),
            len(dampings),
        )
        writer = InfluenceScoreWriter(
            blocks,
            fitted.curvature,
            dampings,
            train_gradients,
            query_gradients,
            fitted.train_set.set_name,
            model.extra_inputs,
            features.batch_size,
        )
        module = ShardedPredictModule(
            model.network, fitted.train_set, pending, features.batch_size, features.num_workers
        )
        trainer = build_trainer(
            context.device,
            inference_mode=False,  # gradients are the point
            use_distributed_sampler=False,  # the module shards the pending rows itself, without padding
            logger=context.logger if context.logger is not None else False,
            callbacks=[writer],
        )
        trainer.predict(module, return_predictions=False)
        if trainer.world_size > 1:
            trainer.strategy.barrier()
        for block in blocks:
            block.store.require_complete()
        if writer.seconds:
            log.info(
                "EK-FAC pass: %.3g training images/s on rank %d",
                writer.images / writer.seconds,
                trainer.global_rank,
            )

    def headers(self) -> tuple[str, str, str]:
        """A squared score ranks by the size of a change, not its sign."""
        if self.settings.square == "square":
            return ("query", "largest change", "smallest change")
        return super().headers()


def queries_per_pass(num_parameters: int) -> int:
    """How many rotated query gradients one pass holds (``QUERY_GRADIENT_BYTES`` of float32)."""
    return max(1, QUERY_GRADIENT_BYTES // (4 * num_parameters))


def query_parts(num_queries: int, per_pass: int) -> list[tuple[int, int]]:
    """A query set's parts (start, stop), each at most ``per_pass`` queries: one score store each."""
    return [(start, min(start + per_pass, num_queries)) for start in range(0, num_queries, per_pass)]


def group_passes(sizes: list[int], per_pass: int) -> list[list[int]]:
    """Parts (given by their sizes, none over ``per_pass``) grouped in order into passes of at most ``per_pass``
    queries: the positions of each pass's parts."""
    passes: list[list[int]] = []
    held = per_pass
    for position, size in enumerate(sizes):
        if held + size > per_pass:
            passes.append([])
            held = 0
        passes[-1].append(position)
        held += size
    return passes


def scoring_passes(query_sizes: list[int], num_parameters: int) -> int:
    """Passes over the training set that score these query sets at every c (for plans): one unless the rotated
    queries exceed ``QUERY_GRADIENT_BYTES``."""
    per_pass = queries_per_pass(num_parameters)
    parts = [stop - start for size in query_sizes for start, stop in query_parts(size, per_pass)]
    return len(group_passes(parts, per_pass))
