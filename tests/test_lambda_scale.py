"""Regularisation on the features' own scale (das_lightning/lambdas.py), and DAS's residual variants against
brute-force leave-one-out refits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import readouts
import torch

from das_lightning.attribution.kernel_solver import KernelSolver, magnitude_residuals
from das_lightning.attribution.projectors import build_projector
from das_lightning.evaluation.lambda_selection import heldout_halves
from das_lightning.evaluation.lds_report import evaluate_method, markdown_table
from das_lightning.lambdas import default_scale_grid, grid_edge
from das_lightning.selection import LDS_JSON_VERSION, choose_scale, selected_scale

RNG = np.random.default_rng(0)


def test_default_grid_spans_from_below_tiny_eigenvalues_to_above_the_trace() -> None:
    grid = default_scale_grid()
    assert grid == sorted(grid) and len(grid) == 36
    assert grid[0] == 1e-8 and grid[-1] == 5e3  # c > N for N <= 5000: above the largest eigenvalue
    assert grid_edge(grid[0], grid) == "low" and grid_edge(grid[-1], grid) == "high"
    assert grid_edge(1e-2, grid) is None and grid_edge(None, grid) is None


def _collinear_features(num: int, dim: int, scale: float = 1.0) -> np.ndarray:
    """Nearly collinear rows, like DAS's mean-eps features: one direction holds most of the trace."""
    common = RNG.normal(size=dim)
    return scale * (np.outer(RNG.normal(3.0, 0.5, size=num), common) + 0.05 * RNG.normal(size=(num, dim)))


@pytest.mark.parametrize("method", ["das", "trak", "relatif"])
def test_scaling_every_feature_leaves_the_scores_at_each_c_unchanged(method: str) -> None:
    train, queries = _collinear_features(30, 12), _collinear_features(5, 12)
    scales = [1e-4, 1e-2, 1.0]
    by_c = {}
    for factor in (1.0, 37.0):
        solver = KernelSolver.from_features(factor * train)
        lambdas = [c * solver.lambda_unit for c in scales]
        swept = readouts.sweep(method, factor * queries, factor * train, lambdas, solver=solver)
        by_c[factor] = [swept[lam] for lam in lambdas]
    for plain, scaled in zip(by_c[1.0], by_c[37.0], strict=True):
        np.testing.assert_allclose(scaled, plain, rtol=1e-6, atol=1e-9 * np.abs(plain).max())


