"""The GPU check's dry run: ``benchmarks/gpu_check.py --dry-run`` runs the GPU check's code on the CPU at test size
(tiny preset, k = 64, 8 samples, a 32 px LoRA pipeline), so the script cannot rot while no GPU is lent."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, entry_env

SCRIPT = REPO / "benchmarks" / "gpu_check.py"
EXPECTED_METHODS = [
    "ours dense (matrix kept)",
    "ours dense (streamed, 2 GiB budget)",
    "ours sparse (s=4)",
    "published (vmap per t + TRAK BasicProjector)",  # no fast_jl on a CPU
    "floor (K batched fwd+bwd)",
]


def test_dry_run_measures_every_row_and_the_lora_step(tmp_path: Path) -> None:
    pytest.importorskip(
        "trak", reason="the published recipe needs the bench extra: pip install -e '.[bench]'"
    )
    committed = REPO / "benchmarks" / "results" / "gpu_check.json"
    before = committed.read_bytes() if committed.exists() else None
    out = tmp_path / "check" / "gpu_check.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)],
        cwd=tmp_path,
        env=entry_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["dry_run"] and report["problems"] == []
    assert report["settings"]["device"] == "cpu" and report["settings"]["preset"] == "tiny"
    # the gpu-marked tests ran (and skipped: no CUDA here)
    assert report["tests"]["returncode"] == 0 and "skipped" in report["tests"]["summary"]

    assert [row["method"] for row in report["results"]] == EXPECTED_METHODS
    for row in report["results"]:
        assert "error" not in row and "skipped" not in row, row
        throughput = row["sample_timesteps_per_s"]
        assert math.isfinite(throughput) and throughput > 0, row
        # throughput is N x K over the best timed pass
        assert throughput == pytest.approx(row["num_samples"] * row["num_timesteps"] / row["best_seconds"])
    # (a) and (b) time the same maths: their unprojected features agree to float32 rounding
    assert report["max_relative_difference_ours_vs_published_unprojected"] < 1e-4

    lora = report["sd_lora"]
    assert "error" not in lora, lora
    assert lora["features_finite"] and all(norm > 0 for norm in lora["feature_norms"])
    assert math.isfinite(lora["loss"]) and lora["num_lora_parameters"] > 0
    assert lora["lora_dtypes"] == ["float32"]

    table = out.with_suffix(".md").read_text()
    assert all(method in table for method in EXPECTED_METHODS)
    # a dry run never touches the committed results
    assert (committed.read_bytes() if committed.exists() else None) == before
