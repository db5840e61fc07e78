"""The frontier: held-out LDS against attribution wall time, per method, draw budget, sampling and projector
(issue 18 item 5), on the subset models of the LDS benchmark (benchmarks/lds_fashion2.py).

    python benchmarks/frontier.py [--root outputs/bench] [--subsets M] [--seeds 0 1]
        [--points 'das-*' ...] [--redo] [--dry-run] [--list]

Each point is one attribution setting: a method (das, dtrak, trak, ekfac), a budget of (t, eps) draws per image
(num_timesteps x draws_per_timestep = 10, 30, 100), a sampling scheme (``grid``: K timesteps of the uniform grid, one
eps each; ``sa``: K/2 stratified timesteps, an antithetic pair (eps, -eps) each; ``strat``: K stratified timesteps,
one eps each, for EK-FAC, whose curvature takes one draw per timestep), a projector (conf/projector/ dense or sparse;
EK-FAC is unprojected) and, for DAS, the normalisation (per timestep, or per draw as SNR-LDS: ``-ndraw``).
``--list`` prints them; ``das-grid10-dense`` is today's default DAS.

A point is measured from nothing, one process each, on this machine:
1. its own scratch run root ``<scratch>/<point>`` is made afresh: links to the root's full model (weights, queries,
   records), subset models and LDS ground-truth cache, the root's default scores of ``--reference`` (das) for the
   pairing, and nothing else (no feature store, no EK-FAC factors, no score of the point): the root is only read
   (its ground-truth cache folder is made if missing, so the first evaluation fills the benchmark's own cache);
2. ``attribute.py`` with the point's overrides and ``method.name=<point>`` is timed (wall clock, the whole process:
   start-up, model load, projector, features of the training set and both query sets, kernel or factors, scores);
3. ``evaluate_lds.py methods=[<point>,<reference>] pairs=[[<point>,<reference>]]`` on the scratch root gives the
   held-out LDS (95% interval) on the validation and generated queries and the paired difference against today's
   default DAS (the same resampled subsets for both).

Writes benchmarks/results/frontier.json after each point (resumable: a measured point is skipped unless ``--redo``;
a failed one is retried), frontier.md (the table, with the Pareto points marked) and frontier.png (LDS against
seconds per query set, the Pareto front drawn). Run it alone on the machine: the times are the measurement.
``--override`` adds an override to every attribute.py and evaluate_lds.py command (a smaller test run);
``--attribute-override`` to attribute.py only (``method.features.e_seed=1``: the same points with other draws, with
``--name`` and ``--scratch`` of their own).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
BUDGETS = (10, 30, 100)
SCORE_FOLDER = re.compile(r"\(score folder (?P<folder>.+)\)\s*$", re.MULTILINE)
# what a scratch root links from the root's full model folder (everything but what a point makes)
NOT_LINKED = {"features", "scores", "csv", "hydra"}


@dataclass(frozen=True)
class Point:
    """One attribution setting of the frontier."""

    name: str
    method: str
    budget: int  # (t, eps) draws per image
    scheme: str  # grid | sa (stratified + antithetic pairs) | strat (stratified, one draw)
    projector: str  # dense | sparse | none (EK-FAC)
    normalize: str | None = None  # DAS: timestep (its default) or draw
    overrides: tuple[str, ...] = field(default_factory=tuple)

    def describe(self) -> dict:
        return {
            "method": self.method,
            "budget": self.budget,
            "scheme": self.scheme,
            "projector": self.projector,
            "normalize": self.normalize,
            "overrides": list(self.overrides),
        }


def scheme_overrides(scheme: str, budget: int) -> list[str]:
    """The draw settings of a scheme, every one named, so that a point means the same whatever the defaults."""
    single = ["method.features.draws_per_timestep=1", "method.features.antithetic=false"]
    if scheme == "grid":
        return [f"method.features.num_timesteps={budget}", "method.features.sampling=grid", *single]
    if scheme == "strat":
        return [f"method.features.num_timesteps={budget}", "method.features.sampling=stratified", *single]
    if scheme == "sa":
        return [
            f"method.features.num_timesteps={budget // 2}",
            "method.features.draws_per_timestep=2",
            "method.features.sampling=stratified",
            "method.features.antithetic=true",
        ]
    raise ValueError(f"unknown scheme {scheme!r}")


def all_points() -> list[Point]:
    """Every point of the frontier, in the order they are measured (cheap budgets first)."""
    points = []

    def add(method: str, budget: int, scheme: str, projector: str, normalize: str | None = None) -> None:
        name = f"{method}-{scheme}{budget}-{projector}" + ("-ndraw" if normalize == "draw" else "")
        overrides = [*scheme_overrides(scheme, budget)]
        if projector != "none":
            overrides.append(f"projector={projector}")
        if normalize == "draw":
            overrides.append("method.features.normalize=draw")
        normal = normalize or ("timestep" if method == "das" else None)
        points.append(Point(name, method, budget, scheme, projector, normal, tuple(overrides)))

    for budget in BUDGETS:
        for method in ("das", "dtrak", "trak"):
            add(method, budget, "grid", "dense")
            add(method, budget, "sa", "dense")
            add(method, budget, "grid", "sparse")
            add(method, budget, "sa", "sparse")
        add("das", budget, "sa", "dense", normalize="draw")
        add("ekfac", budget, "grid", "none")
        add("ekfac", budget, "strat", "none")
    return points


# --- a scratch run root per point -------------------------------------------------------------------------------


def experiment_dir(root: Path, dataset: str, model: str) -> Path:
    return Path(root) / dataset / model


def make_scratch(root_experiment: Path, scratch_experiment: Path, reference: str, seed: int) -> None:
    """A run root of its own for one point, made afresh: links to what the point reads, nothing of what it makes."""
    scratch_root = scratch_experiment.parent.parent
    if scratch_root.exists():
        shutil.rmtree(scratch_root)  # links are removed, never followed
    full = root_experiment / "full" / f"seed{seed}"
    if not (full / "unet").is_dir():
        raise SystemExit(f"no trained full model at {full}: run benchmarks/lds_fashion2.py first")
    target = scratch_experiment / "full" / f"seed{seed}"
    target.mkdir(parents=True)
    for entry in full.iterdir():
        if entry.name not in NOT_LINKED:
            (target / entry.name).symlink_to(entry.resolve())
    scores = target / "scores"
    scores.mkdir()
    if (full / "scores" / reference).is_dir():
        (scores / reference).symlink_to((full / "scores" / reference).resolve())
    for subset_models in sorted(root_experiment.glob("lds-*")):
        (scratch_experiment / subset_models.name).symlink_to(subset_models.resolve())
    cache = root_experiment / "lds" / "ground_truth"
    cache.mkdir(parents=True, exist_ok=True)  # the benchmark's own cache: filled once, read by every point
    (scratch_experiment / "lds").mkdir()
    (scratch_experiment / "lds" / "ground_truth").symlink_to(cache.resolve())


# --- one point ------------------------------------------------------------------------------------------------------


def common_overrides(args: argparse.Namespace, root: Path) -> list[str]:
    return [
        f"experiment={args.experiment}",
        f"paths.root={root}",
        f"seed={args.seed}",
        "logger=csv",
        "trainer.enable_progress_bar=false",
        *args.override,
    ]


def attribute_command(args: argparse.Namespace, point: Point, root: Path) -> list[str]:
    return [
        "attribute.py",
        *common_overrides(args, root),
        f"method={point.method}",
        f"method.name={point.name}",
        *point.overrides,
        *args.attribute_override,
    ]


def evaluate_command(args: argparse.Namespace, root: Path, folder: str) -> list[str]:
    protocol = []  # the experiment's own LDS protocol unless --subsets / --seeds say otherwise
    if args.subsets is not None:
        protocol.append(f"lds.num_subsets={args.subsets}")
    if args.seeds is not None:
        protocol.append(f"lds.seeds=[{','.join(map(str, args.seeds))}]")
    return [
        "evaluate_lds.py",
        *common_overrides(args, root),
        *protocol,
        f"methods=[{folder},{args.reference}]",
        f"pairs=[[{folder},{args.reference}]]",
    ]


def run(command: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    """One process, with the threads the caller's environment gives it (OMP_NUM_THREADS, recorded)."""
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, *command],
        cwd=REPO,
        env={**os.environ, "WANDB_MODE": "offline"},
        capture_output=True,
        text=True,
    )
    return result, time.perf_counter() - started


