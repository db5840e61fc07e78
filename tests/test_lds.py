"""Properties of the LDS: hand-computed values, agreement with scipy, honest lambda choice, paired bootstrap."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import spearmanr
from torchmetrics.functional import spearman_corrcoef

from das_lightning.evaluation.intervals import paired_two_way_difference, two_way_bootstrap
from das_lightning.evaluation.lambda_selection import heldout_split, lds_by_lambda, select_lambda
from das_lightning.evaluation.lds import lds_per_query
from das_lightning.evaluation.lds_report import (
    evaluate_method,
    markdown_table,
    paired_difference,
    plot_lds_vs_lambda,
)
from das_lightning.selection import write_lds_json


def synthetic_problem(
    num_subsets: int, num_queries: int = 40, num_train: int = 60, noise: float = 1.0, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True attributions, random half-subsets, and losses that drop when helpful samples are kept (plus noise)."""
    rng = np.random.default_rng(seed)
    true_scores = rng.normal(size=(num_queries, num_train))  # Q x N
    masks = rng.random((num_subsets, num_train)) < 0.5  # M x N
    losses = -(masks @ true_scores.T) + noise * rng.normal(size=(num_subsets, num_queries)) * 4.0  # M x Q
    return true_scores, masks, losses


def test_lds_matches_hand_computed_tiny_case() -> None:
    scores = np.array([[1.0, 2.0, 4.0], [3.0, -1.0, 0.0]])  # 2 queries x 3 train
    masks = np.array([[1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 0, 0]], dtype=bool)  # 4 subsets x 3 train
    losses = np.array([[0.4, 0.3], [0.2, 0.1], [0.1, 0.2], [0.5, 0.4]])  # 4 subsets x 2 queries
    # query 0: g = (3, 5, 6, 1) and -L = (-.4, -.2, -.1, -.5) share the order -> 1
    # query 1: g = (2, 3, -1, 3), ranks (2, 3.5, 1, 3.5); -L ranks (2, 4, 3, 1): cov -0.5 / sqrt(4.5 * 5)
    expected = torch.tensor([1.0, -1.0 / math.sqrt(90.0)], dtype=torch.float64)
    torch.testing.assert_close(lds_per_query(scores, masks, losses), expected)


def test_lds_per_query_matches_scipy_and_torchmetrics_with_ties() -> None:
    rng = np.random.default_rng(1)
    scores = rng.integers(-2, 3, size=(200, 12)).astype(float)  # small integers: many tied predictions
    masks = rng.random((25, 12)) < 0.5
    losses = np.round(rng.normal(size=(25, 200)), 1)  # rounded: tied losses too
    ours = lds_per_query(scores, masks, losses).numpy()
    predictions = masks.astype(float) @ scores.T
    reference = np.array([spearmanr(predictions[:, q], -losses[:, q]).statistic for q in range(200)])
    np.testing.assert_allclose(ours, reference, atol=1e-10)
    # torchmetrics adds eps=1e-6 to the denominator, hence the looser tolerance
    metrics = spearman_corrcoef(torch.tensor(predictions), torch.tensor(-losses)).numpy()
    np.testing.assert_allclose(ours, metrics, atol=1e-5)


def test_constant_query_is_nan_and_excluded_from_the_mean() -> None:
    scores, masks, losses = synthetic_problem(num_subsets=30, num_queries=6)
    losses[:, 2] = 0.7  # every subset model has the same loss on query 2
    per_query = lds_per_query(scores, masks, losses)
    assert torch.isnan(per_query[2]) and not torch.isnan(per_query[[0, 1, 3, 4, 5]]).any()
    result = two_way_bootstrap(scores, masks, losses, num_resamples=50)
    assert result.num_undefined == 1
    assert result.estimate == pytest.approx(float(per_query[[0, 1, 3, 4, 5]].mean()))


def test_shape_contract_is_enforced() -> None:
    scores, masks, losses = synthetic_problem(num_subsets=10, num_queries=5)
    with pytest.raises(ValueError, match="subsets x queries"):
        lds_per_query(scores, masks, losses.T)


def test_the_interval_narrows_with_more_subsets() -> None:
    widths = []
    for num_subsets in (16, 256):
        scores, masks, losses = synthetic_problem(num_subsets=num_subsets, seed=num_subsets)
        result = two_way_bootstrap(scores, masks, losses, num_resamples=400, seed=3)
        assert result.corrected_low <= result.corrected <= result.corrected_high
        assert result.estimate == pytest.approx(float(lds_per_query(scores, masks, losses).mean()))
        widths.append(result.corrected_high - result.corrected_low)
    assert widths[1] < 0.75 * widths[0]  # the query part of the spread stays: 16 -> 256 subsets is not 4x


def test_paired_difference_method_beats_its_negation() -> None:
    scores, masks, losses = synthetic_problem(num_subsets=20)
    result = paired_two_way_difference(scores, -scores, masks, losses, num_resamples=200)
    assert result.estimate > 0.5 and result.resolved and result.corrected_low > 0


