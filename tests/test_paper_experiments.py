"""Every paper experiment end to end on the CPU at trimmed size, with the paper-size networks (issue 20 item 3).

Each case writes a tiny dataset in the official on-disk format (das_lightning_testing/official_formats.py), then
runs the four entry points as a user would (subprocesses, network off, W&B disabled) with the experiment's own
network and recipe, trimmed only in counts: 2 training steps, 2 generated images, a few training images, K = 2
timesteps for DAS, D-TRAK and EK-FAC, 2 LDS subset models, and the LDS over 2 timesteps x 1 e_seed.
With 2 subsets the LDS is degenerate (every per-query Spearman is -100, 0 or 100); the test asserts what is
meaningful: each stage sealed its artifacts, the scores are finite over the trimmed rows, the LDS stage wrote
lds.json and warned about the subset count.

Slow (minutes per case on 2 cores): ``python -m pytest -m slow tests/test_paper_experiments.py``.
``DAS_PAPER_TIMINGS=FILE`` appends each stage's wall time, CPU time and peak RSS (JSON lines) to FILE (docs/scale.md).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from das_lightning.artifacts import load_generated_queries, require_finished
from das_lightning.attribution.pipeline import load_scores
from das_lightning.paths import RunPaths
from das_lightning_testing.official_formats import write_artbench, write_celeba, write_cifar10_binary
from das_lightning_testing.tiny_sd import build_sd1_shaped_pipeline

from conftest import REPO, compose, entry_env

pytestmark = pytest.mark.slow

METHODS = ("das", "dtrak", "ekfac")
NUM_SUBSETS = 2
NUM_VAL = 2
NUM_GENERATED = 2
STAGE_TIMEOUT_S = 3600

# a child that reports its own child's rusage: ru_maxrss of a process forked from this (large) pytest process
# would start at pytest's resident size, one forked from this small launcher starts at a few MiB
_MEASURE = (
    "import json, os, subprocess, sys, time\n"
    "start = time.perf_counter()\n"
    "child = subprocess.Popen(sys.argv[2:])\n"
    "_, status, usage = os.wait4(child.pid, 0)\n"
    "record = {'wall_s': time.perf_counter() - start, 'cpu_s': usage.ru_utime + usage.ru_stime,\n"
    "          'peak_rss_mib': usage.ru_maxrss / 1024}\n"
    "open(sys.argv[1], 'w').write(json.dumps(record))\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


@dataclass(frozen=True)
class PaperCase:
    """One paper experiment, trimmed: how to write its data and which overrides shrink it."""

    experiment: str
    write_data: Callable[[Path], Path]  # writes the official files under a folder, returns dataset.root
    num_train: int  # training images kept (dataset.num_train: class-stratified)
    network: Callable[[Path], str] | None = None  # the model.pretrained override, given a cache folder
    query_sets: tuple[str, ...] = ("val", "generated")
    extra: tuple[str, ...] = ()  # overrides for every stage (dataset choice, model settings)
    train_extra: tuple[str, ...] = ()
    attribute_extra: tuple[str, ...] = ()


def _cifar(root: Path) -> Path:
    # cifar2 keeps 1000 test images (its registry size, not trimmed by dataset.num_train): 500 of each class
    return write_cifar10_binary(root / "cifar10", per_class_train=2, per_class_test=500)


def _celeba(root: Path) -> Path:
    return write_celeba(root / "celeba", num_train=8, num_test=4)


def _artbench(root: Path) -> Path:
    return write_artbench(root / "artbench", per_style_train=2, per_style_test=2)


def _minisd(folder: Path) -> str:
    """The paper's ArtBench network is lambdalabs/miniSD-diffusers: a local copy of that pipeline folder when
    DAS_MINISD names one, else a random pipeline in its layout whose UNet and VAE are Stable Diffusion 1.x's
    (860M-parameter UNet, das_lightning_testing/tiny_sd.py), written once per test session under ``folder``."""
    local = os.environ.get("DAS_MINISD")
    if local:
        if not (Path(local) / "model_index.json").is_file():
            pytest.fail(f"DAS_MINISD={local} is not a diffusers pipeline folder (no model_index.json)")
        return f"model.pretrained={local}"
    pipeline = folder / "sd1-shaped"
    if not (pipeline / "model_index.json").is_file():
        build_sd1_shaped_pipeline(pipeline)
    return f"model.pretrained={pipeline}"


CASES = {
    "cifar2_lds": PaperCase("cifar2_lds", _cifar, num_train=4),
    "cifar10_lds": PaperCase("cifar10_lds", _cifar, num_train=10),
    "celeba_lds": PaperCase("celeba_lds", _celeba, num_train=4),
    "artbench2_lds": PaperCase(
        "artbench2_lds",
        _artbench,
        num_train=4,
        network=_minisd,
        query_sets=("val",),
        extra=("trainer=cpu", "trainer.precision=32-true", "model.module_kwargs.frozen_dtype=float32"),
    ),
    "artbench5": PaperCase(
        "artbench2_lds",
        _artbench,
        num_train=5,
        network=_minisd,
        query_sets=("val",),
        extra=(
            "dataset=artbench5",
            "trainer=cpu",
            "trainer.precision=32-true",
            "model.module_kwargs.frozen_dtype=float32",
        ),
    ),
}


def run_stage(script: str, overrides: list[str], cwd: Path, label: str) -> subprocess.CompletedProcess:
    """Run an entry point in a subprocess; its wall time and peak RSS go to DAS_PAPER_TIMINGS when set."""
    record_file = cwd / f".measure-{label.replace('/', '-')}.json"
    command = [
        sys.executable,
        "-c",
        _MEASURE,
        str(record_file),
        sys.executable,
        str(REPO / script),
        *overrides,
    ]
    env = entry_env()
    env.setdefault("OMP_NUM_THREADS", "1")  # two cores: one thread per process, as in the rest of the suite
    result = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=STAGE_TIMEOUT_S
    )
    if result.returncode != 0:
        raise AssertionError(
            f"{script} ({label}) failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
        )
    timings = os.environ.get("DAS_PAPER_TIMINGS")
    if timings:
        record = {"stage": label, **json.loads(record_file.read_text())}
        with open(timings, "a") as handle:
            handle.write(json.dumps(record) + "\n")
    return result


@pytest.mark.parametrize("name", list(CASES))
def test_paper_experiment_runs_end_to_end_at_trimmed_size(
    name: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    case = CASES[name]
    network = [case.network(tmp_path_factory.getbasetemp())] if case.network is not None else []
    data_root = case.write_data(tmp_path / "data")
    outputs = tmp_path / "outputs"
    common = [
        f"experiment={case.experiment}",
        *case.extra,
        *network,
        f"dataset.root={data_root}",
        f"dataset.num_train={case.num_train}",
        f"paths.root={outputs}",
        "logger=none",
        "trainer.enable_progress_bar=false",
    ]
    queries = [f"queries.num_val={NUM_VAL}", f"queries.num_generated={NUM_GENERATED}"]
    train = [
        "train.max_steps=2",
        "train.batch_size=4",
        "train.optimizer.warmup_steps=1",
        *case.train_extra,
    ]

    # 1. the full model: 2 steps, 2 generated images (2 DDIM steps) when the experiment generates queries
    generates = "generated" in case.query_sets
    generate = ["generate.num_images=2", "generate.batch_size=2", "generate.sampler.num_inference_steps=2"]
    run_stage(
        "train.py",
        [*common, *train, *(generate if generates else []), f"hydra.run.dir={tmp_path}/hydra/full"],
        tmp_path,
        f"{name}/train-full",
    )
    composed = compose("train", common)
    full = RunPaths(outputs, str(composed.dataset.name), str(composed.model.name), "full", 0)
    require_finished(full)  # DONE names every file with its size and checksum, and they match
    if generates:
        images, _, _ = load_generated_queries(full)
        assert images.shape[0] == NUM_GENERATED and bool(images.isfinite().all())

    # 2. the LDS subset models (alpha = 1/2 of the trimmed set each)
    run_stage(
        "train.py",
        [
            "-m",
            *common,
            *train,
            "subset=lds",
            f"subset.index={','.join(str(k) for k in range(NUM_SUBSETS))}",
            f"hydra.sweep.dir={tmp_path}/hydra/subsets",
        ],
        tmp_path,
        f"{name}/train-subsets",
    )
    for index in range(NUM_SUBSETS):
        require_finished(full.sibling(f"lds-{index}", 0))

    # 3. attribution at K = 2 with the sparse projector (a dense k x P matrix at 35.7M-860M parameters cannot be
    # kept in memory: docs/scale.md)
    for method in METHODS:
        run_stage(
            "attribute.py",
            [
                *common,
                *queries,
                f"method={method}",
                "projector=sparse",
                "projector.dim=64",
                "method.features.num_timesteps=2",
                "method.features.batch_size=4",
                *(["method.residual_timesteps=2"] if method == "das" else []),
                *case.attribute_extra,
                f"hydra.run.dir={tmp_path}/hydra/{method}",
            ],
            tmp_path,
            f"{name}/attribute-{method}",
        )
        for query_set in case.query_sets:
            scores, manifest = load_scores(full.scores_dir / method / query_set)  # complete and checksummed
            expected = NUM_VAL if query_set == "val" else NUM_GENERATED
            assert scores.shape == (len(manifest["lambda_scales"]), expected, case.num_train)
            assert np.isfinite(scores).all(), f"{method} {query_set}: non-finite scores"
            assert np.ptp(np.asarray(scores)) > 0, f"{method} {query_set}: every score is the same"

    # 4. the LDS over the 2 subset models (2 timesteps x 1 e_seed of ground truth)
    result = run_stage(
        "evaluate_lds.py",
        [
            *common,
            *queries,
            f"lds.num_subsets={NUM_SUBSETS}",
            "lds.seeds=[0]",
            "lds.timestep_stride=500",
            "lds.e_seeds=[0]",
            "lds.num_resamples=20",
            f"methods=[{','.join(METHODS)}]",
            "pairs=[[das,dtrak]]",
            f"hydra.run.dir={tmp_path}/hydra/lds",
        ],
        tmp_path,
        f"{name}/evaluate-lds",
    )
    assert f"only {NUM_SUBSETS} subsets" in result.stdout + result.stderr
    report = json.loads((full.lds_results_dir / "lds.json").read_text())
    text = json.dumps(report)
    for method in METHODS:
        assert f'"{method}"' in text
    for value in _numbers(report):
        assert not math.isinf(value)


def _numbers(value) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [float(value)]
    if isinstance(value, dict):
        return [number for item in value.values() for number in _numbers(item)]
    if isinstance(value, list):
        return [number for item in value for number in _numbers(item)]
    return []
