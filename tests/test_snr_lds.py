"""SNR-LDS (METHOD.md §7): background fit, row selection, failure accounting, and the LDS on the kept rows, under
the author's rule (the default: the signed pre-square score fitted, failed and empty queries count 0) and the first
rule (``rule="stored"``: the stored scores fitted, the mean over valid queries)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from das_lightning.errors import ConfigError
from das_lightning.evaluation.lds import lds_per_query
from das_lightning.evaluation.lds_report import snr_table
from das_lightning.evaluation.pipeline import LDSSettings
from das_lightning.evaluation.snr_lds import (
    DEFAULT_SNR_RULE,
    SNR_LDS_LABEL,
    SignUnavailableError,
    fit_background,
    select_rows,
    signed_inputs,
    snr_lds,
    snr_row,
)
from das_lightning.manifest import FILES_KEY, file_record, write_manifest

from conftest import compose

NUM_PLANTED = 10


def planted_scores(num_queries: int, num_train: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian background (a different sigma per query) + NUM_PLANTED rows at +-12 sigma: (Q x N scores, sigmas)."""
    rng = np.random.default_rng(seed)
    sigmas = rng.uniform(0.5, 3.0, size=num_queries)
    scores = rng.normal(size=(num_queries, num_train)) * sigmas[:, None]
    signs = rng.choice([-1.0, 1.0], size=(num_queries, NUM_PLANTED))
    scores[:, :NUM_PLANTED] = 12.0 * sigmas[:, None] * signs
    return scores, sigmas


def test_planted_rows_selected_and_sigma_recovered() -> None:
    """Every planted row is kept; sigma is recovered within ~10% (median within 5%, every query within 12%).

    The rule's own precision (the curvature of a KDE within +-1 MAD; the Silverman bandwidth is not deconvolved, +1 to
    2%), measured on 200 queries with 10 planted rows: 90% of the fitted sigmas lie in [0.91, 1.17] x sigma at
    N = 2000 and in [0.96, 1.08] at N = 10000; hence N = 8000 here (ratios 0.93 to 1.11 for these 8 queries).
    """
    scores, sigmas = planted_scores(num_queries=8, num_train=8000)
    fit = fit_background(scores)
    assert fit.status == ("ok",) * 8
    ratio = fit.sigma.numpy() / sigmas
    assert abs(np.median(ratio) - 1.0) < 0.05, ratio
    assert np.all(np.abs(ratio - 1.0) < 0.12), ratio
    selected = select_rows(scores, fit).numpy()
    assert selected[:, :NUM_PLANTED].all()
    # background rows above 3 sigma: 0.27% of them, a few dozen at most
    assert selected[:, NUM_PLANTED:].mean() < 0.005


def test_scale_invariance() -> None:
    """The rule is scale-free: scaling a query's scores scales sigma and keeps the selection."""
    scores, _ = planted_scores(num_queries=3, num_train=2000, seed=1)
    fit, fit_scaled = fit_background(scores), fit_background(scores * 1e-4)
    torch.testing.assert_close(fit_scaled.sigma, fit.sigma * 1e-4)
    assert torch.equal(select_rows(scores, fit), select_rows(scores * 1e-4, fit_scaled))


def test_background_only_query_selects_almost_nothing() -> None:
    rng = np.random.default_rng(2)
    scores = rng.normal(size=(4, 4000)) * 0.3
    fit = fit_background(scores)
    assert fit.status == ("ok",) * 4
    assert select_rows(scores, fit).numpy().mean(axis=1).max() < 0.01  # ~0.27% expected beyond 3 sigma


def test_degenerate_queries_are_fit_failures_not_errors() -> None:
    """Constant (and all-zero) scores cannot be fitted: counted as fit failures, apart from empty selections."""
    rng = np.random.default_rng(3)
    num_subsets, num_train = 16, 500
    scores = rng.normal(size=(4, num_train))
    scores[0] = 2.5  # constant
    scores[1] = 0.0  # all zero
    scores[2] = rng.normal(size=num_train) * 1e-3  # pure background at a tiny scale: fits, keeps ~nothing
    masks = rng.random((num_subsets, num_train)) < 0.5
    losses = rng.normal(size=(num_subsets, 4))
    # at 6 sigma a Gaussian background keeps nothing
    result = snr_lds(scores, masks, losses, zeta=6.0, rule="stored")
    assert result.fit.status[:2] == ("constant_scores", "constant_scores")
    assert result.query_status[:3] == ("fit_failed", "fit_failed", "empty")
    assert result.num_fit_failed == 2 and result.num_empty >= 1
    assert torch.isnan(result.per_query[:3]).all()
    assert not result.selected[:2].any()
    summary = result.summary()
    assert summary["fit_failures"] == {"constant_scores": 2}
    assert (
        summary["num_valid"] + summary["num_fit_failed"] + summary["num_empty"] + summary["num_undefined"]
        == 4
    )


