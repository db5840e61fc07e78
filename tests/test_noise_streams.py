"""The LDS ground truth's noise streams (lds.noise): ``disjoint`` keys that no feature setting can reproduce,
``coupled`` byte for byte the noise every ground truth had before, the features' rule unchanged, and caches and
bundles made before the setting read as coupled."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch

from das_lightning import diffusion
from das_lightning.attribution.grads import draw_noise
from das_lightning.attribution.timesteps import draw_plan
from das_lightning.diffusion import (
    GROUND_TRUTH_NOISE_DOMAIN,
    NOISE_STREAMS,
    ground_truth_noise,
    ground_truth_noise_seed,
    noise_seed,
    rule_noise,
)
from das_lightning.errors import ConfigError
from das_lightning.evaluation.ground_truth import (
    NOISE_KEY,
    NoiseStreamMismatchError,
    cached_query_losses,
    ground_truth_manifest,
)
from das_lightning.evaluation.pipeline import LDSSettings
from das_lightning.manifest import ManifestMismatchError, read_manifest, write_manifest
from das_lightning.seeding import derive_seed

from conftest import compose

REPO = Path(__file__).resolve().parents[1]
SHAPE = (3, 8, 8)
SETS = ("train", "val", "generated")
INDICES = (0, 3, 17, 40)
GROUND_TRUTH_GRID = range(0, 1000, 50)  # the LDS ground truth of fashion2: 20 timesteps x e_seeds {0, 1, 2}
E_SEEDS = (0, 1, 2)
DRAWS = (0, 1, 2, 3)


def key_text(keys: tuple) -> str:
    """derive_seed's text of a key tuple (checked against derive_seed itself below)."""
    return "\x1f".join(f"{type(key).__name__}:{key}" for key in keys)


def recorded_keys(monkeypatch, call) -> list[tuple]:
    """Every key tuple the noise rule hands derive_seed while ``call()`` runs."""
    keys: list[tuple] = []

    def recording(*args):
        keys.append(args)
        return derive_seed(*args)

    monkeypatch.setattr(diffusion, "derive_seed", recording)
    call()
    monkeypatch.undo()
    return keys


# --- the features' rule is unchanged --------------------------------------------------------------------------


def test_feature_noise_seeds_are_the_ones_every_store_was_made_with() -> None:
    # values computed with the code before lds.noise existed (commit 2c13295), and the keys they come from
    assert noise_seed("val", 3, 50, 0) == derive_seed("noise", "val", 3, 50, 0) == 8994517696730177978
    assert noise_seed("generated", 17, 950, 2) == derive_seed("noise", "generated", 17, 950, 2)
    assert noise_seed("generated", 17, 950, 2) == 9223318561648925702
    assert noise_seed("train", 5, 480, 1, 3) == derive_seed("noise", "train", 5, 480, 1, 3)
    assert noise_seed("train", 5, 480, 1, 3) == 836400265807352459


def test_feature_noise_still_matches_the_committed_bundle_rule() -> None:
    from das_lightning.evaluation.bundle import noise_rule_version

    committed = json.loads((REPO / "benchmarks" / "bundles" / "fashion2" / "manifest.json").read_text())
    assert noise_rule_version() == committed["noise_rule"]


# --- coupled: the old ground truth, byte for byte -------------------------------------------------------------


def test_coupled_is_the_old_ground_truth_noise_byte_for_byte() -> None:
    coupled = ground_truth_noise("val", [40, 3], [0, 950], 1, SHAPE, stream="coupled")
    # blake2b of the old code's rule_noise("val", [40, 3], [0, 950], 1, (3, 8, 8)) (commit 2c13295)
    assert hashlib.blake2b(coupled.numpy().tobytes(), digest_size=8).hexdigest() == "4cf48eb23107c65e"
    for set_name in SETS:
        for e_seed in E_SEEDS:
            indices, timesteps = list(INDICES), [0, 137, 500, 999]
            assert torch.equal(
                ground_truth_noise(set_name, indices, timesteps, e_seed, SHAPE, stream="coupled"),
                rule_noise(set_name, indices, timesteps, e_seed, SHAPE),
            )


