"""EK-FAC's one pass over the training set (issue 18): every c of the grid from one pass, equal to kronfluence's own
pass per damping value; c on the kernel methods' scale (an EK-FAC score is N x the gradient kernel's where G is
exact); the training gradients the feature stores see, draws included; queries split over passes; score stores
resumed, reused, and never reused under another unit rule or grid."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from das_lightning.attribution.context import ScoringContext
from das_lightning.attribution.features import CollectionDevice, FeatureSettings
from das_lightning.attribution.methods import build_method
from das_lightning.attribution.projectors import ProjectorSettings
from das_lightning.attribution.settings import KernelSettings

pytest.importorskip("kronfluence")

from test_ekfac import SMALL_LAYERS, ekfac_scores, ekfac_settings, toy_inputs  # noqa: E402

from das_lightning.attribution.methods import ekfac, ekfac_support  # noqa: E402

GRID = [1e-4, 1e-2, 1.0]


def context_of(inputs, settings) -> ScoringContext:
    return ScoringContext(inputs, settings, CollectionDevice(enable_progress_bar=False), None)


def kronfluence_scores(inputs, settings) -> dict[float, np.ndarray]:
    """kronfluence's own scores of the "val" queries, one pass over the training set per damping c x unit, from
    the factors the method fitted (the path the method took before issue 18)."""
    method = build_method(settings)
    context = context_of(inputs, settings)
    fitted = method.fitted(context)
    features, model = settings.features, inputs.model
    queries = model.model_space(inputs.query_sets["val"])
    task = ekfac_support.DiffusionTask(
        model.alphas_cumprod,
        features.timestep_list(),
        features.e_seed,
        fitted.train_set.set_name,
        queries.set_name,
        measurement=ekfac.MEASUREMENTS[settings.measurement],
        tracked_modules=fitted.factor_manifest["tracked_modules"],
        draws_per_timestep=features.draws_per_timestep,
        antithetic=features.antithetic,
    )
    folder = method.factors_folder(context)
    analyzer = ekfac_support.make_analyzer(model.network, task, folder.parent, folder.name, cpu=True)
    return {
        c: ekfac_support.pairwise_scores(
            analyzer, f"reference-c{c:g}", queries, fitted.train_set, c * fitted.unit, 4
        )
        .double()
        .numpy()
        for c in settings.lambda_scales
    }


@pytest.mark.parametrize(
    ("strategy", "measurement", "draws"),
    [
        ("ekfac", "loss", {}),
        ("kfac", "loss", {}),
        ("diagonal", "mean", {}),
        ("ekfac", "square_norm", {"draws_per_timestep": 2, "antithetic": True}),
    ],
)
def test_one_pass_equals_kronfluence_pass_per_damping(
    tmp_path: Path, strategy: str, measurement: str, draws: dict
) -> None:
    """Every c of the grid from one pass equals kronfluence's scores at damping c x trace(G)/N, one pass each.
    Measured: at most 5.5e-7 of the largest score (float32 on both sides, rotations in another order)."""
    inputs = toy_inputs(tmp_path)
    settings = ekfac_settings(
        param_pattern=SMALL_LAYERS,
        ekfac_strategy=strategy,
        measurement=measurement,
        lambda_scales=GRID,
        lambda_scale=GRID[1],
        features=draws,
    )
    scores, result = ekfac_scores(inputs, settings)
    reference = kronfluence_scores(inputs, settings)
    for c in GRID:
        assert scores[c].shape == (3, 12)
        np.testing.assert_allclose(scores[c], reference[c], rtol=0, atol=1e-5 * np.abs(reference[c]).max())
    assert not np.allclose(scores[GRID[0]], scores[GRID[-1]] * scores[GRID[0]].max() / scores[GRID[-1]].max())


def test_ekfac_c_is_the_kernel_methods_c(tmp_path: Path, monkeypatch) -> None:
    """Where G is exactly the per-example second moment of the gradients, K / N, EK-FAC's score at c is N x the
    gradient kernel's score phi_q^T (K + c trace(K)/N I)^-1 phi_i of TRAK with the identity projector, at every c:
    the unit trace(G)/N is the kernel's trace(K)/N on EK-FAC's per-example scale.

    The exact case: one output channel (conv_out of a one-channel UNet), so G's Kronecker eigenbasis Q_g (x) Q_a
    with Q_g = [1] can be K's own eigenbasis; the factors kronfluence fitted are replaced by it."""
    inputs = toy_inputs(tmp_path, channels=1)
    num_train = len(inputs.train_set)
    pattern = r"^conv_out\."
    draws = {"draws_per_timestep": 2, "antithetic": True}  # the draw settings reach both methods alike
    trak = KernelSettings(
        name="trak",
        kind="trak",
        features=FeatureSettings(
            name="trak",
            output_function="loss",
            normalize="none",
            num_timesteps=2,
            batch_size=8,
            param_pattern=pattern,
            projector=ProjectorSettings(kind="identity", dim=None),
            **draws,
        ),
        lambda_scales=GRID,
        lambda_scale=GRID[1],
    )
    kernel_context = context_of(inputs, trak)
    kernel = build_method(trak).scores(kernel_context, "val")
    features = torch.as_tensor(np.asarray(kernel_context.train_store().features), dtype=torch.float64)
    second_moment = (
        features.T @ features / num_train
    )  # K / N, (73, 73): conv_out's 8 x 3 x 3 weights and bias
    eigenvalues, eigenvectors = torch.linalg.eigh(second_moment)
    exact = {
        "conv_out": {
            "activation_eigenvectors": eigenvectors.float(),
            "gradient_eigenvectors": torch.ones(1, 1),
            "eigenvalues": eigenvalues.clamp_min(0.0)[None, :],
        }
    }
    monkeypatch.setattr(ekfac_support, "load_factors", lambda folder, strategy: exact)
    settings = ekfac_settings(param_pattern=pattern, lambda_scales=GRID, lambda_scale=GRID[1], features=draws)
    scores, result = ekfac_scores(inputs, settings)
    np.testing.assert_allclose(result.lambda_unit * num_train, kernel.lambda_unit, rtol=1e-6)
    np.testing.assert_allclose(result.spectrum, kernel.spectrum, rtol=1e-4)
    for c in GRID:
        expected = num_train * kernel.by_scale[c]
        np.testing.assert_allclose(scores[c], expected, rtol=0, atol=2e-4 * np.abs(expected).max())