def test_lds_on_selected_rows_equals_hand_computed() -> None:
    """SNR-LDS(q) = lds_per_query on the scores with every unselected row zeroed, for the valid queries."""
    num_queries, num_train, num_subsets = 12, 3000, 24
    scores, _ = planted_scores(num_queries, num_train, seed=4)
    rng = np.random.default_rng(5)
    masks = rng.random((num_subsets, num_train)) < 0.5
    # the ground truth depends on the planted rows plus noise
    losses = -(masks[:, :NUM_PLANTED] @ scores[:, :NUM_PLANTED].T) + 20.0 * rng.normal(
        size=(num_subsets, num_queries)
    )
    result = snr_lds(scores, masks, losses)
    assert result.label == SNR_LDS_LABEL and "not comparable" in result.label
    assert result.rule == DEFAULT_SNR_RULE == "author"
    assert result.num_valid == num_queries
    by_hand = lds_per_query(np.where(result.selected.numpy(), scores, 0.0), masks, losses)
    torch.testing.assert_close(result.per_query, by_hand)
    assert result.mean == pytest.approx(float(by_hand.mean()))
    # here the background rows are pure noise in the predictions: restricting to the planted rows helps
    assert result.mean > float(lds_per_query(scores, masks, losses).mean())


def test_fit_scores_select_while_scores_aggregate() -> None:
    """A squared readout: fit and select on the signed scores, aggregate the squares (as for DAS)."""
    scores, _ = planted_scores(num_queries=3, num_train=2000, seed=6)
    rng = np.random.default_rng(7)
    masks = rng.random((12, 2000)) < 0.5
    losses = rng.normal(size=(12, 3))
    result = snr_lds(scores**2, masks, losses, fit_scores=scores, readout="square")
    assert torch.equal(result.selected, select_rows(scores, fit_background(scores)))
    by_hand = lds_per_query(np.where(result.selected.numpy(), scores**2, 0.0), masks, losses)
    valid = ~torch.isnan(result.per_query)
    torch.testing.assert_close(result.per_query[valid], by_hand[valid])


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match="losses"):
        snr_lds(np.ones((2, 5)), np.ones((3, 5), dtype=bool), np.ones((2, 3)))
    with pytest.raises(ValueError, match="zeta"):
        select_rows(np.ones((1, 5)), fit_background(np.arange(5.0)[None]), zeta=0.0)


# ---------------------------------------------------------------------- the author's rule against the stored rule


def test_signed_fit_keeps_the_strong_rows_the_squares_fit_keeps_a_larger_set() -> None:
    """Strong rows of both signs among a Gaussian background, read out squared: fitting the signed pre-square scores
    keeps the planted rows and a few background ones (~0.27% beyond 3 sigma); fitting the stored squares (all >= 0,
    a chi-square taken for a zero-mean Gaussian) keeps hundreds of background rows besides."""
    signed, _ = planted_scores(num_queries=4, num_train=2000, seed=8)
    rng = np.random.default_rng(9)
    masks = rng.random((12, 2000)) < 0.5
    losses = rng.normal(size=(12, 4))
    author = snr_lds(signed**2, masks, losses, fit_scores=signed, readout="square")
    stored = snr_lds(signed**2, masks, losses, rule="stored")
    planted = np.zeros((4, 2000), dtype=bool)
    planted[:, :NUM_PLANTED] = True
    kept_author, kept_stored = author.selected.numpy(), stored.selected.numpy()
    assert kept_author[planted].all() and kept_author[~planted].mean() < 0.006
    assert (kept_author & ~kept_stored).sum() == 0  # the squares keep these too, and far more
    assert (kept_stored.sum(axis=1) > 10 * kept_author.sum(axis=1)).all(), kept_stored.sum(axis=1)
    # the kept rows aggregate the readout, s^2
    by_hand = lds_per_query(np.where(kept_author, signed**2, 0.0), masks, losses)
    torch.testing.assert_close(author.per_query, by_hand)


def test_signed_square_is_fitted_on_its_signed_root() -> None:
    """sign(s) s^2 keeps the sign: the author rule fits sign(v) sqrt(|v|) = s without help, aggregates v."""
    signed, _ = planted_scores(num_queries=3, num_train=2000, seed=10)
    stored = signed * np.abs(signed)
    rng = np.random.default_rng(11)
    masks = rng.random((12, 2000)) < 0.5
    losses = -(masks[:, :NUM_PLANTED] @ stored[:, :NUM_PLANTED].T) + rng.normal(size=(12, 3))
    result = snr_lds(stored, masks, losses, readout="signed_square")
    assert torch.equal(result.selected, select_rows(signed, fit_background(signed)))
    torch.testing.assert_close(
        result.per_query, lds_per_query(np.where(result.selected.numpy(), stored, 0.0), masks, losses)
    )
    # the stored rule fits the signed squares themselves: another, larger set
    assert snr_lds(stored, masks, losses, rule="stored").selected.sum() > 10 * result.selected.sum()