def test_paired_ci_is_narrower_than_the_unpaired_one() -> None:
    """Two close methods: pairing removes the shared query and subset noise (why METHOD.md asks for it)."""
    scores, masks, losses = synthetic_problem(num_subsets=24, noise=1.5, seed=5)
    rng = np.random.default_rng(9)
    slightly_worse = scores + 0.3 * rng.normal(size=scores.shape)
    a = two_way_bootstrap(scores, masks, losses, num_resamples=300)
    b = two_way_bootstrap(slightly_worse, masks, losses, num_resamples=300)
    paired = paired_two_way_difference(scores, slightly_worse, masks, losses, num_resamples=300)
    unpaired = (a.corrected_high - a.corrected_low) + (b.corrected_high - b.corrected_low)
    assert paired.corrected_high - paired.corrected_low < 0.5 * unpaired


def test_heldout_split_is_deterministic_disjoint_halves() -> None:
    selection, report = heldout_split(11, seed=4)
    again_selection, again_report = heldout_split(11, seed=4)
    np.testing.assert_array_equal(selection, again_selection)
    np.testing.assert_array_equal(report, again_report)
    assert len(selection) == 5 and len(report) == 6
    assert sorted(np.concatenate([selection, report]).tolist()) == list(range(11))
    assert not np.array_equal(heldout_split(11, seed=5)[0], selection)


def lambda_problem() -> tuple[dict[float, np.ndarray], np.ndarray, np.ndarray]:
    """lambda 0.1 gives the true attributions, lambda 10 noise: 0.1 must win."""
    true_scores, masks, losses = synthetic_problem(num_subsets=30, num_queries=20, noise=0.3)
    rng = np.random.default_rng(2)
    return {0.1: true_scores, 10.0: rng.normal(size=true_scores.shape)}, masks, losses


def test_heldout_lambda_never_reads_the_report_queries() -> None:
    scores_by_lambda, masks, losses = lambda_problem()
    selection, report = heldout_split(20, seed=0)
    assert select_lambda(scores_by_lambda, masks, losses, selection) == 0.1
    # on the report queries, make lambda 10 perfect and lambda 0.1 anti-correlated, and scramble their losses' scale
    perturbed = {key: value.copy() for key, value in scores_by_lambda.items()}
    perturbed[10.0][report] = scores_by_lambda[0.1][report]
    perturbed[0.1][report] = -scores_by_lambda[0.1][report]
    perturbed_losses = losses.copy()
    perturbed_losses[:, report] = 3.0 * losses[:, report] + 1.0  # same ranks, other values
    assert (
        select_lambda(perturbed, masks, perturbed_losses, None) == 10.0
    )  # a choice that read them would move
    assert select_lambda(perturbed, masks, perturbed_losses, selection) == 0.1
    rng = np.random.default_rng(3)
    # the same perturbation on the selection queries does move it, so the check above can fail
    flipped = {key: value.copy() for key, value in scores_by_lambda.items()}
    flipped[10.0][selection] = scores_by_lambda[0.1][selection]
    flipped[0.1][selection] = rng.normal(size=(len(selection), flipped[0.1].shape[1]))
    assert select_lambda(flipped, masks, losses, selection) == 10.0


def test_evaluate_method_reports_heldout_and_oracle_in_percent() -> None:
    scores_by_lambda, masks, losses = lambda_problem()
    heldout, oracle = evaluate_method(scores_by_lambda, masks, losses, "das", "val", num_resamples=100)
    selection, report = heldout_split(20, seed=0)
    assert (heldout.lambda_selection, oracle.lambda_selection) == ("heldout", "oracle")
    assert heldout.lambda_ == oracle.lambda_ == 0.1
    assert heldout.num_queries == len(report) and oracle.num_queries == 20 and oracle.num_subsets == 30
    expected_heldout = lds_by_lambda(scores_by_lambda, masks, losses, report)[0.1]
    assert heldout.lds == pytest.approx(100.0 * expected_heldout)
    assert oracle.lds == pytest.approx(
        100.0 * float(lds_per_query(scores_by_lambda[0.1], masks, losses).mean())
    )


def test_an_ensembles_records_carry_every_members_unit(tmp_path) -> None:
    scores_by_lambda, masks, losses = lambda_problem()
    members = [{"member": "seed0", "lambda_unit": 2.0}, {"member": "seed1", "lambda_unit": 3.0}]
    records = evaluate_method(
        scores_by_lambda, masks, losses, "das_seeds0-1", "val", 50, lambda_unit=2.0, members=members
    )
    assert all(record.to_json()["members"] == members for record in records)
    plain = evaluate_method(scores_by_lambda, masks, losses, "das", "val", 50, lambda_unit=2.0)
    assert all("members" not in record.to_json() for record in plain)  # one model: no member list


