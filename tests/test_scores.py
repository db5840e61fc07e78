"""Attribution scores against their definitions (METHOD.md §2), and DAS against exact leave-one-out refits of a
linear ridge model, where the linearisation behind DAS is exact."""

from __future__ import annotations

import numpy as np
import pytest
import readouts
import torch

from das_lightning.attribution.kernel_solver import KernelSolver, residual_weights
from das_lightning.attribution.ranking import (
    cosine_scores,
    dot_scores,
    screen_candidates,
    topk,
    tracin_scores,
)

NUM_TRAIN, DIM, NUM_QUERIES = 40, 5, 6


@pytest.fixture
def features() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    train = rng.normal(size=(NUM_TRAIN, DIM))
    queries = rng.normal(size=(NUM_QUERIES, DIM))
    return queries, train


def inverse_kernel(train: np.ndarray, lam: float) -> np.ndarray:
    return np.linalg.inv(train.T @ train + lam * np.eye(train.shape[1]))


def ridge_fit(design: np.ndarray, targets: np.ndarray, lam: float) -> np.ndarray:
    return np.linalg.solve(design.T @ design + lam * np.eye(design.shape[1]), design.T @ targets)


def leave_one_out_output_change(queries: np.ndarray, train: np.ndarray, targets: np.ndarray, lam: float):
    """(queries x train) f_theta*(q) - f_theta\\i(q), each theta\\i refitted from scratch without sample i."""
    full = ridge_fit(train, targets, lam)
    change = np.empty((len(queries), len(train)))
    for i in range(len(train)):
        keep = np.arange(len(train)) != i
        without_i = ridge_fit(train[keep], targets[keep], lam)
        change[:, i] = queries @ (full - without_i)
    return change, targets - train @ full


@pytest.mark.parametrize("lam", [0.05, 3.0])
def test_das_equals_exact_leave_one_out_on_linear_ridge(features, lam):
    queries, train = features
    targets = train @ np.array([1.0, -2.0, 0.5, 0.0, 3.0]) + np.random.default_rng(1).normal(size=NUM_TRAIN)
    change, residuals = leave_one_out_output_change(queries, train, targets, lam)

    das = readouts.das(queries, train, lam, residuals=residuals, leverage=True, square=True)
    np.testing.assert_allclose(das, change**2, rtol=1e-6, atol=1e-9 * np.abs(change**2).max())
    signed = readouts.das(queries, train, lam, residuals=residuals, leverage=True, square=False)
    np.testing.assert_allclose(signed, change, rtol=1e-6, atol=1e-9 * np.abs(change).max())

    # without 1/(1 - h_ii) the one-step estimate is not the refit: the leverage term matters
    no_leverage = readouts.das(queries, train, lam, residuals=residuals, leverage=False, square=True)
    assert not np.allclose(no_leverage, change**2, rtol=1e-3)


def test_das_without_residuals_is_squared_trak_over_one_minus_leverage(features):
    queries, train = features
    lam = 0.7
    inverse = inverse_kernel(train, lam)
    leverage = np.einsum("ik,kl,il->i", train, inverse, train)
    expected = (queries @ inverse @ train.T / (1 - leverage)) ** 2
    np.testing.assert_allclose(readouts.das(queries, train, lam), expected, rtol=1e-6)


def test_leverages_and_solve_match_dense_inverse(features):
    queries, train = features
    lam = 0.3
    solver = KernelSolver.from_features(train, block_size=7)
    inverse = inverse_kernel(train, lam)
    leverage = solver.leverages(train, lam, block_size=3)
    np.testing.assert_allclose(leverage, np.einsum("ik,kl,il->i", train, inverse, train), rtol=1e-10)
    assert (leverage >= 0).all() and (leverage < 1).all()
    np.testing.assert_allclose(solver.solve(queries, lam).numpy(), queries @ inverse, rtol=1e-10)


def test_trak_relatif_renorm_match_definitions(features):
    queries, train = features
    lam = 1.5
    inverse = inverse_kernel(train, lam)
    trak = queries @ inverse @ train.T
    np.testing.assert_allclose(readouts.trak(queries, train, lam), trak, rtol=1e-6)
    np.testing.assert_allclose(readouts.trak(queries, train, lam), trak, rtol=1e-6)

    self_influence = np.einsum("ik,kl,il->i", train, inverse, train)
    np.testing.assert_allclose(
        readouts.relatif(queries, train, lam), trak / np.sqrt(self_influence), rtol=1e-6
    )

    unit_train = train / np.linalg.norm(train, axis=1, keepdims=True)
    unit_queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    renorm = unit_queries @ inverse_kernel(unit_train, lam) @ unit_train.T
    np.testing.assert_allclose(readouts.renorm(queries, train, lam), renorm, rtol=1e-6)


