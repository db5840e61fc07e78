"""What happens when things break: each fault is injected into a finished tiny experiment, then the command that
reads the damaged artifact is run again exactly as a user would (a subprocess), and its RESULT is recorded:

    equal       exit 0 and the result equals the uninterrupted run's (resumed or recomputed)
    error       exit 2 and exactly one ``error:`` line, no traceback; the remedy it names (delete X) is then
                followed and the command rerun: "equal" in the last column when that gives the uninterrupted result
    WRONG       anything else (a traceback, a silently different result): a bug

The tiny experiment: the 8 px fashion2 model of the tests (48 training images), DAS features and scores for the
val and generated queries, 3 LDS subset models and evaluate_lds.py over them.

    python benchmarks/faults.py                 # ~10 minutes on 2 cores; writes benchmarks/results/faults.json/.md
    python benchmarks/faults.py --only weights  # scenarios whose name contains "weights"
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from das_lightning.manifest import atomic_write_text, file_record

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"
RUN = Path("fashion2") / "tiny" / "full" / "seed0"
WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
TRAIN_STORE = "features/das/train"

DATA = ["dataset.image_size=8", "dataset.num_train=48", "logger=none", "trainer.enable_progress_bar=false"]
TRAIN = [
    *DATA,
    "train.max_steps=12",
    "train.batch_size=16",
    "train.optimizer.warmup_steps=2",
    "generate.num_images=6",
    "generate.sampler.num_inference_steps=4",
]
ATTRIBUTE = [
    *DATA,
    "queries.num_val=6",
    "queries.num_generated=6",
    "projector.dim=32",
    "method.features.num_timesteps=2",
    "method.features.batch_size=16",
]
LDS = [
    *DATA,
    "queries.num_val=6",
    "queries.num_generated=6",
    "lds.num_subsets=3",
    "lds.timestep_stride=250",
    "lds.e_seeds=[0,1]",
    "lds.num_resamples=50",
    "methods=[das]",
    "pairs=[]",
]
COUNTERFACTUAL = [
    *LDS,
    "mode=counterfactual",
    "counterfactual.num_queries=1",
    "counterfactual.remove_top=5",
    "counterfactual.clip_model=no-such-org/no-clip",  # no local CLIP: L2 distances only
]
COMMANDS = {
    "train": ("train.py", TRAIN),
    "attribute": ("attribute.py", ATTRIBUTE),
    "evaluate": ("evaluate_lds.py", LDS),
    "counterfactual": ("evaluate_lds.py", COUNTERFACTUAL),  # mode=counterfactual
}


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("DAS_OUTPUT_ROOT", None)
    return env


def command(root: Path, stage: str, *extra: str) -> list[str]:
    script, overrides = COMMANDS[stage]
    flags = [item for item in extra if item == "-m"]  # Hydra's multirun flag goes before the overrides
    rest = [item for item in extra if item != "-m"]
    return [sys.executable, str(REPO / script), *flags, f"paths.root={root}", *overrides, *rest]


def run(root: Path, stage: str, *extra: str, **popen) -> subprocess.CompletedProcess:
    return subprocess.run(
        command(root, stage, *extra), cwd=root, env=environment(), capture_output=True, text=True, **popen
    )


# -- faults ---------------------------------------------------------------------------------------------------
def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: min(1000, len(data) // 2)])


def flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10
    path.write_bytes(bytes(data))


def nan_row(path: Path) -> None:
    array = np.load(path, mmap_mode="r+")
    array[3, 0] = np.nan
    array.flush()


def delete(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()


def change_an_index(path: Path) -> None:
    record = json.loads(path.read_text())
    record["indices"][3] += 1  # still valid JSON of the right size
    path.write_text(json.dumps(record))


def diverge(root: Path) -> None:
    """A model that diverged in training: NaN weights, sealed as finished (the checksums agree)."""
    unet = root / RUN / "unet"
    state = load_file(str(unet / "diffusion_pytorch_model.safetensors"))
    first = sorted(state)[0]
    state[first] = torch.full_like(state[first], float("nan"))
    save_file(state, str(unet / "diffusion_pytorch_model.safetensors"))
    sealed = json.loads((unet / "DONE").read_text())
    sealed["files"] = {name: file_record(unet / name) for name in sealed["files"]}
    atomic_write_text(unet / "DONE", json.dumps(sealed))


# -- results --------------------------------------------------------------------------------------------------
def same_attribution(root: Path, reference: Path) -> bool:
    for name in ("train", "val", "generated"):
        a = root / RUN / "features" / "das" / name / "features.npy"
        b = reference / RUN / "features" / "das" / name / "features.npy"
        if not np.allclose(np.load(a), np.load(b), rtol=1e-4, atol=1e-5):  # batch size changes the last bits
            return False
    for name in ("val", "generated"):
        a = np.load(root / RUN / "scores" / "das" / name / "scores.npy")
        b = np.load(reference / RUN / "scores" / "das" / name / "scores.npy")
        if not np.allclose(a, b, rtol=1e-4, atol=1e-6 * float(np.abs(b).max())):
            return False
    return True


def same_model(root: Path, reference: Path) -> bool:
    ours, theirs = load_file(str(root / RUN / WEIGHTS)), load_file(str(reference / RUN / WEIGHTS))
    generated = "queries/generated.safetensors"
    return all(torch.allclose(ours[k], theirs[k], rtol=1e-4, atol=1e-6) for k in theirs) and (
        (root / RUN / generated).read_bytes() == (reference / RUN / generated).read_bytes()
    )


def same_lds(root: Path, reference: Path) -> bool:
    def records(base: Path) -> list:
        return [
            (r["method"], r["query_set"], r["lambda_selection"], round(r["lds"], 6))
            for r in json.loads((base / "fashion2" / "tiny" / "lds" / "full-seed0" / "lds.json").read_text())[
                "records"
            ]
        ]

    return records(root) == records(reference)


def same_counterfactual(root: Path, reference: Path) -> bool:
    def distances(base: Path) -> dict:
        result = json.loads(
            (base / "fashion2" / "tiny" / "lds" / "full-seed0" / "counterfactual_das.json").read_text()
        )
        return {key: [round(float(v), 6) for v in result[key]] for key in ("l2_top", "l2_random")}

    return distances(root) == distances(reference)


SAME = {
    "train": same_model,
    "attribute": same_attribution,
    "evaluate": same_lds,
    "counterfactual": same_counterfactual,
}


@dataclass
class Scenario:
    name: str
    artifact: str
    fault: str
    stage: str
    inject: Callable[[Path], None]  # given the experiment root
    kill_after: Callable[[Path, float], bool] | None = None  # kill -9 once this holds (root, seconds)
    limit_file_size: int | None = None


def at(relative: str, fault: Callable[[Path], None], base: Path = RUN) -> Callable[[Path], None]:
    return lambda root: fault(root / base / relative)


def rows_done(root: Path, elapsed: float) -> bool:
    done = root / RUN / TRAIN_STORE / "done.npy"
    try:
        return done.exists() and 4 <= int(np.load(done).sum()) < 40
    except (ValueError, OSError):
        return False


def ground_truth_started(root: Path, elapsed: float) -> bool:
    """Some subset models' ground truth is cached, not all of them."""
    caches = list((root / "fashion2" / "tiny" / "lds" / "ground_truth").glob("*/*/losses.safetensors"))
    return 1 <= len(caches) < 6


