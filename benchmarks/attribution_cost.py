"""What attribution costs, method against method, as the training set grows: EK-FAC influence against DAS.

    python benchmarks/attribution_cost.py [--root outputs/cost] [--sizes 125 250 500 1000] [--methods das ekfac]

For each training-set size N a tiny model is trained on N fashion2 images (``train.py``, 100 steps: the cost of
attribution does not depend on how well the model fits), then ``attribute.py method=M`` runs from nothing (no
features, factors or scores yet) on 64 validation queries, as its own process, alone on the machine. Reported per
(method, N): wall time of the attribute command (DAS: train and query features, kernel, residuals, scores on its
whole grid of 36 c; EK-FAC: fitting the factors, then the scores at one damping c; the ``ekfac+1c`` row reruns it with
a second c, reusing the factors and the first c's scores: every further c is one more pass over the training set)
and the peak resident memory of the process (``ru_maxrss`` of that child). Features and factors are computed block by block and the scores are
queries x train, so peak memory should stay nearly flat in N.

Writes benchmarks/results/attribution_cost.json and .md.
"""

from __future__ import annotations

import argparse
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
COMMON = [
    "dataset=fashion2",
    "model=tiny",
    "dataset.image_size=16",
    "logger=none",
    "trainer.enable_progress_bar=false",
]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def measured(args: list[str]) -> tuple[float, float]:
    """(wall seconds, peak resident MiB) of one entry-point process."""
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, *args],
        cwd=REPO,
        env={**os.environ, "WANDB_MODE": "disabled"},
        stdout=subprocess.DEVNULL,
    )
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: python {' '.join(args)}")
    return time.perf_counter() - started, usage.ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", default="outputs/cost")
    parser.add_argument("--sizes", type=int, nargs="+", default=[125, 250, 500, 1000])
    parser.add_argument("--methods", nargs="+", default=["das", "ekfac"])
    args = parser.parse_args()
    rows = []
    for size in args.sizes:
        root = Path(args.root) / f"n{size}"
        data = [*COMMON, f"paths.root={root}", f"dataset.num_train={size}"]
        train = ["train.max_steps=100", "train.optimizer.warmup_steps=10", "generate.num_images=0"]
        measured(["train.py", *data, *train])
        run_dir = root / "fashion2" / "tiny" / "full" / "seed0"
        queries = ["queries.sets=[val]", "queries.num_val=64"]
        for method in args.methods:
            for artifact in ("features", "scores"):
                shutil.rmtree(run_dir / artifact, ignore_errors=True)  # from nothing, every time
            runs = [(method, [f"method={method}"])]
            if method.startswith("ekfac"):  # fit + one c, then the same run with a second c (factors reused)
                runs = [
                    (method, [f"method={method}", "method.lambda_scales=[0.01]"]),
                    (f"{method}+1c", [f"method={method}", "method.lambda_scales=[0.01,0.1]"]),
                ]
            for name, overrides in runs:
                seconds, peak = measured(["attribute.py", *data, *overrides, *queries])
                rows.append(
                    {"method": name, "num_train": size, "seconds": round(seconds, 1), "peak_mib": round(peak)}
                )
                print(f"{name:>10}  N={size:>5}  {seconds:7.1f} s  {peak:7.0f} MiB", flush=True)
    document = {
        "command": "python benchmarks/attribution_cost.py "
        + " ".join([f"--root {args.root}", "--sizes", *map(str, args.sizes), "--methods", *args.methods]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version()},
        "setting": "tiny UNet (0.18M parameters), 16 px fashion2, K = 10 timesteps, 64 validation queries",
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "attribution_cost.json").write_text(json.dumps(document, indent=2) + "\n")
    lines = [
        f"# Attribution cost\n\n{document['command']}  \n{document['date']}, {document['machine']['cpu']}, "
        f"{document['machine']['cores']} cores; {document['setting']}\n",
        "| method | N train | attribute.py wall (s) | peak memory (MiB) |",
        "|---|---|---|---|",
        *(f"| {r['method']} | {r['num_train']} | {r['seconds']} | {r['peak_mib']} |" for r in rows),
    ]
    (RESULTS / "attribution_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
