"""Training, saving, generation and the train.py entry point (sweeps, DDP, bad input)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning
import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from omegaconf import OmegaConf

from das_lightning.data import build_dataset
from das_lightning.data.datamodule import DiffusionDataModule
from das_lightning.diffusion import make_scheduler, per_sample_loss, rule_noise
from das_lightning.models.adapters import MeasuredModel
from das_lightning.models.ddpm import DiffusionModule, OptimizerSettings
from das_lightning.models.sampling import SamplerSettings, ddim_sample
from das_lightning.models.unet import build_unet
from das_lightning.training import SEED_RULE

from conftest import TINY_TRAIN, compose, run_entry


def _fixed_loss(unet: torch.nn.Module, images: torch.Tensor) -> float:
    """Loss on fixed images, timesteps and (rule) noise: comparable before and after training."""
    indices = list(range(len(images)))
    timesteps = torch.tensor([(97 * i) % 1000 for i in indices])
    noise = rule_noise("test", indices, timesteps, 0, images.shape[1:])
    with torch.no_grad():
        unet.eval()
        return per_sample_loss(unet, images, noise, timesteps, make_scheduler().alphas_cumprod).mean().item()


def test_short_training_lowers_the_loss() -> None:
    dataset = build_dataset("fashion2", "train", None, image_size=8, num_train=64)
    torch.manual_seed(0)
    unet = build_unet("tiny", 8, 1)
    images = torch.stack([dataset[i]["image"] for i in range(64)])
    before = _fixed_loss(unet, images)
    module = DiffusionModule(unet, OptimizerSettings(lr=2e-3, warmup_steps=2, total_steps=40), seed=0)
    data = DiffusionDataModule(dataset=dataset, subset_indices=None, batch_size=32, seed=0)
    trainer = lightning.Trainer(
        max_steps=40,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
    after = _fixed_loss(unet, images)
    assert after < 0.7 * before, (before, after)


def test_save_pretrained_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    torch.manual_seed(1)
    unet = build_unet("tiny", 8, 1).eval()
    unet.save_pretrained(tmp_path, safe_serialization=True)
    loaded = UNet2DModel.from_pretrained(tmp_path, use_safetensors=True).eval()
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([1, 500, 999])
    with torch.no_grad():
        assert torch.equal(unet(x, t).sample, loaded(x, t).sample)


def test_generation_does_not_depend_on_batch_size_or_range() -> None:
    torch.manual_seed(2)
    model = MeasuredModel(build_unet("tiny", 8, 1), make_scheduler().alphas_cumprod, Path("unused"))
    settings = SamplerSettings(num_inference_steps=3, seed=7)
    together = ddim_sample(model, 5, settings, batch_size=5).images
    split = ddim_sample(model, 5, settings, batch_size=2).images
    alone = ddim_sample(model, 1, settings, first_index=3).images
    torch.testing.assert_close(together, split, atol=1e-5, rtol=0)
    torch.testing.assert_close(together[3:4], alone, atol=1e-5, rtol=0)
    assert not torch.allclose(together[0], together[1])  # one seed per image, not one for all


def test_train_entry_writes_model_queries_and_manifest(trained_root: Path) -> None:
    run = trained_root / "fashion2" / "tiny" / "full" / "seed0"
    assert (run / "unet" / "DONE").exists()
    assert (run / "checkpoints" / "last.ckpt").exists()
    assert (run / "queries" / "generated_grid.png").exists()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["dataset"] == "fashion2:train:n48" and manifest["subset"] == "full"
    subset = json.loads((run / "subset.json").read_text())
    assert subset["indices"] == list(range(48))


def test_rerun_reuses_the_model_and_a_changed_setting_is_refused(trained_root: Path) -> None:
    weights = (
        trained_root / "fashion2" / "tiny" / "full" / "seed0" / "unet" / "diffusion_pytorch_model.safetensors"
    )
    stamp = weights.stat().st_mtime_ns
    run_entry("train.py", f"paths.root={trained_root}", *TINY_TRAIN, cwd=trained_root)
    assert weights.stat().st_mtime_ns == stamp
    result = run_entry(
        "train.py",
        f"paths.root={trained_root}",
        *TINY_TRAIN,
        "train.batch_size=8",
        cwd=trained_root,
        check=False,
    )
    assert result.returncode == 2
    assert "train" in result.stderr and "different settings" in result.stderr


def test_multirun_trains_two_different_subsets(tmp_path: Path) -> None:
    run_entry(
        "train.py",
        "-m",
        "subset=lds",
        "subset.index=0,1",
        f"paths.root={tmp_path}",
        *TINY_TRAIN,
        "train.max_steps=2",
        cwd=tmp_path,
    )
    lists = []
    for k in (0, 1):
        record = json.loads(
            (tmp_path / "fashion2" / "tiny" / f"lds-{k}" / "seed0" / "subset.json").read_text()
        )
        assert record["size"] == 24 and record["alpha"] == 0.5 and record["index"] == k
        assert (tmp_path / "fashion2" / "tiny" / f"lds-{k}" / "seed0" / "unet" / "DONE").exists()
        lists.append(record["indices"])
    assert lists[0] != lists[1]
    labels = build_dataset("fashion2", "train", None, image_size=8, num_train=48).labels
    for indices in lists:  # stratified: half of each class
        assert np.bincount(labels[indices]).tolist() == (np.bincount(labels) // 2).tolist()
    manifests = [
        json.loads((tmp_path / "fashion2" / "tiny" / f"lds-{k}" / "seed0" / "manifest.json").read_text())
        for k in (0, 1)
    ]
    # the protocol's common random numbers: subset models of one seed r share their training seed
    assert manifests[0]["training_seed"] == manifests[1]["training_seed"]
    assert manifests[0]["seed_rule"] == manifests[1]["seed_rule"] == SEED_RULE


def test_subset_models_of_one_seed_start_from_identical_weights_and_the_full_model_does_not(
    tmp_path: Path, monkeypatch
) -> None:
    from das_lightning import cli
    from das_lightning.models import unet as unet_module

    initial: dict[str, dict[str, torch.Tensor]] = {}
    current: list[str] = []

    def recording_build_unet(**kwargs):
        model = build_unet(**kwargs)
        initial[current[-1]] = {name: value.clone() for name, value in model.state_dict().items()}
        return model

    monkeypatch.setattr(unet_module, "build_unet", recording_build_unet)
    for tag, overrides in (
        ("lds-0", ["subset=lds", "subset.index=0"]),
        ("lds-1", ["subset=lds", "subset.index=1"]),
        ("full", []),
        ("lds-0-seed1", ["subset=lds", "subset.index=0", "seed=1"]),
    ):
        current.append(tag)
        cli.run_train(
            compose("train", [f"paths.root={tmp_path}", *TINY_TRAIN, "train.max_steps=1", *overrides])
        )

    def same(a: str, b: str) -> bool:
        return all(torch.equal(initial[a][name], initial[b][name]) for name in initial[a])

    assert same("lds-0", "lds-1")  # what differs between them is their data
    assert not same("lds-0", "full")  # the full model's seed is its own
    assert not same("lds-0", "lds-0-seed1")  # another r, another initialisation


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("subset.alpha=1.5", "subset.alpha"),
        ("subset.index=-1", "subset.index"),
        ("train.max_steps=-5", "train.max_steps must be a positive integer"),
        ("dataset.image_size=17", "dataset.image_size=17 does not fit this UNet"),
    ],
)
def test_bad_settings_are_refused_before_any_work(tmp_path: Path, override: str, message: str) -> None:
    key = override.split("=")[0]
    result = run_entry(
        "train.py",
        "subset=lds",
        "subset.index=0",
        override,
        f"paths.root={tmp_path}",
        *[o for o in TINY_TRAIN if not o.startswith(key + "=")],
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 2 and message in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.rglob("manifest.json")) and not list(tmp_path.rglob("unet"))


def test_absent_dataset_offline_gives_one_clear_message(tmp_path: Path) -> None:
    result = run_entry(
        "train.py", "dataset=cifar10", f"paths.root={tmp_path}", "logger=none", cwd=tmp_path, check=False
    )
    assert result.returncode == 2
    assert "dataset.root" in result.stderr and "Traceback" not in result.stderr


def test_corrupt_checkpoint_is_named(tmp_path: Path) -> None:
    run = tmp_path / "fashion2" / "tiny" / "full" / "seed0" / "checkpoints"
    run.mkdir(parents=True)
    (run / "last.ckpt").write_bytes(b"not a checkpoint")
    result = run_entry("train.py", f"paths.root={tmp_path}", *TINY_TRAIN, cwd=tmp_path, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "last.ckpt" in result.stderr and "corrupt" in result.stderr


def test_missing_resume_checkpoint_is_named(tmp_path: Path) -> None:
    result = run_entry(
        "train.py",
        f"paths.root={tmp_path}",
        *TINY_TRAIN,
        f"resume_from={tmp_path}/nope.ckpt",
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 2 and "nope.ckpt" in result.stderr


def test_two_process_ddp_training_writes_one_model(tmp_path: Path) -> None:
    run_entry(
        "train.py",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        f"paths.root={tmp_path}",
        *TINY_TRAIN,
        "train.max_steps=3",
        "generate.num_images=0",
        cwd=tmp_path,
    )
    run = tmp_path / "fashion2" / "tiny" / "full" / "seed0"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]
    sealed = json.loads((run / "unet" / "DONE").read_text())
    assert sealed["step"] == 3 and "diffusion_pytorch_model.safetensors" in sealed["files"]


def test_wandb_logs_offline_into_the_run_folder(tmp_path: Path) -> None:
    run_entry(
        "train.py",
        f"paths.root={tmp_path}",
        *TINY_TRAIN,
        "logger=wandb",
        "train.max_steps=3",
        cwd=tmp_path,
        wandb_mode="offline",
    )
    run = tmp_path / "fashion2" / "tiny" / "full" / "seed0"
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, "one offline W&B run, inside the run folder"
    assert list(offline[0].rglob("samples/generated*.png")), "the grid of generated samples is logged"
    assert not (tmp_path / "wandb").exists()


def test_slurm_launcher_config_composes_to_a_submitit_slurm_array() -> None:
    cfg = compose("train", ["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.array_parallelism) == ("gpu", 1, 64)
    # each job's logs land in the sweep folder, whose subfolders differ per subset and seed
    assert launcher.submitit_folder == f"{cfg.hydra.sweep.dir}/.submitit/%j"
    subdir = OmegaConf.to_container(cfg.hydra.sweep, resolve=False)["subdir"]
    assert "${subset.tag}" in subdir and "${seed}" in subdir


def test_multirun_through_the_submitit_launcher_trains_each_subset(tmp_path: Path) -> None:
    # submitit's local executor runs each job in its own process, as SLURM would: the same pickling and paths
    run_entry(
        "train.py",
        "-m",
        "hydra/launcher=submitit_local",
        "subset=lds",
        "subset.index=0,1",
        f"paths.root={tmp_path}",
        *TINY_TRAIN,
        "train.max_steps=2",
        cwd=tmp_path,
    )
    lists = [
        json.loads((tmp_path / "fashion2" / "tiny" / f"lds-{k}" / "seed0" / "subset.json").read_text())
        for k in (0, 1)
    ]
    assert all(
        (tmp_path / "fashion2" / "tiny" / f"lds-{k}" / "seed0" / "unet" / "DONE").exists() for k in (0, 1)
    )
    assert lists[0]["indices"] != lists[1]["indices"]


def test_wandb_runs_of_one_experiment_share_a_group_and_say_their_job(tmp_path: Path, monkeypatch) -> None:
    from das_lightning import cli, loggers

    seen: list[dict] = []

    class RecordingWandbLogger:  # stands in for Lightning's, recording what wandb.init would get
        def __init__(self, **kwargs):
            seen.append(kwargs)

        def __getattr__(self, name):
            return lambda *args, **kwargs: None

    monkeypatch.setattr(loggers, "WandbLogger", RecordingWandbLogger)
    cli.run_train(
        compose(
            "train",
            [
                f"paths.root={tmp_path}",
                *TINY_TRAIN,
                "logger=wandb",
                "train.max_steps=1",
                "subset=lds",
                "subset.index=0",
            ],
        )
    )
    cli.make_logger(
        compose("attribute", [f"paths.root={tmp_path}", "logger=wandb"]), tmp_path, "a", "attribute"
    )
    assert [(kwargs["group"], kwargs["job_type"]) for kwargs in seen] == [
        ("fashion2/tiny", "subset"),
        ("fashion2/tiny", "attribute"),
    ]
    assert seen[0]["mode"] == "offline"
    with pytest.raises(ValueError, match="job_type"):
        loggers.build_logger(loggers.LoggerSettings(), tmp_path, "x", {}, job_type="nope")