def test_query_losses_default_stays_coupled_for_das_residuals() -> None:
    from conftest import tiny_unet

    unet, alphas_cumprod = tiny_unet().eval(), diffusion.make_scheduler().alphas_cumprod
    images = torch.rand((3, 3, 8, 8), generator=torch.Generator().manual_seed(0)) * 2 - 1
    args = (unet, alphas_cumprod, images, [4, 9, 2], "train", [10, 600], [0, 1])
    default = diffusion.query_losses(*args)
    assert torch.equal(default, diffusion.query_losses(*args, noise="coupled"))
    assert not torch.allclose(default, diffusion.query_losses(*args, noise="disjoint"))


# --- disjoint: no feature setting reproduces it ---------------------------------------------------------------


def test_no_feature_key_can_be_a_disjoint_key(monkeypatch) -> None:
    """The feature key space, enumerated: every key the features' rule makes (any set, index, timestep, e_seed,
    draw id, through rule_noise and the draw plans of grid, stratified and antithetic features) starts with the
    field "noise"; every disjoint key starts with the ground truth's own domain. derive_seed's text begins with the
    first field and a separator that no field before it can hold, so the two texts differ whatever the set name."""
    assert key_text(("noise", "val", 3, 50, 0)).startswith("str:noise\x1f")
    digest = hashlib.blake2b(key_text(("noise", "val", 3, 50, 0)).encode(), digest_size=8).digest()
    assert int.from_bytes(digest, "little") & ((1 << 63) - 1) == derive_seed("noise", "val", 3, 50, 0)

    def features() -> None:
        for set_name in SETS:
            for e_seed in E_SEEDS:
                rule_noise(set_name, [3] * 1000, range(1000), e_seed, (1,), draws=1)
                for draws, antithetic in ((1, False), (4, False), (4, True)):
                    plan = draw_plan(range(0, 1000, 100), draws, antithetic)
                    draw_noise(set_name, [17] * len(plan), plan, e_seed, (1,))

    feature_keys = recorded_keys(monkeypatch, features)
    assert len(feature_keys) == 3 * 3 * (1000 + 10 * (1 + 4 + 4))
    assert {keys[0] for keys in feature_keys} == {"noise"}
    assert all(key_text(keys).startswith("str:noise\x1f") for keys in feature_keys)

    def ground_truth() -> None:
        for set_name in SETS:
            for e_seed in E_SEEDS:
                ground_truth_noise(set_name, [3] * 20, GROUND_TRUTH_GRID, e_seed, (1,), stream="disjoint")

    truth_keys = recorded_keys(monkeypatch, ground_truth)
    assert {keys[0] for keys in truth_keys} == {GROUND_TRUTH_NOISE_DOMAIN}
    assert "\x1f" not in GROUND_TRUTH_NOISE_DOMAIN
    assert not any(key_text(keys).startswith("str:noise\x1f") for keys in truth_keys)


def test_disjoint_seeds_are_none_of_the_feature_seeds() -> None:
    feature = {
        noise_seed(set_name, index, t, e_seed, draw)
        for set_name in SETS
        for index in INDICES
        for t in range(1000)
        for e_seed in E_SEEDS
        for draw in DRAWS
    }
    disjoint = {
        ground_truth_noise_seed(set_name, index, t, e_seed, "disjoint")
        for set_name in SETS
        for index in INDICES
        for t in range(1000)
        for e_seed in E_SEEDS
    }
    assert len(disjoint) == len(SETS) * len(INDICES) * 1000 * len(E_SEEDS)
    assert not feature & disjoint


def test_disjoint_draws_differ_from_every_feature_draw_of_the_same_image_and_timestep() -> None:
    for set_name in ("val", "generated"):
        for index in (3, 40):
            for t in (0, 50, 500, 950):
                truth = torch.cat(
                    [ground_truth_noise(set_name, [index], [t], e, SHAPE, stream="disjoint") for e in E_SEEDS]
                )  # (3, *SHAPE)
                features = torch.cat(
                    [rule_noise(set_name, [index] * 4, [t] * 4, e, SHAPE, draws=list(DRAWS)) for e in E_SEEDS]
                )  # (12, *SHAPE): e_seeds 0..2 x draws 0..3; antithetic features use their negation too
                for row in truth:
                    assert not any(torch.equal(row, other) or torch.equal(row, -other) for other in features)


