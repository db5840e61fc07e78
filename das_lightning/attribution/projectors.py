"""Projectors: per-sample gradients of P parameters -> features of k dimensions (METHOD.md §2, JL projection).

One small interface (:class:`Projector`) and several implementations, chosen by name with
:func:`build_projector`. Every random projector is a pure function of (seed, P, k, its ``extra`` settings): the
same gradient row gives the same feature whatever the batch size, the device or the number of processes, and
``describe()`` records everything that defines the matrix so manifests can refuse to mix features.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

from das_lightning.errors import ConfigError
from das_lightning.seeding import derive_seed

GIB = 1 << 30


class Projector(ABC):
    """Maps gradient rows (B, P) to features (B, k)."""

    kind: str
    num_params: int
    dim: int
    seed: int
    dtype: torch.dtype

    @abstractmethod
    def project(self, grads: torch.Tensor) -> torch.Tensor:
        """Features (B, k) of gradient rows (B, P)."""

    def extra(self) -> dict[str, Any]:
        """Settings beyond kind/seed/k/P/dtype that change the matrix."""
        return {}

    def describe(self) -> dict[str, Any]:
        """What defines the projection, for manifests."""
        return {
            "kind": self.kind,
            "seed": self.seed,
            "dim": self.dim,
            "num_params": self.num_params,
            "dtype": str(self.dtype).removeprefix("torch."),
            "extra": self.extra(),
        }

    def _check_input(self, grads: torch.Tensor) -> None:
        if grads.dim() != 2 or grads.shape[1] != self.num_params:
            raise ConfigError(
                f"{self.kind} projector expects gradients (B, {self.num_params}), got {tuple(grads.shape)}"
            )


class DenseProjector(Projector):
    """A dense Gaussian or Rademacher JL matrix, defined chunk by chunk of rows (matrix-free).

    Rows [c * chunk_rows, (c + 1) * chunk_rows) of the (P, k) matrix are drawn on a CPU generator seeded with
    ``derive_seed("projector", seed, c)`` and scaled by 1/sqrt(k), so the values do not depend on the device,
    the batch size or how a caller splits its work (``chunk_rows`` is part of the definition). If the whole
    matrix fits ``memory_budget_bytes`` it is generated once per device and kept (one matmul per call);
    otherwise chunks are regenerated on every call, which costs far more than the matmul. Both paths give the
    same output up to float rounding.
    """

    kind = "dense"
    DISTRIBUTIONS = ("rademacher", "gaussian")

    def __init__(
        self,
        num_params: int,
        dim: int,
        seed: int,
        distribution: str = "rademacher",
        chunk_rows: int = 4096,
        memory_budget_bytes: int = 4 * GIB,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if distribution not in self.DISTRIBUTIONS:
            raise ConfigError(f"unknown distribution {distribution!r}; known: {list(self.DISTRIBUTIONS)}")
        if num_params < 1 or dim < 1 or chunk_rows < 1:
            raise ConfigError(
                f"num_params, dim and chunk_rows must be positive: {num_params}, {dim}, {chunk_rows}"
            )
        self.num_params, self.dim, self.seed = int(num_params), int(dim), int(seed)
        self.distribution = distribution
        self.chunk_rows = int(chunk_rows)
        self.memory_budget_bytes = int(memory_budget_bytes)
        self.device = None if device is None else torch.device(device)
        self.dtype = dtype
        self._materialised: torch.Tensor | None = None

    def extra(self) -> dict[str, Any]:
        return {"distribution": self.distribution, "chunk_rows": self.chunk_rows}

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.num_params / self.chunk_rows)

    @property
    def fits_in_memory(self) -> bool:
        return self.num_params * self.dim * torch.finfo(self.dtype).bits // 8 <= self.memory_budget_bytes

    def chunk_bounds(self, chunk: int) -> tuple[int, int]:
        """Parameter rows [start, stop) of chunk ``chunk``."""
        start = chunk * self.chunk_rows
        return start, min(start + self.chunk_rows, self.num_params)

    def chunk(self, chunk: int) -> torch.Tensor:
        """Rows of chunk ``chunk`` of the (P, k) matrix, scaled, as float32 on the CPU."""
        start, stop = self.chunk_bounds(chunk)
        generator = torch.Generator().manual_seed(derive_seed("projector", self.seed, chunk))
        shape = (stop - start, self.dim)
        if self.distribution == "gaussian":
            values = torch.randn(shape, generator=generator)
        else:
            values = torch.randint(0, 2, shape, generator=generator, dtype=torch.int8).float().mul_(2).sub_(1)
        return values.mul_(1.0 / math.sqrt(self.dim))

    def matrix(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The whole (P, k) matrix (for tests and for the materialised path)."""
        matrix = torch.empty(self.num_params, self.dim, dtype=self.dtype, device=device)
        for chunk in range(self.num_chunks):
            start, stop = self.chunk_bounds(chunk)
            matrix[start:stop] = self.chunk(chunk)
        return matrix

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        self._check_input(grads)
        grads = grads.to(device=self.device or grads.device, dtype=self.dtype)
        # compare where the tensors are, not the requested device: "cuda" asks for the tensor device cuda:0, and
        # the two never compare equal (a matrix rebuilt on every batch)
        device = grads.device
        if self.fits_in_memory:
            if self._materialised is None or self._materialised.device != device:
                self._materialised = self.matrix(device)
            return grads @ self._materialised
        out = torch.zeros(grads.shape[0], self.dim, dtype=self.dtype, device=device)
        for chunk in range(self.num_chunks):
            start, stop = self.chunk_bounds(chunk)
            out.addmm_(grads[:, start:stop], self.chunk(chunk).to(device=device, dtype=self.dtype))
        return out


