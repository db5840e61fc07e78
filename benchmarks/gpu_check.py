"""The GPU check (issue 13): one command, meant to finish within 8 minutes on one H100/H200, with no network.

1. the ``gpu``-marked tests (``pytest -m gpu tests``): CUDA features equal the CPU's, the dense matrix is built
   once per run, bf16 frozen weights give finite features, ``trainer=gpu`` trains the tiny model;
2. feature throughput of the paper's 35.7M-parameter CIFAR UNet (random weights), K = 10 uniform timesteps,
   k = 32768, output ``mean``, per-timestep normalisation, with the rows of ``benchmarks/features.py`` (the same
   functions, run on CUDA): (a) ours, sparse JL and dense Rademacher; (b) the published recipe (vmap per
   timestep, average, TRAK's ``CudaProjector`` when fast_jl imports, else its ``BasicProjector`` on CUDA: the
   row's name says which); (c) the floor (K batched forward+backward). A row whose projection cannot run is
   listed as not run, with the reason: at P = 35.7M and k = 32768 the dense matrix is 4.3 TiB, so it can be
   neither kept on the GPU nor regenerated (on the CPU, from its seed) once per batch;
3. one SD-LoRA training step and projected LoRA features on a tiny random Stable Diffusion pipeline at 256 px
   with bf16 frozen weights.

It prints the table (sample-timesteps/s, speed-up over (b), time relative to (c), peak GPU memory) and writes
JSON (+ the table as .md). ``--dry-run`` runs the same code on the CPU with the tiny preset, a tiny k and a few
samples (under a minute); it is what the default test suite runs, so the script cannot rot while no GPU is lent.

    make gpu-check                                         # = python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check.json

On a GPU machine without network that has torch, lightning, transformers and peft but not the rest, build the
missing pure-Python wheels here with ``make gpu-wheels`` (into ``.whl/``), carry them, and run there:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \\
        && PYTHONPATH=/tmp/site:. python3 benchmarks/gpu_check.py
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import features as feature_benchmark  # benchmarks/features.py, beside this script
import torch

from das_lightning.attribution.projectors import GIB

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = feature_benchmark.RESULTS_DIR / "gpu_check.json"
# the CPU regenerates a streamed dense matrix from its seed on every batch: beyond this it is not attempted
MAX_STREAMED_BYTES = 64 * GIB
# the part of the GPU's memory a kept dense matrix may take (the gradients of a batch need the rest)
KEPT_MATRIX_SHARE = 0.5
OURS_DENSE_KEPT = "ours dense (matrix kept)"
OURS_DENSE_STREAMED = "ours dense (streamed, 2 GiB budget)"
OURS_SPARSE = "ours sparse (s=4)"


@dataclass
class CheckSettings:
    """One run's workload; ``full()`` is the GPU check, ``dry_run()`` the same code at CPU-test size."""

    device: str
    preset: str
    num_samples: int
    batch_size: int
    num_timesteps: int
    dim: int
    repeats: int
    # PerSampleGradients.timestep_batch of the "ours" rows, one row each: None is the library's automatic choice
    # (budgets measured on a CPU), 1 is one timestep of the whole batch per vmap call
    ours_timestep_batches: tuple[int | None, ...]
    threads: int
    in_process: bool  # rows in this process (the dry run: interpreter start-ups would be most of its time)
    test_paths: tuple[str, ...]
    sd_image_size: int
    sd_batch_size: int
    sd_dim: int

    @classmethod
    def full(cls) -> CheckSettings:
        # batch 64: the published row regenerates its whole P x k matrix per call, whatever the batch size, so a
        # large batch is its best case; one timestep of 64 samples per vmap call is the published call's shape,
        # while the automatic choice caps a call at 4 GiB of pair gradients (30 pairs at P = 35.7M)
        return cls(
            device="cuda",
            preset="cifar",
            num_samples=256,
            batch_size=64,
            num_timesteps=10,
            dim=32768,
            repeats=2,
            ours_timestep_batches=(None, 1),
            threads=4,
            in_process=False,
            test_paths=("tests",),
            sd_image_size=256,
            sd_batch_size=4,
            sd_dim=4096,
        )

    @classmethod
    def dry_run(cls) -> CheckSettings:
        return cls(
            device="cpu",
            preset="tiny",
            num_samples=8,
            batch_size=4,
            num_timesteps=10,
            dim=64,
            repeats=1,
            ours_timestep_batches=(None,),
            threads=1,
            in_process=True,
            test_paths=("tests/test_gpu.py",),  # collecting the whole suite would take longer than the rest
            sd_image_size=32,
            sd_batch_size=2,
            sd_dim=64,
        )


def offline_env() -> dict[str, str]:
    """The environment of every step: nothing may reach the network."""
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"})
    env.pop("WANDB_API_KEY", None)
    return env