def test_normalize_inverse_rescales_without_reranking(features):
    queries, train = features
    lam = 0.2
    inverse = inverse_kernel(train, lam)
    scale = 1.0 / np.abs(inverse).mean()
    plain = readouts.trak(queries, train, lam)
    scaled = readouts.trak(queries, train, lam, normalize_inverse=True)
    np.testing.assert_allclose(scaled, scale * plain, rtol=1e-6)
    np.testing.assert_array_equal(np.argsort(scaled, axis=1), np.argsort(plain, axis=1))
    # DAS squares the scaled inverse; the leverage keeps the true inverse
    das_scaled = readouts.das(queries, train, lam, normalize_inverse=True)
    np.testing.assert_allclose(das_scaled, scale**2 * readouts.das(queries, train, lam), rtol=1e-5)


def test_scores_do_not_depend_on_block_size_storage_or_row_order(features, tmp_path):
    queries, train = features
    lam = 0.4
    residuals = np.random.default_rng(2).uniform(0.1, 1.0, size=NUM_TRAIN)
    # a read-only fp16 memmap, as the feature store writes it; the reference uses the same fp16 values
    stored = np.lib.format.open_memmap(tmp_path / "train.npy", mode="w+", dtype=np.float16, shape=train.shape)
    stored[:] = train
    stored.flush()
    train_memmap = np.load(tmp_path / "train.npy", mmap_mode="r")
    train16 = np.asarray(train_memmap, dtype=np.float64)

    reference = readouts.das(queries, train16, lam, residuals=residuals, block_size=NUM_TRAIN)
    for block_size in (1, 7, NUM_TRAIN):
        scores = readouts.das(queries, train_memmap, lam, residuals=residuals, block_size=block_size)
        np.testing.assert_allclose(scores, reference, rtol=1e-5)
    from_tensors = readouts.das(
        torch.from_numpy(queries), torch.from_numpy(train16), lam, residuals=residuals
    )
    np.testing.assert_allclose(from_tensors, reference, rtol=1e-5)

    permutation = np.random.default_rng(3).permutation(NUM_TRAIN)
    permuted = readouts.das(
        queries, train16[permutation], lam, residuals=residuals[permutation], block_size=7
    )
    unpermuted = np.empty_like(permuted)
    unpermuted[:, permutation] = permuted
    np.testing.assert_allclose(unpermuted, reference, rtol=1e-5)


def test_large_lambda_trak_tends_to_dot_product(features):
    queries, train = features
    dot = queries @ train.T
    errors = []
    for lam in (1e1, 1e3, 1e5, 1e8):
        scaled = lam * readouts.trak(queries, train, lam).astype(np.float64)
        errors.append(np.linalg.norm(scaled - dot) / np.linalg.norm(dot))
    assert all(later < earlier for earlier, later in zip(errors, errors[1:], strict=False))
    assert errors[-1] < 1e-5


def test_scores_for_lambdas_match_single_lambda_calls(features):
    queries, train = features
    lambdas = [0.01, 1.0, 500.0]
    residuals = np.random.default_rng(4).uniform(0.1, 1.0, size=NUM_TRAIN)
    solver = KernelSolver.from_features(train)
    swept = readouts.sweep("das", queries, train, lambdas, solver=solver, residuals=residuals, square=False)
    for lam in lambdas:
        np.testing.assert_allclose(
            swept[lam], readouts.das(queries, train, lam, residuals, square=False), rtol=1e-6
        )
    for method in ("trak", "relatif", "renorm"):
        swept = readouts.sweep(method, queries, train, lambdas, block_size=9)
        for lam in lambdas:
            np.testing.assert_allclose(swept[lam], readouts.SINGLE[method](queries, train, lam), rtol=1e-6)


def test_journey_trak_is_sum_of_per_step_trak(features):
    _, train = features
    steps = np.random.default_rng(5).normal(size=(4, NUM_QUERIES, DIM))
    lam = 0.8
    per_step = sum(readouts.trak(step, train, lam).astype(np.float64) for step in steps)
    np.testing.assert_allclose(readouts.journey_trak(steps, train, lam), per_step, rtol=1e-5)
    swept = readouts.sweep("journey_trak", steps, train, [lam])[lam]
    np.testing.assert_allclose(swept, per_step, rtol=1e-5)


def test_tracin_is_learning_rate_weighted_sum_of_dot_products(features):
    queries, train = features
    rng = np.random.default_rng(6)
    queries_2, train_2 = rng.normal(size=queries.shape), rng.normal(size=train.shape)
    expected = 0.1 * queries @ train.T + 0.02 * queries_2 @ train_2.T
    np.testing.assert_allclose(
        tracin_scores([(0.1, queries, train), (0.02, queries_2, train_2)]), expected, rtol=1e-6
    )


