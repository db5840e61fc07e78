"""Re-evaluate a committed LDS bundle's recorded methods with today's yardstick, from the bundle alone.

    python benchmarks/bundle_rescore.py [--bundle benchmarks/bundles/fashion2] [--results benchmarks/results/lds_fashion2]

The bundle keeps every recorded method's predictions at its held-out and oracle c and the per-seed ground truth,
so a change of the evaluation (an interval, the centred LDS, a flag) is applied to it without the run root that made
it: this rewrites the bundle's ``README.md`` (from its bundle.json) and ``lds.json`` (records, paired differences, the per-set query-agnostic baselines) and
the benchmark's results JSON and Markdown (``--results``: the benchmark block of the run that trained the models is
kept, a ``rescored`` block says when and by which command the evaluation was redone). tests/test_benchmark_bundle.py
then checks that the bundle reproduces the committed results exactly.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone
from pathlib import Path

from das_lightning.evaluation.bundle import bundle_readme, load_bundle, reproduce_recorded
from das_lightning.manifest import FILES_KEY, file_record, read_manifest, write_manifest
from das_lightning.selection import write_lds_json

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", default="benchmarks/bundles/fashion2")
    parser.add_argument("--results", default="benchmarks/results/lds_fashion2", help="path without .json/.md")
    args = parser.parse_args()
    started = time.perf_counter()
    bundle = load_bundle(REPO / args.bundle)
    report = reproduce_recorded(bundle)
    seconds = round(time.perf_counter() - started, 1)
    records = [record.to_json() for record in report.records]
    differences = [difference.to_json() for difference in report.differences]
    shared = [row.to_json() for row in report.shared]
    lds_file = REPO / args.bundle / "lds.json"
    previous = json.loads(lds_file.read_text())
    write_lds_json(lds_file, records, differences, {**previous.get("meta", {}), "shared_factor": shared})
    readme = REPO / args.bundle / "README.md"  # it describes lds.json's fields, so it follows today's text
    readme.write_text(bundle_readme(bundle.description))
    manifest = read_manifest(REPO / args.bundle)
    for rewritten in (lds_file, readme):  # the integrity records of the rewritten files
        manifest[FILES_KEY][rewritten.name] = file_record(rewritten)
    write_manifest(REPO / args.bundle, manifest)
    load_bundle(REPO / args.bundle)  # it still loads and verifies
    results_json = REPO / f"{args.results}.json"
    document = json.loads(results_json.read_text())
    document.update(records=records, differences=differences)
    document.setdefault("meta", {})["shared_factor"] = shared
    command = f"python benchmarks/bundle_rescore.py --bundle {args.bundle} --results {args.results}"
    document["rescored"] = {
        "command": command,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "seconds": seconds,
    }
    results_json.write_text(json.dumps(document, indent=2) + "\n")
    benchmark = document.get("benchmark", {})
    header = (
        "# LDS on fashion2 (experiment=fashion2_lds)\n\n"
        f"Models, scores and ground truth: {benchmark.get('command', '?')} ({benchmark.get('date', '?')}).  \n"
        f"Evaluation redone from the bundle: {command} ({document['rescored']['date']}, {seconds:.0f} s).\n\n"
    )
    (REPO / f"{args.results}.md").write_text(header + report.table)
    print(header + report.table)


if __name__ == "__main__":
    main()
