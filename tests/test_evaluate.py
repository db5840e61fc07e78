"""evaluate_lds.py end to end on tiny models: records, refusals, cached ground truth; and the counterfactual check."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from das_lightning import cli
from das_lightning.attribution.pipeline import load_scores
from das_lightning.errors import ConfigError, MissingArtifactError
from das_lightning.evaluation.pipeline import MissingSubsetModelsError
from das_lightning.manifest import ManifestMismatchError

from conftest import RUN, TINY_ATTRIBUTE, TINY_LDS, TINY_TRAIN, compose, run_entry


@pytest.fixture(scope="module")
def lds_root(lds_run: Path, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lds") / "run"
    shutil.copytree(lds_run, root)
    return root


def _evaluate(root: Path, *overrides: str):
    return cli.run_lds(compose("evaluate_lds", [f"paths.root={root}", *TINY_LDS, *overrides]))


def test_lds_json_has_every_method_set_and_selection(lds_root: Path) -> None:
    _evaluate(lds_root)
    document = json.loads((lds_root / "fashion2" / "tiny" / "lds" / "full-seed0" / "lds.json").read_text())
    records = document["records"]
    keys = {(r["method"], r["query_set"], r["lambda_selection"]) for r in records}
    assert keys == {
        (m, q, s) for m in ("das", "pixel") for q in ("val", "generated") for s in ("heldout", "oracle")
    }
    for record in records:
        assert record["num_subsets"] == 3
        if record["lds"] is not None:
            assert -100 <= record["ci_low"] <= record["lds"] <= record["ci_high"] <= 100
    das_oracle = [r for r in records if r["method"] == "das" and r["lambda_selection"] == "oracle"]
    scores_manifest = json.loads((lds_root / RUN / "scores" / "das" / "val" / "manifest.json").read_text())
    for record in das_oracle:  # c and the absolute lambda, on the features' unit
        assert record["lambda_scale"] in scores_manifest["lambda_scales"]
        if record["query_set"] == "val":
            assert record["lambda"] == pytest.approx(record["lambda_scale"] * scores_manifest["lambda_unit"])
    assert document["meta"]["seed_rule"] and document["version"] == 2
    differences = document["differences"]
    assert {(d["a"], d["b"], d["query_set"]) for d in differences} == {
        ("das", "pixel", "val"),
        ("das", "pixel", "generated"),
    }
    assert (lds_root / "fashion2" / "tiny" / "lds" / "full-seed0" / "lds.md").read_text().count("das") >= 2
    assert (lds_root / "fashion2" / "tiny" / "lds" / "full-seed0" / "lds_vs_lambda_val.png").exists()


def test_snr_lds_is_an_option_reported_apart_from_the_lds(lds_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "snr"
    shutil.copytree(lds_root, root)
    report = _evaluate(root, "lds.snr_zeta=3")
    document = json.loads((root / "fashion2" / "tiny" / "lds" / "full-seed0" / "lds.json").read_text())
    rows = document["meta"]["snr_lds"]
    assert {(row["method"], row["query_set"]) for row in rows} == {
        (m, q) for m in ("das", "pixel") for q in ("val", "generated")
    }
    for row in rows:  # every query is accounted for: valid, failed fit, empty selection or undefined
        assert "not comparable with the LDS" in row["label"] and row["zeta"] == 3
        if (
            row["method"] == "das"
        ):  # squared readout, its signed score is not stored: refused by the author's rule
            assert "refused" in row and "das" in row["refused"]
            continue
        assert row["num_valid"] + row["num_fit_failed"] + row["num_empty"] + row["num_undefined"] == 6
    # its own table under its label, after the LDS tables; the LDS records are the same as without it
    assert "not comparable with the LDS" in report.table.split("| a | b |")[-1]
    plain = _evaluate(root)
    assert [r.to_json() for r in plain.records] == [r.to_json() for r in report.records] and not plain.snr


def test_ground_truth_is_cached_per_model(lds_root: Path) -> None:
    _evaluate(lds_root)
    caches = sorted((lds_root / "fashion2" / "tiny" / "lds" / "ground_truth").rglob("losses.safetensors"))
    assert len(caches) == 3 * 2  # three subset models x two query sets
    stamps = [path.stat().st_mtime_ns for path in caches]
    _evaluate(lds_root, "methods=[pixel]", "pairs=[]")
    assert [path.stat().st_mtime_ns for path in caches] == stamps


def test_missing_subset_models_are_named_before_any_work(lds_root: Path) -> None:
    with pytest.raises(MissingSubsetModelsError) as error:
        _evaluate(lds_root, "lds.num_subsets=5")
    message = str(error.value)
    assert "3 (seed 0)" in message and "4 (seed 0)" in message and "subset.index=3,4" in message
    assert "1 (seed 0)" not in message


def test_typos_are_named_before_the_subset_models_are_looked_for(lds_root: Path, tmp_path: Path) -> None:
    """A misspelt method or lds.* value is named at once, not after "train N subset models" (which the missing
    subsets of lds.num_subsets=40 would otherwise say first)."""
    with pytest.raises(MissingArtifactError, match="method 'nope' has no scores.*scored here: .*das"):
        _evaluate(lds_root, "methods=[das,nope]", "lds.num_subsets=40")
    with pytest.raises(ConfigError, match="lds.heldout must be one of"):
        _evaluate(tmp_path / "nothing-here", "lds.heldout=nope")


def test_scores_for_another_query_list_are_refused(lds_root: Path) -> None:
    with pytest.raises(ManifestMismatchError, match="num_queries"):
        _evaluate(lds_root, "queries.num_val=5")


def test_missing_models_exit_cleanly_from_the_command_line(lds_root: Path) -> None:
    result = run_entry(
        "evaluate_lds.py", f"paths.root={lds_root}", *TINY_LDS, "lds.num_subsets=4", cwd=lds_root, check=False
    )
    assert result.returncode == 2 and "subset.index=3" in result.stderr and "Traceback" not in result.stderr


def test_counterfactual_retrains_and_measures_distances(lds_root: Path) -> None:
    _evaluate(lds_root)  # an lds.json with DAS's held-out selection
    cli.run_counterfactual(
        compose(
            "evaluate_lds",
            [
                f"paths.root={lds_root}",
                *TINY_LDS,
                "mode=counterfactual",
                "counterfactual.num_queries=1",
                "counterfactual.remove_top=5",
                "counterfactual.clip_model=no-such-org/no-clip",
            ],
        )
    )
    result = json.loads(
        (lds_root / "fashion2" / "tiny" / "lds" / "full-seed0" / "counterfactual_das.json").read_text()
    )
    assert len(result["l2_top"]) == 1 and len(result["l2_random"]) == 1
    assert np.isfinite(result["median_l2_top"]) and result["median_l2_top"] > 0
    assert result["median_clip_cosine_top"] is None  # no local CLIP: reported as absent, never made up
    kept = json.loads((lds_root / "fashion2" / "tiny" / "cf-das-q0" / "seed0" / "subset.json").read_text())
    # the top-5 removed are those at the c the LDS selected on held-out queries (lds.json), not a picture default
    document = json.loads((lds_root / "fashion2" / "tiny" / "lds" / "full-seed0" / "lds.json").read_text())
    (selected,) = [
        r["lambda_scale"]
        for r in document["records"]
        if (r["method"], r["query_set"], r["lambda_selection"]) == ("das", "generated", "heldout")
    ]
    assert result["lambda_scale"] == selected and "lds.json" in result["lambda_source"]
    stacked, manifest = load_scores(lds_root / RUN / "scores" / "das" / "generated")
    top5 = np.argsort(-stacked[manifest["lambda_scales"].index(selected)][0], kind="stable")[:5]
    assert kept["size"] == 43 and not set(top5.tolist()) & set(kept["indices"])


def test_attribution_after_the_lds_uses_its_heldout_lambda(lds_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "again"
    shutil.copytree(lds_root, root)
    _evaluate(root)
    document = json.loads((root / "fashion2" / "tiny" / "lds" / "full-seed0" / "lds.json").read_text())
    result = cli.run_attribute(compose("attribute", [f"paths.root={root}", *TINY_ATTRIBUTE]))
    for query_set in ("val", "generated"):
        (selected,) = [
            r["lambda_scale"]
            for r in document["records"]
            if (r["method"], r["query_set"], r["lambda_selection"]) == ("das", query_set, "heldout")
        ]
        top = json.loads((root / RUN / "scores" / "das" / query_set / "topk.json").read_text())
        assert top["picture"]["lambda_scale"] == selected and "lds.json" in top["picture"]["source"]
        assert result.chosen[query_set].scale == selected
        stacked, manifest = load_scores(root / RUN / "scores" / "das" / query_set)
        chosen_scores = stacked[manifest["lambda_scales"].index(selected)]
        assert top["proponent_indices"][0] == np.argsort(-chosen_scores[0], kind="stable")[:8].tolist()


def test_subset_models_of_another_seed_rule_are_refused(lds_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "old-rule"
    shutil.copytree(lds_root, root)
    manifest_path = root / "fashion2" / "tiny" / "lds-1" / "seed0" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest.pop("seed_rule")  # as made before subset models shared their seed
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ManifestMismatchError, match="seed_rule") as error:
        _evaluate(root)
    assert "lds-1" in str(error.value)


def test_heldout_on_queries_and_subsets_reports_on_the_other_subsets(lds_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "split"
    shutil.copytree(lds_root, root)
    # a fourth subset model: the split needs two subsets on each side
    run_entry(
        "train.py",
        "-m",
        "subset=lds",
        "subset.index=3",
        f"paths.root={root}",
        *TINY_TRAIN,
        "train.max_steps=4",
        cwd=root,
    )
    report = _evaluate(root, "lds.num_subsets=4", "lds.heldout=queries_and_subsets")
    heldout = [r for r in report.records if r.lambda_selection == "heldout"]
    oracle = [r for r in report.records if r.lambda_selection == "oracle"]
    assert all(r.num_subsets == 2 and r.heldout_mode == "queries_and_subsets" for r in heldout)
    assert all(r.num_subsets == 4 for r in oracle)


def test_two_process_ddp_ground_truth_equals_one_process(lds_root: Path, tmp_path: Path) -> None:
    single = _evaluate(lds_root)
    root = tmp_path / "ddp"
    shutil.copytree(lds_root, root)
    shutil.rmtree(root / "fashion2" / "tiny" / "lds")
    result = run_entry(
        "evaluate_lds.py",
        f"paths.root={root}",
        *TINY_LDS,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        cwd=root,
    )
    document = json.loads((root / "fashion2" / "tiny" / "lds" / "full-seed0" / "lds.json").read_text())
    by_key = {(r["method"], r["query_set"], r["lambda_selection"]): r["lds"] for r in document["records"]}
    assert len(by_key) == len(single.records)
    for record in single.records:
        expected = record.lds
        got = by_key[(record.method, record.query_set, record.lambda_selection)]
        assert (got is None) == (expected is None)
        if expected is not None:
            assert abs(got - expected) < 1e-6
    assert result.stdout.count("| das") == single.table.count("| das")
    assert not list((root / "fashion2" / "tiny" / "lds").rglob("*.tmp*"))
