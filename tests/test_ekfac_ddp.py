"""EK-FAC under DDP (issue 20): rank zero fits the factors while the other rank waits, each rank scores its shard of
the training images into the shared score stores, and the result is the one-process result (2 CPU processes, gloo)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from das_lightning import cli
from das_lightning.attribution.pipeline import load_scores

pytest.importorskip("kronfluence")

from conftest import RUN, TINY_ATTRIBUTE, compose, copy_model, run_entry  # noqa: E402

# two of the tiny model's layers: the fit stays small; what is sharded is the pass over the training images
EKFAC = [
    "method=ekfac",
    r"method.features.param_pattern='^(conv_out|up_blocks\.1\.resnets\.1\.conv2)\.'",
    "method.lambda_scales=[1e-4,1e-2,1]",
    "method.lambda_scale=1e-2",
]


def test_two_process_ddp_ekfac_equals_one_process(trained_root: Path, tmp_path: Path) -> None:
    """Two ranks (one fits, both score a shard of the training images) give the one-process scores. The one-process
    run reuses the two-process run's factors: the fit is the same code on one rank either way, and its rounding
    depends on the threads a process has (Lightning gives each CPU rank its share), which the smallest dampings
    magnify to 1e-3 of a score; what is compared is the sharded pass."""
    both = copy_model(trained_root, tmp_path / "ddp")
    result = run_entry(
        "attribute.py",
        f"paths.root={both}",
        *TINY_ATTRIBUTE,
        *EKFAC,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        cwd=both,
    )
    assert result.stdout.count("method ekfac:") == 1  # both ranks score, one writes and reports
    assert "training images/s on rank 1" in result.stdout + result.stderr  # rank 1 scored its shard
    factors = both / RUN / "features" / "ekfac" / "ekfac-sampled"
    assert len(list(factors.glob("factors_fit/lambda_matrix.safetensors"))) == 1  # one fit: rank zero's
    stores = sorted((factors / "scores").iterdir())
    assert len(stores) == 2  # a score store per query set, complete, whose rows both ranks wrote
    for store in stores:
        assert np.load(store / "done.npy").all()
        assert json.loads((store / "manifest.json").read_text())["num_rows"] == 48

    single = copy_model(trained_root, tmp_path / "single")
    shutil.copytree(
        factors,
        single / RUN / "features" / "ekfac" / "ekfac-sampled",
        ignore=shutil.ignore_patterns("scores"),
    )
    cli.run_attribute(compose("attribute", [f"paths.root={single}", *TINY_ATTRIBUTE, *EKFAC]))
    for query_set in ("val", "generated"):
        expected, manifest = load_scores(single / RUN / "scores" / "ekfac" / query_set)
        scores, ddp_manifest = load_scores(both / RUN / "scores" / "ekfac" / query_set)
        assert scores.shape == (3, 6, 48)
        np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
        assert ddp_manifest["lambda_unit"] == manifest["lambda_unit"]
