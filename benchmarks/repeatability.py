"""Repeatability: the Monte-Carlo noise floor of an attribution method at one setting (issue 18 item 4).

    python benchmarks/repeatability.py --root outputs/bench [--methods das dtrak trak ekfac] [--repeats 8]
        [--override method.features.num_timesteps=30 ...] [--scale C] [--dry-run]

Runs ``attribute.py`` R times per method on the full model of ``--root`` (``experiment=fashion2_lds`` unless
``--experiment``), each repeat r with ``method.features.e_seed=r``: e_seed keys the noise of every (t, eps) draw of
both sides (training and query features, and DAS's residual losses) under the noise rule (image identity, t, draw,
e_seed) and seeds stratified timesteps, so the repeats are independent draws of the same estimator. Repeat 0 is the
run's own store (e_seed 0) and is reused when it exists; the others get folders of their own
(features.store_folder: ``<name>-<hash>``), so nothing of the run is overwritten.

Per method and query set, at one c (``--scale``, else the c the run's LDS selected on held-out queries for the
method, else the method's ``lambda_scale``), it reports
- the variance ratio by decile of |score| (ascending): per query, the training rows are ranked by the |mean over
  repeats| of their score and cut into ten equal groups; per group, the sum over its rows (and all queries) of the
  across-repeat variance (ddof 1) over the sum of the squared repeat means. SNR-LDS's figure (16 repeats, the DAS
  authors' CIFAR-2): 19.7, 2.94, 1.04, 0.52, 0.32, 0.21, 0.15, 0.10, 0.09, 0.05: below 1 the signal dominates,
  and rows of pure noise read about R (the repeat mean keeps 1/R of the variance): compare at the same R;
- the mean Spearman between repeats (over queries and pairs of repeats) of each query's scores over the training set.

Writes benchmarks/results/repeatability.{json,md} and repeatability.png (``--name`` changes the stem). Resumable: a
repeat whose scores exist is reused by attribute.py itself (its stores are complete).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
NUM_BINS = 10
# SNR-LDS (Jinxu-Lin/SNR-LDS): VarRatio by decile of |score|, 16 repeats, CIFAR-2 (METHOD.md §7)
SNR_LDS_REFERENCE = [19.7, 2.94, 1.04, 0.52, 0.32, 0.21, 0.15, 0.10, 0.086, 0.045]
SCORE_FOLDER = re.compile(r"\(score folder (?P<folder>.+)\)\s*$", re.MULTILINE)


# --- the statistics -----------------------------------------------------------------------------------------------


def _check_repeats(repeats: np.ndarray) -> np.ndarray:
    repeats = np.asarray(repeats, dtype=np.float64)
    if repeats.ndim != 3 or repeats.shape[0] < 2:
        raise ValueError(f"repeats must be (R >= 2, queries, train), got shape {repeats.shape}")
    if not np.all(np.isfinite(repeats)):
        raise ValueError("repeats hold NaN or inf scores")
    return repeats


def decile_groups(magnitude: np.ndarray, num_bins: int = NUM_BINS) -> np.ndarray:
    """(Q, N) -> (Q, N) group index 0..num_bins-1 of each row within its query, by ascending ``magnitude``
    (groups of equal size up to one row; ties keep their training order)."""
    magnitude = np.asarray(magnitude)
    if magnitude.shape[1] < num_bins:
        raise ValueError(f"{magnitude.shape[1]} training rows cannot fill {num_bins} groups")
    order = np.argsort(magnitude, axis=1, kind="stable")
    groups = np.empty(magnitude.shape, dtype=np.int64)
    for group, positions in enumerate(np.array_split(np.arange(magnitude.shape[1]), num_bins)):
        np.put_along_axis(groups, order[:, positions], group, axis=1)
    return groups


def variance_ratio_by_decile(repeats: np.ndarray, num_bins: int = NUM_BINS) -> list[float]:
    """repeats (R, Q, N): the scores of R independent repeats. Per decile of |repeat mean| (ascending, per query):
    sum of across-repeat variances (ddof 1) / sum of squared repeat means, pooled over the queries."""
    repeats = _check_repeats(repeats)
    mean = repeats.mean(axis=0)
    variance = repeats.var(axis=0, ddof=1)
    groups = decile_groups(np.abs(mean), num_bins)
    ratios = []
    for group in range(num_bins):
        chosen = groups == group
        signal = float(np.sum(mean[chosen] ** 2))
        ratios.append(float(np.sum(variance[chosen])) / signal if signal > 0 else float("inf"))
    return ratios


def overall_variance_ratio(repeats: np.ndarray) -> float:
    """The same ratio over every (query, training row)."""
    repeats = _check_repeats(repeats)
    signal = float(np.sum(repeats.mean(axis=0) ** 2))
    return float(np.sum(repeats.var(axis=0, ddof=1))) / signal if signal > 0 else float("inf")


def _ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks along the last axis (ties share their mean rank), as the LDS ranks."""
    import torch

    from das_lightning.evaluation.lds import average_ranks

    return average_ranks(torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64))).numpy()


