"""LDS benchmark at CPU scale: runs experiment=fashion2_lds end to end and records the table.

    python benchmarks/lds_fashion2.py [--root outputs/bench] [--subsets 32] [--workers 2]

Stages (each a normal command, so a failed or interrupted run resumes where it stopped): train the full model,
train the subset models (Hydra multiruns in ``--workers`` parallel single-thread processes: on 2 cores two
one-thread workers train about five times faster than one default-thread process beside other work), attribute
with every method, evaluate. Subset models of one seed share it (METHOD.md §3); lambda is on the features' own
scale (das_lightning/lambdas.py). Writes benchmarks/results/lds_fashion2.json (records + paired differences +
machine, date, stage times) and benchmarks/results/lds_fashion2.md. The table of the first protocol (own seed per
subset model, absolute lambda grid) is kept as lds_fashion2_v1_own_seeds_absolute_grid.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
METHODS = [
    "das",
    "das_plain",
    "das_noleverage",
    "das_magnitude",
    "das_exact",
    "dtrak",
    "trak",
    "relatif",
    "grad_cos",
    "pixel",
]


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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", default="outputs/bench", help="paths.root for every artifact")
    parser.add_argument("--subsets", type=int, default=32, help="number of LDS subsets M")
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
    run("train full model", ["train.py", *common], timings)
    chunks = [list(range(args.subsets))[w :: args.workers] for w in range(args.workers)]
    run_parallel(
        "train subset models",
        [
            ["train.py", "-m", *common, "subset=lds", f"subset.index={','.join(map(str, chunk))}"]
            for chunk in chunks
            if chunk
        ],
        timings,
    )
    for method in METHODS:
        run(f"attribute {method}", ["attribute.py", *common, f"method={method}"], timings)
    run(
        "evaluate",
        ["evaluate_lds.py", *common, f"lds.num_subsets={args.subsets}", f"methods=[{','.join(METHODS)}]"],
        timings,
    )
    total = round(time.perf_counter() - started, 1)

    lds_dir = REPO / args.root / "fashion2" / "tiny" / "lds"
    document = json.loads((lds_dir / "lds.json").read_text())
    document["benchmark"] = {
        "command": (
            f"python benchmarks/lds_fashion2.py --root {args.root} --subsets {args.subsets} "
            f"--workers {args.workers}"
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
    print(header + table)


if __name__ == "__main__":
    main()