def _lds_problem(gradients: np.ndarray, queries: np.ndarray, true_c: float, num_subsets: int = 40):
    """Subset masks and losses that follow the raw-gradient TRAK scores at c = ``true_c`` exactly."""
    solver = KernelSolver.from_features(gradients)
    truth = readouts.sweep("trak", queries, gradients, [true_c * solver.lambda_unit], solver=solver)[
        true_c * solver.lambda_unit
    ]
    masks = np.zeros((num_subsets, len(gradients)), dtype=bool)
    for k in range(num_subsets):
        masks[k, RNG.choice(len(gradients), len(gradients) // 2, replace=False)] = True
    return masks, -(masks @ truth.T)  # lower loss where the kept samples help more


def test_projector_conventions_select_the_same_c_on_the_same_gradients() -> None:
    num_train, num_params, dim = 60, 40, 4096
    gradients = RNG.normal(size=(num_train, num_params)) * np.linspace(3.0, 0.01, num_params)
    queries = RNG.normal(size=(16, num_params)) * np.linspace(3.0, 0.01, num_params)
    masks, losses = _lds_problem(gradients, queries, true_c=1e-2)
    grid = default_scale_grid()
    dense = build_projector("dense", num_params, dim, seed=0)  # scales by 1/sqrt(k)

    def project(projector, rows: np.ndarray) -> np.ndarray:
        return projector.project(torch.as_tensor(rows, dtype=torch.float32)).double().numpy()

    conventions = {
        "dense": (project(dense, gradients), project(dense, queries)),
        # TRAK's CUDA projector does not scale: the same matrix without 1/sqrt(k)
        "trak_cuda": (np.sqrt(dim) * project(dense, gradients), np.sqrt(dim) * project(dense, queries)),
        "sparse": (
            project(build_projector("sparse", num_params, dim, seed=0), gradients),
            project(build_projector("sparse", num_params, dim, seed=0), queries),
        ),
    }
    selected = {}
    for name, (train, query) in conventions.items():
        solver = KernelSolver.from_features(train)
        swept = readouts.sweep("trak", query, train, [c * solver.lambda_unit for c in grid], solver=solver)
        by_c = {c: swept[c * solver.lambda_unit] for c in grid}
        heldout, _ = evaluate_method(by_c, masks, losses, "trak", "val", num_resamples=20)
        selected[name] = heldout.lambda_
    assert selected["dense"] == selected["trak_cuda"] == selected["sparse"], selected
    assert grid_edge(selected["dense"], grid) is None


def test_an_edge_selection_is_flagged_in_the_table() -> None:
    train, queries = _collinear_features(30, 8), _collinear_features(12, 8)
    masks, losses = _lds_problem(train, queries, true_c=1e-6)
    solver = KernelSolver.from_features(train)
    grid = [1e-2, 1e-1, 1.0]  # too narrow: the truth lies below it
    swept = readouts.sweep("trak", queries, train, [c * solver.lambda_unit for c in grid], solver=solver)
    records = evaluate_method(
        {c: swept[c * solver.lambda_unit] for c in grid},
        masks,
        losses,
        "trak",
        "val",
        20,
        0,
        solver.lambda_unit,
    )
    assert records[1].edge == "low" and records[1].lambda_absolute == pytest.approx(1e-2 * solver.lambda_unit)
    table = markdown_table(records)
    assert "trak/val/oracle: low edge" in table and " *" in table


def test_heldout_halves_split_queries_and_optionally_subsets() -> None:
    halves = heldout_halves(10, 8, "queries_and_subsets", seed=3)
    assert set(halves.selection_queries) | set(halves.report_queries) == set(range(10))
    assert not set(halves.selection_queries) & set(halves.report_queries)
    assert set(halves.selection_subsets) | set(halves.report_subsets) == set(range(8))
    assert not set(halves.selection_subsets) & set(halves.report_subsets)
    assert heldout_halves(10, 8, "queries").report_subsets is None
    with pytest.raises(ValueError, match="lds.heldout"):
        heldout_halves(10, 8, "nope")


def test_lambda_downstream_comes_from_the_heldout_selection(tmp_path) -> None:
    lds_file = tmp_path / "lds.json"
    assert choose_scale(lds_file, "das", "val", 0.01).source == "method.lambda_scale"
    records = [
        {"method": "das", "query_set": "val", "lambda_selection": "oracle", "lambda_scale": 0.5},
        {"method": "das", "query_set": "val", "lambda_selection": "heldout", "lambda_scale": 0.002},
    ]
    lds_file.write_text(json.dumps({"version": LDS_JSON_VERSION, "records": records}))
    chosen = choose_scale(lds_file, "das", "val", 0.01)
    assert chosen.scale == 0.002 and "held-out" in chosen.source
    assert chosen.describe(10.0)["lambda"] == pytest.approx(0.02)
    assert selected_scale(lds_file, "das", "generated") is None
    lds_file.write_text(json.dumps({"version": 1, "records": records}))  # absolute lambdas: never reused as c
    assert selected_scale(lds_file, "das", "val") is None


# ------------------------------------------------------------------------------------------ residual variants


def _quadratic_problem(num_train: int, dim: int, lam: float):
    """Objective sum_i [(phi_i^T theta)^2 / 2 - b_i^T theta] + lam |theta|^2 / 2: the Gauss-Newton Hessian is
    K + lam I as DAS assumes, but each sample's own gradient phi_i phi_i^T theta - b_i is NOT parallel to phi_i."""
    train = RNG.normal(size=(num_train, dim))
    pulls = RNG.normal(size=(num_train, dim))
    queries = RNG.normal(size=(7, dim))
    hessian = train.T @ train + lam * np.eye(dim)
    theta = np.linalg.solve(hessian, pulls.sum(0))
    psi = pulls - train * (train @ theta)[:, None]  # minus each sample's own loss gradient at theta*
    change = np.empty((len(queries), num_train))
    for i in range(num_train):
        keep = np.arange(num_train) != i
        without_i = np.linalg.solve(train[keep].T @ train[keep] + lam * np.eye(dim), pulls[keep].sum(0))
        change[:, i] = queries @ (theta - without_i)  # f_theta*(q) - f_theta\i(q), refitted from scratch
    return queries, train, psi, change


@pytest.mark.parametrize(("num_train", "dim"), [(30, 6), (10, 25)])  # kernel form, and Gram form (k > N)
def test_exact_residual_equals_brute_force_leave_one_out(num_train: int, dim: int) -> None:
    lam = 0.3
    queries, train, psi, change = _quadratic_problem(num_train, dim, lam)
    signed = readouts.das(queries, train, lam, train_psi=psi, square=False)
    np.testing.assert_allclose(signed, change, rtol=1e-7, atol=1e-10 * np.abs(change).max())
    np.testing.assert_allclose(readouts.das(queries, train, lam, train_psi=psi), change**2, rtol=1e-6)
    # the one-step form with the best scalar residual per sample is not the refit when psi is not parallel to phi
    best_scalar = (psi * train).sum(1) / (train * train).sum(1)
    one_step = readouts.das(queries, train, lam, residuals=best_scalar, square=False)
    assert not np.allclose(one_step, change, rtol=1e-2)


def test_exact_residual_reduces_to_the_one_step_form_when_psi_is_parallel() -> None:
    train, queries = RNG.normal(size=(25, 5)), RNG.normal(size=(4, 5))
    residuals = RNG.normal(size=25)
    exact = readouts.das(queries, train, 0.7, train_psi=residuals[:, None] * train)
    np.testing.assert_allclose(exact, readouts.das(queries, train, 0.7, residuals=residuals), rtol=1e-8)
    with pytest.raises(ValueError, match="leverage"):
        readouts.das(queries, train, 0.7, train_psi=train, leverage=False)


def test_magnitude_residual_is_the_relative_size_of_the_loss() -> None:
    losses = np.array([[1.0, 1.0], [4.0, 4.0], [9.0, 9.0]])
    np.testing.assert_allclose(magnitude_residuals(losses), np.array([1.0, 2.0, 3.0]) / 2.0)
    np.testing.assert_allclose(magnitude_residuals(100 * losses), magnitude_residuals(losses))