def counterfactual_retraining(root: Path, elapsed: float) -> bool:
    """A counterfactual retraining has started (its run manifest is written) and the result is not there yet."""
    tiny = root / "fashion2" / "tiny"
    started = any(tiny.glob("cf-das-*/seed0/manifest.json"))
    return started and not (tiny / "lds" / "full-seed0" / "counterfactual_das.json").exists()


def without_counterfactual(root: Path) -> None:
    tiny = root / "fashion2" / "tiny"
    for folder in tiny.glob("cf-das-*"):
        shutil.rmtree(folder)
    (tiny / "lds" / "full-seed0" / "counterfactual_das.json").unlink()


def after(seconds: float) -> Callable[[Path, float], bool]:
    return lambda root, elapsed: elapsed >= seconds


def gt_cache(root: Path) -> Path:
    """The ground-truth cache of subset model 0 on the val queries (the folder is named after the set)."""
    return next(
        p
        for p in sorted((root / "fashion2" / "tiny" / "lds" / "ground_truth" / "lds-0-seed0").iterdir())
        if "test" in p.name
    )


def without_features(root: Path) -> None:
    shutil.rmtree(root / RUN / "features")
    shutil.rmtree(root / RUN / "scores")


SCENARIOS = [
    Scenario("features truncated", "features.npy (train store)", "cut to 1000 bytes", "attribute",
             at(f"{TRAIN_STORE}/features.npy", truncate)),
    Scenario("features bit flip", "features.npy (train store)", "one bit flipped", "attribute",
             at(f"{TRAIN_STORE}/features.npy", flip_bit)),
    Scenario("features NaN on disk", "features.npy (train store)", "NaN written into a finished row", "attribute",
             at(f"{TRAIN_STORE}/features.npy", nan_row)),
    Scenario("features deleted", "features.npy (train store)", "deleted", "attribute",
             at(f"{TRAIN_STORE}/features.npy", delete)),
    Scenario("done map truncated", "done.npy (train store)", "cut in half", "attribute",
             at(f"{TRAIN_STORE}/done.npy", truncate)),
    Scenario("done map bit flip", "done.npy (train store)", "one bit flipped", "attribute",
             at(f"{TRAIN_STORE}/done.npy", flip_bit)),
    Scenario("row checksums bit flip", "row_digests.npy (train store)", "one bit flipped", "attribute",
             at(f"{TRAIN_STORE}/row_digests.npy", flip_bit)),
    Scenario("store manifest truncated", "manifest.json (train store)", "cut in half", "attribute",
             at(f"{TRAIN_STORE}/manifest.json", truncate)),
    Scenario("store manifest deleted", "manifest.json (train store)", "deleted", "attribute",
             at(f"{TRAIN_STORE}/manifest.json", delete)),
    Scenario("weights truncated (attribute)", "unet/*.safetensors", "cut to 1000 bytes", "attribute",
             at(WEIGHTS, truncate)),
    Scenario("weights truncated (train)", "unet/*.safetensors", "cut to 1000 bytes", "train", at(WEIGHTS, truncate)),
    Scenario("weights bit flip", "unet/*.safetensors", "one bit flipped", "attribute", at(WEIGHTS, flip_bit)),
    Scenario("weights deleted", "unet/*.safetensors", "deleted", "attribute", at(WEIGHTS, delete)),
    Scenario("weights NaN (diverged model)", "unet/*.safetensors", "NaN weights, sealed as finished",
             "attribute", lambda root: (diverge(root), without_features(root))),
    Scenario("checkpoint truncated", "checkpoints/last.ckpt", "cut in half (model folder deleted)", "train",
             lambda root: (truncate(root / RUN / "checkpoints" / "last.ckpt"), delete(root / RUN / "unet"))),
    Scenario("generated queries truncated", "queries/generated.safetensors", "cut to 1000 bytes", "attribute",
             at("queries/generated.safetensors", truncate)),
    Scenario("generated queries deleted", "queries/generated.safetensors", "deleted", "train",
             at("queries/generated.safetensors", delete)),
    Scenario("scores truncated (evaluate)", "scores/das/val/scores.npy", "cut to 1000 bytes", "evaluate",
             at("scores/das/val/scores.npy", truncate)),
    Scenario("scores bit flip (attribute)", "scores/das/val/scores.npy", "one bit flipped", "attribute",
             at("scores/das/val/scores.npy", flip_bit)),
    Scenario("ground truth truncated", "lds/ground_truth/.../losses.safetensors", "cut in half", "evaluate",
             lambda root: truncate(gt_cache(root) / "losses.safetensors")),
    Scenario("ground truth deleted", "lds/ground_truth/.../losses.safetensors", "deleted", "evaluate",
             lambda root: delete(gt_cache(root) / "losses.safetensors")),
    Scenario("index list changed", "lds-0/seed0/subset.json", "one index changed (valid JSON)", "evaluate",
             lambda root: change_an_index(root / "fashion2" / "tiny" / "lds-0" / "seed0" / "subset.json")),
    Scenario("subset weights bit flip", "lds-1/seed0/unet/*.safetensors", "one bit flipped", "evaluate",
             lambda root: flip_bit(root / "fashion2" / "tiny" / "lds-1" / "seed0" / WEIGHTS)),
    Scenario("kill -9 in feature collection", "features/das/train", "kill -9 after 4-40 of 48 rows", "attribute",
             without_features, kill_after=rows_done),
    Scenario("kill -9 in training", "full/seed0", "kill -9 6 s after start", "train",
             lambda root: shutil.rmtree(root / RUN), kill_after=after(6.0)),
    Scenario("kill -9 in scoring", "scores/das", "kill -9 6.5 s after start (features reused)", "attribute",
             lambda root: shutil.rmtree(root / RUN / "scores"), kill_after=after(6.5)),
    Scenario("kill -9 in ground truth", "lds/ground_truth", "kill -9 once 1-5 of 6 caches are written",
             "evaluate", lambda root: shutil.rmtree(root / "fashion2" / "tiny" / "lds"),
             kill_after=ground_truth_started),
    Scenario("kill -9 in the counterfactual", "cf-das-*, counterfactual_das.json",
             "kill -9 once a retraining has started", "counterfactual", without_counterfactual,
             kill_after=counterfactual_retraining),
    Scenario("full disk", "scores, grid, report", "RLIMIT_FSIZE = 8 KiB per file", "attribute",
             without_features, limit_file_size=8192),
]  # fmt: skip