def failure(stage: str, command: list[str], result: subprocess.CompletedProcess) -> dict:
    tail = (result.stderr.strip() or result.stdout.strip())[-1500:]
    return {
        "error": f"{stage} failed ({result.returncode}): {tail}",
        "command": "python " + " ".join(command),
    }


def lds_results(scratch_experiment: Path, seed: int, folder: str, reference: str) -> dict:
    """Held-out LDS per query set of ``folder`` and its paired difference against ``reference``."""
    document = json.loads((scratch_experiment / "lds" / f"full-seed{seed}" / "lds.json").read_text())
    lds = {}
    for record in document["records"]:
        if record["method"] == folder and record["lambda_selection"] == "heldout":
            lds[record["query_set"]] = {
                key: record.get(key) for key in ("lds", "ci_low", "ci_high", "lambda_scale", "num_queries")
            }
    for record in document["records"]:
        if record["method"] == reference and record["lambda_selection"] == "heldout":
            lds.setdefault(record["query_set"], {})["reference_lds"] = record["lds"]
    for difference in document.get("differences", []):
        if difference["a"] == folder and difference["b"] == reference:
            lds.setdefault(difference["query_set"], {})["versus_reference"] = {
                key: difference[key] for key in ("diff", "ci_low", "ci_high")
            }
    return lds