def test_dot_and_cosine_baselines(features):
    queries, train = features
    np.testing.assert_allclose(dot_scores(queries, train, block_size=3), queries @ train.T, rtol=1e-6)
    train_with_zero = train.copy()
    train_with_zero[5] = 0.0
    cosine = cosine_scores(queries, train_with_zero, block_size=3)
    norms = np.linalg.norm(queries, axis=1)[:, None] * np.linalg.norm(train, axis=1)[None, :]
    expected = queries @ train.T / norms
    expected[:, 5] = 0.0
    np.testing.assert_allclose(cosine, expected, rtol=1e-6, atol=1e-7)
    assert np.abs(cosine).max() <= 1.0 + 1e-6


def test_screening_keeps_top_m_and_zeroes_the_rest(features):
    queries, train = features
    cheap = dot_scores(queries, train)
    mask = screen_candidates(cheap, 8)
    assert (mask.sum(axis=1) == 8).all()
    for row, keep in zip(cheap, mask, strict=True):
        assert row[keep].min() >= row[~keep].max()
    lam = 0.5
    full = readouts.das(queries, train, lam, square=False)
    masked = readouts.das(queries, train, lam, square=False, mask=mask, block_size=7)
    assert (masked[~mask] == 0).all()
    np.testing.assert_array_equal(masked[mask], full[mask])
    tracin = tracin_scores([(1.0, queries, train)], mask=mask)
    assert (tracin[~mask] == 0).all()
    assert screen_candidates(cheap, NUM_TRAIN + 5).all()


def test_residual_weights_hand_example():
    losses = torch.tensor([[1.0, 4.0, 4.0], [4.0, 0.0, 0.0], [0.0, 0.0, 0.0], [2.0, 2.0, 2.0]])
    # row 0: sqrt = (1, 2, 2), norm 3, mean of (1/3, 2/3, 2/3) = 5/9; row 1: (1, 0, 0) -> 1/3; row 3: 1/sqrt(3)
    np.testing.assert_allclose(residual_weights(losses), [5 / 9, 1 / 3, 0.0, 1 / np.sqrt(3)], rtol=1e-12)
    with pytest.raises(ValueError):
        residual_weights(np.ones(3))


def test_topk_proponents_and_opponents():
    scores = np.array([[0.5, -1.0, 2.0, 0.0], [3.0, 3.0, -2.0, 1.0]], dtype=np.float32)
    result = topk(scores, 2)
    assert result["proponent_indices"] == [[2, 0], [0, 1]]
    assert result["opponent_indices"] == [[1, 3], [2, 3]]
    assert result["proponent_scores"][0] == [2.0, 0.5]
    assert isinstance(result["opponent_scores"][1][0], float)
    masked = topk(scores, 1, mask=np.array([[True, False, False, True], [False, True, True, False]]))
    assert masked["proponent_indices"] == [[0], [1]] and masked["opponent_indices"] == [[3], [2]]


def _kernel_form(train: np.ndarray) -> KernelSolver:
    kernel = torch.from_numpy(train.T @ train)
    eigenvalues, eigenvectors = torch.linalg.eigh(0.5 * (kernel + kernel.T))
    return KernelSolver(eigenvalues, eigenvectors, num_samples=len(train))


def test_more_dimensions_than_samples_uses_the_gram_form_with_the_same_results() -> None:
    rng = np.random.default_rng(5)
    # rank-deficient on purpose: 12 rows spanning 9 directions of a 60-dimensional space
    train = rng.normal(size=(12, 9)) @ rng.normal(size=(9, 60))
    queries = rng.normal(size=(4, 60))  # mostly outside the rows' span
    gram, kernel = KernelSolver.from_features(train), _kernel_form(train)
    assert (gram.dim, gram.rank) == (60, 9) and kernel.rank == 60
    for lam in (0.01, 1.0, 300.0):
        exact_inverse = inverse_kernel(train, lam)
        np.testing.assert_allclose(
            gram.solve(queries, lam).numpy(), queries @ exact_inverse, rtol=1e-7, atol=1e-10
        )
        np.testing.assert_allclose(gram.leverages(train, lam), kernel.leverages(train, lam), rtol=1e-8)
        np.testing.assert_allclose(gram.inverse_mean_abs(lam), np.abs(exact_inverse).mean(), rtol=1e-8)
        for method in ("trak", "das", "relatif"):
            by_gram = readouts.sweep(method, queries, train, [lam], solver=gram)[lam]
            by_kernel = readouts.sweep(method, queries, train, [lam], solver=kernel)[lam]
            np.testing.assert_allclose(by_gram, by_kernel, rtol=1e-4, atol=1e-6 * np.abs(by_kernel).max())
    with pytest.raises(ValueError, match="lambda = 0"):
        gram.inverse_spectrum(0.0)