def spearman_between_repeats(repeats: np.ndarray) -> tuple[float, np.ndarray]:
    """(mean, per pair) Spearman between repeats of each query's scores over the training set: the mean over
    queries of each pair (r < s), and the mean over pairs. Queries whose scores are constant are left out."""
    repeats = _check_repeats(repeats)
    ranks = _ranks(repeats)  # (R, Q, N)
    centred = ranks - ranks.mean(axis=-1, keepdims=True)
    norms = np.sqrt(np.sum(centred**2, axis=-1))  # (R, Q)
    per_pair = []
    for first, second in itertools.combinations(range(repeats.shape[0]), 2):
        norm = norms[first] * norms[second]
        defined = norm > 0
        correlation = np.sum(centred[first] * centred[second], axis=-1)[defined] / norm[defined]
        per_pair.append(float(np.mean(correlation)) if correlation.size else float("nan"))
    pairs = np.array(per_pair)
    return float(np.nanmean(pairs)), pairs


def repeatability(repeats: np.ndarray, num_bins: int = NUM_BINS) -> dict[str, object]:
    """Every statistic of one method and query set, as recorded in the JSON."""
    mean_spearman, per_pair = spearman_between_repeats(repeats)
    return {
        "num_repeats": int(np.shape(repeats)[0]),
        "num_queries": int(np.shape(repeats)[1]),
        "num_train": int(np.shape(repeats)[2]),
        "variance_ratio_by_decile": variance_ratio_by_decile(repeats, num_bins),
        "variance_ratio": overall_variance_ratio(repeats),
        "mean_spearman": mean_spearman,
        "spearman_min_pair": float(np.nanmin(per_pair)),
        "spearman_max_pair": float(np.nanmax(per_pair)),
    }


# --- running the repeats ------------------------------------------------------------------------------------------


def attribute_command(args: argparse.Namespace, method: str, e_seed: int) -> list[str]:
    return [
        "attribute.py",
        f"experiment={args.experiment}",
        f"paths.root={args.root}",
        "logger=csv",
        "trainer.enable_progress_bar=false",
        f"method={method}",
        f"method.features.e_seed={e_seed}",
        *args.override,
    ]