def measure(args: argparse.Namespace, point: Point) -> dict:
    """Make the point's scratch root, time its attribution from nothing, evaluate it."""
    root_experiment = experiment_dir(Path(args.root), args.dataset, args.model)
    scratch = Path(args.scratch) / point.name
    scratch_experiment = experiment_dir(scratch, args.dataset, args.model)
    make_scratch(root_experiment, scratch_experiment, args.reference, args.seed)
    command = attribute_command(args, point, scratch)
    print(f"[{datetime.now():%H:%M:%S}] {point.name}: python {' '.join(command)}", flush=True)
    result, seconds = run(command)
    if result.returncode != 0:
        return failure("attribute.py", command, result)
    found = SCORE_FOLDER.search(result.stdout)
    if found is None:
        return {"error": f"attribute.py printed no score folder: {result.stdout[-800:]}"}
    folder = Path(found["folder"]).name
    print(f"    {seconds:.0f} s -> scores/{folder}", flush=True)
    evaluate = evaluate_command(args, scratch, folder)
    evaluated, evaluate_seconds = run(evaluate)
    if evaluated.returncode != 0:
        return {**failure("evaluate_lds.py", evaluate, evaluated), "attribute_seconds": round(seconds, 1)}
    results = lds_results(scratch_experiment, args.seed, folder, args.reference)
    summary = ", ".join(
        f"{name} {value.get('lds', float('nan')):.1f}" for name, value in sorted(results.items())
    )
    print(f"    LDS {summary} (evaluated in {evaluate_seconds:.0f} s)", flush=True)
    return {
        **point.describe(),
        "score_folder": folder,
        "attribute_seconds": round(seconds, 1),
        "evaluate_seconds": round(evaluate_seconds, 1),
        "attribute_command": "python " + " ".join(command),
        "evaluate_command": "python " + " ".join(evaluate),
        "lds": results,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
    }


# --- the report -------------------------------------------------------------------------------------------------


def pareto_names(measured: dict[str, dict], query_set: str) -> set[str]:
    """Points no other point beats on both axes (at most as many seconds and a higher held-out LDS, or fewer
    seconds and at least the LDS)."""
    points = [
        (name, record["attribute_seconds"], record["lds"][query_set]["lds"])
        for name, record in measured.items()
        if "error" not in record and record["lds"].get(query_set, {}).get("lds") is not None
    ]
    front = set()
    for name, seconds, lds in points:
        dominated = any(
            (s <= seconds and v > lds) or (s < seconds and v >= lds)
            for other, s, v in points
            if other != name
        )
        if not dominated:
            front.add(name)
    return front