def test_a_plain_square_without_its_signed_scores_is_refused_by_the_author_rule() -> None:
    signed, _ = planted_scores(num_queries=2, num_train=500, seed=12)
    masks = np.random.default_rng(13).random((8, 500)) < 0.5
    losses = np.random.default_rng(14).normal(size=(8, 2))
    with pytest.raises(ValueError, match="keeps no sign"):
        snr_lds(signed**2, masks, losses, readout="square")
    assert snr_lds(signed**2, masks, losses, readout="square", rule="stored").rule == "stored"
    with pytest.raises(ConfigError, match="lds.snr_rule must be one of"):
        snr_lds(signed, masks, losses, rule="signed")


def test_failed_and_empty_queries_count_zero_under_the_author_rule_and_are_dropped_under_the_stored() -> None:
    """Query 0 is valid, query 1 constant (a failed fit), query 2 pure background (empty at 6 sigma)."""
    rng = np.random.default_rng(15)
    num_train, num_subsets = 600, 16
    scores = rng.normal(size=(3, num_train))
    scores[0, :NUM_PLANTED] = 20.0 * rng.choice([-1.0, 1.0], size=NUM_PLANTED)
    scores[1] = 2.5
    masks = rng.random((num_subsets, num_train)) < 0.5
    losses = -(masks @ np.where(np.arange(num_train) < NUM_PLANTED, scores, 0.0).T) + rng.normal(
        size=(num_subsets, 3)
    )
    author = snr_lds(scores, masks, losses, zeta=6.0)
    stored = snr_lds(scores, masks, losses, zeta=6.0, rule="stored")
    for result in (author, stored):
        assert result.query_status == ("valid", "fit_failed", "empty")  # counted apart under both rules
        summary = result.summary()
        assert (summary["num_valid"], summary["num_fit_failed"], summary["num_empty"]) == (1, 1, 1)
    valid = float(lds_per_query(np.where(author.selected.numpy(), scores, 0.0), masks, losses)[0])
    assert valid > 0.5
    assert author.mean == pytest.approx((valid + 0.0 + 0.0) / 3) and stored.mean == pytest.approx(valid)
    assert author.per_query.tolist()[1:] == [0.0, 0.0] and torch.isnan(stored.per_query[1:]).all()
    assert author.summary()["snr_lds"] == pytest.approx(100 * valid / 3)


# ------------------------------------------------------------- the LDS stage: a method's readout from its manifest


def _score_folder(
    scores_dir: Path, name: str, kind: str, stacked: np.ndarray, square: str | None, **extra: object
) -> None:
    """A finished score folder as attribute.py writes it (the manifest keys signed_inputs compares)."""
    folder = scores_dir / name / "val"
    folder.mkdir(parents=True)
    np.save(folder / "scores.npy", stacked.astype(np.float32))
    settings = {"name": name, "kind": kind, "features": {"name": kind, "num_timesteps": 15}}
    if square is not None:
        settings |= {"square": square, "lambda_scales": [0.1, 1.0]}
    manifest = {
        "method": settings,
        "lambda_scales": [0.1, 1.0],
        "lambda_unit": 2.0,
        "checkpoint": "abc",
        "train_set": "train",
        "num_train": stacked.shape[-1],
        "query_set": "val",
        "num_queries": stacked.shape[1],
        "complete": True,
        FILES_KEY: {"scores.npy": file_record(folder / "scores.npy")},
        **extra,
    }
    write_manifest(folder, manifest)


@pytest.fixture
def scores_dir(tmp_path: Path) -> Path:
    """trak (linear), trak_squared (its square), das (a square whose linear readout was scored only for another
    model), ekfac_signed_square, pixel (no readout power, no lambda)."""
    rng = np.random.default_rng(16)
    signed = rng.normal(size=(2, 3, 200))  # c x queries x train
    das = rng.normal(size=(2, 3, 200))
    _score_folder(tmp_path, "trak", "trak", signed, "linear")
    _score_folder(tmp_path, "trak_squared", "trak", signed**2, "square")
    _score_folder(tmp_path, "das", "das", das**2, "square")
    _score_folder(tmp_path, "das_signed", "das", das, "linear", checkpoint="another model")
    _score_folder(tmp_path, "ekfac_signed_square", "ekfac", signed * np.abs(signed), "signed_square")
    _score_folder(tmp_path, "pixel", "pixel", signed[:1], None, lambda_scales=None, lambda_unit=None)
    return tmp_path