def run_attribute(command: list[str]) -> Path:
    """Run attribute.py; the score folder it printed."""
    result = subprocess.run(
        [sys.executable, *command],
        cwd=REPO,
        env={**os.environ, "WANDB_MODE": "offline"},
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        tail = (result.stderr.strip() or result.stdout.strip())[-1500:]
        raise RuntimeError(f"attribute.py failed ({result.returncode}): python {' '.join(command)}\n{tail}")
    found = SCORE_FOLDER.search(result.stdout)
    if found is None:
        raise RuntimeError(f"attribute.py printed no score folder:\n{result.stdout[-2000:]}")
    folder = Path(found["folder"])
    return folder if folder.is_absolute() else REPO / folder


def lds_file_of(score_folder: Path) -> Path:
    """The lds.json of the full model a score folder belongs to (<experiment>/lds/<tag>-seed<r>/lds.json)."""
    run = score_folder.parent.parent  # <experiment>/<tag>/seed<r>
    return run.parent.parent / "lds" / f"{run.parent.name}-{run.name}" / "lds.json"


def chosen_scale(
    score_folder: Path, method: str, query_set: str, given: float | None
) -> tuple[float | None, str]:
    """(c, where it came from): --scale, else the run's held-out selection for ``method``, else the scores'."""
    from das_lightning.manifest import read_manifest
    from das_lightning.selection import selected_scale

    manifest = read_manifest(score_folder / query_set) or {}
    if not manifest.get("lambda_scales"):
        return None, "no lambda"
    if given is not None:
        return given, "--scale"
    lds_file = lds_file_of(score_folder)
    selected = selected_scale(lds_file, method, query_set) if lds_file.exists() else None
    if selected is not None:
        return selected, f"{lds_file} (held-out selection of {method})"
    picture = manifest.get("picture") or {}
    return picture.get("lambda_scale"), "the scores' picture c (method.lambda_scale)"


def load_repeats(folders: list[Path], query_set: str, scale: float | None) -> np.ndarray:
    from das_lightning.attribution.pipeline import scores_at
    from das_lightning.manifest import read_manifest

    arrays = []
    for folder in folders:
        manifest = read_manifest(folder / query_set)
        stacked = np.load(folder / query_set / "scores.npy", mmap_mode="r")
        arrays.append(np.asarray(scores_at(stacked, manifest, scale), dtype=np.float64))
    return np.stack(arrays)


def markdown(document: dict) -> str:
    lines = [
        f"# Repeatability ({document['repeats']} repeats, e_seed {document['e_seeds'][0]}..{document['e_seeds'][-1]})",
        "",
        f"{document['command']}  ",
        f"{document['date']}, {document['machine']['cpu']}, {document['machine']['cores']} cores; "
        f"attribute.py overrides: {' '.join(document['overrides']) or '(none)'}",
        "",
        "Variance ratio (across-repeat variance / squared mean) by decile of |score|, ascending; mean Spearman "
        "between repeats of each query's scores. Below 1 the signal dominates.",
        "",
        "| method | set | c | " + " | ".join(f"D{d + 1}" for d in range(NUM_BINS)) + " | all | Spearman |",
        "|---|---|---|" + "---|" * NUM_BINS + "---|---|",
    ]
    for record in document["records"]:
        scale = "-" if record["lambda_scale"] is None else f"{record['lambda_scale']:g}"
        ratios = " | ".join(f"{value:.3g}" for value in record["variance_ratio_by_decile"])
        lines.append(
            f"| {record['method']} | {record['query_set']} | {scale} | {ratios} | "
            f"{record['variance_ratio']:.3g} | {record['mean_spearman']:.3f} |"
        )
    reference = " | ".join(f"{value:g}" for value in SNR_LDS_REFERENCE)
    lines.append(f"| SNR-LDS (CIFAR-2, 16 repeats) | - | - | {reference} | - | - |")
    for method, error in document.get("failures", {}).items():
        lines += ["", f"{method} failed at {error.splitlines()[0]}: {error.splitlines()[-1][:300]}"]
    return "\n".join(lines) + "\n"


def plot(records: list[dict], target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    query_sets = sorted({record["query_set"] for record in records}, reverse=True)
    figure, axes = plt.subplots(1, len(query_sets), figsize=(4.8 * len(query_sets), 3.8), squeeze=False)
    deciles = np.arange(1, NUM_BINS + 1)
    for axis, query_set in zip(axes[0], query_sets, strict=True):
        for record in (r for r in records if r["query_set"] == query_set):
            label = f"{record['method']} (rho {record['mean_spearman']:.2f})"
            axis.plot(deciles, record["variance_ratio_by_decile"], marker="o", label=label)
        axis.plot(deciles, SNR_LDS_REFERENCE, color="grey", linestyle="--", label="SNR-LDS CIFAR-2")
        axis.axhline(1.0, color="black", linewidth=0.6)
        axis.set_yscale("log")
        axis.set_xticks(deciles)
        axis.set_xlabel("decile of |score| (ascending)")
        axis.set_ylabel("variance / squared mean")
        axis.set_title(f"{query_set} queries")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(target, dpi=120)
    plt.close(figure)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--root", default="outputs/bench", help="paths.root of a run with a trained full model"
    )
    parser.add_argument("--experiment", default="fashion2_lds")
    parser.add_argument("--methods", nargs="+", default=["das", "dtrak", "trak", "ekfac"])
    parser.add_argument("--repeats", type=int, default=8, help="R: attributions with e_seed first..first+R-1")
    parser.add_argument("--first-seed", type=int, default=0, help="e_seed of the first repeat")
    parser.add_argument("--query-sets", nargs="+", default=["val", "generated"])
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        help="an attribute.py override for every repeat (repeatable)",
    )
    parser.add_argument("--scale", type=float, default=None, help="c for every method (default: selected)")
    parser.add_argument("--out", default=str(RESULTS), help="folder of the JSON, markdown and plot")
    parser.add_argument("--name", default="repeatability", help="file stem of the outputs")
    parser.add_argument("--dry-run", action="store_true", help="print the attribute.py commands and exit")
    args = parser.parse_args(argv)
    if args.repeats < 2:
        parser.error("--repeats must be at least 2")
    e_seeds = list(range(args.first_seed, args.first_seed + args.repeats))
    if args.dry_run:
        for method in args.methods:
            for e_seed in e_seeds:
                print("python " + " ".join(attribute_command(args, method, e_seed)))
        return
    started = time.perf_counter()
    records, seconds, failures = [], {}, {}
    for method in args.methods:
        folders = []
        for e_seed in e_seeds:
            begun = time.perf_counter()
            try:
                folders.append(run_attribute(attribute_command(args, method, e_seed)))
            except RuntimeError as error:  # one method's failure does not lose the others' repeats
                failures[method] = f"e_seed {e_seed}: {error}"
                print(f"{method} e_seed {e_seed} failed:\n{error}", flush=True)
                break
            seconds[f"{method} e_seed {e_seed}"] = round(time.perf_counter() - begun, 1)
            print(f"{method} e_seed {e_seed}: {folders[-1]} ({seconds[f'{method} e_seed {e_seed}']:.0f} s)")
        if method in failures:
            continue
        for query_set in args.query_sets:
            if not (folders[0] / query_set).is_dir():
                continue
            scale, source = chosen_scale(folders[0], method, query_set, args.scale)
            statistics = repeatability(load_repeats(folders, query_set, scale))
            records.append(
                {
                    "method": method,
                    "query_set": query_set,
                    "lambda_scale": scale,
                    "lambda_source": source,
                    "score_folders": [str(folder) for folder in folders],
                    **statistics,
                }
            )
    command = "python benchmarks/repeatability.py " + " ".join(argv if argv is not None else sys.argv[1:])
    document = {
        "command": command.strip(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version()},
        "root": args.root,
        "experiment": args.experiment,
        "repeats": args.repeats,
        "e_seeds": e_seeds,
        "overrides": args.override,
        "snr_lds_reference": SNR_LDS_REFERENCE,
        "attribute_seconds": seconds,
        "total_seconds": round(time.perf_counter() - started, 1),
        "records": records,
        "failures": failures,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(document, indent=2) + "\n")
    table = markdown(document)
    (out / f"{args.name}.md").write_text(table)
    if records:
        plot(records, out / f"{args.name}.png")
    print(table)


if __name__ == "__main__":
    main()