def one_error(result: subprocess.CompletedProcess) -> str | None:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    if result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr:
        return errors[0]
    return None


def follow_remedy(error: str, root: Path, stage: str) -> subprocess.CompletedProcess | None:
    """Do what the error says (delete the path it names, rerun the commands it names), then the command itself."""
    match = re.search(r"delete (/\S+?)(?= and |: |; |, |$)", error)  # paths may hold ':' (set names)
    commands = re.findall(r"python (train|attribute|evaluate_lds)\.py", error)
    if match is None and not commands:
        return None
    if match is not None and match.group(1).startswith(str(root)) and Path(match.group(1)).exists():
        delete(Path(match.group(1)))
    subset = re.search(r"subset lds-(\d+)", error)
    for script in commands:
        named = {"evaluate_lds": "evaluate"}.get(script, script)
        if named == stage:
            continue
        extra = ("subset=lds", f"subset.index={subset.group(1)}", "train.max_steps=4") if subset else ()
        run(root, named, *extra)
    return run(root, stage)


def two_writers(root: Path, reference: Path) -> dict:
    """Two attribute.py runs started together on an experiment without features."""
    without_features(root)
    argv = command(root, "attribute", "method.features.batch_size=2")
    processes = [
        subprocess.Popen(
            argv, cwd=root, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    results = [subprocess.CompletedProcess(argv, p.wait(), *p.communicate()) for p in processes]
    errors = [one_error(r) for r in results]
    codes = sorted(r.returncode for r in results)
    rerun = run(root, "attribute")
    outcome = "equal" if rerun.returncode == 0 and same_attribution(root, reference) else "WRONG"
    if codes == [0, 2] and any(errors):
        first = "one finished, the other: " + next(e for e in errors if e).replace(str(root), "<root>")
    elif codes == [0, 0]:
        first = "both finished (the second found the store complete)"
    else:
        first = f"WRONG: exit codes {codes}"
    return {"outcome": first, "then": outcome}


def play(scenario: Scenario, pristine: Path, work: Path) -> dict:
    root = work / re.sub(r"[^\w-]+", "_", scenario.name)  # Hydra's override grammar: no brackets in paths
    shutil.copytree(pristine, root)
    scenario.inject(root)
    if scenario.kill_after is not None:
        process = subprocess.Popen(
            command(root, scenario.stage), cwd=root, env=environment(),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        start = time.time()
        while process.poll() is None and not scenario.kill_after(root, time.time() - start):
            time.sleep(0.02)
        killed = process.poll() is None
        if killed:
            os.kill(process.pid, signal.SIGKILL)
        process.wait()
        result = run(root, scenario.stage)
        same = result.returncode == 0 and SAME[scenario.stage](root, pristine)
        return {
            "outcome": ("equal" if same else "WRONG") + ("" if killed else " (finished before the kill)"),
            "then": "",
        }
    popen = {}
    if scenario.limit_file_size is not None:
        limit = scenario.limit_file_size

        def limited() -> None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        popen["preexec_fn"] = limited
    result = run(root, scenario.stage, **popen)
    if result.returncode == 0:
        return {
            "outcome": "equal" if SAME[scenario.stage](root, pristine) else "WRONG (silently different)",
            "then": "",
        }
    error = one_error(result)
    if error is None:
        return {
            "outcome": f"WRONG: exit {result.returncode}: {result.stderr.strip().splitlines()[-1:]}",
            "then": "",
        }
    again = run(root, scenario.stage, **popen)  # the same command again: the same error, nothing changed
    stable = one_error(again) == error
    if scenario.limit_file_size is not None:
        then = run(root, scenario.stage)  # with room again
    else:
        then = follow_remedy(error, root, scenario.stage)
    followed = (
        ""
        if then is None
        else ("equal" if then.returncode == 0 and SAME[scenario.stage](root, pristine) else "WRONG")
    )
    shown = error.replace(str(root), "<root>")
    return {
        "outcome": shown if stable else f"{shown} (but a different error on the second run)",
        "then": followed,
    }


def prepare(root: Path) -> None:
    steps = [
        ("train", ()),
        ("train", ("-m", "subset=lds", "subset.index=0,1,2", "train.max_steps=4")),
        ("attribute", ()),
        ("evaluate", ()),
        ("counterfactual", ()),
    ]
    for stage, extra in steps:
        result = run(root, stage, *extra)
        if result.returncode != 0:
            raise SystemExit(f"preparing the experiment failed at {stage}:\n{result.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", default="", help="run the scenarios whose name contains this")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "faults.json")
    args = parser.parse_args()
    started = time.time()
    rows = []
    with tempfile.TemporaryDirectory(prefix="das-faults-") as scratch:
        pristine = Path(scratch) / "pristine"
        pristine.mkdir()
        prepare(pristine)
        work = Path(scratch) / "work"
        for scenario in SCENARIOS:
            if args.only not in scenario.name:
                continue
            row = {
                "artifact": scenario.artifact,
                "fault": scenario.fault,
                "command": COMMANDS[scenario.stage][0],
            }
            row.update(play(scenario, pristine, work))
            print(f"{scenario.name}: {row['outcome']} {row['then']}", flush=True)
            rows.append(row)
        if args.only in "two writers":
            root = work / "two_writers"
            shutil.copytree(pristine, root)
            row = {
                "artifact": "features/das/*",
                "fault": "two runs started together",
                "command": "attribute.py",
            }
            row.update(two_writers(root, pristine))
            print(f"two writers: {row['outcome']} {row['then']}", flush=True)
            rows.append(row)
    lines = [
        "| artifact | fault | command rerun | outcome | after the remedy |",
        "|---|---|---|---|---|",
        *(
            f"| {r['artifact']} | {r['fault']} | `{r['command']}` | {r['outcome']} | {r['then'] or '-'} |"
            for r in rows
        ),
    ]
    table = "\n".join(lines)
    print("\n" + table)
    meta = {
        "date": datetime.date.today().isoformat(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "seconds": round(time.time() - started),
        "wrong": sum("WRONG" in r["outcome"] or r["then"] == "WRONG" for r in rows),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.output, json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    atomic_write_text(args.output.with_suffix(".md"), f"{table}\n\n{json.dumps(meta)}\n")


if __name__ == "__main__":
    main()
