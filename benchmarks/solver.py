"""Benchmark of the kernel factorisation behind every kernel score (TRAK, D-TRAK, DAS, relatif, renorm).

``KernelSolver.from_features`` factorises K = Phi^T Phi once per feature set. With N train rows of k features it
takes the k x k kernel (memory k^2, eigendecomposition O(k^3)) when N >= k, and the N x N Gram matrix (memory
N k + N^2, O(N^2 k + N^3)) when N < k, as in the paper's ArtBench / CIFAR-2 settings (N = 5000, k = 32768).
Each row factorises random float32 features in a fresh subprocess (so its peak RSS is its own), then scores 64
queries at one lambda; the kernel form is only attempted where its k x k float64 matrix fits ``--max-kernel-gib``.

    python benchmarks/solver.py                          # the table below, a few minutes on 2 cores
    python benchmarks/solver.py --sizes 5000x32768       # one size
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from das_lightning.attribution.kernel_solver import DASReadout, KernelSolver, kernel_scores

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_SIZES = ("1000x4096", "2000x8192", "5000x32768", "8192x4096")
NUM_QUERIES = 64


def measure(num_train: int, dim: int, form: str) -> dict:
    """Factorise and score once; seconds and peak RSS of this process."""
    rng = np.random.default_rng(0)
    train = rng.standard_normal((num_train, dim), dtype=np.float32)
    queries = rng.standard_normal((NUM_QUERIES, dim), dtype=np.float32)
    start = time.perf_counter()
    if form == "gram":
        solver = KernelSolver.from_gram(train)
    else:
        kernel = KernelSolver.accumulate_kernel(train)
        eigenvalues, eigenvectors = torch.linalg.eigh(0.5 * (kernel + kernel.T))
        del kernel
        solver = KernelSolver(eigenvalues, eigenvectors, num_samples=num_train)
    factorised = time.perf_counter() - start
    kernel_scores(queries, train, [1.0], DASReadout(), solver=solver)
    scored = time.perf_counter() - start - factorised
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB on Linux
    return {"factorise_s": factorised, "score_s": scored, "peak_rss_mib": peak, "rank": solver.rank}


def run_isolated(num_train: int, dim: int, form: str) -> dict:
    command = [sys.executable, __file__, "--one", f"{num_train}x{dim}", "--form", form]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", default=list(DEFAULT_SIZES), help="NxK sizes")
    parser.add_argument("--max-kernel-gib", type=float, default=4.0, help="skip the kernel form above this")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--form", choices=("gram", "kernel"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        num_train, dim = (int(part) for part in args.one.split("x"))
        print(json.dumps(measure(num_train, dim, args.form)))
        return

    rows = []
    for size in args.sizes:
        num_train, dim = (int(part) for part in size.split("x"))
        forms = ["kernel"] if num_train >= dim else ["gram"]
        kernel_gib = dim * dim * 8 / 2**30
        if num_train < dim and kernel_gib <= args.max_kernel_gib:
            forms.append("kernel")  # what the solver would have done without the Gram form
        for form in forms:
            row = {"N": num_train, "k": dim, "form": form, **run_isolated(num_train, dim, form)}
            row["chosen"] = form == ("gram" if num_train < dim else "kernel")
            rows.append(row)
            print(
                f"N={num_train:>6} k={dim:>6} {form:<6} factorise {row['factorise_s']:8.1f} s  "
                f"score {row['score_s']:6.1f} s  peak {row['peak_rss_mib']:8.0f} MiB"
                f"{'' if row['chosen'] else '  (not chosen)'}",
                flush=True,
            )
        if num_train < dim and kernel_gib > args.max_kernel_gib:
            print(
                f"N={num_train:>6} k={dim:>6} kernel skipped: its k x k float64 matrix alone is {kernel_gib:.1f} GiB"
            )

    header = (
        "| N | k | form | factorise (s) | score 64 queries (s) | peak RSS (MiB) | chosen by from_features |"
    )
    lines = [header, "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['N']} | {row['k']} | {row['form']} | {row['factorise_s']:.1f} | {row['score_s']:.1f} | "
            f"{row['peak_rss_mib']:.0f} | {'yes' if row['chosen'] else 'no'} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    meta = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {args.threads} threads",
        "torch": torch.__version__,
        "queries": NUM_QUERIES,
    }
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "solver.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (RESULTS_DIR / "solver.md").write_text(f"{table}\n\n{json.dumps(meta)}\n")


if __name__ == "__main__":
    main()