def test_method_without_lambda_and_outputs(tmp_path) -> None:
    scores_by_lambda, masks, losses = lambda_problem()
    records = evaluate_method({None: scores_by_lambda[0.1]}, masks, losses, "pixel", "val", num_resamples=50)
    records += evaluate_method(scores_by_lambda, masks, losses, "trak", "val", num_resamples=50)
    assert [record.lambda_ for record in records[:2]] == [None, None]
    difference = paired_difference(
        "trak", scores_by_lambda[0.1], "pixel", scores_by_lambda[10.0], masks, losses, "val", num_resamples=50
    )
    write_lds_json(
        tmp_path / "lds.json",
        [record.to_json() for record in records],
        [difference.to_json()],
        {"dataset": "toy"},
    )
    document = json.loads((tmp_path / "lds.json").read_text())
    assert document["unit"] == "percent" and document["meta"] == {"dataset": "toy"}
    assert document["records"][2]["lambda_scale"] == 0.1 and "lambda_" not in document["records"][2]
    assert document["records"][2]["lds"] == pytest.approx(records[2].lds)
    assert document["differences"][0]["diff"] == pytest.approx(difference.diff)
    table = markdown_table(records, [difference])
    assert f"{records[2].lds:.2f} [{records[2].ci_low:.2f}, {records[2].ci_high:.2f}]" in table
    assert f"{difference.diff:.2f}" in table
    curve = {"trak": lds_by_lambda(scores_by_lambda, masks, losses)}
    plot_lds_vs_lambda(curve, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the held-out selection is drawn on top: marking it changes the picture, marking another c changes it again
    plot_lds_vs_lambda(curve, tmp_path / "marked.png", {"trak": 0.1})
    plot_lds_vs_lambda(curve, tmp_path / "other.png", {"trak": 10.0})
    pictures = [
        np.asarray(Image.open(tmp_path / f"{n}.png").convert("L")) for n in ("curve", "marked", "other")
    ]
    assert (pictures[0] != pictures[1]).any() and (pictures[1] != pictures[2]).any()


def test_the_seed_aware_interval_is_reported_only_from_four_seeds_and_a_difference_must_survive_it() -> None:
    """Ground truth of training seeds that disagree: each record shows every per-seed LDS, its LDS and interval are
    those of the averaged losses (two-way, conditional on the seeds), and only from four seeds on a seed-aware
    interval (seeds resampled too, wider) is reported beside it."""
    scores_by_lambda, masks, losses = lambda_problem()
    rng = np.random.default_rng(5)
    others = [losses + rng.normal(scale=2.0 * losses.std(), size=losses.shape) for _ in range(3)]
    by_seed = np.stack([losses, others[0]])
    averaged = by_seed.mean(0)
    one_seed = evaluate_method(scores_by_lambda, masks, averaged, "das", "val", 300)
    two_seeds = evaluate_method(scores_by_lambda, masks, averaged, "das", "val", 300, losses_by_seed=by_seed)
    for single, several in zip(one_seed, two_seeds, strict=True):
        assert several.lds == pytest.approx(single.lds)  # the point estimate is the averaged ground truth's
        assert len(several.per_seed) == 2 and len(single.per_seed) == 1
        assert (several.ci_low, several.ci_high) == pytest.approx((single.ci_low, single.ci_high))
        assert several.seed_ci_low is None and several.seed_ci_high is None
    four = np.stack([losses, *others])
    four_averaged = four.mean(0)
    plain_four = evaluate_method(scores_by_lambda, masks, four_averaged, "das", "val", 300)
    seeded_four = evaluate_method(
        scores_by_lambda, masks, four_averaged, "das", "val", 300, losses_by_seed=four
    )
    for single, several in zip(plain_four, seeded_four, strict=True):
        assert len(several.per_seed) == 4
        assert (several.ci_low, several.ci_high) == pytest.approx((single.ci_low, single.ci_high))
        assert several.seed_ci_high - several.seed_ci_low > several.ci_high - several.ci_low
    assert "seed-aware CI" in markdown_table(seeded_four) and "seed-aware CI" not in markdown_table(two_seeds)
    oracle = two_seeds[1]
    assert oracle.per_seed[0] == pytest.approx(
        100 * float(lds_per_query(scores_by_lambda[0.1], masks, losses).mean())
    )
    assert "per seed (%)" in markdown_table(two_seeds)
    # a method against itself: exactly zero, never resolved; against noise: resolved on both seeds
    same = paired_difference(
        "das",
        scores_by_lambda[0.1],
        "das",
        scores_by_lambda[0.1],
        masks,
        averaged,
        "val",
        200,
        losses_by_seed=by_seed,
    )
    assert same.diff == 0 and same.ci_low == same.ci_high == 0 and not same.resolved
    better = paired_difference(
        "das",
        scores_by_lambda[0.1],
        "noise",
        scores_by_lambda[10.0],
        masks,
        averaged,
        "val",
        200,
        losses_by_seed=by_seed,
    )
    assert better.resolved and better.to_json()["resolved"] and len(better.per_seed) == 2