def test_coupled_grid_features_reuse_ten_of_sixty_ground_truth_draws_and_disjoint_none() -> None:
    """METHOD.md §8 "Noise overlap": grid features (K = 10, e_seed 0, one draw) against a ground truth on
    t in {0, 50, ..., 950} x e_seeds {0, 1, 2}."""
    grid_features = {noise_seed("val", 7, t, 0) for t in range(0, 1000, 100)}
    for stream, shared in (("coupled", 10), ("disjoint", 0)):
        truth = [ground_truth_noise_seed("val", 7, t, e, stream) for t in GROUND_TRUTH_GRID for e in E_SEEDS]
        assert len(truth) == 60 and len(grid_features & set(truth)) == shared


def test_streams_are_named_and_unknown_ones_refused() -> None:
    assert NOISE_STREAMS == ("disjoint", "coupled")
    with pytest.raises(ConfigError, match="disjoint.*coupled"):
        ground_truth_noise_seed("val", 0, 0, 0, "independent")


# --- settings, caches and bundles -----------------------------------------------------------------------------


def test_lds_settings_default_disjoint_and_reject_an_unknown_stream() -> None:
    assert LDSSettings().noise == "disjoint"
    LDSSettings(noise="coupled").validate()
    with pytest.raises(ConfigError, match=r"lds\.noise must be one of \['disjoint', 'coupled'\]"):
        LDSSettings(noise="shared").validate()
    assert dataclasses.asdict(LDSSettings())["noise"] == "disjoint"  # what a bundle's protocol records


def test_the_evaluate_config_carries_the_stream() -> None:
    from das_lightning.cli import to_plain

    cfg = compose("evaluate_lds", [])
    assert LDSSettings(**to_plain(cfg.lds)).noise == "disjoint"
    assert LDSSettings(**to_plain(compose("evaluate_lds", ["lds.noise=coupled"]).lds)).noise == "coupled"


def counting(values: list[float]):
    calls: list[int] = []

    def compute() -> torch.Tensor:
        calls.append(1)
        return torch.tensor(values)

    return compute, calls


def test_a_cache_made_before_lds_noise_reads_as_coupled(tmp_path: Path) -> None:
    old = ground_truth_manifest("ckpt", "val", [4, 1, 9], [0, 500], [0, 1], noise="coupled")
    del old[NOISE_KEY]  # as every cache manifest was written before lds.noise
    compute, calls = counting([0.1, 0.2, 0.3])
    made = cached_query_losses(tmp_path, old, compute)
    disjoint = ground_truth_manifest("ckpt", "val", [4, 1, 9], [0, 500], [0, 1], noise="disjoint")
    with pytest.raises(NoiseStreamMismatchError, match="lds.noise=coupled to reuse it") as refusal:
        cached_query_losses(tmp_path, disjoint, compute)
    message = str(refusal.value)
    assert f"no {NOISE_KEY!r} key" in message and f"delete {tmp_path}" in message
    assert isinstance(refusal.value, ManifestMismatchError) and NOISE_KEY in refusal.value.differences
    coupled = ground_truth_manifest("ckpt", "val", [4, 1, 9], [0, 500], [0, 1], noise="coupled")
    assert torch.equal(cached_query_losses(tmp_path, coupled, compute), made) and len(calls) == 1
    assert NOISE_KEY not in read_manifest(tmp_path)  # read, not rewritten


def test_a_cache_records_its_stream_and_refuses_the_other(tmp_path: Path) -> None:
    for made, asked in (("disjoint", "coupled"), ("coupled", "disjoint")):
        folder = tmp_path / made
        compute, calls = counting([0.5, 0.25])
        cached_query_losses(folder, ground_truth_manifest("ckpt", "val", [0, 1], noise=made), compute)
        assert read_manifest(folder)[NOISE_KEY] == made
        with pytest.raises(NoiseStreamMismatchError, match=f"lds.noise={made} to reuse it"):
            cached_query_losses(folder, ground_truth_manifest("ckpt", "val", [0, 1], noise=asked), compute)
        cached_query_losses(folder, ground_truth_manifest("ckpt", "val", [0, 1], noise=made), compute)
        assert len(calls) == 1