def interval(entry: dict | None, value: str = "lds") -> str:
    if not entry or entry.get(value) is None:
        return "-"
    return f"{entry[value]:.1f} [{entry['ci_low']:.1f}, {entry['ci_high']:.1f}]"


def markdown(document: dict) -> str:
    measured = document["points"]
    query_sets = sorted({q for r in measured.values() if "error" not in r for q in r["lds"]}, reverse=True)
    fronts = {query_set: pareto_names(measured, query_set) for query_set in query_sets}
    lines = [
        "# Frontier: held-out LDS against attribution seconds",
        "",
        f"{document['command']}  ",
        f"{document['machine']['cpu']}, {document['machine']['cores']} cores, "
        f"{document['machine'].get('threads', 'default')} thread(s) per process (OMP_NUM_THREADS); root "
        f"{document['root']}, {document['subsets'] or 'all'} subsets x seeds {document['seeds'] or 'all'} "
        "(none given: the experiment's); "
        f"differences against `{document['reference']}` (today's default DAS, the root's scores), paired bootstrap",
        "",
        "seconds: attribute.py from nothing (one process: features of train + query sets, kernel or factors, "
        "scores). * = on the Pareto front of that query set.",
        "",
    ]
    header = "| point | method | draws | scheme | projector | seconds |"
    rule = "|---|---|---|---|---|---|"
    for query_set in query_sets:
        header += f" LDS {query_set} | vs {document['reference']} {query_set} |"
        rule += "---|---|"
    lines += [header, rule]
    for name, record in sorted(measured.items(), key=lambda item: item[1].get("attribute_seconds") or 0):
        if "error" in record:
            lines.append(f"| {name} | failed: {record['error'][:120]!r} |")
            continue
        row = (
            f"| {name} | {record['method']} | {record['budget']} | {record['scheme']}"
            f"{'' if record.get('normalize') in (None, 'timestep') else ' (per draw)'} | {record['projector']} | "
            f"{record['attribute_seconds']:.0f} |"
        )
        for query_set in query_sets:
            entry = record["lds"].get(query_set, {})
            mark = "*" if name in fronts[query_set] else ""
            row += f" {interval(entry)}{mark} | {interval(entry.get('versus_reference'), 'diff')} |"
        lines.append(row)
    return "\n".join(lines) + "\n"