class SparseJLProjector(Projector):
    """A sparse JL matrix: each parameter feeds ``nnz_per_param`` (s) of the k outputs with random signs, / sqrt(s).

    The k outputs are split into s nearly equal blocks and each parameter picks one output in every block (so
    its s outputs are distinct). The hashes are drawn once from ``derive_seed("projector-sparse", seed)``.
    ``project`` uses ``index_add_`` over parameter chunks: as fast as a sparse CSR matmul on CPU (measured at
    P = 200k, k = 4096, s = 4, B = 32), with no beta-API warnings and on every device.
    """

    kind = "sparse"

    def __init__(
        self,
        num_params: int,
        dim: int,
        seed: int,
        nnz_per_param: int = 4,
        chunk_rows: int = 1 << 16,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if not 1 <= nnz_per_param <= dim:
            raise ConfigError(f"nnz_per_param must be in [1, dim={dim}], got {nnz_per_param}")
        self.num_params, self.dim, self.seed = int(num_params), int(dim), int(seed)
        self.nnz_per_param = int(nnz_per_param)
        self.chunk_rows = int(chunk_rows)
        self.device = None if device is None else torch.device(device)
        self.dtype = dtype
        generator = torch.Generator().manual_seed(derive_seed("projector-sparse", self.seed))
        block_starts = torch.tensor([block * dim // nnz_per_param for block in range(nnz_per_param + 1)])
        block_widths = (block_starts[1:] - block_starts[:-1]).to(torch.float64)
        # one output per block: start of the block + a uniform offset within it
        uniforms = torch.rand((num_params, nnz_per_param), generator=generator, dtype=torch.float64)
        self.output_indices = (block_starts[:-1] + (uniforms * block_widths).long()).to(torch.long)
        signs = torch.randint(0, 2, (num_params, nnz_per_param), generator=generator, dtype=torch.int8)
        self.weights = (signs.float() * 2 - 1) / math.sqrt(nnz_per_param)

    def extra(self) -> dict[str, Any]:
        return {"nnz_per_param": self.nnz_per_param}

    def matrix(self) -> torch.Tensor:
        """The dense (P, k) matrix (for tests)."""
        matrix = torch.zeros(self.num_params, self.dim)
        matrix.scatter_add_(1, self.output_indices, self.weights)
        return matrix

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        self._check_input(grads)
        grads = grads.to(device=self.device or grads.device, dtype=self.dtype)
        device = grads.device  # a tensor device ("cuda:0"), as in DenseProjector
        if self.output_indices.device != device:
            self.output_indices, self.weights = self.output_indices.to(device), self.weights.to(device)
        batch = grads.shape[0]
        out = torch.zeros(batch, self.dim, dtype=self.dtype, device=device)
        for start in range(0, self.num_params, self.chunk_rows):
            stop = min(start + self.chunk_rows, self.num_params)
            contributions = grads[:, start:stop].unsqueeze(-1) * self.weights[start:stop].to(self.dtype)
            out.index_add_(1, self.output_indices[start:stop].reshape(-1), contributions.reshape(batch, -1))
        return out


class IdentityProjector(Projector):
    """No projection (k = P): for small models and for tests of everything downstream."""

    kind = "identity"

    def __init__(
        self, num_params: int, dim: int | None = None, seed: int = 0, dtype: torch.dtype = torch.float32
    ) -> None:
        if dim is not None and dim != num_params:
            raise ConfigError(f"the identity projector has dim = num_params = {num_params}, got dim={dim}")
        self.num_params = self.dim = int(num_params)
        self.seed = int(seed)
        self.dtype = dtype

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        self._check_input(grads)
        return grads.to(self.dtype)


TRAK_INSTALL_HINT = (
    "The 'trak_cuda' projector needs a CUDA device and the TRAK library with its fast_jl kernel: "
    "`pip install traker[fast]` (compiles against your CUDA toolkit). Use projector kind 'dense' or 'sparse' otherwise."
)


class TrakCudaProjector(Projector):
    """TRAK's fused CUDA JL projector (``trak.projectors.CudaProjector``) behind the same interface.

    Its matrix is defined by fast_jl, not by :class:`DenseProjector`'s chunks: features from the two are not
    interchangeable (``describe()`` says which made them).
    """

    kind = "trak_cuda"

    def __init__(
        self,
        num_params: int,
        dim: int,
        seed: int,
        distribution: str = "rademacher",
        device: torch.device | str = "cuda",
        max_batch_size: int = 32,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if distribution not in DenseProjector.DISTRIBUTIONS:
            raise ConfigError(
                f"unknown distribution {distribution!r}; known: {list(DenseProjector.DISTRIBUTIONS)}"
            )
        device = torch.device(device)
        if device.type != "cuda" or not torch.cuda.is_available():
            raise RuntimeError(f"{TRAK_INSTALL_HINT} (device {device} is not an available CUDA device)")
        try:
            import fast_jl  # noqa: F401
            from trak.projectors import CudaProjector, ProjectionType
        except ImportError as error:
            raise RuntimeError(f"{TRAK_INSTALL_HINT} ({error})") from error
        self.num_params, self.dim, self.seed = int(num_params), int(dim), int(seed)
        self.distribution, self.max_batch_size, self.dtype = distribution, int(max_batch_size), dtype
        self._projector = CudaProjector(
            grad_dim=self.num_params,
            proj_dim=self.dim,
            seed=self.seed,
            # TRAK calls the Gaussian "normal"
            proj_type=ProjectionType("normal" if distribution == "gaussian" else distribution),
            device=device,
            max_batch_size=self.max_batch_size,
        )

    def extra(self) -> dict[str, Any]:
        return {"distribution": self.distribution, "max_batch_size": self.max_batch_size}

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        self._check_input(grads)
        return self._projector.project(grads.to(self._projector.device), model_id=0).to(self.dtype)


PROJECTORS: dict[str, type[Projector]] = {
    DenseProjector.kind: DenseProjector,
    SparseJLProjector.kind: SparseJLProjector,
    IdentityProjector.kind: IdentityProjector,
    TrakCudaProjector.kind: TrakCudaProjector,
}


TAKES_DISTRIBUTION = {
    DenseProjector.kind,
    TrakCudaProjector.kind,
}  # the kinds that draw from projector.distribution


@dataclass
class ProjectorSettings:
    """How per-sample gradients are compressed (conf/projector/*.yaml; every field enters the feature manifest)."""

    kind: str = "dense"  # dense | sparse | identity | trak_cuda
    dim: int = 4096  # k
    seed: int = 0
    distribution: str = "rademacher"  # dense: rademacher | gaussian
    options: dict[str, Any] = field(default_factory=dict)  # the projector class's other arguments

    def validate(self) -> None:
        projector_class(self.kind)
        if self.kind != "identity" and int(self.dim) < 1:
            raise ConfigError(f"projector.dim must be a positive integer, got {self.dim}")


def build_projector(kind: str, num_params: int, dim: int | None, seed: int, **kwargs: Any) -> Projector:
    """The projector registered as ``kind`` (``dense``, ``sparse``, ``identity``, ``trak_cuda``)."""
    return projector_class(kind)(num_params=num_params, dim=dim, seed=seed, **kwargs)


def projector_class(kind: str) -> type[Projector]:
    """The class registered as ``kind``; a clear error naming the known kinds otherwise."""
    if kind not in PROJECTORS:
        raise ConfigError(f"unknown projector kind {kind!r}; known: {sorted(PROJECTORS)}")
    return PROJECTORS[kind]