def test_identity_ekfac_scores_the_feature_stores_gradients(tmp_path: Path) -> None:
    """One noise rule: under the same draw settings (two antithetic draws at stratified timesteps, each draw
    unit-normalised) EK-FAC's training and query gradients are the rows of the identity-projected feature stores,
    so its identity-strategy score is their dot product."""
    inputs = toy_inputs(tmp_path)
    draws = {"draws_per_timestep": 2, "antithetic": True, "sampling": "stratified", "normalize": "draw"}
    settings = ekfac_settings(param_pattern=SMALL_LAYERS, ekfac_strategy="identity", features=draws)
    scores, result = ekfac_scores(inputs, settings)
    stores = KernelSettings(
        name="trak",
        kind="trak",
        features=replace(
            settings.features,
            name="trak",
            output_function="loss",
            projector=ProjectorSettings(kind="identity", dim=None),
        ),
    )
    context = context_of(inputs, stores)
    train = np.asarray(context.train_store().features, dtype=np.float64)
    queries = np.asarray(context.query_store("val").features, dtype=np.float64)
    expected = queries @ train.T
    assert result.lambda_unit == 1.0
    np.testing.assert_allclose(scores[0.1], expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_queries_split_over_passes_score_the_same(tmp_path: Path, monkeypatch) -> None:
    """Rotated queries over ``QUERY_GRADIENT_BYTES`` go in parts, one pass each, to the same scores."""
    inputs = toy_inputs(tmp_path)
    settings = ekfac_settings(param_pattern=SMALL_LAYERS, lambda_scales=GRID, lambda_scale=GRID[1])
    whole, _ = ekfac_scores(inputs, settings)
    monkeypatch.setattr(ekfac, "QUERY_GRADIENT_BYTES", 4 * 803 * 2)  # two of the 803-parameter rows a pass
    split, _ = ekfac_scores(inputs, settings)
    assert ekfac.scoring_passes([3], 803) == 2 and ekfac.scoring_passes([1, 1], 803) == 1  # what plans count
    stores = sorted(
        path.name for path in (tmp_path / "features" / "ekfac" / "ekfac-sampled" / "scores").iterdir()
    )
    assert len(stores) == 3 and sum("-q0-2-" in name or "-q2-3-" in name for name in stores) == 2
    for c in GRID:
        np.testing.assert_allclose(split[c], whole[c], rtol=1e-6, atol=1e-7 * np.abs(whole[c]).max())


def test_grid_diagonals_recomputed_per_batch_score_the_same(tmp_path: Path, monkeypatch) -> None:
    """Past ``INVERSE_WEIGHTS_BYTES`` (a large network's grid) the diagonals 1 / (Lambda + d) are recomputed per
    training batch instead of kept: the same scores."""
    settings = ekfac_settings(param_pattern=SMALL_LAYERS, lambda_scales=GRID, lambda_scale=GRID[1])
    for name in ("kept", "recomputed"):  # two run folders: nothing of the first is reused by the second
        (tmp_path / name).mkdir()
    kept, _ = ekfac_scores(toy_inputs(tmp_path / "kept"), settings)
    monkeypatch.setattr(ekfac, "INVERSE_WEIGHTS_BYTES", 0)
    recomputed, _ = ekfac_scores(toy_inputs(tmp_path / "recomputed"), settings)
    for c in GRID:
        np.testing.assert_allclose(recomputed[c], kept[c], rtol=1e-6, atol=1e-7 * np.abs(kept[c]).max())


def test_score_stores_resume_are_reused_and_never_cross_units_or_grids(tmp_path: Path, monkeypatch) -> None:
    inputs = toy_inputs(tmp_path)
    settings = ekfac_settings(param_pattern=r"^conv_out\.", lambda_scales=GRID, lambda_scale=GRID[1])
    first, _ = ekfac_scores(inputs, settings)
    root = tmp_path / "features" / "ekfac" / "ekfac-sampled" / "scores"
    (store,) = root.iterdir()
    manifest = (store / "manifest.json").read_text()
    assert ekfac.UNIT_RULE in manifest
    written = (store / "features.npy").stat().st_mtime_ns

    # a finished store is read as it is by a fresh run
    again, _ = ekfac_scores(inputs, settings)
    assert (store / "features.npy").stat().st_mtime_ns == written
    for c in GRID:
        np.testing.assert_array_equal(again[c], first[c])

    # a pass killed after some rows: the next run scores the missing rows only, to the same scores
    done = np.load(store / "done.npy", mmap_mode="r+")
    done[3:8] = 0
    done.flush()
    del done
    resumed, _ = ekfac_scores(inputs, settings)
    assert np.load(store / "done.npy").all()
    for c in GRID:
        np.testing.assert_allclose(resumed[c], first[c], rtol=1e-6, atol=1e-7 * np.abs(first[c]).max())
    written = (store / "features.npy").stat().st_mtime_ns

    # another grid, or scores made under another unit rule, are other stores: never read for these
    ekfac_scores(inputs, replace(settings, lambda_scales=[1e-3, 1e-1]))
    monkeypatch.setattr(ekfac, "UNIT_RULE", "damping = c x trace(G) / P")
    ekfac_scores(inputs, settings)
    assert len(list(root.iterdir())) == 3
    assert (store / "features.npy").stat().st_mtime_ns == written
