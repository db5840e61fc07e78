"""The signed-square readout sign(s) s^2: the sign kept, the size squared, the order of each query's scores kept."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import rankdata

from das_lightning.attribution.kernel_solver import (
    DASReadout,
    InnerProduct,
    RelativeInfluence,
    SignedSquare,
    Squared,
    kernel_scores,
    signed_square,
)


@pytest.fixture(scope="module")
def features() -> tuple[np.ndarray, np.ndarray]:
    generator = np.random.default_rng(0)
    return generator.normal(size=(5, 6)), generator.normal(size=(40, 6))


def test_signed_square_is_s_times_abs_s_on_tensors_and_arrays() -> None:
    values = np.array([-3.0, -0.5, 0.0, 0.25, 2.0])
    expected = np.array([-9.0, -0.25, 0.0, 0.0625, 4.0])
    np.testing.assert_array_equal(signed_square(values), expected)
    torch.testing.assert_close(signed_square(torch.from_numpy(values)), torch.from_numpy(expected))
    assert isinstance(signed_square(values), np.ndarray) and torch.is_tensor(
        signed_square(torch.tensor(values))
    )


def test_sign_kept_size_squared_and_ranks_unchanged() -> None:
    scores = np.random.default_rng(1).normal(size=(3, 200))
    readout = signed_square(scores)
    np.testing.assert_array_equal(np.sign(readout), np.sign(scores))
    np.testing.assert_allclose(np.abs(readout), scores**2)
    # a monotone map: every query ranks the training images as the plain score does ...
    for row, plain in zip(readout, scores, strict=True):
        np.testing.assert_array_equal(rankdata(row), rankdata(plain))
        # ... and within each sign, by size as the squared score does
        for side in (plain > 0, plain < 0):
            np.testing.assert_array_equal(rankdata(np.abs(row[side])), rankdata(plain[side] ** 2))


@pytest.mark.parametrize("inner", [InnerProduct, RelativeInfluence])
def test_wrapping_a_kernel_readout(features, inner) -> None:
    queries, train = features
    lambdas = [0.1, 3.0]
    plain = kernel_scores(queries, train, lambdas, inner())
    signed = SignedSquare(inner())
    assert signed.needs_leverage == inner.needs_leverage and not signed.uses_psi
    wrapped = kernel_scores(queries, train, lambdas, signed)
    squared = kernel_scores(queries, train, lambdas, Squared(inner()))
    for lam in lambdas:
        np.testing.assert_allclose(wrapped[lam], plain[lam] * np.abs(plain[lam]), rtol=1e-5, atol=1e-12)
        np.testing.assert_allclose(np.abs(wrapped[lam]), squared[lam], rtol=1e-6)
        assert (wrapped[lam] < 0).any() and (wrapped[lam] > 0).any()  # both signs present: the sign is kept


def test_das_signed_square_is_the_signed_change_squared(features) -> None:
    """DAS squares inside its readout: its signed square wraps the unsquared readout, and its size is DAS's."""
    queries, train = features
    residuals = np.linspace(0.5, 1.5, len(train))
    signed = SignedSquare(DASReadout(residuals, leverage=True, square=False))
    assert signed.needs_leverage
    wrapped = kernel_scores(queries, train, [1.0], signed)[1.0]
    change = kernel_scores(queries, train, [1.0], DASReadout(residuals, leverage=True, square=False))[1.0]
    das = kernel_scores(queries, train, [1.0], DASReadout(residuals, leverage=True, square=True))[1.0]
    np.testing.assert_array_equal(np.sign(wrapped), np.sign(change))
    np.testing.assert_allclose(np.abs(wrapped), das, rtol=1e-5)