def run_gpu_tests(paths: Sequence[str]) -> dict[str, Any]:
    """``pytest -m gpu`` over ``paths`` (skipped without CUDA); its summary line and exit status."""
    # a module that cannot be imported there (a package not carried) must not stop the gpu tests of the others;
    # it still counts as an error in the summary and the exit status
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "--continue-on-collection-errors", *paths]
    started = time.perf_counter()
    completed = subprocess.run(
        command, cwd=REPO, env=offline_env(), capture_output=True, text=True, check=False
    )
    lines = [line for line in completed.stdout.strip().splitlines() if line.strip()]
    return {
        "command": " ".join(["python", *command[1:]]),
        "returncode": completed.returncode,
        "summary": lines[-1].strip("= ") if lines else completed.stderr.strip()[-500:],
        "seconds": time.perf_counter() - started,
        # the failures' details, for a run whose output is read later
        "output_tail": completed.stdout[-4000:] if completed.returncode else "",
    }


def published_method(device: str) -> str:
    """(b)'s row: TRAK's fused CUDA projector where it can run, else its block-wise BasicProjector."""
    if device.startswith("cuda") and feature_benchmark.fast_jl_available():
        return feature_benchmark.PUBLISHED_CUDA
    return feature_benchmark.PUBLISHED


def skip_reason(method: str, matrix_bytes: int, device: str) -> str | None:
    """Why a dense row cannot run at this P x k, or None."""
    if method == OURS_DENSE_KEPT:
        if device.startswith("cuda"):
            budget = KEPT_MATRIX_SHARE * torch.cuda.get_device_properties(torch.device(device)).total_memory
        else:
            budget = feature_benchmark.MAX_MATERIALISED_BYTES
        if matrix_bytes > budget:
            return f"the {matrix_bytes / GIB:,.0f} GiB matrix exceeds {budget / GIB:,.0f} GiB"
    if method == OURS_DENSE_STREAMED and matrix_bytes > MAX_STREAMED_BYTES:
        return f"it would regenerate a {matrix_bytes / GIB:,.0f} GiB matrix on the CPU for every batch"
    return None


def ours_vs_published(settings: CheckSettings) -> float:
    """Max |ours - published| / max |ours| of 4 samples' unprojected features: (a) and (b) time the same maths."""
    if settings.in_process:
        return feature_benchmark.agreement(
            settings.preset, settings.num_timesteps, settings.threads, settings.device
        )
    completed = subprocess.run(
        [sys.executable, feature_benchmark.__file__, "--agreement", settings.preset]
        + ["--num-timesteps", str(settings.num_timesteps), "--threads", str(settings.threads)]
        + ["--device", settings.device],
        capture_output=True,
        text=True,
        check=False,
        env=offline_env(),
    )
    if completed.returncode != 0:
        print(completed.stderr[-2000:], file=sys.stderr)
        return math.nan
    return json.loads(completed.stdout.strip().splitlines()[-1])


def run_here(config: feature_benchmark.Config) -> dict[str, Any]:
    """One row in this process (peak memory then covers everything before it), an error recorded as a row."""
    try:
        return feature_benchmark.run_config(config)
    except Exception as error:  # noqa: BLE001 - the row says what failed, the run's exit status too
        traceback.print_exc()
        return {**asdict(config), "error": f"{type(error).__name__}: {error}"}


def feature_rows(settings: CheckSettings) -> list[dict[str, Any]]:
    """(a), (b), (c) on ``settings.device``, each in a fresh process (its own peak memory) unless
    ``settings.in_process``; a row that cannot run at this P x k is listed with the reason."""
    matrix_bytes = feature_benchmark.materialised_bytes(settings.preset, settings.dim)
    ours = [OURS_DENSE_KEPT, OURS_DENSE_STREAMED, OURS_SPARSE]
    rows = []
    runs = [(method, batch) for method in ours for batch in settings.ours_timestep_batches]
    runs += [(published_method(settings.device), None), (feature_benchmark.FLOOR, None)]
    for method, timestep_batch in runs:
        config = feature_benchmark.Config(
            preset=settings.preset,
            method=method,
            num_samples=settings.num_samples,
            batch_size=settings.batch_size,
            num_timesteps=settings.num_timesteps,
            dim=settings.dim,
            # the published row is timed once: it dominates the run time
            repeats=1 if method.startswith("published") else settings.repeats,
            threads=settings.threads,
            device=settings.device,
            timestep_batch=timestep_batch,
        )
        reason = skip_reason(method, matrix_bytes, settings.device)
        if reason:
            rows.append({**asdict(config), "skipped": reason})
        elif settings.in_process:
            rows.append(run_here(config))
        else:
            rows.append(feature_benchmark.run_in_subprocess(config))
        print(feature_benchmark.format_table(rows, gpu_memory=True).splitlines()[-1], flush=True)
    return rows


