"""benchmarks/repeatability.py's statistics on synthetic repeats whose answer is known by construction."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, entry_env

SCRIPT = REPO / "benchmarks" / "repeatability.py"


@pytest.fixture(scope="module")
def stats():
    spec = importlib.util.spec_from_file_location("repeatability", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def antithetic_repeats(mean: np.ndarray, spread: np.ndarray) -> np.ndarray:
    """Two repeats mean +- spread: repeat mean exactly ``mean``, variance (ddof 1) exactly 2 spread^2."""
    return np.stack([mean + spread, mean - spread])


def test_variance_ratio_by_decile_equals_the_constructed_ratio(stats) -> None:
    """Ten training rows per query, row j of magnitude j + 1 (sign alternating, so |.| ranks, not the value) with
    spread s_j: decile j's ratio is 2 s_j^2 / (j + 1)^2 whatever the query order of the rows."""
    rng = np.random.default_rng(0)
    magnitudes = np.arange(1.0, 11.0)
    spreads = rng.uniform(0.1, 3.0, size=10)
    expected = 2 * spreads**2 / magnitudes**2
    means, deviations = [], []
    for _ in range(5):  # five queries, each with its training rows in another order
        order = rng.permutation(10)
        signs = np.where(np.arange(10) % 2 == 0, 1.0, -1.0)
        means.append((signs * magnitudes)[order])
        deviations.append(spreads[order])
    repeats = antithetic_repeats(np.array(means), np.array(deviations))
    np.testing.assert_allclose(stats.variance_ratio_by_decile(repeats), expected, rtol=1e-12)
    overall = np.sum(2 * spreads**2) / np.sum(magnitudes**2)
    assert stats.overall_variance_ratio(repeats) == pytest.approx(overall, rel=1e-12)


def test_deciles_pool_equal_groups_over_queries(stats) -> None:
    """100 rows per query: decile d holds rows 10d..10d+9 of each query's |mean| order; pooled over queries, its
    ratio is the sum of its variances over the sum of its squared means."""
    rng = np.random.default_rng(1)
    mean = rng.normal(size=(3, 100))
    spread = rng.uniform(0.0, 1.0, size=(3, 100))
    repeats = antithetic_repeats(mean, spread)
    order = np.argsort(np.abs(mean), axis=1)
    expected = []
    for decile in range(10):
        rows = order[:, 10 * decile : 10 * (decile + 1)]
        variance = np.take_along_axis(2 * spread**2, rows, axis=1).sum()
        signal = np.take_along_axis(mean**2, rows, axis=1).sum()
        expected.append(variance / signal)
    np.testing.assert_allclose(stats.variance_ratio_by_decile(repeats), expected, rtol=1e-12)


def test_pure_noise_gives_a_ratio_near_r_over_one_and_signal_a_falling_curve(stats) -> None:
    """Scores that are noise alone (true mean 0): the repeat mean of R draws of variance 1 has E[mean^2] = 1/R, so
    the pooled ratio is near R. With a signal growing over the rows the ratio falls from decile to decile."""
    rng = np.random.default_rng(2)
    noise = rng.normal(size=(8, 50, 400))
    assert stats.overall_variance_ratio(noise) == pytest.approx(8.0, rel=0.05)
    signal = np.linspace(0.0, 5.0, 400)[None, None, :] + 0.3 * noise
    ratios = stats.variance_ratio_by_decile(signal)
    assert all(later < earlier for earlier, later in zip(ratios, ratios[1:], strict=False))
    assert ratios[-1] == pytest.approx(0.09 / np.mean(np.linspace(0.0, 5.0, 400)[360:] ** 2), rel=0.1)


def test_identical_repeats_have_no_variance_and_rank_correlation_one(stats) -> None:
    scores = np.random.default_rng(3).normal(size=(4, 30))
    repeats = np.stack([scores] * 3)
    np.testing.assert_allclose(stats.variance_ratio_by_decile(repeats), 0.0, atol=1e-24)
    mean, pairs = stats.spearman_between_repeats(repeats)
    assert mean == pytest.approx(1.0) and pairs.shape == (3,)


def test_spearman_between_repeats_is_the_mean_over_queries_and_pairs(stats) -> None:
    """A monotone transform keeps the ranks (rho 1), a reversal negates them (rho -1); the mean is over pairs."""
    scores = np.random.default_rng(4).normal(size=(5, 40))
    repeats = np.stack([scores, np.exp(scores), -scores])
    mean, pairs = stats.spearman_between_repeats(repeats)
    np.testing.assert_allclose(pairs, [1.0, -1.0, -1.0], atol=1e-12)
    assert mean == pytest.approx(-1.0 / 3.0)
    independent = np.random.default_rng(5).normal(size=(2, 200, 300))
    assert abs(stats.spearman_between_repeats(independent)[0]) < 0.01
    # against scipy on one query with ties
    scipy_stats = pytest.importorskip("scipy.stats")
    tied = np.array([[[1.0, 2.0, 2.0, 3.0, 5.0, 4.0]], [[2.0, 1.0, 3.0, 3.0, 4.0, 6.0]]])
    expected = scipy_stats.spearmanr(tied[0, 0], tied[1, 0]).statistic
    assert stats.spearman_between_repeats(tied)[0] == pytest.approx(expected, abs=1e-12)


def test_bad_repeats_are_refused(stats) -> None:
    with pytest.raises(ValueError, match="R >= 2"):
        stats.variance_ratio_by_decile(np.zeros((1, 2, 20)))
    with pytest.raises(ValueError, match="NaN"):
        stats.spearman_between_repeats(np.full((2, 2, 20), np.nan))
    with pytest.raises(ValueError, match="cannot fill"):
        stats.variance_ratio_by_decile(np.ones((2, 2, 5)))


def test_dry_run_lists_one_attribute_command_per_method_and_repeat(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--root", str(tmp_path), "--methods", "das", "dtrak",
         "--repeats", "3", "--override", "method.features.num_timesteps=30"],
        cwd=tmp_path, env=entry_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 6
    assert all("method.features.num_timesteps=30" in line for line in lines)
    assert [line.split("method.features.e_seed=")[1].split()[0] for line in lines] == ["0", "1", "2"] * 2