def plot(document: dict, target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = {n: r for n, r in document["points"].items() if "error" not in r}
    query_sets = sorted({q for r in measured.values() for q in r["lds"]}, reverse=True)
    if not query_sets:
        return
    colours = {"das": "tab:red", "dtrak": "tab:blue", "trak": "tab:green", "ekfac": "tab:purple"}
    markers = {"grid": "o", "sa": "s", "strat": "^"}
    figure, axes = plt.subplots(1, len(query_sets), figsize=(6 * len(query_sets), 4.5), squeeze=False)
    for axis, query_set in zip(axes[0], query_sets, strict=True):
        front = pareto_names(document["points"], query_set)
        for record in measured.values():
            entry = record["lds"].get(query_set)
            if not entry or entry.get("lds") is None:
                continue
            colour = colours.get(record["method"], "black")
            draw = record.get("normalize") == "draw"
            axis.errorbar(
                record["attribute_seconds"],
                entry["lds"],
                yerr=[[entry["lds"] - entry["ci_low"]], [entry["ci_high"] - entry["lds"]]],
                marker=markers.get(record["scheme"], "o"),
                color=colour,
                markerfacecolor="white" if record["projector"] == "sparse" else colour,
                markeredgecolor="black" if draw else colour,
                alpha=0.8,
                capsize=2,
                linestyle="none",
            )
            axis.annotate(str(record["budget"]), (record["attribute_seconds"], entry["lds"]), fontsize=6)
        on_front = sorted(
            (measured[name]["attribute_seconds"], measured[name]["lds"][query_set]["lds"]) for name in front
        )
        if on_front:
            xs, ys = zip(*on_front, strict=True)
            axis.step(xs, ys, where="post", color="black", linewidth=0.8, label="Pareto front")
        default = measured.get("das-grid10-dense")
        if default and query_set in default["lds"]:
            axis.axhline(default["lds"][query_set]["lds"], color="tab:red", linewidth=0.6, linestyle=":")
        axis.set_xscale("log")
        axis.set_xlabel("attribution seconds (from nothing, one process)")
        axis.set_ylabel("held-out LDS (%)")
        axis.set_title(f"{query_set} queries")
    handles = [
        plt.Line2D([], [], color=c, marker="o", linestyle="none", label=m) for m, c in colours.items()
    ] + [plt.Line2D([], [], color="grey", marker=k, linestyle="none", label=s) for s, k in markers.items()]
    handles.append(
        plt.Line2D(
            [], [], color="grey", marker="o", markerfacecolor="white", linestyle="none", label="sparse"
        )
    )
    handles.append(plt.Line2D([], [], color="black", linewidth=0.8, label="Pareto front"))
    axes[0][-1].legend(handles=handles, fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(target, dpi=120)
    plt.close(figure)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def write_report(document: dict, out: Path, name: str) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(document, indent=2) + "\n")
    table = markdown(document)
    (out / f"{name}.md").write_text(table)
    plot(document, out / f"{name}.png")
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", default="outputs/bench", help="paths.root of the LDS benchmark (read only)")
    parser.add_argument("--scratch", default="outputs/frontier", help="where the points' run roots are made")
    parser.add_argument("--experiment", default="fashion2_lds")
    parser.add_argument("--dataset", default="fashion2", help="the experiment's dataset.name")
    parser.add_argument("--model", default="tiny", help="the experiment's model.name")
    parser.add_argument("--seed", type=int, default=0, help="the full model attributed")
    parser.add_argument("--subsets", type=int, default=None, help="LDS subsets M (default: the experiment's)")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="subset models' seeds (default: the experiment's)"
    )
    parser.add_argument(
        "--reference", default="das", help="the root's score folder the points are paired with"
    )
    parser.add_argument("--points", nargs="+", default=["*"], help="point names or patterns (see --list)")
    parser.add_argument("--override", action="append", default=[], help="an override for every command")
    parser.add_argument(
        "--attribute-override",
        action="append",
        default=[],
        help="an override for attribute.py only (e.g. method.features.e_seed=1: the same points, other draws)",
    )
    parser.add_argument("--redo", action="store_true", help="measure the chosen points again")
    parser.add_argument("--dry-run", action="store_true", help="print the commands of the chosen points")
    parser.add_argument("--list", action="store_true", help="print the points and exit")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--name", default="frontier", help="file stem of the outputs")
    args = parser.parse_args(argv)
    points = [p for p in all_points() if any(fnmatch.fnmatch(p.name, pattern) for pattern in args.points)]
    if not points:
        parser.error(f"no point matches {args.points}; see --list")
    if args.list:
        for point in points:
            print(f"{point.name:28s} {' '.join(point.overrides)}")
        return
    if args.dry_run:
        for point in points:
            scratch = Path(args.scratch) / point.name
            print(f"# {point.name}")
            print("python " + " ".join(attribute_command(args, point, scratch)))
            print("python " + " ".join(evaluate_command(args, scratch, point.name + "<printed suffix>")))
        return
    out = Path(args.out)
    existing = out / f"{args.name}.json"
    document = json.loads(existing.read_text()) if existing.exists() else {"points": {}}
    document.update(
        command="python benchmarks/frontier.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        machine={
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "threads": os.environ.get(
                "OMP_NUM_THREADS", "default"
            ),  # per process: what the seconds were run with
            "python": platform.python_version(),
        },
        root=args.root,
        experiment=args.experiment,
        subsets=args.subsets,
        seeds=args.seeds,
        reference=args.reference,
        overrides=args.override,
        attribute_overrides=args.attribute_override,
    )
    for point in points:
        previous = document["points"].get(point.name)
        if previous is not None and "error" not in previous and not args.redo:
            print(
                f"{point.name}: measured ({previous['attribute_seconds']:.0f} s), skipped (--redo measures it again)"
            )
            continue
        document["points"][point.name] = measure(args, point)
        if "error" in document["points"][point.name]:
            print(f"    {document['points'][point.name]['error']}", flush=True)
        write_report(document, out, args.name)  # after every point: an interrupted run keeps what it measured
    print(write_report(document, out, args.name))


if __name__ == "__main__":
    main()
