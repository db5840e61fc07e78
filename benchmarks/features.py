"""Benchmark of projected per-sample gradient features (issue 3): ours vs the published recipe vs the floor.

Same model, same samples, K uniform timesteps, k output dimensions, output function ``mean`` (DAS), per-timestep
unit normalisation on, on the CPU (``benchmarks/gpu_check.py`` runs the same rows on a CUDA device):

- (a) ours: ``PerSampleGradients.flat_gradients`` + a projector + ``FeatureStore.write``, i.e. what
  ``ProjectedGradientCollector`` does per batch; one row per projector (dense Rademacher with the matrix kept in
  memory, dense Rademacher streamed under the default 2 GiB budget, sparse JL);
- (b) the published recipe (D-TRAK / DAS scripts), written here: a loop over the K timesteps, per timestep
  ``vmap(grad)`` over the batch, flatten, normalise, average, then the TRAK library's ``BasicProjector``
  (PyPI ``traker``, Rademacher, its default block size; on CUDA its ``CudaProjector`` when fast_jl imports) and
  the same store write. ``traker`` is the ``bench`` extra (``pip install -e '.[bench]'``, which
  ``make bench-features`` runs); without it the benchmark stops at once and says so;
- (c) the floor: K batched forward+backward passes over the same samples (one scalar summed over the batch, no
  per-sample gradients, no projection).

Each configuration runs in a fresh subprocess so its peak RSS is its own; it warms up on one batch (which also
builds a kept projection matrix: reported as setup time) and the best of ``--repeats`` timed passes over the
N samples is kept. Throughput is in sample-timesteps per second (N * K / seconds).

    make bench-features                                 # installs the bench extra, then the full table
    python benchmarks/features.py                       # the full table, ~9 min on 2 busy cores
    python benchmarks/features.py --presets tiny        # only the 16 px model
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from das_lightning.attribution.grads import PerSampleGradients
from das_lightning.attribution.projectors import GIB, build_projector
from das_lightning.attribution.store import FeatureStore
from das_lightning.attribution.timesteps import select_timesteps
from das_lightning.diffusion import NUM_TRAIN_TIMESTEPS, add_noise, make_scheduler, rule_noise
from das_lightning.models.attention import use_vmap_friendly_attention
from das_lightning.models.unet import build_unet, count_parameters
from das_lightning.seeding import derive_seed

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SET_NAME = "benchmark"
NUM_THREADS = 2
# preset -> (image size, channels): the default tiny demo UNet, the ~1M-parameter 32x32 UNet, and the paper's
# 35.7M-parameter CIFAR UNet (GPU only: benchmarks/gpu_check.py)
MODELS: dict[str, tuple[int, int]] = {"tiny": (16, 1), "small": (32, 3), "cifar": (32, 3)}
# a materialised dense matrix above this is not attempted (the 2-core box has 23 GiB and other jobs on it)
MAX_MATERIALISED_BYTES = 8 * GIB

BatchStep = Callable[[torch.Tensor, list[int]], torch.Tensor | None]
# N per preset by default: the published and streamed rows regenerate a P x k matrix per batch (~1-2 min a batch
# for the small UNet), so the small model is timed on one batch to keep the whole run near 10 minutes
DEFAULT_NUM_SAMPLES = {"tiny": 64, "small": 32}
CPU_PRESETS = list(DEFAULT_NUM_SAMPLES)
BENCH_INSTALL = "pip install -e '.[bench]'"


@dataclass
class Step:
    """What one method does per batch, and how to warm it up.

    ``warm_up`` runs the same code on the first batch; for the rows whose projection regenerates the whole
    P x k matrix on every call (TRAK's BasicProjector, our streamed dense path) it skips the projection, which
    has nothing to warm up and would cost as much as a timed batch.
    """

    run: BatchStep
    warm_up: BatchStep
    projection: str = ""


@dataclass
class Config:
    """One measured row: a model, a method and a workload."""

    preset: str
    method: str
    num_samples: int
    batch_size: int
    num_timesteps: int
    dim: int
    repeats: int
    threads: int = NUM_THREADS
    device: str = "cpu"
    timestep_batch: int | None = None  # of the "ours" rows (PerSampleGradients; None: automatic)


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work, so a timer read after it covers the work and not only its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def trak_missing() -> str | None:
    """Why the published rows cannot run (the TRAK library is not importable), or None."""
    try:
        import trak.projectors  # noqa: F401
    except ImportError as error:
        return f"{error}: the published recipe needs the TRAK library; run `{BENCH_INSTALL}` first"
    return None


def fast_jl_available() -> bool:
    """Whether TRAK's CUDA projector kernel (fast_jl, built against the local CUDA toolkit) imports."""
    try:
        import fast_jl  # noqa: F401
    except ImportError:
        return False
    return True


def _ours(projector_kind: str, **projector_options: Any) -> Callable[..., Step]:
    """(a): the library's per-sample gradients and projector, exactly as the collector calls them."""

    def make(
        model: torch.nn.Module,
        alphas_cumprod: torch.Tensor,
        timesteps: list[int],
        dim: int,
        timestep_batch: int | None = None,
    ) -> Step:
        gradients = PerSampleGradients(
            model,
            alphas_cumprod,
            "mean",
            timesteps,
            normalize_per_timestep=True,
            timestep_batch=timestep_batch,
        )
        projector = build_projector(
            projector_kind, gradients.num_parameters, dim, seed=0, **projector_options
        )

        def flat(images: torch.Tensor, indices: list[int]) -> torch.Tensor:
            return gradients.flat_gradients(images, indices, SET_NAME)

        def step(images: torch.Tensor, indices: list[int]) -> torch.Tensor:
            return projector.project(flat(images, indices))

        streamed = projector_kind == "dense" and not projector.fits_in_memory
        path = (
            {True: "streamed", False: "matrix kept"}[streamed]
            if projector_kind == "dense"
            else projector_kind
        )
        return Step(run=step, warm_up=flat if streamed else step, projection=path)

    return make


def published_features(
    model: torch.nn.Module, alphas_cumprod: torch.Tensor, timesteps: list[int]
) -> tuple[Callable[[torch.Tensor, list[int]], torch.Tensor], int]:
    """(b) before projection, as in the D-TRAK/DAS scripts: per timestep vmap(grad) over the batch, flatten,
    normalise, average. Returns the step (images, indices) -> (B, P) and P.

    The same attention processor as ours is used (the scripts instead delete scaled_dot_product_attention from
    torch), and the same noise rule, so (a) and (b) compute the same features up to the projection matrix.
    """
    use_vmap_friendly_attention(model)
    names = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    params = {name: parameter.detach() for name, parameter in model.named_parameters()}
    buffers = {name: buffer.detach() for name, buffer in model.named_buffers()}
    num_params = sum(params[name].numel() for name in names)

    def sample_output(params, buffers, image, noise, timestep):  # one sample, a batch of one for the model
        noisy = add_noise(image.unsqueeze(0), noise.unsqueeze(0), timestep.unsqueeze(0), alphas_cumprod)
        prediction = functional_call(model, (params, buffers), (noisy, timestep.unsqueeze(0))).sample
        return prediction.mean()

    per_sample_grad = vmap(grad(sample_output), in_dims=(None, None, 0, 0, 0))

    def features(images: torch.Tensor, indices: list[int]) -> torch.Tensor:
        batch, device = images.shape[0], images.device
        average = torch.zeros(batch, num_params, device=device)
        for timestep in timesteps:
            noise = rule_noise(SET_NAME, indices, [timestep] * batch, 0, images.shape[1:], device)
            timestep_batch = torch.full((batch,), timestep, device=device)
            gradients = per_sample_grad(params, buffers, images, noise, timestep_batch)
            flat = torch.cat([gradients[name].reshape(batch, -1) for name in names], dim=1)
            average += flat / flat.norm(dim=1, keepdim=True) / len(timesteps)
        return average

    return features, num_params


def _published(
    model: torch.nn.Module, alphas_cumprod: torch.Tensor, timesteps: list[int], dim: int, **_: Any
) -> Step:
    """(b): the published features, then the TRAK library's ``BasicProjector`` (Rademacher, default blocks) on
    the model's device."""
    from trak.projectors import BasicProjector, ProjectionType

    features, num_params = published_features(model, alphas_cumprod, timesteps)
    device = next(model.parameters()).device
    projector = BasicProjector(
        grad_dim=num_params, proj_dim=dim, seed=0, proj_type=ProjectionType.rademacher, device=device
    )

    def step(images: torch.Tensor, indices: list[int]) -> torch.Tensor:
        return projector.project(features(images, indices), model_id=0)

    return Step(
        run=step, warm_up=features, projection=f"TRAK BasicProjector on {device}, regenerated per call"
    )


def _published_cuda(
    model: torch.nn.Module, alphas_cumprod: torch.Tensor, timesteps: list[int], dim: int, **_: Any
) -> Step:
    """(b) on a GPU with fast_jl: the published features, then TRAK's ``CudaProjector`` (Rademacher), called on
    at most ``max_batch_size`` = 32 rows at a time as TRAK's own gradient computer does."""
    from trak.projectors import CudaProjector, ProjectionType

    features, num_params = published_features(model, alphas_cumprod, timesteps)
    device = next(model.parameters()).device
    max_batch_size = 32
    projector = CudaProjector(
        grad_dim=num_params,
        proj_dim=dim,
        seed=0,
        proj_type=ProjectionType.rademacher,
        device=device,
        max_batch_size=max_batch_size,
    )

    def step(images: torch.Tensor, indices: list[int]) -> torch.Tensor:
        rows = features(images, indices)
        return torch.cat([projector.project(part, model_id=0) for part in rows.split(max_batch_size)])

    return Step(run=step, warm_up=step, projection="TRAK CudaProjector (fast_jl)")


def _floor(
    model: torch.nn.Module, alphas_cumprod: torch.Tensor, timesteps: list[int], dim: int, **_: Any
) -> Step:
    """(c): K batched forward+backward passes, the cost of any gradient-based feature without per-sample work."""

    def step(images: torch.Tensor, indices: list[int]) -> None:
        batch, device = images.shape[0], images.device
        for timestep in timesteps:
            noise = rule_noise(SET_NAME, indices, [timestep] * batch, 0, images.shape[1:], device)
            timestep_batch = torch.full((batch,), timestep, device=device)
            noisy = add_noise(images, noise, timestep_batch, alphas_cumprod)
            model.zero_grad(set_to_none=True)
            model(noisy, timestep_batch).sample.mean(dim=(1, 2, 3)).sum().backward()
        return None

    return Step(run=step, warm_up=step)


METHODS: dict[str, Callable[..., Step]] = {
    "ours dense (matrix kept)": _ours("dense", distribution="rademacher", memory_budget_bytes=1 << 40),
    "ours dense (streamed, 2 GiB budget)": _ours(
        "dense", distribution="rademacher", memory_budget_bytes=2 * GIB
    ),
    "ours sparse (s=4)": _ours("sparse", nnz_per_param=4),
    "published (vmap per t + TRAK BasicProjector)": _published,
    "published (vmap per t + TRAK CudaProjector)": _published_cuda,
    "floor (K batched fwd+bwd)": _floor,
}
PUBLISHED = "published (vmap per t + TRAK BasicProjector)"
PUBLISHED_CUDA = "published (vmap per t + TRAK CudaProjector)"
FLOOR = "floor (K batched fwd+bwd)"
# the rows of a CPU run (TRAK's CUDA projector needs a GPU and fast_jl)
CPU_METHODS = [method for method in METHODS if method != PUBLISHED_CUDA]


def build_workload(
    preset: str, num_samples: int, device: torch.device | str = "cpu"
) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The same randomly initialised model and samples for every method (seeded by name, drawn on the CPU, so
    every device gets the same weights and images)."""
    image_size, channels = MODELS[preset]
    torch.manual_seed(derive_seed("benchmark-model", preset))
    model = build_unet(preset, image_size, channels).eval()
    generator = torch.Generator().manual_seed(derive_seed("benchmark-images", preset))
    images = torch.rand((num_samples, channels, image_size, image_size), generator=generator) * 2 - 1
    return model.to(device), make_scheduler().alphas_cumprod.to(device), images.to(device)


def run_config(config: Config) -> dict[str, Any]:
    """Measure one configuration in this process (called in a fresh subprocess)."""
    torch.set_num_threads(config.threads)
    device = torch.device(config.device)
    model, alphas_cumprod, images = build_workload(config.preset, config.num_samples, device)
    timesteps = select_timesteps("uniform", config.num_timesteps, total=NUM_TRAIN_TIMESTEPS)
    rss_model = peak_rss_mib()
    options = {"timestep_batch": config.timestep_batch} if config.method.startswith("ours") else {}
    step = METHODS[config.method](model, alphas_cumprod, timesteps, config.dim, **options)
    batches = [
        (
            images[start : start + config.batch_size],
            list(range(start, min(start + config.batch_size, len(images)))),
        )
        for start in range(0, len(images), config.batch_size)
    ]
    with tempfile.TemporaryDirectory() as folder:
        store = FeatureStore.open(Path(folder), config.num_samples, config.dim, {"benchmark": config.method})

        def one_pass() -> None:
            for batch_images, indices in batches:
                rows = step.run(batch_images, indices)
                if rows is not None:  # the floor makes no features
                    store.write(np.asarray(indices), rows.detach().float().cpu().numpy())
            synchronize(device)

        started = time.perf_counter()
        step.warm_up(*batches[0])  # allocator, vmap tracing; a kept projection matrix is built here
        synchronize(device)
        setup_seconds = time.perf_counter() - started
        seconds = []
        for _ in range(config.repeats):
            started = time.perf_counter()
            one_pass()
            seconds.append(time.perf_counter() - started)
    best = min(seconds)
    peak_gpu = torch.cuda.max_memory_allocated(device) / (1 << 20) if device.type == "cuda" else None
    return {
        **asdict(config),
        "num_parameters": count_parameters(model),
        "projection": step.projection,
        "seconds": seconds,
        "best_seconds": best,
        "warmup_seconds": setup_seconds,
        "sample_timesteps_per_s": config.num_samples * config.num_timesteps / best,
        "load_average_after": os.getloadavg()[0],
        "rss_after_model_mib": rss_model,
        "peak_rss_mib": peak_rss_mib(),
        "peak_gpu_mib": peak_gpu,
    }


def agreement(preset: str, num_timesteps: int, threads: int, device: str = "cpu") -> float:
    """Max |ours - published| / max |ours| of the unprojected features of 4 samples: (a) and (b) time the same maths."""
    torch.set_num_threads(threads)
    model, alphas_cumprod, images = build_workload(preset, 4, device)
    timesteps = select_timesteps("uniform", num_timesteps, total=NUM_TRAIN_TIMESTEPS)
    indices = list(range(4))
    gradients = PerSampleGradients(model, alphas_cumprod, "mean", timesteps, normalize_per_timestep=True)
    ours = gradients.flat_gradients(images, indices, SET_NAME)
    published, _ = published_features(model, alphas_cumprod, timesteps)
    return float((ours - published(images, indices)).abs().max() / ours.abs().max())


def run_in_subprocess(config: Config) -> dict[str, Any]:
    """Run one configuration in a fresh interpreter, so peak RSS (and peak GPU memory) is per configuration."""
    completed = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(asdict(config))],
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        return {**asdict(config), "error": completed.stderr.strip().splitlines()[-1:]}
    return json.loads(completed.stdout.strip().splitlines()[-1])


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu_model = "unknown"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    try:
        from importlib.metadata import version

        traker_version = version("traker")
    except Exception:  # the published row then reports its own import error
        traker_version = None
    return {
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cuda": torch.version.cuda,
        "traker": traker_version,
        "platform": platform.platform(),
    }


def materialised_bytes(preset: str, dim: int) -> int:
    model, _, _ = build_workload(preset, 1)
    return count_parameters(model) * dim * 4


def format_table(results: list[dict[str, Any]], gpu_memory: bool = False) -> str:
    """A markdown table: throughput, speed-up over the published recipe, cost relative to the floor, peak RSS
    (and peak GPU memory, for CUDA rows)."""
    gpu_header, gpu_rule = (" peak GPU MiB |", "---|") if gpu_memory else ("", "")
    lines = [
        "| model | P | method | N | sample-timesteps/s | a/b (speed-up) | a/c (cost) | warm-up s | peak RSS MiB |"
        + gpu_header,
        "|---|---|---|---|---|---|---|---|---|" + gpu_rule,
    ]
    by_key = {
        (r["preset"], r["method"], r["num_samples"]): r
        for r in results
        if "error" not in r and "skipped" not in r
    }
    for r in results:
        # rows with a fixed number of timesteps per vmap call say so (none: the automatic choice)
        method = r["method"] + (f", {r['timestep_batch']} t per call" if r.get("timestep_batch") else "")
        if "error" in r or "skipped" in r:
            reason = r.get("skipped") or r["error"]
            lines.append(
                f"| {r['preset']} | | {method} | {r['num_samples']} | not run: {reason} | | | | |"
                + (" |" if gpu_memory else "")
            )
            continue
        published = next(
            (
                by_key[key]
                for key in by_key
                if key[0] == r["preset"] and key[1].startswith("published") and key[2] == r["num_samples"]
            ),
            None,
        )
        floor = by_key.get((r["preset"], FLOOR, r["num_samples"]))
        is_ours = r["method"].startswith("ours")
        speedup = (
            f"{r['sample_timesteps_per_s'] / published['sample_timesteps_per_s']:.1f}x"
            if is_ours and published
            else ""
        )
        cost = (
            f"{floor['sample_timesteps_per_s'] / r['sample_timesteps_per_s']:.2f}x"
            if r is not floor and floor
            else ""
        )
        gpu_cell = ""
        if gpu_memory:  # rows measured on a CPU have no GPU peak
            gpu_cell = f" {r['peak_gpu_mib']:.0f} |" if r.get("peak_gpu_mib") is not None else " |"
        lines.append(
            f"| {r['preset']} | {r['num_parameters'] / 1e6:.2f}M | {method} | {r['num_samples']} "
            f"| {r['sample_timesteps_per_s']:.0f} | {speedup} | {cost} | {r['warmup_seconds']:.1f} "
            f"| {r['peak_rss_mib']:.0f} |" + gpu_cell
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=CPU_PRESETS, choices=list(MODELS))
    parser.add_argument("--num-samples", type=int, help=f"N for every preset (default {DEFAULT_NUM_SAMPLES})")
    parser.add_argument(
        "--flat-num-samples", type=int, default=256, help="second N for the memory-flat check"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-timesteps", type=int, default=10)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=2, help="timed passes of the fast rows (best is kept)")
    parser.add_argument("--threads", type=int, default=NUM_THREADS, help="torch threads")
    parser.add_argument(
        "--flat-presets", nargs="*", default=["tiny"], help="presets for the memory-flat check"
    )
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "features.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--agreement", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)  # of --agreement (gpu_check.py)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run_config(Config(**json.loads(args.worker)))))
        return
    if args.agreement:
        print(json.dumps(agreement(args.agreement, args.num_timesteps, args.threads, args.device)))
        return
    missing = trak_missing()
    if missing:  # a row of errors after minutes of work would hide the one install step
        parser.exit(2, f"error: {missing} (or `make bench-features`, which installs it)\n")

    started = time.perf_counter()
    load_before = os.getloadavg()
    results: list[dict[str, Any]] = []
    agreements: dict[str, float] = {}
    for preset in args.presets:
        completed = subprocess.run(
            [sys.executable, __file__, "--agreement", preset, "--num-timesteps", str(args.num_timesteps)]
            + ["--threads", str(args.threads)],
            capture_output=True,
            text=True,
            check=True,
        )
        agreements[preset] = json.loads(completed.stdout.strip().splitlines()[-1])
        matrix_bytes = materialised_bytes(preset, args.dim)
        for method in CPU_METHODS:
            config = Config(
                preset,
                method,
                args.num_samples or DEFAULT_NUM_SAMPLES[preset],
                args.batch_size,
                args.num_timesteps,
                args.dim,
                args.repeats,
                args.threads,
            )
            if method == "ours dense (matrix kept)" and matrix_bytes > MAX_MATERIALISED_BYTES:
                results.append({**asdict(config), "skipped": f"{matrix_bytes / GIB:.1f} GiB matrix"})
                continue
            # the slow rows are timed once: they dominate the run time
            if method == PUBLISHED or "streamed" in method:
                config.repeats = 1
            results.append(run_in_subprocess(config))
            print(format_table(results).splitlines()[-1], flush=True)
        if preset not in args.flat_presets:
            continue
        # peak memory flat in N: the sparse row again over a larger N
        flat = Config(
            preset,
            "ours sparse (s=4)",
            args.flat_num_samples,
            args.batch_size,
            args.num_timesteps,
            args.dim,
            1,
            args.threads,
        )
        results.append(run_in_subprocess(flat))
        print(format_table(results).splitlines()[-1], flush=True)

    table = format_table(results)
    command = "python benchmarks/features.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = {
        "command": command.strip(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "total_seconds": time.perf_counter() - started,
        "settings": {
            "num_timesteps": args.num_timesteps,
            "timesteps": "uniform",
            "dim": args.dim,
            "output_function": "mean",
            "normalize_per_timestep": True,
            "batch_size": args.batch_size,
            "torch_threads": args.threads,
        },
        "max_relative_difference_ours_vs_published_unprojected": agreements,
        "results": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    args.output.with_suffix(".md").write_text(
        f"`{report['command']}` on {report['machine']['cpu_model']} ({report['machine']['cpu_count']} cores, "
        f"{args.threads} torch threads), torch {torch.__version__}, {report['date']}\n\n{table}\n"
    )
    print()
    print(table)
    print(f"\nours vs published (unprojected, max relative difference): {agreements}")
    print(f"wrote {args.output} in {report['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