def _stored(scores_dir: Path, name: str, row: int) -> np.ndarray:
    return np.load(scores_dir / name / "val" / "scores.npy")[row]


def test_signed_inputs_follow_each_methods_readout(scores_dir: Path) -> None:
    linear = signed_inputs(scores_dir, "pixel", "val", None, _stored(scores_dir, "pixel", 0))
    assert (linear.readout, linear.fit_scores) == ("linear", None)
    signed_square = signed_inputs(
        scores_dir, "ekfac_signed_square", "val", 1.0, _stored(scores_dir, "ekfac_signed_square", 1)
    )
    assert (signed_square.readout, signed_square.fit_scores) == ("signed_square", None)
    # a plain square: the sign comes from the linear sibling (same settings but name and readout), at the same c
    squared = signed_inputs(scores_dir, "trak_squared", "val", 1.0, _stored(scores_dir, "trak_squared", 1))
    assert squared.readout == "square" and squared.fit_on == "signed scores of trak"
    np.testing.assert_array_equal(squared.fit_scores, _stored(scores_dir, "trak", 1).astype(np.float64))


def test_a_square_whose_sign_is_lost_is_refused_by_name(scores_dir: Path) -> None:
    """das's only linear readout was scored with another checkpoint: no sibling, refused with what would work."""
    with pytest.raises(SignUnavailableError) as refusal:
        signed_inputs(scores_dir, "das", "val", 1.0, _stored(scores_dir, "das", 1))
    message = str(refusal.value)
    assert "'das'" in message and "keeps no sign" in message and "lds.snr_rule=stored" in message
    assert "method.square=linear" in message and "tried" not in message
    # the LDS stage reports the refusal as the method's row, named in the table, and goes on
    rng = np.random.default_rng(17)
    masks, losses = rng.random((8, 200)) < 0.5, rng.normal(size=(8, 3))
    row = snr_row(scores_dir, "das", "val", 1.0, _stored(scores_dir, "das", 1), masks, losses, 3.0, "author")
    assert row["method"] == "das" and "keeps no sign" in row["refused"]
    kept = snr_row(
        scores_dir,
        "trak_squared",
        "val",
        1.0,
        _stored(scores_dir, "trak_squared", 1),
        masks,
        losses,
        3.0,
        "author",
    )
    table = snr_table([kept, row])
    assert "rule = author" in table.splitlines()[1] and "| das | val | refused |" in table
    assert (
        "signed scores of trak" in table and "- das, val: SNR-LDS (lds.snr_rule=author) cannot fit" in table
    )
    # the stored rule fits the squares themselves
    stored = snr_row(
        scores_dir, "das", "val", 1.0, _stored(scores_dir, "das", 1), masks, losses, 3.0, "stored"
    )
    assert stored["rule"] == "stored" and "refused" not in stored
    assert "rule = stored" in snr_table([stored]).splitlines()[1]


def test_a_squared_ensemble_is_refused(tmp_path: Path) -> None:
    signed = np.random.default_rng(18).normal(size=(2, 3, 50))
    _score_folder(tmp_path, "trak", "trak", signed, "linear")
    ensemble = [{"seed": 0}, {"seed": 1}]
    _score_folder(tmp_path, "trak_squared_seeds0-1", "trak", signed**2, "square", ensemble=ensemble)
    with pytest.raises(SignUnavailableError, match="ensemble of square readouts"):
        signed_inputs(tmp_path, "trak_squared_seeds0-1", "val", 1.0, signed[1] ** 2)


def test_the_rule_is_a_setting_with_the_authors_as_default() -> None:
    from das_lightning.cli import to_plain

    settings = LDSSettings(**to_plain(compose("evaluate_lds", []).lds))
    assert settings.snr_rule == "author"
    settings.validate()
    with pytest.raises(
        ConfigError, match="lds.snr_rule must be one of \\['author', 'stored'\\], not 'squares'"
    ):
        LDSSettings(snr_rule="squares").validate()


def test_a_sibling_whose_square_is_not_the_stored_score_is_not_used(scores_dir: Path) -> None:
    """Same settings, but trak's scores squared are not trak_squared's (e.g. one was rescored): refused, naming it."""
    stored = _stored(scores_dir, "trak_squared", 1) * 1.5
    with pytest.raises(
        SignUnavailableError, match=r"tried: trak \(its square differs from the stored scores\)"
    ):
        signed_inputs(scores_dir, "trak_squared", "val", 1.0, stored)
    with pytest.raises(SignUnavailableError, match=r"trak \(no c = 3 on its grid\)"):
        signed_inputs(scores_dir, "trak_squared", "val", 3.0, stored)
