"""The centred LDS and the query-agnostic baselines (das_lightning/evaluation/shared_factor.py), and the
damping-dominated flag: properties on made-up cases whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from das_lightning.evaluation.lds import lds_per_query
from das_lightning.evaluation.lds_report import (
    DAMPING_DOMINATED_C_PER_TRAIN,
    centred_lds,
    damping_dominated,
    evaluate_method,
    markdown_table,
    shared_factor_record,
)
from das_lightning.evaluation.shared_factor import (
    factor_share,
    leave_one_query_out,
    query_averaged,
    remove_shared_factor,
    standardise,
)


def test_centring_ignores_each_querys_scale_and_offset_and_removes_the_shared_ranking() -> None:
    rng = np.random.default_rng(0)
    values = rng.normal(size=(16, 9))
    scale, offset = rng.uniform(0.1, 10.0, size=9), rng.normal(size=9)
    np.testing.assert_allclose(
        remove_shared_factor(values * scale + offset), remove_shared_factor(values), atol=1e-12
    )
    centred = remove_shared_factor(values)
    np.testing.assert_allclose(
        centred.mean(axis=1), 0.0, atol=1e-12
    )  # no ranking is left that all queries share
    np.testing.assert_allclose(standardise(values).std(axis=0), 1.0)


def test_a_world_of_one_shared_ranking_has_nothing_left_once_centred() -> None:
    rng = np.random.default_rng(1)
    ranking = rng.normal(size=(20, 1))
    losses = ranking * rng.uniform(0.5, 2.0, size=(1, 12)) + rng.normal(
        size=(1, 12)
    )  # every query ranks alike
    assert factor_share(losses) == pytest.approx(1.0)
    np.testing.assert_allclose(remove_shared_factor(losses), 0.0, atol=1e-12)
    # the other queries' mean loss ranks each query's subsets exactly: the ceiling is 100
    ceiling = lds_per_query(leave_one_query_out(losses).T, np.eye(20), losses)
    np.testing.assert_allclose(ceiling.numpy(), 1.0)
    # one ranking for every query is what query_averaged returns, the same for each column
    predicted = ranking @ rng.uniform(1.0, 3.0, size=(1, 12))
    np.testing.assert_allclose(query_averaged(predicted), standardise(predicted))


def test_independent_queries_share_little_and_their_centred_lds_stays_close_to_the_plain_one() -> None:
    """Losses with no common ranking (each query its own attribution): the factor share is near that of noise
    (about 1/(number of queries) x a small-sample excess), the ceiling near 0, and the centred LDS near the plain
    LDS; add one shared ranking and the plain LDS of a method that predicts it rises while its centred LDS does
    not."""
    rng = np.random.default_rng(2)
    num_subsets, num_queries, num_train = 64, 40, 100
    masks = rng.random((num_subsets, num_train)) < 0.5
    attributions = rng.normal(size=(num_queries, num_train))
    losses = -(masks @ attributions.T) + 3.0 * rng.normal(size=(num_subsets, num_queries))
    scores = attributions + rng.normal(size=attributions.shape)
    assert factor_share(losses) < 0.15
    agnostic = shared_factor_record("val", "oracle", losses[None], 100, 0)
    assert abs(agnostic.ceiling) < 10.0  # percent
    plain = float(lds_per_query(scores, masks, losses).mean())
    centred = centred_lds(masks @ scores.T, losses[None], 100, 0)
    assert centred.interval.estimate == pytest.approx(plain, abs=0.05)
    assert abs(centred.query_averaged) < 0.1
    # a shared ranking: every subset model is better or worse on all queries together, by how many of a fixed set
    # of training rows it kept; a method that only knows that set scores every query alike
    shared_rows = rng.normal(size=num_train)
    shared_losses = losses - 4.0 * (masks @ shared_rows)[:, None]
    agnostic_method = np.repeat(shared_rows[None], num_queries, axis=0)
    assert factor_share(shared_losses) > 0.5
    assert float(lds_per_query(agnostic_method, masks, shared_losses).mean()) > 0.5
    # ... and nothing once centred: its centred predictions are constant, so its centred LDS is undefined
    agnostic_centred = centred_lds(masks @ agnostic_method.T, shared_losses[None], 100, 0).interval
    assert math.isnan(agnostic_centred.estimate) and agnostic_centred.num_undefined == num_queries


def test_damping_dominated_means_within_a_factor_two_of_the_dot_product() -> None:
    """At c >= N the regularised inverse is within a factor 2 of I / lambda in every direction; below it is not
    flagged."""
    rng = np.random.default_rng(3)
    num_train = 50
    features = rng.normal(size=(num_train, 30)) * rng.uniform(0.1, 5.0, size=30)
    kernel = features.T @ features  # K = Phi^T Phi
    unit = np.trace(kernel) / num_train  # lambda = c x trace(K)/N (das_lightning/lambdas.py)
    for c in (DAMPING_DOMINATED_C_PER_TRAIN * num_train, 4.0 * num_train):
        lambda_ = c * unit
        # lambda (K + lambda I)^-1 against I: its eigenvalues lambda / (eig + lambda)
        ratios = lambda_ / (np.linalg.eigvalsh(kernel) + lambda_)
        assert ratios.min() >= 0.5 and ratios.max() <= 1.0
        assert damping_dominated(c, num_train)
    assert not damping_dominated(0.5 * num_train, num_train)
    assert not damping_dominated(None, num_train)


def test_records_and_table_carry_the_centred_lds_and_the_flag() -> None:
    rng = np.random.default_rng(4)
    masks = rng.random((16, 20)) < 0.5
    truth = rng.normal(size=(12, 20))
    losses = -(masks @ truth.T) + rng.normal(size=(16, 12))
    by_c = {0.1: truth + rng.normal(size=truth.shape), 100.0: truth + 0.1 * rng.normal(size=truth.shape)}
    heldout, oracle = evaluate_method(by_c, masks, losses, "trak", "val", num_resamples=50)
    assert oracle.lambda_ == 100.0 and oracle.damping_dominated  # 100 >= N = 20
    assert oracle.centred is not None and oracle.centred_ci_low <= oracle.centred <= oracle.centred_ci_high
    expected = 100.0 * float(
        lds_per_query(
            remove_shared_factor(masks @ by_c[100.0].T).T, np.eye(16), remove_shared_factor(losses)
        ).mean()
    )
    assert oracle.centred == pytest.approx(expected)
    table = markdown_table([heldout, oracle])
    assert "centred LDS" in table and "† damping-dominated" in table and "trak/val/oracle" in table
