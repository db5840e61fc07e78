"""LDS benchmark at CPU scale: runs experiment=fashion2_lds end to end and records the table.

    python benchmarks/lds_fashion2.py [--root outputs/bench] [--subsets 32]

Stages (each a normal command, so a failed or interrupted run resumes where it stopped): train the full model,
train the subset models (a Hydra multirun), attribute with every method, evaluate. Writes
benchmarks/results/lds_fashion2.json (records + paired differences + machine, date, stage times) and
benchmarks/results/lds_fashion2.md.
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
METHODS = ["das", "das_plain", "dtrak", "trak", "relatif", "grad_cos", "pixel"]


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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", default="outputs/bench", help="paths.root for every artifact")
    parser.add_argument("--subsets", type=int, default=32, help="number of LDS subsets M")
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
    run(
        "train subset models",
        ["train.py", "-m", *common, "subset=lds", f"subset.index=range(0,{args.subsets})"],
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
        "command": f"python benchmarks/lds_fashion2.py --root {args.root} --subsets {args.subsets}",
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
