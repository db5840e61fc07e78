"""LDS benchmark at CPU scale: runs experiment=fashion2_lds end to end and records the table.

    python benchmarks/lds_fashion2.py [--root outputs/bench] [--subsets 64] [--seeds 0 1] [--workers 2]

Stages (each a normal command, so a failed or interrupted run resumes where it stopped): train the full models
(seed 0, the primary, and seeds 1-3 for the ensembles; snapshots every 125 steps for the checkpoint ensemble), train
the subset models once per ground-truth training seed r of ``--seeds`` (Hydra multiruns in ``--workers`` parallel
single-thread processes: on 2 cores two one-thread workers train about five times faster than one default-thread
process beside other work), attribute with every method and ensemble, evaluate, and export the LDS bundle
(``--bundle``, committed: ``python evaluate_lds.py bundle=benchmarks/bundles/fashion2`` reproduces the tables from it
without training). Subset models of one seed r share it (METHOD.md §3); the ground truth averages the R seeds' losses
and the interval resamples seeds too (das_lightning/evaluation/intervals.py). lambda (and EK-FAC's damping) is on the
features' own scale (das_lightning/lambdas.py). Writes benchmarks/results/lds_fashion2.json (records + paired
differences + machine, date, stage times), benchmarks/results/lds_fashion2.md and the LDS-vs-number-of-models plot
benchmarks/results/lds_vs_models.png. The table of the first protocol (own seed per subset model, absolute lambda
grid) is kept as lds_fashion2_v1_own_seeds_absolute_grid.{json,md}.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
FULL_SEEDS = [0, 1, 2, 3]  # seed 0 is the primary model (its generated images are the queries)
SNAPSHOT_EVERY = 125  # of 500 steps: the checkpoint ensemble's members
ENSEMBLE_SIZES = [1, 2, 4]
EKFAC = ("ekfac", "ekfac_squared", "ekfac_das")
# the draws every committed table was measured with (10 grid timesteps x 1 noise draw, the papers'), named for every
# gradient method: DAS, TRAK and D-TRAK moved to other draws in issue 18 (docs/frontier.md), the benchmark did not
PAPER_DRAWS = [
    "method.features.num_timesteps=10",
    "method.features.sampling=grid",
    "method.features.draws_per_timestep=1",
    "method.features.antithetic=false",
]
# score-folder name -> attribute.py overrides (ensembles average the members' scores at each c); EK-FAC scores its
# whole grid (48 c) from one pass
ATTRIBUTIONS: dict[str, list[str]] = {
    **{
        name: [f"method={name}", *PAPER_DRAWS]
        for name in (
            "das",
            "das_plain",
            "das_noleverage",
            "das_magnitude",
            "das_exact",
            "dtrak",
            "trak",
            "relatif",
            "trak_squared",
            "dtrak_squared",
            "relatif_squared",
            "grad_cos",
            *EKFAC,
        )
    },
    "pixel": ["method=pixel"],
    **{
        f"{method}_seeds{'-'.join(map(str, FULL_SEEDS[:size]))}": [
            f"method={method}",
            *PAPER_DRAWS,
            f"ensemble.seeds=[{','.join(map(str, FULL_SEEDS[:size]))}]",
        ]
        for method in ("das", "dtrak")
        for size in ENSEMBLE_SIZES[1:]
    },
    "das_steps125-250-375-500": ["method=das", *PAPER_DRAWS, "ensemble.checkpoints=[125,250,375,500]"],
}
METHODS = list(ATTRIBUTIONS)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def run(stage: str, args: list[str], timings: dict[str, float]) -> None:
    started = time.perf_counter()
    print(f"[{datetime.now():%H:%M:%S}] {stage}: python {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, *args], cwd=REPO, check=True, env={**os.environ, "WANDB_MODE": "offline"})
    timings[stage] = round(time.perf_counter() - started, 1)
    print(f"    {timings[stage]:.0f} s", flush=True)


def run_parallel(stage: str, commands: list[list[str]], timings: dict[str, float]) -> None:
    """Run commands side by side, one thread each (threads beyond the cores only slow every worker down)."""
    started = time.perf_counter()
    single = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    workers = []
    for args in commands:
        print(f"[{datetime.now():%H:%M:%S}] {stage} (worker): python {' '.join(args)}", flush=True)
        workers.append(subprocess.Popen([sys.executable, *args], cwd=REPO, env={**os.environ, **single}))
    failed = [worker.args for worker in workers if worker.wait() != 0]
    if failed:
        raise SystemExit(f"{stage}: {len(failed)} worker(s) failed, e.g. {' '.join(failed[0])}")
    timings[stage] = round(time.perf_counter() - started, 1)
    print(f"    {timings[stage]:.0f} s", flush=True)


def train_subset_models(
    common: list[str], num_subsets: int, seeds: list[int], workers: int, timings: dict[str, float]
) -> None:
    """Subsets 0..M-1 under every training seed, as ``workers`` single-thread Hydra multiruns side by side."""
    chunks = [list(range(num_subsets))[w::workers] for w in range(workers)]
    run_parallel(
        "train subset models",
        [
            [
                "train.py",
                "-m",
                *common,
                "subset=lds",
                f"subset.index={','.join(map(str, chunk))}",
                f"seed={','.join(map(str, seeds))}",
            ]
            for chunk in chunks
            if chunk
        ],
        timings,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", default="outputs/bench", help="paths.root for every artifact")
    parser.add_argument("--subsets", type=int, default=64, help="number of LDS subsets M")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1], help="training seeds r of the subset models (R = 2)"
    )
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        help="score-folder names (fnmatch patterns, e.g. 'ekfac*') neither attributed nor evaluated",
    )
    parser.add_argument(
        "--evaluate-only",
        action="store_true",
        help="only the evaluation (the models and score folders of an earlier run are there: skip their reuse checks)",
    )
    parser.add_argument(
        "--bundle", default="benchmarks/bundles/fashion2", help="where the LDS bundle is exported ('' = not)"
    )
    parser.add_argument("--workers", type=int, default=2, help="parallel single-thread subset trainers")
    args = parser.parse_args()
    common = [
        "experiment=fashion2_lds",
        f"paths.root={args.root}",
        "logger=csv",
        "trainer.enable_progress_bar=false",
    ]
    timings: dict[str, float] = {}
    started = time.perf_counter()
    for seed in [] if args.evaluate_only else FULL_SEEDS:
        run(
            f"train full model seed {seed}",
            ["train.py", *common, f"seed={seed}", f"train.snapshot_every_n_steps={SNAPSHOT_EVERY}"],
            timings,
        )
    if not args.evaluate_only:
        train_subset_models(common, args.subsets, args.seeds, args.workers, timings)
    methods = [name for name in METHODS if not any(fnmatch.fnmatch(name, skip) for skip in args.skip)]
    for name in [] if args.evaluate_only else methods:
        run(f"attribute {name}", ["attribute.py", *common, *ATTRIBUTIONS[name]], timings)
    evaluate = [
        "evaluate_lds.py",
        *common,
        f"lds.num_subsets={args.subsets}",
        f"lds.seeds=[{','.join(map(str, args.seeds))}]",
        f"methods=[{','.join(methods)}]",
    ]
    if args.bundle:
        shutil.rmtree(REPO / args.bundle, ignore_errors=True)  # the bundle of this run replaces the last one
        evaluate.append(f"export_bundle={args.bundle}")
    run("evaluate", evaluate, timings)
    total = round(time.perf_counter() - started, 1)

    lds_dir = REPO / args.root / "fashion2" / "tiny" / "lds" / "full-seed0"
    document = json.loads((lds_dir / "lds.json").read_text())
    document["benchmark"] = {
        "command": (
            f"python benchmarks/lds_fashion2.py --root {args.root} --subsets {args.subsets} "
            f"--seeds {' '.join(map(str, args.seeds))} --workers {args.workers}"
            + (f" --skip {' '.join(args.skip)}" if args.skip else "")
            + (" --evaluate-only" if args.evaluate_only else "")
        ),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version()},
        "stage_seconds": timings,
        "total_seconds": total,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "lds_fashion2.json").write_text(json.dumps(document, indent=2) + "\n")
    table = (lds_dir / "lds.md").read_text()
    header = (
        f"# LDS on fashion2 (experiment=fashion2_lds)\n\n{document['benchmark']['command']}  \n"
        f"{document['benchmark']['date']}, {document['benchmark']['machine']['cpu']}, "
        f"{document['benchmark']['machine']['cores']} cores, {total / 60:.0f} min end to end\n\n"
    )
    (RESULTS / "lds_fashion2.md").write_text(header + table)
    plot_lds_vs_models(document["records"], RESULTS / "lds_vs_models.png")
    print(header + table)


def plot_lds_vs_models(records: list[dict], target: Path) -> None:
    """LDS (held-out lambda, 95% CI) of DAS and D-TRAK against the number of full models averaged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    query_sets = sorted({record["query_set"] for record in records}, reverse=True)
    figure, axes = plt.subplots(1, len(query_sets), figsize=(4.5 * len(query_sets), 3.6), squeeze=False)
    for axis, query_set in zip(axes[0], query_sets, strict=True):
        for method in ("das", "dtrak"):
            points = []
            for size in ENSEMBLE_SIZES:
                name = method if size == 1 else f"{method}_seeds{'-'.join(map(str, FULL_SEEDS[:size]))}"
                found = [
                    r
                    for r in records
                    if r["method"] == name
                    and r["query_set"] == query_set
                    and r["lambda_selection"] == "heldout"
                ]
                if found:
                    points.append((size, found[0]["lds"], found[0]["ci_low"], found[0]["ci_high"]))
            if points:
                sizes, lds, low, high = (list(column) for column in zip(*points, strict=True))
                errors = [
                    [v - lo for v, lo in zip(lds, low, strict=True)],
                    [hi - v for v, hi in zip(lds, high, strict=True)],
                ]
                axis.errorbar(sizes, lds, yerr=errors, marker="o", capsize=3, label=method)
        axis.set_xscale("log", base=2)
        axis.set_xticks(ENSEMBLE_SIZES, [str(size) for size in ENSEMBLE_SIZES])
        axis.set_xlabel("full models averaged (seeds)")
        axis.set_ylabel("LDS (%), held-out lambda")
        axis.set_title(f"fashion2, {query_set} queries")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(target, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
