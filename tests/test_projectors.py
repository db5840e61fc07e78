"""Projectors: determinism for a seed, agreement with an explicit matrix, JL inner-product preservation and
independence of the batch size."""

from __future__ import annotations

import math

import pytest
import torch

from das_lightning.attribution.projectors import (
    DenseProjector,
    IdentityProjector,
    SparseJLProjector,
    TrakCudaProjector,
    build_projector,
)


def random_rows(rows: int, num_params: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, num_params, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "make",
    [
        lambda seed: DenseProjector(300, 16, seed, distribution="rademacher", chunk_rows=64),
        lambda seed: DenseProjector(300, 16, seed, distribution="gaussian", chunk_rows=64),
        lambda seed: SparseJLProjector(300, 16, seed, nnz_per_param=3),
    ],
    ids=["dense-rademacher", "dense-gaussian", "sparse"],
)
def test_same_seed_same_projection_other_seed_differs(make) -> None:
    grads = random_rows(5, 300)
    first, again, other = make(7).project(grads), make(7).project(grads), make(8).project(grads)
    assert first.shape == (5, 16)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.allclose(first, other)


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_dense_materialised_and_streamed_equal_the_explicit_matrix(distribution: str) -> None:
    num_params, dim, chunk_rows = 1000, 24, 128  # the last chunk is short (1000 = 7 * 128 + 104)
    grads = random_rows(6, num_params)
    materialised = DenseProjector(num_params, dim, 3, distribution=distribution, chunk_rows=chunk_rows)
    streamed = DenseProjector(
        num_params, dim, 3, distribution=distribution, chunk_rows=chunk_rows, memory_budget_bytes=0
    )
    assert materialised.fits_in_memory and not streamed.fits_in_memory
    # the matrix built by hand from the documented chunk rule
    chunks = []
    for chunk in range(math.ceil(num_params / chunk_rows)):
        rows = min(chunk_rows, num_params - chunk * chunk_rows)
        chunks.append(materialised.chunk(chunk))
        assert chunks[-1].shape == (rows, dim)
    explicit = torch.cat(chunks)
    if distribution == "rademacher":
        torch.testing.assert_close(explicit.abs() * math.sqrt(dim), torch.ones_like(explicit))
        assert (explicit > 0).any() and (explicit < 0).any()
    torch.testing.assert_close(materialised.project(grads), grads @ explicit)
    torch.testing.assert_close(streamed.project(grads), grads @ explicit)


@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_inner_products_preserved(kind: str) -> None:
    num_params, dim = 20000, 2048
    projector = build_projector(kind, num_params, dim, seed=0)
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(num_params, generator=generator)
    # pairs with cosines from about 0 to about 0.9, so the check is not only on near-orthogonal vectors
    others = [base * weight + torch.randn(num_params, generator=generator) for weight in (0.0, 0.5, 1.0, 3.0)]
    rows = torch.stack([base, *others])
    projected = projector.project(rows)
    for j in range(1, rows.shape[0]):
        exact = rows[0] @ rows[j]
        approx = projected[0] @ projected[j]
        assert abs(approx - exact) / (rows[0].norm() * rows[j].norm()) < 0.1
    norms_ratio = projected.norm(dim=1) / rows.norm(dim=1)
    assert ((norms_ratio - 1).abs() < 0.1).all()


@pytest.mark.parametrize(
    "projector",
    [
        DenseProjector(500, 32, 2, chunk_rows=100),
        DenseProjector(500, 32, 2, chunk_rows=100, memory_budget_bytes=0),
        SparseJLProjector(500, 32, 2, nnz_per_param=4, chunk_rows=128),
        IdentityProjector(500),
    ],
    ids=["dense", "dense-streamed", "sparse", "identity"],
)
def test_projection_independent_of_batch_size(projector) -> None:
    grads = random_rows(9, 500)
    together = projector.project(grads)
    one_by_one = torch.cat([projector.project(grads[j : j + 1]) for j in range(9)])
    torch.testing.assert_close(one_by_one, together)


CUDA_ONLY = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize(
    "device",
    [
        None,
        "cpu",
        # "cpu:0" is to the CPU what "cuda" is to cuda:0: the requested device never equals a tensor's device,
        # so this case shows the per-batch rebuild without a GPU
        "cpu:0",
        torch.device("cpu", 0),
        pytest.param("cuda", marks=CUDA_ONLY),
        pytest.param("cuda:0", marks=CUDA_ONLY),
    ],
    ids=["none", "cpu", "cpu:0", "device-cpu-0", "cuda", "cuda:0"],
)
def test_dense_matrix_is_built_once_per_device(device, monkeypatch: pytest.MonkeyPatch) -> None:
    projector = DenseProjector(300, 16, 4, chunk_rows=64, device=device)
    assert projector.fits_in_memory
    builds = []
    build = projector.matrix
    monkeypatch.setattr(projector, "matrix", lambda on: builds.append(on) or build(on))
    grads = random_rows(4, 300)
    first = projector.project(grads)
    for _ in range(4):
        torch.testing.assert_close(projector.project(grads), first, rtol=0, atol=0)
    assert len(builds) == 1, builds
    # the kept matrix lives where the features are made
    assert first.device == projector._materialised.device
    torch.testing.assert_close(first.cpu(), grads @ projector.matrix("cpu"))


def test_sparse_matches_its_explicit_matrix_and_structure() -> None:
    projector = SparseJLProjector(400, 30, 5, nnz_per_param=4, chunk_rows=64)
    matrix = projector.matrix()
    # each parameter reaches exactly s distinct outputs with weights +-1/sqrt(s)
    assert ((matrix != 0).sum(dim=1) == 4).all()
    assert set(matrix[matrix != 0].abs().unique().tolist()) == {0.5}
    grads = random_rows(3, 400)
    torch.testing.assert_close(projector.project(grads), grads @ matrix)


def test_identity_is_exact() -> None:
    grads = random_rows(4, 50)
    projector = build_projector("identity", 50, None, seed=0)
    assert projector.dim == 50
    torch.testing.assert_close(projector.project(grads), grads, rtol=0, atol=0)
    with pytest.raises(ValueError, match="dim = num_params"):
        IdentityProjector(50, dim=10)


def test_describe_names_what_defines_the_matrix() -> None:
    described = DenseProjector(100, 8, 4, distribution="gaussian", chunk_rows=32).describe()
    assert described == {
        "kind": "dense",
        "seed": 4,
        "dim": 8,
        "num_params": 100,
        "dtype": "float32",
        "extra": {"distribution": "gaussian", "chunk_rows": 32},
    }
    assert SparseJLProjector(100, 8, 4, nnz_per_param=2).describe()["extra"] == {"nnz_per_param": 2}


def test_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="unknown projector kind 'fast'.*dense"):
        build_projector("fast", 10, 4, seed=0)
    with pytest.raises(ValueError, match="expects gradients"):
        DenseProjector(10, 4, 0).project(torch.zeros(2, 11))
    with pytest.raises(ValueError, match="unknown distribution"):
        DenseProjector(10, 4, 0, distribution="uniform")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where CUDA is missing")
def test_trak_cuda_projector_explains_how_to_install() -> None:
    with pytest.raises(RuntimeError, match=r"pip install traker\[fast\]"):
        TrakCudaProjector(10, 4, 0)
