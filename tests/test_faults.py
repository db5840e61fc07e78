"""Fault injection: each fault is followed by the same command again, and the RESULT is checked: either the result
of an uninterrupted run (resumed or recomputed) or exactly one clear ``error:`` line naming the file, never a
silently different result. Fast faults run by default; those that kill a running process are marked ``slow``."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from das_lightning import cli
from das_lightning.attribution.pipeline import load_scores
from das_lightning.data.subsets import save_index_list
from das_lightning.manifest import atomic_path, atomic_write_text, hash_array

from conftest import REPO, RUN, TINY_ATTRIBUTE, TINY_TRAIN, compose, copy_model, entry_env, run_entry


# -- atomic writes --------------------------------------------------------------------------------------------
def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "scores.npy"
    np.save(target, np.arange(3))
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        np.save(tmp, np.arange(5))
        raise RuntimeError("killed half way")
    np.testing.assert_array_equal(np.load(target), np.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.npy"]


def test_temporary_names_keep_the_suffix_so_writers_infer_the_format(tmp_path: Path) -> None:
    from PIL import Image

    with atomic_path(tmp_path / "grid.png") as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".png"
        Image.new("RGB", (2, 2)).save(tmp)
    assert Image.open(tmp_path / "grid.png").format == "PNG"
    atomic_write_text(tmp_path / "a.json", json.dumps({"x": 1}))
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}


# -- helpers --------------------------------------------------------------------------------------------------
def truncate(path: Path, size: int | None = None) -> None:
    """Keep the first ``size`` bytes (default: 1000, or half of a smaller file)."""
    data = path.read_bytes()
    path.write_bytes(data[: min(1000, len(data) // 2) if size is None else size])


def flip_bit(path: Path, offset: int = -5) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def nan_row(path: Path, row: int = 3) -> None:
    array = np.load(path, mmap_mode="r+")
    array[row, 0] = np.nan
    array.flush()


FAULTS = {"truncate": truncate, "bitflip": flip_bit, "delete": lambda path: path.unlink(), "nan": nan_row}


def _fresh(das_root: Path, target: Path, with_features: bool = True) -> Path:
    """A copy of the tiny model with its finished DAS train and val stores (as an uninterrupted run left them)."""
    root = copy_model(das_root, target)
    if with_features:
        for name in ("train", "val"):
            shutil.copytree(
                das_root / RUN / "features" / "das" / name, root / RUN / "features" / "das" / name
            )
    return root


def _command(entry, config: str, root: Path, overrides: list[str], capsys) -> tuple[int, list[str]]:
    """Run an entry point's function in-process behind the CLI's error handler: (exit code, stderr lines)."""
    capsys.readouterr()
    try:
        cli.user_errors_exit(entry)(compose(config, [f"paths.root={root}", *overrides]))
        code = 0
    except SystemExit as exit_:
        code = int(exit_.code)
    return code, capsys.readouterr().err.splitlines()


ATTRIBUTE_VAL = [*TINY_ATTRIBUTE, "queries.sets=[val]"]


def _attribute(root: Path, capsys, *extra: str) -> tuple[int, list[str]]:
    return _command(cli.run_attribute, "attribute", root, [*ATTRIBUTE_VAL, *extra], capsys)


def _one_error(code: int, lines: list[str], *fragments: str) -> str:
    """Exactly one ``error:`` line, exit 2, no traceback, naming what it must name."""
    errors = [line for line in lines if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, (code, "\n".join(lines[-12:]))
    assert not any("Traceback" in line for line in lines)
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def _assert_uninterrupted(root: Path, das_root: Path) -> None:
    """The features and the val scores equal those of the uninterrupted run."""
    for name in ("train", "val"):
        np.testing.assert_allclose(
            np.load(root / RUN / "features" / "das" / name / "features.npy"),
            np.load(das_root / RUN / "features" / "das" / name / "features.npy"),
            rtol=1e-5,
            atol=1e-6,
        )
    scores, _ = load_scores(root / RUN / "scores" / "das" / "val")
    reference, _ = load_scores(das_root / RUN / "scores" / "das" / "val")
    np.testing.assert_allclose(scores, reference, rtol=1e-4, atol=1e-6 * float(np.abs(reference).max()))


# -- feature stores -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "fault", "named"),
    [
        ("features.npy", "truncate", "features.npy holds 1000 bytes"),
        ("features.npy", "bitflip", "do not match their checksums"),
        ("features.npy", "nan", "do not match their checksums"),
        ("features.npy", "delete", "features.npy is missing"),
        ("done.npy", "truncate", "done.npy holds"),
        ("done.npy", "delete", "done.npy is missing"),
        ("row_digests.npy", "bitflip", "do not match their checksums"),
        ("manifest.json", "truncate", "manifest.json is damaged"),
    ],
)
def test_damaged_store_files_give_one_error_naming_the_file(
    das_root: Path, tmp_path: Path, capsys, name: str, fault: str, named: str
) -> None:
    root = _fresh(das_root, tmp_path)
    store = root / RUN / "features" / "das" / "train"
    FAULTS[fault](store / name)
    before = {p.name: p.read_bytes() for p in store.iterdir() if p.is_file()}
    error = _one_error(*_attribute(root, capsys), named, "delete")
    assert str(store) in error
    # refused without touching the store (a short features.npy is not zero-extended) and without any scores
    assert {p.name: p.read_bytes() for p in store.iterdir() if p.is_file()} == before
    assert not (root / RUN / "scores" / "das" / "val" / "scores.npy").exists()


def test_following_the_remedy_gives_the_uninterrupted_result(das_root: Path, tmp_path: Path, capsys) -> None:
    root = _fresh(das_root, tmp_path)
    store = root / RUN / "features" / "das" / "train"
    truncate(store / "features.npy")
    _one_error(*_attribute(root, capsys), "features.npy")
    _one_error(*_attribute(root, capsys), "features.npy")  # the same command again: the same error
    shutil.rmtree(store)  # what the error says to do
    assert _attribute(root, capsys)[0] == 0
    _assert_uninterrupted(root, das_root)


def test_a_store_without_its_manifest_is_recomputed(das_root: Path, tmp_path: Path, capsys) -> None:
    # without the manifest the rows cannot be trusted to be of these settings: recomputed, never reused
    root = _fresh(das_root, tmp_path)
    (root / RUN / "features" / "das" / "train" / "manifest.json").unlink()
    assert _attribute(root, capsys)[0] == 0
    _assert_uninterrupted(root, das_root)


def test_nan_features_from_the_model_are_refused_and_the_rerun_resumes(
    das_root: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    from das_lightning.attribution.grads import PerSampleGradients

    root = _fresh(das_root, tmp_path, with_features=False)
    original = PerSampleGradients.flat_gradients

    def poisoned(self, images, indices, *args, **kwargs):
        flat = original(self, images, indices, *args, **kwargs)
        return torch.where(torch.as_tensor(indices == 20)[:, None], torch.nan, flat)

    monkeypatch.setattr(PerSampleGradients, "flat_gradients", poisoned)
    _one_error(*_attribute(root, capsys), "non-finite features for dataset indices [20]")
    done = np.load(root / RUN / "features" / "das" / "train" / "done.npy")
    assert 0 < done.sum() < 48 and done[20] == 0  # batches before it are kept, its batch is not marked
    monkeypatch.setattr(PerSampleGradients, "flat_gradients", original)
    assert _attribute(root, capsys)[0] == 0
    _assert_uninterrupted(root, das_root)


def test_a_second_writer_of_the_same_store_is_refused(das_root: Path, tmp_path: Path, capsys) -> None:
    root = _fresh(das_root, tmp_path, with_features=False)
    store = root / RUN / "features" / "das" / "train"
    store.mkdir(parents=True)
    holder = subprocess.Popen(  # another run holding the store's writer lock
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time; h = open(sys.argv[1], 'a+'); fcntl.flock(h, fcntl.LOCK_EX); "
            "h.write('pid 4242 on elsewhere'); h.flush(); print('locked', flush=True); time.sleep(60)",
            str(store / ".writer.lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        _one_error(*_attribute(root, capsys), "is being written by pid 4242 on elsewhere", str(store))
        assert not (store / "manifest.json").exists()  # the second writer wrote nothing
    finally:
        holder.kill()
        holder.wait()
    assert _attribute(root, capsys)[0] == 0  # the lock died with its holder
    _assert_uninterrupted(root, das_root)


def test_a_full_disk_gives_one_error_and_the_rerun_finishes(das_root: Path, tmp_path: Path) -> None:
    """RLIMIT_FSIZE (files larger than 8 KiB cannot be written) stands in for a full disk: the features fit, the
    score matrix (10 x 6 x 48 float32) does not."""
    root = _fresh(das_root, tmp_path, with_features=False)

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))

    command = [sys.executable, str(REPO / "attribute.py"), f"paths.root={root}", *ATTRIBUTE_VAL]
    limited = subprocess.run(
        command, cwd=root, env=entry_env(), capture_output=True, text=True, preexec_fn=limit_file_size
    )
    lines = limited.stderr.splitlines()
    _one_error(limited.returncode, lines, "no room", "File too large", "rerun the same command")
    assert np.load(root / RUN / "features" / "das" / "train" / "done.npy").all()  # finished work kept
    assert not list((root / RUN / "scores").rglob("*.tmp-*"))  # no half-written file left behind
    run_entry("attribute.py", *command[2:], cwd=root)
    _assert_uninterrupted(root, das_root)


# -- model weights and generated queries ----------------------------------------------------------------------
WEIGHTS = "diffusion_pytorch_model.safetensors"


def test_truncated_weights_give_one_error_and_exit_2_from_the_command_line(
    das_root: Path, tmp_path: Path
) -> None:
    root = _fresh(das_root, tmp_path)
    truncate(root / RUN / "unet" / WEIGHTS)
    result = run_entry("attribute.py", f"paths.root={root}", *ATTRIBUTE_VAL, cwd=root, check=False)
    _one_error(result.returncode, result.stderr.splitlines(), WEIGHTS, "python train.py")


@pytest.mark.parametrize("fault", ["bitflip", "delete"])
def test_damaged_weights_are_named_by_every_stage(das_root: Path, tmp_path: Path, capsys, fault: str) -> None:
    root = _fresh(das_root, tmp_path)
    FAULTS[fault](root / RUN / "unet" / WEIGHTS)
    _one_error(*_attribute(root, capsys), WEIGHTS, "rerun `python train.py`")
    # train.py does not reuse a damaged model either
    _one_error(*_command(cli.run_train, "train", root, TINY_TRAIN, capsys), WEIGHTS, "delete")


def test_an_unloadable_model_folder_from_elsewhere_is_one_clear_error(tmp_path: Path) -> None:
    from das_lightning.manifest import CorruptArtifactError
    from das_lightning.models.ddpm import load_trained_network
    from das_lightning.models.unet import build_unet

    build_unet("tiny", sample_size=8, channels=1).save_pretrained(
        str(tmp_path / "m"), safe_serialization=True
    )
    truncate(tmp_path / "m" / WEIGHTS)
    with pytest.raises(CorruptArtifactError, match=r"cannot load the model in .*m: .*truncated"):
        load_trained_network(tmp_path / "m")


@pytest.mark.parametrize("fault", ["truncate", "bitflip"])
def test_damaged_generated_queries_are_refused(das_root: Path, tmp_path: Path, capsys, fault: str) -> None:
    root = _fresh(das_root, tmp_path)
    FAULTS[fault](root / RUN / "queries" / "generated.safetensors")
    overrides = [*TINY_ATTRIBUTE, "queries.sets=[generated]"]
    _one_error(
        *_command(cli.run_attribute, "attribute", root, overrides, capsys),
        "generated.safetensors is damaged",
        "python train.py",
    )


def test_deleted_generated_queries_are_regenerated_identically(
    das_root: Path, tmp_path: Path, capsys
) -> None:
    root = _fresh(das_root, tmp_path)
    target = root / RUN / "queries" / "generated.safetensors"
    target.unlink()
    assert _command(cli.run_train, "train", root, TINY_TRAIN, capsys)[0] == 0
    assert target.read_bytes() == (das_root / RUN / "queries" / "generated.safetensors").read_bytes()


# -- scores, ground truth, latents, index lists ---------------------------------------------------------------
@pytest.mark.parametrize("fault", ["truncate", "bitflip"])
def test_damaged_scores_are_refused_where_reused_and_rewritten_by_attribute(
    das_root: Path, tmp_path: Path, capsys, fault: str
) -> None:
    from das_lightning.manifest import CorruptArtifactError

    root = _fresh(das_root, tmp_path)
    assert _attribute(root, capsys)[0] == 0
    folder = root / RUN / "scores" / "das" / "val"
    FAULTS[fault](folder / "scores.npy")
    with pytest.raises(CorruptArtifactError, match="scores.npy is damaged.*python attribute.py"):
        load_scores(folder)  # what evaluate_lds.py and the counterfactual read
    assert _attribute(root, capsys)[0] == 0  # the same command again recomputes them
    _assert_uninterrupted(root, das_root)


def test_a_half_written_score_folder_is_not_read_and_is_rewritten(
    das_root: Path, tmp_path: Path, capsys
) -> None:
    # the state a kill during scoring leaves: the manifest says incomplete, a temporary file beside it
    root = _fresh(das_root, tmp_path)
    folder = root / RUN / "scores" / "das" / "val"
    shutil.copytree(das_root / RUN / "scores" / "das" / "val", folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    (folder / ".scores.tmp-99999.npy").write_bytes(b"\x93NUMPY half")
    with pytest.raises(FileNotFoundError, match="no finished scores"):
        load_scores(folder)
    assert _attribute(root, capsys)[0] == 0
    _assert_uninterrupted(root, das_root)


@pytest.mark.parametrize("fault", ["truncate", "bitflip", "delete"])
def test_ground_truth_cache_is_verified_before_reuse(tmp_path: Path, fault: str) -> None:
    from das_lightning.evaluation.ground_truth import LOSSES_FILE, cached_query_losses, ground_truth_manifest
    from das_lightning.manifest import CorruptArtifactError

    manifest = ground_truth_manifest("model-a", "val", [0, 1, 2], [0, 10], [0])
    calls = []

    def compute() -> torch.Tensor:
        calls.append(1)
        return torch.tensor([0.5, 0.25, 0.125], dtype=torch.float64)

    first = cached_query_losses(tmp_path / "gt", manifest, compute)
    FAULTS[fault](tmp_path / "gt" / LOSSES_FILE)
    if fault == "delete":  # a missing cache is measured again, to the same values
        assert torch.equal(cached_query_losses(tmp_path / "gt", manifest, compute), first) and len(calls) == 2
        return
    with pytest.raises(CorruptArtifactError, match=r"losses.safetensors is damaged.*evaluate_lds.py"):
        cached_query_losses(tmp_path / "gt", manifest, compute)
    assert len(calls) == 1


@pytest.mark.parametrize("fault", ["truncate", "bitflip", "delete"])
def test_latent_cache_is_verified_before_reuse(tmp_path: Path, fault: str) -> None:
    from diffusers import AutoencoderKL

    from das_lightning.data import build_dataset
    from das_lightning.manifest import CorruptArtifactError
    from das_lightning.models.latent import LATENTS_FILE, cached_latents

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
    )
    dataset = build_dataset(name="fashion2", split="train", root=None, image_size=8, num_train=8)
    first = cached_latents(vae, dataset, tmp_path / "latents")
    FAULTS[fault](tmp_path / "latents" / LATENTS_FILE)
    if fault == "delete":
        assert torch.equal(cached_latents(vae, dataset, tmp_path / "latents").tensors, first.tensors)
        return
    with pytest.raises(CorruptArtifactError, match="latents.safetensors is damaged"):
        cached_latents(vae, dataset, tmp_path / "latents")


def test_an_index_list_changed_on_disk_is_refused(das_root: Path, tmp_path: Path) -> None:
    from das_lightning.evaluation.pipeline import LDSSettings, subset_models
    from das_lightning.manifest import CorruptArtifactError
    from das_lightning.paths import RunPaths

    root = tmp_path
    subset = root / "fashion2" / "tiny" / "lds-0" / "seed0"
    subset.mkdir(parents=True)
    for name in ("unet", "manifest.json"):
        source = das_root / RUN / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, subset / name)
    indices = list(range(0, 48, 2))
    manifest = json.loads((subset / "manifest.json").read_text())
    (subset / "manifest.json").write_text(json.dumps({**manifest, "subset_hash": hash_array(indices)}))
    save_index_list(subset / "subset.json", np.array(indices), alpha=0.5, index=0, num_total=48)
    settings = LDSSettings(num_subsets=1, alpha=0.5)
    paths = RunPaths(root, "fashion2", "tiny", "full", 0)
    masks, _ = subset_models(paths, settings, 48)
    assert masks[0].nonzero()[0].tolist() == indices
    record = json.loads((subset / "subset.json").read_text())
    record["indices"][3] += 1  # still valid JSON, still the right size: only the hash tells
    (subset / "subset.json").write_text(json.dumps(record))
    with pytest.raises(CorruptArtifactError, match="subset.json is damaged"):
        subset_models(paths, settings, 48)
    truncate(subset / "subset.json", 20)
    with pytest.raises(CorruptArtifactError, match="subset.json is damaged"):
        subset_models(paths, settings, 48)


# -- kill -9 --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_training_killed_at_any_moment_resumes_to_the_same_model(trained_root: Path, tmp_path: Path) -> None:
    command = [sys.executable, str(REPO / "train.py"), f"paths.root={tmp_path}", *TINY_TRAIN]
    for delay in (4.0, 7.0):
        process = subprocess.Popen(
            command, cwd=tmp_path, env=entry_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(delay)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    run_entry("train.py", *command[2:], cwd=tmp_path)
    ours = load_file(str(tmp_path / RUN / "unet" / WEIGHTS))
    reference = load_file(str(trained_root / RUN / "unet" / WEIGHTS))
    for name, tensor in reference.items():
        torch.testing.assert_close(ours[name], tensor, rtol=1e-4, atol=1e-6)
    assert (tmp_path / RUN / "queries" / "generated.safetensors").exists()
    assert not list((tmp_path / RUN).glob(".unet.tmp-*"))


@pytest.mark.slow
def test_attribute_killed_at_any_moment_resumes_to_the_same_result(das_root: Path, tmp_path: Path) -> None:
    root = _fresh(das_root, tmp_path, with_features=False)
    command = [sys.executable, str(REPO / "attribute.py"), f"paths.root={root}", *ATTRIBUTE_VAL]
    for delay in (5.0, 6.0, 7.0, 8.0):  # start-up, features, scoring, pictures: wherever it falls
        process = subprocess.Popen(
            command, cwd=root, env=entry_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(delay)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    run_entry("attribute.py", *command[2:], cwd=root)
    _assert_uninterrupted(root, das_root)


# -- small ones -----------------------------------------------------------------------------------------------
def test_a_diverged_loss_names_settings_that_exist() -> None:
    from das_lightning.models.ddpm import DiffusionModule, OptimizerSettings
    from das_lightning.models.unet import build_unet

    unet = build_unet("tiny", 8, 1)
    with torch.no_grad():
        next(unet.parameters()).fill_(float("nan"))
    module = DiffusionModule(unet, OptimizerSettings(), seed=0)
    batch = {"image": torch.zeros(2, 1, 8, 8), "index": torch.arange(2), "label": torch.zeros(2).long()}
    with pytest.raises(FloatingPointError, match="train.optimizer.lr=.*trainer.precision=32-true") as error:
        module.training_step(batch, 0)
    suggested = re.findall(r"\(([\w.]+=[\w.-]*)", str(error.value))
    assert [s.split("=")[0] for s in suggested] == ["train.optimizer.lr", "trainer.precision"]
    config = compose("train", ["train.optimizer.lr=1e-5", "trainer.precision=32-true"])  # both keys exist
    assert config.train.optimizer.lr == 1e-5 and config.trainer.precision == "32-true"


def test_more_val_queries_than_the_test_split_is_refused(das_root: Path, tmp_path: Path, capsys) -> None:
    root = _fresh(das_root, tmp_path, with_features=False)
    code, lines = _command(
        cli.run_attribute, "attribute", root, [*ATTRIBUTE_VAL, "queries.num_val=5000"], capsys
    )
    _one_error(code, lines, "queries.num_val=5000", "holds 2000 images", "between 1 and 2000")


def test_a_damaged_lds_json_is_refused_not_ignored(tmp_path: Path) -> None:
    from das_lightning.manifest import CorruptArtifactError
    from das_lightning.selection import choose_scale

    (tmp_path / "lds.json").write_text('{"version": 2, "records": [{"method": "das"')
    with pytest.raises(CorruptArtifactError, match="lds.json is damaged.*evaluate_lds.py"):
        choose_scale(tmp_path / "lds.json", "das", "val", 0.1)
