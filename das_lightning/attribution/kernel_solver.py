"""The kernel methods' scores from projected gradient features: the kernel solve and the readouts (TRAK/D-TRAK,
relative influence, DAS and their squares), and DAS's residual weights. Similarities, TracIn, screening and top-k
are in :mod:`.ranking`; row access to features in :mod:`.rows`.

Shape contract (METHOD.md §2):

- ``train_features`` Phi: N x k. ``query_features`` Q: M x k. Either may be anything with ``len()`` whose row
  slices ``features[a:b]`` give a numpy array or a tensor, usually a read-only ``np.memmap`` of fp16/fp32. Train
  features are only ever read in row blocks of ``block_size`` (N x k in float64 would not fit: 50000 x 32768 is
  13 GB); query features are read whole (M x k in float64).
- Every scorer returns a float32 numpy array of shape (M, N): queries x train. Results do not depend on
  ``block_size`` nor on the order in which train rows were accumulated into the kernel (up to float64 rounding).
- An optional boolean ``mask`` (M x N, see :func:`screen_candidates`) keeps only each query's candidates; every
  other entry is exactly 0.

The kernel is K = Phi^T Phi (k x k), accumulated in float64 block by block, and factorised once as
K = V diag(s) V^T. Then (K + lambda I)^-1 = V diag(1 / (s + lambda)) V^T for every lambda of a grid without
refactorising, and for a query q and train sample i

    phi_q^T (K + lambda I)^-1 phi_i = (V^T phi_q)^T diag(1 / (s + lambda)) (V^T phi_i)
    h_ii = phi_i^T (K + lambda I)^-1 phi_i = sum_j (V^T phi_i)_j^2 / (s_j + lambda)

so a single pass over Phi serves all queries and all lambdas, with memory k^2 plus one block.

``normalize_inverse`` reproduces the authors' habit of dividing (K + lambda I)^-1 by the mean absolute value of
its entries. That multiplies every score of one (method, lambda) by the same positive constant, so it changes no
ranking and no Spearman-based LDS; it only changes magnitudes, and thus how scores of different lambdas compare.
Leverages h_ii always use the true inverse, so that 0 <= h_ii < 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from das_lightning.attribution.rows import (
    DEFAULT_BLOCK_SIZE,
    RowSliceable,
    as_float64,
    check_mask,
    iter_row_blocks,
    mask_block,
    read_all,
)


class KernelSolver:
    """The factorised kernel K = Phi^T Phi = V diag(s) V^T of a set of train features.

    Build it once per feature set (:meth:`from_features`) and pass it to every kernel scorer and every lambda: the
    eigendecomposition is the only cubic step. With more feature dimensions than training samples (k > N, e.g. the
    paper's k = 32768 for N = 5000) it is made from the N x N Gram matrix Phi Phi^T instead of the k x k kernel, and
    V keeps only the r <= N directions the rows span: every train row lies in that span, so scores and leverages
    are exact, and :meth:`solve` adds the 1/lambda term of the directions outside it.
    """

    def __init__(self, eigenvalues: torch.Tensor, eigenvectors: torch.Tensor, num_samples: int):
        # K is positive semi-definite; eigh can return -1e-13 for zero modes, which would make h_ii < 0
        self.eigenvalues = eigenvalues.to(torch.float64).clamp_min(0.0)
        self.eigenvectors = eigenvectors.to(torch.float64)  # k x r, orthonormal columns
        self.num_samples = num_samples
        self._inverse_mean_abs: dict[float, float] = {}

    @staticmethod
    def accumulate_kernel(train_features: RowSliceable, block_size: int = DEFAULT_BLOCK_SIZE) -> torch.Tensor:
        """K = Phi^T Phi in float64, summed over row blocks (memory k^2 plus one block)."""
        kernel: torch.Tensor | None = None
        for _, _, block in iter_row_blocks(train_features, block_size):
            product = block.T @ block
            kernel = product if kernel is None else kernel.add_(product)
        if kernel is None:
            raise ValueError("train_features has no rows")
        return kernel

    @staticmethod
    def uses_gram(num_samples: int, dim: int) -> bool:
        """Whether :meth:`from_features` factorises through the N x N Gram matrix (N < k) rather than the k x k kernel
        (the plan of das_lightning/plan.py asks the same)."""
        return num_samples < dim

    @classmethod
    def from_features(
        cls, train_features: RowSliceable, block_size: int = DEFAULT_BLOCK_SIZE
    ) -> KernelSolver:
        """Factorise K of the train features: through the k x k kernel, or the N x N Gram matrix when N < k."""
        num_samples = len(train_features)
        if num_samples == 0:
            raise ValueError("train_features has no rows")
        if cls.uses_gram(num_samples, int(np.shape(train_features[0:1])[1])):
            return cls.from_gram(train_features)
        kernel = cls.accumulate_kernel(train_features, block_size)
        # symmetrise: summation order leaves K asymmetric in the last bits, and eigh reads one triangle only
        kernel = 0.5 * (kernel + kernel.T)
        eigenvalues, eigenvectors = torch.linalg.eigh(kernel)
        return cls(eigenvalues, eigenvectors, num_samples=num_samples)

    @classmethod
    def from_gram(cls, train_features: RowSliceable) -> KernelSolver:
        """Factorise K through G = Phi Phi^T = U diag(s) U^T: K's nonzero eigenvalues are s, its eigenvectors
        V = Phi^T U diag(s)^-1/2. Memory N x k for Phi (less than the k x k kernel when N < k) plus N x N."""
        features = read_all(train_features)
        gram = features @ features.T
        eigenvalues, eigenvectors = torch.linalg.eigh(0.5 * (gram + gram.T))
        # directions with s at rounding level carry no train row; dividing by their sqrt would amplify noise
        keep = (
            eigenvalues
            > eigenvalues.max().clamp_min(0.0) * eigenvalues.shape[0] * torch.finfo(torch.float64).eps
        )
        eigenvalues, eigenvectors = eigenvalues[keep], eigenvectors[:, keep]
        directions = (features.T @ eigenvectors) / eigenvalues.sqrt()
        return cls(eigenvalues, directions, num_samples=len(features))

    @property
    def dim(self) -> int:
        """The feature dimension k."""
        return int(self.eigenvectors.shape[0])

    @property
    def lambda_unit(self) -> float:
        """trace(K) / N, the mean squared train-feature norm: lambda = c * unit (see :mod:`das_lightning.lambdas`)."""
        return float(self.eigenvalues.sum()) / self.num_samples

    def relative_spectrum(self, negligible: float = 1e-9) -> tuple[float, float]:
        """(smallest non-negligible, largest) eigenvalue of K in units of :attr:`lambda_unit`; eigenvalues below
        ``negligible`` x the largest are rounding noise of a rank-deficient K."""
        largest = float(self.eigenvalues.max())
        kept = self.eigenvalues[self.eigenvalues > negligible * largest]
        unit = self.lambda_unit
        return float(kept.min()) / unit, largest / unit

    @property
    def rank(self) -> int:
        """How many directions V keeps (k for the kernel form, at most N for the Gram form)."""
        return int(self.eigenvectors.shape[1])

    def inverse_spectrum(self, lam: float) -> torch.Tensor:
        """1 / (s + lambda): the eigenvalues of (K + lambda I)^-1 on the kept directions."""
        if lam < 0:
            raise ValueError(f"lambda must be non-negative, got {lam}")
        if lam == 0 and self.rank < self.dim:
            raise ValueError(
                "lambda = 0 needs K invertible; with fewer train samples than dimensions it is not"
            )
        return 1.0 / (self.eigenvalues + lam)

    def to_eigenbasis(self, rows: Any) -> torch.Tensor:
        """Rows expressed in the eigenbasis of K: rows @ V (float64)."""
        return as_float64(rows) @ self.eigenvectors

    def solve(self, rows: Any, lam: float) -> torch.Tensor:
        """X (K + lambda I)^-1 for the rows X (M x k), i.e. the transpose of (K + lambda I)^-1 X^T (float64).

        Applying V diag(1 / (s + lambda)) V^T (+ (I - V V^T) / lambda outside the kept directions) is the solve
        with the factorisation; no inverse is formed.
        """
        rows = as_float64(rows)
        eigen = rows @ self.eigenvectors
        solved = (eigen * self.inverse_spectrum(lam)) @ self.eigenvectors.T
        if self.rank < self.dim:
            solved += (rows - eigen @ self.eigenvectors.T) / lam
        return solved

    def leverages(
        self, features: RowSliceable, lam: float, block_size: int = DEFAULT_BLOCK_SIZE
    ) -> np.ndarray:
        """h_ii = phi_i^T (K + lambda I)^-1 phi_i for every row of ``features``, block by block (float64, N).

        Exact for the train rows (they lie in the kept directions); other rows need :meth:`solve`."""
        inverse_spectrum = self.inverse_spectrum(lam)
        result = np.empty(len(features), dtype=np.float64)
        for start, stop, block in iter_row_blocks(features, block_size):
            result[start:stop] = (self.to_eigenbasis(block).square() @ inverse_spectrum).numpy()
        return result

    def inverse_mean_abs(self, lam: float, block_size: int = DEFAULT_BLOCK_SIZE) -> float:
        """Mean absolute entry of (K + lambda I)^-1, built in row blocks (O(k^2 r) per lambda, cached)."""
        if lam not in self._inverse_mean_abs:
            inverse_spectrum = self.inverse_spectrum(lam)
            outside = 1.0 / lam if self.rank < self.dim else 0.0  # (I - V V^T) / lambda
            total = 0.0
            for start in range(0, self.dim, block_size):
                stop = min(start + block_size, self.dim)
                rows = self.eigenvectors[start:stop] * (inverse_spectrum - outside)
                block = rows @ self.eigenvectors.T
                block[:, start:stop].diagonal().add_(outside)
                total += float(block.abs().sum())
            self._inverse_mean_abs[lam] = total / self.dim**2
        return self._inverse_mean_abs[lam]


@dataclass
class BlockTerms:
    """What a kernel readout needs for one block of train samples and one lambda."""

    similarity: torch.Tensor  # M x b: phi_q^T (K + lambda I)^-1 phi_i, true (unscaled) inverse
    leverage: torch.Tensor | None  # b: h_ii with the true inverse (None when the readout does not use it)
    inverse_scale: float  # 1 / mean|(K + lambda I)^-1| under normalize_inverse, else 1
    start: int
    stop: int
    # residual=exact only: phi_q^T (K + lambda I)^-1 psi_i (M x b) and phi_i^T (K + lambda I)^-1 psi_i (b)
    query_psi: torch.Tensor | None = None
    self_psi: torch.Tensor | None = None


class Readout:
    """Turns the kernel terms of one block into one method's scores (queries x block)."""

    needs_leverage = False
    uses_psi = False  # whether it reads train_psi (the exact DAS residual)

    def __call__(self, terms: BlockTerms) -> torch.Tensor:
        raise NotImplementedError

    def check(self, num_train: int) -> None:
        """Refuse options that cannot go with this readout (called once before the pass)."""


class InnerProduct(Readout):
    """TRAK and D-TRAK: phi_q^T (K + lambda I)^-1 phi_i (the two differ only in the features' output function)."""

    def __call__(self, terms: BlockTerms) -> torch.Tensor:
        return terms.similarity * terms.inverse_scale


class RelativeInfluence(Readout):
    """Relative influence: TRAK / sqrt(phi_i^T (K + lambda I)^-1 phi_i) (0 for a zero train feature)."""

    needs_leverage = True

    def __call__(self, terms: BlockTerms) -> torch.Tensor:
        # the denominator phi_i^T K_l^-1 phi_i is the leverage, under the same (possibly rescaled) inverse
        if terms.leverage is None:
            raise RuntimeError("relative influence needs the leverages; kernel_scores computes them")
        self_influence = (terms.leverage * terms.inverse_scale).sqrt()
        safe = torch.where(self_influence > 0, self_influence, torch.ones_like(self_influence))
        return torch.where(self_influence > 0, terms.similarity * terms.inverse_scale / safe, 0.0)


class MappedReadout(Readout):
    """Another readout's score through an elementwise map (its power: :class:`Squared`, ``SignedSquare``); what the
    inner readout needs (leverages, psi) passes through."""

    def __init__(self, inner: Readout) -> None:
        self.inner = inner
        self.needs_leverage = inner.needs_leverage
        self.uses_psi = inner.uses_psi

    def check(self, num_train: int) -> None:
        self.inner.check(num_train)

    def __call__(self, terms: BlockTerms) -> torch.Tensor:
        return self.transform(self.inner(terms))

    def transform(self, scores: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Squared(MappedReadout):
    """Another readout's score, squared: ranks by the size of the change, not its sign (``method.square=true``)."""

    def transform(self, scores: torch.Tensor) -> torch.Tensor:
        return scores.square()


Scores = TypeVar("Scores", torch.Tensor, np.ndarray)


def signed_square(scores: Scores) -> Scores:
    """s |s| elementwise (sign(s) s^2, written without sign() so that -0.0 and 0 stay 0): the signed-square readout
    (METHOD.md §7; SNR-LDS's best for EK-FAC and FMAS). Like the square it stretches the large scores away from the
    noise-dominated small ones; unlike it, it keeps whether keeping the image raises or lowers the measurement. A
    monotone map of s: it never reorders one query's scores, only how a sum over a subset (the LDS prediction)
    weighs them."""
    if isinstance(scores, torch.Tensor):
        return scores * scores.abs()
    return np.multiply(scores, np.abs(scores))


class SignedSquare(MappedReadout):
    """Another readout's score s as s |s|: ranks by size within each sign, keeps the sign
    (``method.square=signed_square`` on a kernel method; for DAS it wraps the unsquared ``DASReadout``)."""

    def transform(self, scores: torch.Tensor) -> torch.Tensor:
        return signed_square(scores)


def powered(signed: Readout, power: str) -> Readout:
    """``signed`` raised to ``method.square``'s power: linear (itself), square, or signed_square (sign(s) s^2)."""
    if power == "linear":
        return signed
    if power == "square":
        return Squared(signed)
    if power == "signed_square":
        return SignedSquare(signed)
    raise ValueError(f"unknown readout power {power!r}")


class DASReadout(Readout):
    """DAS: (phi_q^T (K + lambda I)^-1 phi_i * r_i / (1 - h_ii))^2, or with ``exact`` the Sherman-Morrison form.

    The one-step form is the squared change of the output on q when sample i is left out of a ridge least-squares
    fit of a model linear in its parameters, *if* the gradient of sample i's own loss is r_i phi_i with r_i its
    signed residual (METHOD.md §2); with any other r_i (the authors' normalised r_i, or none) it is an
    approximation. ``exact`` (kernel_scores given ``train_psi``, N x k, psi_i = minus the gradient of sample i's own
    loss in feature space) drops that assumption: phi_q^T H^-1 psi_i + (phi_q^T H^-1 phi_i)(phi_i^T H^-1 psi_i) /
    (1 - h_ii) is the exact leave-one-out change for the linearised model, and equals the one-step form when
    psi_i = r_i phi_i. ``square=False`` keeps the sign (positive: including i raises f(q)); ``leverage=False``
    drops 1/(1-h_ii) (the exact form needs it).
    """

    def __init__(
        self, residuals: Any = None, leverage: bool = True, square: bool = True, exact: bool = False
    ) -> None:
        if exact and (residuals is not None or not leverage):
            raise ValueError("the exact DAS residual (train_psi) replaces residuals and needs leverage=True")
        self.residuals = residuals
        self.needs_leverage = bool(leverage)
        self.square = bool(square)
        self.uses_psi = bool(exact)
        self._residuals: torch.Tensor | None = None

    def check(self, num_train: int) -> None:
        vector = _residual_vector(self.residuals, num_train)
        self._residuals = None if vector is None else torch.as_tensor(vector, dtype=torch.float64)

    def __call__(self, terms: BlockTerms) -> torch.Tensor:
        if self.uses_psi:
            # exact Sherman-Morrison with the train sample's own loss direction psi_i (not assumed parallel to
            # phi_i): phi_q^T H^-1 psi_i + (phi_q^T H^-1 phi_i)(phi_i^T H^-1 psi_i) / (1 - h_ii)
            if terms.query_psi is None or terms.self_psi is None or terms.leverage is None:
                raise RuntimeError("the exact DAS readout needs train_psi and the leverages")
            change = terms.query_psi + terms.similarity * terms.self_psi / (1.0 - terms.leverage)
            change = change * terms.inverse_scale
            return change.square() if self.square else change
        # the one-step form with psi_i = r_i phi_i: phi_q^T H^-1 phi_i r_i / (1 - h_ii)
        change = terms.similarity * terms.inverse_scale
        if self._residuals is not None:
            change = change * self._residuals[terms.start : terms.stop]
        if self.needs_leverage:
            if terms.leverage is None:
                raise RuntimeError("DAS with leverage needs the leverages; kernel_scores computes them")
            change = change / (1.0 - terms.leverage)
        return change.square() if self.square else change


def kernel_scores(
    query_features: RowSliceable | torch.Tensor,
    train_features: RowSliceable,
    lambdas: Sequence[float],
    readout: Readout,
    *,
    solver: KernelSolver | None = None,
    mask: Any = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    normalize_inverse: bool = False,
    train_psi: RowSliceable | None = None,
) -> dict[float, np.ndarray]:
    """{lambda: (M, N) scores} of one kernel readout for every lambda, from one factorisation and one pass over
    the train features. Memory of the result: len(lambdas) x M x N float32.

    ``train_psi`` (N x k, DAS's exact residual): each train sample's own loss direction psi_i, read block by block
    beside Phi; it need not lie in the span of the train rows, so the Gram form adds its 1/lambda part outside."""
    if readout.uses_psi != (train_psi is not None):
        raise ValueError("train_psi goes with, and only with, a readout that uses it (DAS residual=exact)")
    solver = solver if solver is not None else KernelSolver.from_features(train_features, block_size)
    num_train = len(train_features)
    if solver.num_samples != num_train:
        raise ValueError(f"solver was built on {solver.num_samples} train samples, features have {num_train}")
    readout.check(num_train)
    queries = read_all(query_features)
    queries_eigen = solver.to_eigenbasis(queries)  # M x r
    # the part of the queries outside V's span (Gram form): it meets psi there, through the 1/lambda term
    queries_outside = queries - queries_eigen @ solver.eigenvectors.T if solver.rank < solver.dim else None
    if train_psi is not None and len(train_psi) != num_train:
        raise ValueError(f"train_psi has {len(train_psi)} rows, train features {num_train}")
    num_queries = int(queries_eigen.shape[0])
    check_mask(mask, num_queries, num_train)
    lambdas = [float(lam) for lam in lambdas]
    inverse_spectra = {lam: solver.inverse_spectrum(lam) for lam in lambdas}
    scales = {lam: 1.0 / solver.inverse_mean_abs(lam) if normalize_inverse else 1.0 for lam in lambdas}
    results = {lam: np.zeros((num_queries, num_train), dtype=np.float32) for lam in lambdas}
    for start, stop, block in iter_row_blocks(train_features, block_size):
        block_eigen = solver.to_eigenbasis(block)  # b x r, shared by every lambda
        block_eigen_squared = block_eigen.square() if readout.needs_leverage else None
        psi = None if train_psi is None else as_float64(train_psi[start:stop])  # b x k
        psi_eigen = None if psi is None else solver.to_eigenbasis(psi)  # b x r
        psi_outside_products = (
            None if psi is None or queries_outside is None else queries_outside @ psi.T
        )  # M x b, phi_q^T (I - V V^T) psi_i
        for lam in lambdas:
            inverse_spectrum = inverse_spectra[lam]
            query_psi = self_psi = None
            if psi_eigen is not None:
                query_psi = (queries_eigen * inverse_spectrum) @ psi_eigen.T
                if psi_outside_products is not None:
                    query_psi = query_psi + psi_outside_products / lam
                # phi_i lies in V's span: no outside term
                self_psi = (block_eigen * psi_eigen * inverse_spectrum).sum(dim=1)
            terms = BlockTerms(
                similarity=(queries_eigen * inverse_spectrum) @ block_eigen.T,
                leverage=None if block_eigen_squared is None else block_eigen_squared @ inverse_spectrum,
                inverse_scale=scales[lam],
                start=start,
                stop=stop,
                query_psi=query_psi,
                self_psi=self_psi,
            )
            scores = mask_block(readout(terms), mask, start, stop)
            results[lam][:, start:stop] = scores.numpy().astype(np.float32)
    return results


def _residual_vector(residuals: Any, num_train: int) -> np.ndarray | None:
    if residuals is None:
        return None
    vector = np.asarray(
        residuals.detach().cpu() if isinstance(residuals, torch.Tensor) else residuals, dtype=np.float64
    )
    if vector.shape != (num_train,):
        raise ValueError(f"residuals have shape {vector.shape}, expected ({num_train},)")
    return vector


def summed_steps(query_steps: Any) -> torch.Tensor:
    """S x M x k per-denoising-step query features summed over the steps (float64, M x k), one step at a time.

    Journey-TRAK's score is linear in the query feature, so the sum over steps of TRAK is TRAK of this sum."""
    if len(getattr(query_steps, "shape", ())) != 3:
        raise ValueError(
            f"query_steps must be steps x queries x k, got shape {getattr(query_steps, 'shape', None)}"
        )
    total = as_float64(query_steps[0])
    for step in range(1, len(query_steps)):
        total += as_float64(query_steps[step])
    return total


def _loss_matrix(per_timestep_losses: Any) -> np.ndarray:
    if isinstance(per_timestep_losses, torch.Tensor):
        per_timestep_losses = per_timestep_losses.detach().cpu().numpy()
    losses = np.asarray(per_timestep_losses, dtype=np.float64)
    if losses.ndim != 2:
        raise ValueError(f"per_timestep_losses must be train x timesteps, got shape {losses.shape}")
    if (losses < 0).any():
        raise ValueError("per-timestep losses must be non-negative")
    return losses


def residual_weights(per_timestep_losses: Any) -> np.ndarray:
    """``residual=normalized`` (the authors' code): r_i = mean_t( sqrt(L_t(x_i)) / ||sqrt(L_.(x_i))||_2 ) from
    per-timestep training losses (N x T -> N).

    Each row is unit-normalised over t before averaging, so r_i lies in [1/T, 1/sqrt(T)]: it keeps the shape of the
    loss-vs-t curve and drops its size (measured: 2.2% variation across images). A row of zero losses has r_i = 0.
    """
    losses = _loss_matrix(per_timestep_losses)
    roots = np.sqrt(losses)
    norms = np.linalg.norm(roots, axis=1, keepdims=True)
    normalised = np.divide(roots, norms, out=np.zeros_like(roots), where=norms > 0)
    return normalised.mean(axis=1)


def magnitude_residuals(per_timestep_losses: Any) -> np.ndarray:
    """``residual=magnitude``: r_i = sqrt(mean_t L_t(x_i)), the size of sample i's residual, divided by its mean
    over the training images (N x T -> N, mean 1; a global factor changes no ranking)."""
    sizes = np.sqrt(_loss_matrix(per_timestep_losses).mean(axis=1))
    mean = sizes.mean()
    return sizes / mean if mean > 0 else sizes