def sd_lora_check(settings: CheckSettings) -> dict[str, Any]:
    """One LoRA training step + projected features on a tiny random SD pipeline, bf16 frozen weights."""
    from das_lightning_testing.tiny_sd import build_tiny_sd_pipeline, lora_step_and_features

    device = torch.device(settings.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as folder:
            # four VAE blocks: 8x down as in Stable Diffusion (256 px -> 32 x 32 latents)
            pipeline = build_tiny_sd_pipeline(
                Path(folder) / "tiny-sd", image_size=settings.sd_image_size, vae_channels=(8, 8, 16, 16)
            )
            result = lora_step_and_features(
                pipeline,
                device,
                image_size=settings.sd_image_size,
                frozen_dtype="bfloat16",
                batch_size=settings.sd_batch_size,
                dim=settings.sd_dim,
            )
    except Exception as error:  # noqa: BLE001 - recorded, and the run's exit status says it failed
        traceback.print_exc()
        return {"error": f"{type(error).__name__}: {error}", "seconds": time.perf_counter() - started}
    report = asdict(result)
    features = report.pop("features")
    report.update(
        image_size=settings.sd_image_size,
        batch_size=settings.sd_batch_size,
        dim=settings.sd_dim,
        features_finite=bool(torch.isfinite(features).all()),
        feature_norms=[float(norm) for norm in features.norm(dim=1)],
        peak_gpu_mib=torch.cuda.max_memory_allocated(device) / (1 << 20) if device.type == "cuda" else None,
        seconds=time.perf_counter() - started,
    )
    return report


def failures(report: dict[str, Any]) -> list[str]:
    """What went wrong in a run, one line each (empty when everything ran)."""
    problems = []
    if report["tests"]["returncode"] != 0:
        problems.append(f"gpu tests: {report['tests']['summary']}")
    for row in report["results"]:
        if "error" in row:
            problems.append(f"{row['method']}: {row['error']}")
    if not math.isfinite(report["max_relative_difference_ours_vs_published_unprojected"]):
        problems.append("ours vs published agreement did not run")
    if "error" in report["sd_lora"] or not report["sd_lora"].get("features_finite"):
        problems.append(f"sd-lora: {report['sd_lora'].get('error', 'non-finite features')}")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="the same code on the CPU at test size")
    parser.add_argument(
        "--out", type=Path, help=f"JSON to write (default {DEFAULT_OUT}; a temp file with --dry-run)"
    )
    parser.add_argument("--num-samples", type=int, help="N (full: 256)")
    parser.add_argument("--batch-size", type=int, help="images per batch (full: 64)")
    parser.add_argument("--dim", type=int, help="k (full: 32768)")
    parser.add_argument(
        "--timestep-batch",
        type=int,
        nargs="+",
        dest="ours_timestep_batches",
        help="timesteps per vmap call of the ours rows, a row each; 0 = automatic (full: 0 1)",
    )
    parser.add_argument("--skip-tests", action="store_true", help="leave out the gpu-marked tests")
    args = parser.parse_args(argv)

    settings = CheckSettings.dry_run() if args.dry_run else CheckSettings.full()
    for name in ("num_samples", "batch_size", "dim"):
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    if args.ours_timestep_batches:
        settings.ours_timestep_batches = tuple(batch or None for batch in args.ours_timestep_batches)
    out = args.out or (
        Path(tempfile.gettempdir()) / "gpu_check_dry_run.json" if args.dry_run else DEFAULT_OUT
    )
    # stop before any work when the run cannot be what it claims
    if settings.device == "cuda" and not torch.cuda.is_available():
        parser.exit(
            2, "error: no CUDA device is visible; on a CPU run `python benchmarks/gpu_check.py --dry-run`\n"
        )
    missing = feature_benchmark.trak_missing()
    if missing:
        parser.exit(2, f"error: {missing}\n")
    torch.set_num_threads(settings.threads)

    started = time.perf_counter()
    if args.skip_tests:
        tests = {"command": None, "returncode": 0, "summary": "skipped (--skip-tests)", "seconds": 0.0}
    else:
        tests = run_gpu_tests(settings.test_paths)
    print(f"gpu tests: {tests['summary']} ({tests['seconds']:.0f} s)", flush=True)
    agreement = ours_vs_published(settings)
    rows = feature_rows(settings)
    sd_lora = sd_lora_check(settings)
    print(f"sd-lora: {json.dumps(sd_lora)}", flush=True)

    table = feature_benchmark.format_table(rows, gpu_memory=True)
    published = next((row for row in rows if row["method"].startswith("published")), {})
    command = "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = {
        "command": command.strip(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dry_run": args.dry_run,
        "machine": feature_benchmark.machine_info(),
        "settings": {
            **asdict(settings),
            "timesteps": "uniform",
            "output_function": "mean",
            "normalize_per_timestep": True,
            "published_projection": published.get("projection"),
            "fast_jl": feature_benchmark.fast_jl_available(),
        },
        "tests": tests,
        "max_relative_difference_ours_vs_published_unprojected": agreement,
        "results": rows,
        "sd_lora": sd_lora,
        "total_seconds": time.perf_counter() - started,
    }
    problems = failures(report)
    report["problems"] = problems
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    machine = report["machine"]
    out.with_suffix(".md").write_text(
        f"`{report['command']}` on {machine['gpu'] or machine['cpu_model']}, torch {machine['torch']}, "
        f"{report['date']}; (b) = {report['settings']['published_projection']}\n\n{table}\n"
    )
    print()
    print(table)
    print(f"\n(b) projected with: {report['settings']['published_projection']}")
    print(f"ours vs published (unprojected, max relative difference): {agreement:.2e}")
    print(f"wrote {out} in {report['total_seconds']:.0f} s")
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
