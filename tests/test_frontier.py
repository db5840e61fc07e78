"""benchmarks/frontier.py without running a point: the points' budgets, the Pareto front, and scratch roots that
start from nothing while the benchmark's root is only read."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, entry_env

SCRIPT = REPO / "benchmarks" / "frontier.py"


@pytest.fixture(scope="module")
def frontier():
    spec = importlib.util.spec_from_file_location("frontier", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def override_value(point, key: str, default):
    for override in point.overrides:
        name, _, value = override.partition("=")
        if name == key:
            return value
    return default


def test_every_point_spends_its_budget_of_draws(frontier) -> None:
    points = frontier.all_points()
    assert len({point.name for point in points}) == len(points)
    for point in points:
        timesteps = int(override_value(point, "method.features.num_timesteps", 10))
        draws = int(override_value(point, "method.features.draws_per_timestep", 1))
        assert timesteps * draws == point.budget, point.name
        assert (override_value(point, "projector", "dense") == "sparse") == (point.projector == "sparse")
    budgets = {(p.method, p.scheme, p.projector): set() for p in points}
    for point in points:
        budgets[(point.method, point.scheme, point.projector)].add(point.budget)
    assert all(found == {10, 30, 100} for found in budgets.values())
    assert {p.method for p in points} == {"das", "dtrak", "trak", "ekfac"}
    default = next(p for p in points if p.name == "das-grid10-dense")
    # paper-DAS (the reference): every draw setting named, so the point does not follow the defaults
    assert set(default.overrides) == {
        "method.features.num_timesteps=10",
        "method.features.sampling=grid",
        "method.features.draws_per_timestep=1",
        "method.features.antithetic=false",
        "projector=dense",
    }


def test_pareto_front_keeps_the_points_nothing_beats(frontier) -> None:
    def record(seconds: float, lds: float) -> dict:
        return {"attribute_seconds": seconds, "lds": {"val": {"lds": lds}}}

    measured = {
        "fast": record(10, 20.0),
        "slow-better": record(100, 30.0),
        "slow-worse": record(100, 15.0),  # slower and worse than fast
        "tie-slower": record(50, 20.0),  # as good as fast, slower
        "best": record(300, 35.0),
        "failed": {"error": "attribute.py failed"},
    }
    assert frontier.pareto_names(measured, "val") == {"fast", "slow-better", "best"}


def make_root(root: Path) -> Path:
    experiment = root / "fashion2" / "tiny"
    full = experiment / "full" / "seed0"
    for folder in ("unet", "queries", "features/das/train", "scores/das/val", "scores/dtrak/val", "lds-0/x"):
        (full / folder).mkdir(parents=True)
    (full / "unet" / "weights").write_text("w")
    (full / "manifest.json").write_text("{}")
    (full / "features" / "das" / "train" / "features.npy").write_text("f")
    (full / "scores" / "das" / "val" / "scores.npy").write_text("s")
    for index in (0, 1):
        (experiment / f"lds-{index}" / "seed0" / "unet").mkdir(parents=True)
    return experiment


def test_scratch_root_links_what_a_point_reads_and_holds_nothing_it_makes(frontier, tmp_path: Path) -> None:
    experiment = make_root(tmp_path / "root")
    before = sorted(str(path.relative_to(tmp_path)) for path in (tmp_path / "root").rglob("*"))
    scratch = tmp_path / "scratch" / "das-grid10-dense" / "fashion2" / "tiny"
    frontier.make_scratch(experiment, scratch, "das", 0)
    full = scratch / "full" / "seed0"
    assert (full / "unet").is_symlink() and (full / "unet" / "weights").read_text() == "w"
    assert (full / "manifest.json").is_symlink() and (full / "queries").is_symlink()
    assert not (full / "features").exists()  # from nothing: no store
    assert sorted(path.name for path in (full / "scores").iterdir()) == ["das"]  # the reference alone
    assert (full / "scores" / "das").resolve() == (experiment / "full" / "seed0" / "scores" / "das").resolve()
    assert all((scratch / f"lds-{index}").is_symlink() for index in (0, 1))
    assert (scratch / "lds" / "ground_truth").resolve() == (experiment / "lds" / "ground_truth").resolve()
    # what a point wrote is gone when it is measured again; the root keeps every file (links never followed)
    (full / "features" / "das" / "train").mkdir(parents=True)
    (full / "scores" / "das-grid10-dense").mkdir()
    (scratch / "lds" / "full-seed0").mkdir()
    frontier.make_scratch(experiment, scratch, "das", 0)
    assert not (full / "features").exists() and not (full / "scores" / "das-grid10-dense").exists()
    after = sorted(str(path.relative_to(tmp_path)) for path in (tmp_path / "root").rglob("*"))
    assert after == sorted([*before, "root/fashion2/tiny/lds", "root/fashion2/tiny/lds/ground_truth"])
    assert (experiment / "full" / "seed0" / "scores" / "das" / "val" / "scores.npy").read_text() == "s"


def test_dry_run_and_list_name_the_chosen_points(tmp_path: Path) -> None:
    def run(*arguments: str) -> list[str]:
        result = subprocess.run(
            [sys.executable, str(SCRIPT), *arguments], cwd=tmp_path, env=entry_env(),
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return result.stdout.strip().splitlines()

    listed = run("--list", "--points", "das-*100*")
    assert [line.split()[0] for line in listed] == ["das-grid100-dense", "das-sa100-dense", "das-grid100-sparse",
                                                    "das-sa100-sparse", "das-sa100-dense-ndraw"]  # fmt: skip
    commands = run("--dry-run", "--points", "ekfac-strat30-none", "--scratch", str(tmp_path / "s"))
    assert commands[0] == "# ekfac-strat30-none"
    assert "method=ekfac" in commands[1] and "method.name=ekfac-strat30-none" in commands[1]
    assert "method.features.sampling=stratified" in commands[1]
    assert commands[2].startswith("python evaluate_lds.py") and "pairs=[[ekfac-strat30-none" in commands[2]
    assert not (tmp_path / "s").exists()  # a dry run makes nothing