def test_other_differences_are_still_named_first(tmp_path: Path) -> None:
    write_manifest(
        tmp_path, {**ground_truth_manifest("ckpt", "val", [0, 1], noise="coupled"), "model": "old"}
    )
    compute, _ = counting([0.5, 0.25])
    with pytest.raises(ManifestMismatchError, match="model") as refusal:
        cached_query_losses(tmp_path, ground_truth_manifest("ckpt", "val", [0, 1]), compute)
    assert not isinstance(refusal.value, NoiseStreamMismatchError)


def test_the_committed_bundle_reads_as_coupled() -> None:
    from das_lightning.evaluation.bundle import load_bundle

    bundle = load_bundle(REPO / "benchmarks" / "bundles" / "fashion2")  # measured coupled, before lds.noise
    assert bundle.settings.noise == "coupled"
    protocol = {key: value for key, value in bundle.description["protocol"].items() if key != "noise"}
    before = dataclasses.replace(bundle, description={**bundle.description, "protocol": protocol})
    assert before.settings.noise == "coupled"  # a protocol without the key
    after = {**bundle.description, "protocol": {**protocol, "noise": "disjoint"}}
    assert dataclasses.replace(bundle, description=after).settings.noise == "disjoint"


# --- end to end: an LDS run root made before lds.noise ----------------------------------------------------------


def test_an_old_run_root_keeps_its_coupled_caches_and_measures_disjoint_beside_them(
    lds_run: Path, tmp_path: Path
) -> None:
    import shutil

    from safetensors.torch import load_file

    from das_lightning import cli

    from conftest import TINY_LDS

    root = tmp_path / "run"
    shutil.copytree(lds_run, root)
    ground_truth = root / "fashion2" / "tiny" / "lds" / "ground_truth"

    def evaluate(*overrides: str):
        return cli.run_lds(compose("evaluate_lds", [f"paths.root={root}", *TINY_LDS, *overrides]))

    shutil.rmtree(ground_truth, ignore_errors=True)
    evaluate("lds.noise=coupled", "methods=[pixel]", "pairs=[]")
    caches = sorted(ground_truth.rglob("losses.safetensors"))
    assert len(caches) == 3 * 2
    for cache in caches:  # as a cache made before lds.noise: no key, in the folder caches always had
        assert "~noise" not in str(cache)
        manifest = read_manifest(cache.parent)
        assert manifest[NOISE_KEY] == "coupled"
        del manifest[NOISE_KEY]
        write_manifest(cache.parent, manifest)
    coupled = [load_file(cache)["loss"] for cache in caches]
    stamps = [cache.stat().st_mtime_ns for cache in caches]
    evaluate("methods=[pixel]", "pairs=[]")  # the default, disjoint: measured beside the old caches
    disjoint = sorted(path for path in ground_truth.rglob("losses.safetensors") if path not in caches)
    assert len(disjoint) == 3 * 2 and all("~noise-disjoint" in str(path) for path in disjoint)
    for path, before in zip(disjoint, coupled, strict=True):
        assert read_manifest(path.parent)[NOISE_KEY] == "disjoint"
        assert not torch.allclose(load_file(path)["loss"], before)
    evaluate("lds.noise=coupled", "methods=[pixel]", "pairs=[]")
    assert [
        cache.stat().st_mtime_ns for cache in caches
    ] == stamps  # the old caches reused, not measured again
    # a cache copied into the other stream's folder is refused, naming the key and the remedy
    shutil.rmtree(disjoint[0].parent)
    shutil.copytree(caches[0].parent, disjoint[0].parent)
    with pytest.raises(NoiseStreamMismatchError, match="lds.noise=coupled to reuse it, or delete"):
        evaluate("methods=[pixel]", "pairs=[]")
