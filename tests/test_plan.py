"""plan=true: the figures a plan prints equal what the stages write and do on the tiny runs, nothing is written, and
a figure over this machine's free memory is named."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from das_lightning import cli, plan
from das_lightning.attribution.store import DIGESTS_FILE, DONE_FILE, FEATURES_FILE, npy_bytes

from conftest import REPO, TINY_ATTRIBUTE, TINY_TRAIN, compose, copy_model, entry_env, run_entry

RUN = Path("fashion2") / "tiny" / "full" / "seed0"
QUERY_SETS = ("val", "generated")
# the tiny LDS of test_evaluate.py, at two subsets so that two subset models suffice
TINY_LDS = [
    "lds.num_subsets=2",
    "lds.timestep_stride=250",
    "lds.e_seeds=[0,1]",
    "lds.num_resamples=20",
    "methods=[pixel]",
    "pairs=[]",
    "queries.num_val=6",
    "queries.num_generated=6",
    "dataset.image_size=8",
    "dataset.num_train=48",
    "logger=none",
    "trainer.enable_progress_bar=false",
]


def attribute_plan(root: Path, *overrides: str) -> plan.Plan:
    return cli.run_attribute(
        compose("attribute", [f"paths.root={root}", *TINY_ATTRIBUTE, *overrides, "plan=true"])
    )


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with its size and modification time."""
    return {
        str(path.relative_to(root)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_planned_stores_scores_and_parameters_equal_the_das_run(das_root: Path) -> None:
    result = attribute_plan(das_root)
    for key in ("train", *QUERY_SETS):
        folder = das_root / RUN / "features" / "das" / key
        written = sum((folder / name).stat().st_size for name in (FEATURES_FILE, DONE_FILE, DIGESTS_FILE))
        assert result.figure(f"store_bytes.{key}") == written
    for name in QUERY_SETS:
        path = das_root / RUN / "scores" / "das" / name / "scores.npy"
        scores = np.load(path, mmap_mode="r")
        assert result.figure(f"score_bytes.{name}") == path.stat().st_size
        assert scores.shape == (36, 6, 48) and scores.dtype == np.float32  # the c grid x queries x train
    from das_lightning.models.adapters import ModelAdapter

    network = ModelAdapter().load(das_root / RUN / "unet", das_root).network
    assert result.figure("num_parameters") == sum(p.numel() for p in network.parameters())
    assert result.figure("tracked_parameters") == result.figure("num_parameters")  # no param_pattern
    assert result.figure("num_train") == 48
    assert result.figure("gradient_evaluations") == (48 + 6 + 6) * 2  # K = 2 timesteps, one draw


def test_param_pattern_restricts_the_tracked_parameters(tmp_path: Path) -> None:
    every = attribute_plan(tmp_path)
    encoder = attribute_plan(tmp_path, "method.features.param_pattern=down_blocks")
    assert 0 < encoder.figure("tracked_parameters") < every.figure("tracked_parameters")
    assert encoder.figure("num_parameters") == every.figure("num_parameters")


@pytest.mark.parametrize(
    ("script", "overrides"),
    [
        ("attribute.py", TINY_ATTRIBUTE),
        ("evaluate_lds.py", TINY_LDS),
        ("train.py", [*TINY_TRAIN, "subset=lds", "subset.index=0"]),
    ],
)
def test_plan_writes_nothing_under_the_root_and_exits_zero(
    trained_root: Path, tmp_path: Path, script: str, overrides: list[str]
) -> None:
    root = copy_model(trained_root, tmp_path / "root")
    before = tree(root)
    # Hydra's own log folder goes where hydra.run.dir says (by default under the run folder, as for every command)
    result = run_entry(
        script,
        f"paths.root={root}",
        *overrides,
        "plan=true",
        f"hydra.run.dir={tmp_path / 'hydra'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0
    assert result.stdout.startswith("plan: ")
    assert tree(root) == before


def test_a_figure_over_the_free_memory_is_named(tmp_path: Path, monkeypatch, capsys) -> None:
    assert "warning" not in str(attribute_plan(tmp_path, "projector=dense"))
    monkeypatch.setattr(plan, "available_memory", lambda accelerator: (1 << 20, "a test's 1 MiB"))
    result = attribute_plan(tmp_path, "projector=dense")
    printed = capsys.readouterr().out
    assert result.figure("projector_memory") > 1 << 20  # 176,849 x 32 floats
    assert (
        "warning: projector (dense, k=32)" in printed and "exceeds the free memory here (1.0 MiB)" in printed
    )


def test_dataset_files_missing_fall_back_to_the_registry(tmp_path: Path) -> None:
    """CIFAR-2 without its files: N from the registry, the reason in the plan, no failure."""
    result = cli.run_attribute(
        compose("attribute", [f"paths.root={tmp_path}", "experiment=cifar2_lds", "logger=none", "plan=true"])
    )
    assert result.figure("num_train") == 5000
    assert "files not read" in str(result)
    assert result.figure("num_parameters") == 35_746_307  # the cifar preset, built on the meta device
    assert result.figure("score_bytes.val") == npy_bytes((36, 1000, 5000), "float32")
    assert not any(tmp_path.iterdir())


@pytest.fixture(scope="module")
def lds_root(trained_root: Path, tmp_path_factory) -> Path:
    """The tiny full model with two subset models (2 steps each) and pixel scores: enough for an LDS."""
    root = copy_model(trained_root, tmp_path_factory.mktemp("plan-lds"))
    for index in (0, 1):
        cli.run_train(
            compose(
                "train",
                [
                    f"paths.root={root}",
                    *TINY_TRAIN,
                    "train.max_steps=2",
                    "subset=lds",
                    f"subset.index={index}",
                ],
            )
        )
    pixel = [override for override in TINY_ATTRIBUTE if not override.startswith("method.features")]
    cli.run_attribute(compose("attribute", [f"paths.root={root}", *pixel, "method=pixel"]))
    return root


def test_ground_truth_passes_equal_what_evaluate_does(lds_root: Path, monkeypatch) -> None:
    from das_lightning.evaluation import ground_truth

    planned = cli.run_lds(compose("evaluate_lds", [f"paths.root={lds_root}", *TINY_LDS, "plan=true"]))
    forwards = []
    original = ground_truth.query_losses

    def counted(unet, alphas_cumprod, images, indices, set_name, timesteps, e_seeds, **kwargs):
        forwards.append(len(images) * len(timesteps) * len(e_seeds))  # one UNet row per (query, t, e_seed)
        return original(unet, alphas_cumprod, images, indices, set_name, timesteps, e_seeds, **kwargs)

    monkeypatch.setattr(ground_truth, "query_losses", counted)
    cli.run_lds(compose("evaluate_lds", [f"paths.root={lds_root}", *TINY_LDS]))
    assert planned.figure("ground_truth_forwards") == sum(forwards) == 2 * 1 * 12 * 4 * 2
    caches = list((lds_root / "fashion2" / "tiny" / "lds" / "ground_truth").rglob("losses.safetensors"))
    assert planned.figure("ground_truth_cache") == sum(path.stat().st_size for path in caches)


# The measured peak of a trimmed attribution against the plan's estimate: a subprocess records its peak RSS
# (VmHWM) before and after the attribution; projector.dim=512 makes the dense matrix (176,849 x 512 floats,
# 345 MiB) the figure that dominates, as the projector and the batch's P-vectors do at paper scale. Measured here
# (2 cores, torch 2.13 CPU), three runs: plan 419.5 MiB, measured 477.5 / 479.8 / 484.8 MiB (1.14-1.16 x the plan);
# the rest is Lightning's trainer, the data loader, the residual pass and allocator slack, none of it planned.
PEAK_SCRIPT = """
import json, sys
from das_lightning import cli
import das_lightning.attribution.pipeline, lightning  # imported before the baseline
sys.path.insert(0, {tests!r})
from conftest import compose


def peak_rss():  # this process's own high-water mark; ru_maxrss would start at the forking parent's size
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024


overrides = {overrides!r}
planned = cli.run_attribute(compose("attribute", overrides + ["plan=true"]))
before = peak_rss()
cli.run_attribute(compose("attribute", overrides))
print(json.dumps({{"planned": planned.figure("peak_memory"), "measured": peak_rss() - before}}))
"""
PEAK_FACTOR = 1.5  # measured / planned must lie within [1 / PEAK_FACTOR, PEAK_FACTOR]


def test_measured_peak_memory_is_near_the_plan(trained_root: Path, tmp_path: Path) -> None:
    root = copy_model(trained_root, tmp_path / "root")
    overrides = [f"paths.root={root}", *TINY_ATTRIBUTE, "projector=dense", "projector.dim=512"]
    script = PEAK_SCRIPT.format(tests=str(REPO / "tests"), overrides=overrides)
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=entry_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    ratio = figures["measured"] / figures["planned"]
    assert 1 / PEAK_FACTOR <= ratio <= PEAK_FACTOR, figures
    shutil.rmtree(root)


def test_planned_ekfac_passes_equal_the_run(trained_root: Path, tmp_path: Path, monkeypatch) -> None:
    """EK-FAC's plan counts kronfluence's two fitting passes and the scoring passes the run makes: one for both
    query sets and every c, two when the rotated queries must be split (``QUERY_GRADIENT_BYTES``)."""
    pytest.importorskip("kronfluence")
    from das_lightning.attribution.methods import ekfac

    ekfac_run = [
        "method=ekfac",
        r"method.features.param_pattern='^(conv_out|up_blocks\.1\.resnets\.1\.conv2)\.'",
        "method.lambda_scales=[1e-4,1]",
        "method.lambda_scale=1",
    ]
    passes = []
    one_pass = ekfac.EKFAC._one_pass
    monkeypatch.setattr(
        ekfac.EKFAC, "_one_pass", lambda self, *args: (passes.append(1), one_pass(self, *args))[1]
    )
    tracked = attribute_plan(trained_root, *ekfac_run).figure("tracked_parameters")
    assert 0 < tracked < attribute_plan(trained_root).figure("tracked_parameters")  # the two layers
    for query_bytes, scoring in (
        (ekfac.QUERY_GRADIENT_BYTES, 1),
        (4 * tracked * 6, 2),
    ):  # 6 of 12 queries a pass
        monkeypatch.setattr(ekfac, "QUERY_GRADIENT_BYTES", query_bytes)
        root = copy_model(trained_root, tmp_path / f"ekfac-{scoring}")
        planned = attribute_plan(root, *ekfac_run)
        assert planned.figure("train_passes") == 2 + scoring
        assert planned.figure("peak_memory") > planned.figure("model_memory")
        passes.clear()
        cli.run_attribute(compose("attribute", [f"paths.root={root}", *TINY_ATTRIBUTE, *ekfac_run]))
        assert len(passes) == scoring
