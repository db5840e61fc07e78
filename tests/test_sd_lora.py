"""Stable Diffusion + LoRA and latent diffusion, offline on a tiny random pipeline saved as a local folder:
training moves only the adapters and lowers the loss, LoRA features are per-sample gradients of exactly the
adapter weights, DAS runs on them, an absent hub model fails with a message that says how to fetch it, and a
latent cache refuses latents of another VAE."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import readouts
import torch
from safetensors.torch import load_file

from das_lightning import cli
from das_lightning.artifacts import load_generated_queries, load_unet
from das_lightning.attribution.features import FeatureSettings, collect_features
from das_lightning.attribution.grads import PerSampleGradients, reference_flat_gradients
from das_lightning.attribution.pipeline import load_scores
from das_lightning.attribution.projectors import ProjectorSettings
from das_lightning.data import build_dataset
from das_lightning.diffusion import per_sample_loss, query_losses, rule_noise
from das_lightning.loggers import LoggerSettings
from das_lightning.manifest import ManifestMismatchError, hash_file
from das_lightning.models.adapters import dataset_extra
from das_lightning.models.ddpm import OptimizerSettings
from das_lightning.models.latent import cached_latents, load_vae
from das_lightning.models.sd_lora import (
    LORA_PARAMETER_PATTERN,
    LORA_WEIGHTS_NAME,
    LoRAAdapter,
    PretrainedModelNotFoundError,
    StableDiffusionLoRAModule,
    TextConditioning,
    class_prompts,
    load_pretrained_unet,
    load_stable_diffusion,
    load_trained_lora,
)
from das_lightning.paths import RunPaths
from das_lightning.queries import validation_queries
from das_lightning.training import (
    GenerationSettings,
    SubsetSettings,
    TrainerSettings,
    TrainSettings,
    train_model,
)

from conftest import compose
from sd_fixtures import IMAGE_SIZE, build_tiny_sd_pipeline, write_style_folders

STYLES = ("post_impressionism", "ukiyo_e")
PER_CLASS = 8
LOSS_TIMESTEPS = (50, 200, 400, 600, 800)
# evaluate_lds.py on two subset models, shrunk for a CPU
TINY_LDS = [
    "methods=[das]",
    "pairs=[]",
    "lds.num_subsets=2",
    "lds.timestep_stride=500",
    "lds.e_seeds=[0]",
    "lds.num_resamples=20",
]


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing in these tests may reach the network, whatever the library defaults."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd_pipeline(tmp_path_factory.mktemp("pipeline") / "tiny-sd")


@pytest.fixture(scope="module")
def artbench_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_style_folders(tmp_path_factory.mktemp("artbench"), STYLES, PER_CLASS)


def _train_set(root: Path):
    return build_dataset("artbench2", "train", root, IMAGE_SIZE)


@pytest.fixture(scope="module")
def trained_lora(
    tmp_path_factory: pytest.TempPathFactory, pipeline_folder: Path, artbench_root: Path
) -> RunPaths:
    """A rank-4 LoRA trained on LDS subset 0 through the same job as every other model."""
    root = tmp_path_factory.mktemp("outputs")
    paths = RunPaths(root, "artbench2", "sd_lora", "lds-0", 0)
    train_model(
        paths=paths,
        unet_factory=lambda: load_pretrained_unet(str(pipeline_folder)),
        train_set=_train_set(artbench_root),
        subset=SubsetSettings(kind="lds", index=0, alpha=0.5),
        seed=0,
        train=TrainSettings(
            batch_size=8,
            max_steps=80,
            random_flip=False,
            optimizer=OptimizerSettings(lr=3e-2, warmup_steps=0),
        ),
        trainer_settings=TrainerSettings(enable_progress_bar=False, log_every_n_steps=1000),
        logger_settings=LoggerSettings(kind="none"),
        generation=GenerationSettings(num_images=0),
        config={},
        module_class=StableDiffusionLoRAModule,
        module_kwargs={"pretrained": str(pipeline_folder), "rank": 4},
    )
    return paths


def _mean_loss(unet: torch.nn.Module, latents, labels, conditioning, alphas_cumprod, set_name) -> float:
    """L_simple over fixed timesteps and rule noise, so two models are compared on exactly the same draws."""
    total = 0.0
    indices = list(range(latents.shape[0]))
    with torch.no_grad():
        for timestep in LOSS_TIMESTEPS:
            steps = torch.full((len(indices),), timestep)
            noise = rule_noise(set_name, indices, steps, 0, latents.shape[1:])
            hidden = conditioning.for_labels(labels)
            total += per_sample_loss(
                unet.eval(), latents, noise, steps, alphas_cumprod, encoder_hidden_states=hidden
            ).mean()
    return float(total) / len(LOSS_TIMESTEPS)


def test_lora_training_lowers_loss_and_changes_only_lora_weights(
    trained_lora: RunPaths, pipeline_folder: Path, artbench_root: Path, tmp_path: Path
) -> None:
    trained = load_trained_lora(trained_lora.unet_dir)
    base = load_stable_diffusion(str(pipeline_folder))
    base_state = base.unet.state_dict()
    changed, unchanged_lora = [], []
    for name, tensor in trained.parts.unet.state_dict().items():
        if LORA_PARAMETER_PATTERN in name:
            # PEFT starts every lora_B at zero: a trained adapter has moved away from it
            if "lora_B" in name and torch.count_nonzero(tensor) == 0:
                unchanged_lora.append(name)
            continue
        base_name = name.replace(".base_layer", "")
        if not torch.equal(tensor, base_state[base_name]):
            changed.append(name)
    assert changed == [], f"frozen weights changed: {changed[:5]}"
    assert unchanged_lora == []
    assert trained.class_names == list(STYLES)

    subset = np.asarray(json.loads(trained_lora.subset_path.read_text())["indices"], dtype=np.int64)
    latents = cached_latents(base.vae, _train_set(artbench_root), tmp_path / "latents")
    conditioning = trained.text_conditioning()
    rows = torch.from_numpy(subset)
    labels = torch.from_numpy(latents.labels[subset])
    args = (latents.tensors[rows], labels, conditioning, trained.alphas_cumprod, latents.set_name)
    before, after = _mean_loss(base.unet, *args), _mean_loss(trained.parts.unet, *args)
    assert after < 0.95 * before, (before, after)
    # load_unet (what the attribution stage calls) rebuilds the same adapted UNet
    reloaded = load_unet(trained_lora)
    assert _mean_loss(reloaded, *args) == pytest.approx(after, rel=1e-5)


def test_prompts_come_from_class_names() -> None:
    assert class_prompts(STYLES) == ["a post impressionism painting", "a ukiyo e painting"]


def test_lora_features_have_the_adapter_size_and_match_the_reference_loop(
    trained_lora: RunPaths, artbench_root: Path, tmp_path: Path
) -> None:
    trained = load_trained_lora(trained_lora.unet_dir)
    unet = trained.parts.unet
    latents = cached_latents(trained.parts.vae, _train_set(artbench_root), tmp_path / "latents")
    gradients = PerSampleGradients(
        unet,
        trained.alphas_cumprod,
        output_function="mean",
        timesteps=[100, 700],
        normalize_per_timestep=True,
        param_filter=LORA_PARAMETER_PATTERN,
    )
    lora_size = sum(p.numel() for name, p in unet.named_parameters() if "lora_" in name)
    total_size = sum(p.numel() for p in unet.parameters())
    assert gradients.num_parameters == lora_size < total_size
    # the adapters are exactly what a reloaded LoRA model leaves trainable
    trainable = PerSampleGradients(unet, trained.alphas_cumprod, "mean", [100], True, param_filter=None)
    assert trainable.parameter_names == gradients.parameter_names

    indices = [0, 3, 9]
    batch = {"image": latents.tensors[indices], "label": torch.from_numpy(latents.labels[indices])}
    extra = trained.text_conditioning()(batch)
    fast = gradients.flat_gradients(batch["image"], indices, latents.set_name, extra)
    slow = reference_flat_gradients(
        unet,
        trained.alphas_cumprod,
        "mean",
        [100, 700],
        True,
        batch["image"],
        indices,
        latents.set_name,
        gradients.parameter_names,
        extra=extra,
    )
    assert fast.shape == (3, lora_size)
    # float32 sums in another order (vmap vs one sample at a time): entries agree to 1e-5 of the largest one
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5 * float(slow.abs().max()))
    # the text conditioning is an input: another prompt gives another gradient
    other = {"encoder_hidden_states": extra["encoder_hidden_states"].flip(0)}
    assert not torch.allclose(
        gradients.flat_gradients(batch["image"], indices, latents.set_name, other), fast
    )


def test_bf16_frozen_weights_give_the_float32_features_to_bf16_precision(pipeline_folder: Path) -> None:
    """What frozen_dtype=bfloat16 does on a GPU, on the CPU: same adapters, frozen weights (and so the latents)
    in bfloat16, per-sample LoRA gradients finite and pointing where the float32 ones do."""
    torch.manual_seed(0)
    module = StableDiffusionLoRAModule(
        load_pretrained_unet(str(pipeline_folder)),
        OptimizerSettings(),
        pretrained=str(pipeline_folder),
        rank=4,
        class_names=list(STYLES),
    )
    with torch.no_grad():
        for name, parameter in module.unet.named_parameters():
            if "lora_B" in name:  # PEFT starts lora_B at zero, which makes every lora_A gradient zero
                parameter.normal_(0.0, 0.05)
    batch = {"image": torch.rand(4, 3, IMAGE_SIZE, IMAGE_SIZE) * 2 - 1, "label": torch.tensor([0, 1, 0, 1])}

    def features() -> tuple[torch.dtype, torch.Tensor]:
        latents, extra = module.model_inputs(batch)
        gradients = PerSampleGradients(
            module.unet, module.alphas_cumprod, "mean", [100, 400, 700], True, LORA_PARAMETER_PATTERN
        )
        return latents.dtype, gradients.flat_gradients(latents, [0, 1, 2, 3], "bf16-check", extra)

    full_dtype, full = features()
    module.cast_frozen_weights(torch.bfloat16)
    half_dtype, half = features()
    assert (full_dtype, half_dtype) == (torch.float32, torch.bfloat16)
    dtypes = {(LORA_PARAMETER_PATTERN in name, p.dtype) for name, p in module.unet.named_parameters()}
    assert dtypes == {(True, torch.float32), (False, torch.bfloat16)}
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    # bfloat16 keeps 8 bits of mantissa: the same direction, not float32 rounding (0.9999+ measured)
    assert torch.nn.functional.cosine_similarity(full, half, dim=1).min() > 0.999


def test_das_scores_run_end_to_end_on_lora_features(
    trained_lora: RunPaths, artbench_root: Path, tmp_path: Path
) -> None:
    trained = load_trained_lora(trained_lora.unet_dir)
    train_latents = cached_latents(trained.parts.vae, _train_set(artbench_root), tmp_path / "latents-train")
    # queries: the first four training images under the same identity, so they draw the same noise
    query_latents = train_latents.take(np.arange(4), train_latents.set_name)
    settings = FeatureSettings(
        num_timesteps=2,
        projector=ProjectorSettings(dim=32),
        param_pattern=LORA_PARAMETER_PATTERN,
        batch_size=8,
    )
    conditioning: TextConditioning = trained.text_conditioning()
    stores = {}
    for name, dataset in (("train", train_latents), ("queries", query_latents)):
        stores[name] = collect_features(
            trained.parts.unet,
            trained.alphas_cumprod,
            dataset,
            checkpoint_id=str(trained_lora.unet_dir),
            folder=tmp_path / "features" / name,
            settings=settings,
            extra_inputs=conditioning,
        )
    train_features = np.asarray(stores["train"].require_complete().features)
    query_features = np.asarray(stores["queries"].require_complete().features)
    assert train_features.shape == (2 * PER_CLASS, 32)
    scores = readouts.das(query_features, train_features, lam=1e-2)
    assert scores.shape == (4, 2 * PER_CLASS)
    assert np.isfinite(scores).all() and (scores >= 0).all()
    # a feature depends on the image and its identity only, not on the batch or the store it was collected in
    # (to float32 summation order, which the thread count changes: 1e-4 of the largest entry)
    scale = float(np.abs(train_features).max())
    np.testing.assert_allclose(query_features, train_features[:4], rtol=1e-4, atol=1e-4 * scale)
    # with more feature dimensions than training images, leaving a query's own image out changes it the most
    assert (scores.argmax(axis=1) == np.arange(4)).all()


def test_absent_hub_model_names_it_and_how_to_fetch_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    missing = "das-lightning-tests/no-such-model-7c1e"
    with pytest.raises(PretrainedModelNotFoundError) as raised:
        load_stable_diffusion(missing)
    message = str(raised.value)
    assert missing in message
    assert f"huggingface-cli download {missing}" in message
    assert "local folder" in message


def test_latent_cache_refuses_another_vae(pipeline_folder: Path, artbench_root: Path, tmp_path: Path) -> None:
    dataset = _train_set(artbench_root)
    vae = load_vae(str(pipeline_folder))
    first = cached_latents(vae, dataset, tmp_path / "cache")
    again = cached_latents(vae, dataset, tmp_path / "cache")
    assert torch.equal(first.tensors, again.tensors)
    assert first[5]["image"].shape == (4, IMAGE_SIZE // 2, IMAGE_SIZE // 2)
    assert first[5]["label"] == dataset[5]["label"]

    other_vae = load_vae(str(pipeline_folder))
    with torch.no_grad():
        next(other_vae.parameters()).add_(0.01)
    with pytest.raises(ManifestMismatchError, match="vae"):
        cached_latents(other_vae, dataset, tmp_path / "cache")


def _compose_experiment(pipeline_folder: Path, tmp_path: Path):
    from hydra import compose, initialize_config_dir

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose(
            "train",
            overrides=[
                "experiment=artbench2_lds",
                f"dataset.root={tmp_path}",
                f"model.pretrained={pipeline_folder}",
                "subset=lds",
                "subset.index=3",
                f"paths.root={tmp_path / 'outputs'}",
            ],
        )


def test_artbench2_lds_experiment_composes_to_a_lora_run(pipeline_folder: Path, tmp_path: Path) -> None:
    from hydra.utils import get_class, instantiate

    cfg = _compose_experiment(pipeline_folder, tmp_path)
    assert (cfg.dataset.name, cfg.subset.tag, cfg.dataset.num_train) == ("artbench2", "lds-3", 5000)
    assert cfg.trainer.precision == "16-mixed"
    assert get_class(cfg.model.module_class) is StableDiffusionLoRAModule
    assert cfg.model.module_kwargs.pretrained == str(pipeline_folder)
    assert (cfg.model.module_kwargs.rank, cfg.model.module_kwargs.frozen_dtype) == (128, "float16")
    assert type(instantiate(cfg.model.unet)).__name__ == "UNet2DConditionModel"


def test_artbench2_lds_experiment_sets_the_paper_lora_recipe(pipeline_folder: Path, tmp_path: Path) -> None:
    cfg = _compose_experiment(pipeline_folder, tmp_path)
    assert (cfg.train.optimizer.lr, cfg.train.max_steps, cfg.generate.num_images) == (3e-4, 4000, 0)


def test_conditioned_ground_truth_pairs_each_query_with_its_own_conditioning(
    trained_lora: RunPaths, artbench_root: Path, tmp_path: Path
) -> None:
    model = LoRAAdapter().load(trained_lora.unet_dir, tmp_path / "latents")
    latents = model.model_space(_train_set(artbench_root))
    latents = latents.take(np.array([0, 1, 8, 9, 2, 10]), latents.set_name)  # both classes, interleaved
    extra = dataset_extra(model.extra_inputs, latents)
    images, indices = latents.tensors, list(range(len(latents)))

    def losses(batch_size: int, conditioning: dict[str, torch.Tensor] | None) -> torch.Tensor:
        return query_losses(
            model.network,
            model.alphas_cumprod,
            images,
            indices,
            latents.set_name,
            [100, 600],
            [0],
            batch_size=batch_size,
            extra=conditioning,
        )

    # rows of a batch mix queries of both classes: each must meet its own prompt, whatever the batch size
    reference = losses(64, extra)
    torch.testing.assert_close(losses(3, extra), reference, rtol=1e-5, atol=1e-7)
    swapped = {"encoder_hidden_states": extra["encoder_hidden_states"].flip(0)}
    assert not torch.allclose(losses(64, swapped), reference)


# ---------------------------------------------------------------- the three entry points, in process


@pytest.fixture(scope="module")
def split_artbench_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/ and test/ style folders: validation queries need a test split."""
    root = tmp_path_factory.mktemp("artbench-split")
    write_style_folders(root / "train", STYLES, per_class=4, seed=0)
    write_style_folders(root / "test", STYLES, per_class=2, seed=1)
    return root


def _experiment(pipeline_folder: Path, data_root: Path, outputs: Path) -> list[str]:
    """experiment=artbench2_lds shrunk to the tiny pipeline on a CPU."""
    return [
        "experiment=artbench2_lds",
        f"dataset.root={data_root}",
        f"dataset.image_size={IMAGE_SIZE}",
        "dataset.num_train=null",
        f"model.pretrained={pipeline_folder}",
        "trainer=cpu",
        "trainer.precision=32-true",
        "trainer.enable_progress_bar=false",
        "logger=none",
        f"paths.root={outputs}",
        "queries.num_val=4",
    ]


def test_train_attribute_and_lds_run_end_to_end_on_a_lora_pipeline(
    pipeline_folder: Path, split_artbench_root: Path, tmp_path: Path
) -> None:
    experiment = _experiment(pipeline_folder, split_artbench_root, tmp_path / "outputs")
    tiny_lora = [
        "model.module_kwargs.rank=4",
        "model.module_kwargs.frozen_dtype=float32",
        "train.batch_size=4",
        "train.max_steps=1",
    ]
    full = cli.run_train(compose("train", [*experiment, *tiny_lora]))
    for index in (0, 1):
        cli.run_train(compose("train", [*experiment, *tiny_lora, "subset=lds", f"subset.index={index}"]))

    result = cli.run_attribute(
        compose(
            "attribute",
            [
                *experiment,
                "method=das",
                "projector.dim=16",
                "method.features.num_timesteps=2",
                "method.features.batch_size=8",
                "method.residual_timesteps=2",
            ],
        )
    )
    assert list(result.folders) == ["val"]  # the experiment attributes validation queries only
    scores, manifest = load_scores(result.folders["val"])
    assert scores.shape == (len(manifest["lambda_scales"]), 4, 8)
    assert np.isfinite(scores).all() and (scores >= 0).all()
    # the features differentiate exactly the adapter weights of the trained model
    store_manifest = json.loads((full.features_dir / "das" / "train" / "manifest.json").read_text())
    trained = load_trained_lora(full.unet_dir)
    lora_size = sum(p.numel() for name, p in trained.parts.unet.named_parameters() if "lora_" in name)
    assert store_manifest["features"]["param_pattern"] == LORA_PARAMETER_PATTERN
    assert store_manifest["gradients"]["num_parameters"] == lora_size
    assert manifest["checkpoint"] == hash_file(full.unet_dir / LORA_WEIGHTS_NAME)

    cli.run_lds(
        compose(
            "evaluate_lds",
            [*experiment, *TINY_LDS],
        )
    )
    records = json.loads((full.lds_results_dir / "lds.json").read_text())
    assert "das" in json.dumps(records)
    # the ground truth of a subset model is its conditioned latent loss on the queries
    subset = full.sibling("lds-0", 0)
    cached = next((full.lds_dir / "ground_truth" / "lds-0-seed0").glob("*/losses.safetensors"))
    model = LoRAAdapter().load(subset.unet_dir, tmp_path / "latents")
    queries = model.model_space(
        validation_queries(build_dataset("artbench2", "test", split_artbench_root, IMAGE_SIZE), 4)
    )
    direct = query_losses(
        model.network,
        model.alphas_cumprod,
        queries.tensors,
        list(range(4)),
        queries.set_name,
        range(0, 1000, 500),
        [0],
        extra=dataset_extra(model.extra_inputs, queries),
        noise="disjoint",  # the ground truth's own stream (lds.noise's default)
    )
    torch.testing.assert_close(load_file(str(cached))["loss"], direct, rtol=1e-5, atol=1e-7)


def _generated_set_is_conditioned_and_decoded(paths: RunPaths, count: int) -> None:
    images, labels, class_names = load_generated_queries(paths)
    assert class_names == list(STYLES)
    assert labels.tolist() == [
        i % len(STYLES) for i in range(count)
    ]  # image j is conditioned on class j mod 2
    assert images.shape == (count, 3, IMAGE_SIZE, IMAGE_SIZE)  # decoded by the VAE, not latents
    assert images.abs().max() <= 1.0 and not torch.allclose(images[0], images[1])


def test_lora_pipeline_generates_conditioned_queries_and_attributes_them_along_their_journey(
    pipeline_folder: Path, split_artbench_root: Path, tmp_path: Path
) -> None:
    experiment = _experiment(pipeline_folder, split_artbench_root, tmp_path / "outputs")
    queries = ["queries.num_generated=4"]
    recipe = [
        "model.module_kwargs.rank=4",
        "model.module_kwargs.frozen_dtype=float32",
        "train.batch_size=4",
        "train.max_steps=2",
        "train.snapshot_every_n_steps=1",
        "generate.num_images=4",
        "generate.sampler.num_inference_steps=3",
    ]
    full = cli.run_train(compose("train", [*experiment, *recipe]))
    _generated_set_is_conditioned_and_decoded(full, 4)

    # TracIn snapshots of a LoRA run keep the adapters only, and TracIn scores run on them
    snapshots = sorted(full.snapshots_dir.glob("step*/diffusion_pytorch_model.safetensors"))
    assert len(snapshots) == 2
    trained = load_trained_lora(full.unet_dir)
    lora_names = {name for name, _ in trained.parts.unet.named_parameters() if LORA_PARAMETER_PATTERN in name}
    assert set(load_file(str(snapshots[0]))) == lora_names

    small_features = [
        "projector.dim=16",
        "method.features.num_timesteps=2",
        "method.features.batch_size=8",
    ]
    for method in ("journey_trak", "tracin"):
        # journeys exist for generated images only
        overrides = [*experiment, *queries, f"method={method}", *small_features, "queries.sets=[generated]"]
        if method == "journey_trak":
            overrides.append("method.journey_steps=2")
        result = cli.run_attribute(compose("attribute", overrides))
        scores, manifest = load_scores(result.folders["generated"])
        assert scores.shape[1:] == (4, 8) and np.isfinite(scores).all()
        assert np.abs(scores).max() > 0


def test_latent_diffusion_generates_attributes_and_evaluates_on_one_latent_cache(
    pipeline_folder: Path, split_artbench_root: Path, tmp_path: Path
) -> None:
    from das_lightning.attribution.methods.journey_support import predicted_clean_steps
    from das_lightning.models.latent import LatentDiffusionAdapter

    common = [
        "model=ldm",
        f"model.vae={pipeline_folder}",
        "model.unet.preset=tiny",
        f"model.unet.sample_size={IMAGE_SIZE // 2}",
        f"model.unet.num_class_embeds={len(STYLES)}",
        "dataset=artbench2",
        f"dataset.root={split_artbench_root}",
        f"dataset.image_size={IMAGE_SIZE}",
        "trainer=cpu",
        "trainer.enable_progress_bar=false",
        "logger=none",
        f"paths.root={tmp_path / 'outputs'}",
    ]
    queries = ["queries.num_val=4", "queries.num_generated=4"]
    recipe = ["train.batch_size=4", "train.max_steps=2", "train.random_flip=false"]
    generation = ["generate.num_images=4", "generate.sampler.num_inference_steps=3"]
    full = cli.run_train(compose("train", [*common, *recipe, *generation]))
    for index in (0, 1):
        cli.run_train(compose("train", [*common, *recipe, "subset=lds", f"subset.index={index}"]))
    _generated_set_is_conditioned_and_decoded(full, 4)
    train_cache = next(full.latents_dir.glob("*train*/latents.safetensors"))
    written = train_cache.stat().st_mtime_ns

    # replaying the trajectory reproduces the generated images: at DDIM's last step x_0-hat is the sample itself
    model = LatentDiffusionAdapter(str(pipeline_folder)).load(full.unet_dir, full.latents_dir)
    steps = predicted_clean_steps(model, full, 4, 3)
    images, _, _ = load_generated_queries(full)
    torch.testing.assert_close(model.decode(steps[-1][1]).clamp(-1, 1), images, atol=1e-4, rtol=0)

    features = [
        "projector.dim=16",
        "method.features.num_timesteps=2",
        "method.residual_timesteps=2",
    ]
    cli.run_attribute(compose("attribute", [*common, *queries, "method=das", *features]))
    journey = [
        *common,
        *queries,
        "method=journey_trak",
        *features[:2],
        "method.journey_steps=2",
        "queries.sets=[generated]",
    ]
    scores, _ = load_scores(cli.run_attribute(compose("attribute", journey)).folders["generated"])
    assert np.isfinite(scores).all() and np.abs(scores).max() > 0
    cli.run_lds(
        compose(
            "evaluate_lds",
            [*common, *queries, *TINY_LDS],
        )
    )
    records = json.loads((full.lds_results_dir / "lds.json").read_text())["records"]
    assert {record["query_set"] for record in records} == {"val", "generated"}
    # training's latents of the training set are the ones attribution and the ground truth read: encoded once
    assert train_cache.stat().st_mtime_ns == written
    # one cache per image set: the training set and the two query sets
    assert len(list(full.latents_dir.glob("*/latents.safetensors"))) == 3


def test_lora_sampling_follows_the_pipeline_schedule_and_never_clips_latents(trained_lora: RunPaths) -> None:
    from das_lightning.models.sampling import SamplerSettings, ddim_scheduler

    model = LoRAAdapter().load(trained_lora.unet_dir, trained_lora.latents_dir)
    scheduler = ddim_scheduler(model, SamplerSettings(num_inference_steps=10))
    assert (
        scheduler.config.clip_sample is False
    )  # the PNDM config has no clip_sample; DDIM's default would clip
    assert scheduler.config.steps_offset == 1 and scheduler.config.set_alpha_to_one is False
    assert scheduler.final_alpha_cumprod == pytest.approx(float(model.alphas_cumprod[0]))
    torch.testing.assert_close(
        scheduler.alphas_cumprod, model.alphas_cumprod
    )  # scaled-linear, not pixel DDPM
    assert scheduler.timesteps.tolist() == list(range(901, 0, -100))


def test_the_lora_module_loads_the_pretrained_unet_once(pipeline_folder: Path, monkeypatch) -> None:
    import das_lightning.models.sd_lora as sd_lora

    loaded: list[str | None] = []
    original = sd_lora.load_pretrained_component

    def counting(loader, pretrained, subfolder):
        loaded.append(subfolder)
        return original(loader, pretrained, subfolder)

    monkeypatch.setattr(sd_lora, "load_pretrained_component", counting)
    unet = load_pretrained_unet(str(pipeline_folder))  # what model.unet instantiates
    StableDiffusionLoRAModule(unet, OptimizerSettings(), pretrained=str(pipeline_folder), rank=4)
    assert loaded.count("unet") == 1 and {"vae", "text_encoder", "tokenizer", "scheduler"} <= set(loaded)


def test_a_plan_without_the_network_claims_no_peak(
    pipeline_folder: Path, split_artbench_root: Path, tmp_path: Path
) -> None:
    """plan=true cannot build a pipeline's LoRA UNet from its config alone: it says so and prints no peak memory
    (a peak of the score matrices alone, a few KiB, would mislead), for DAS and EK-FAC alike."""
    experiment = _experiment(pipeline_folder, split_artbench_root, tmp_path / "outputs")
    for method in ("das", "ekfac"):
        if method == "ekfac":
            pytest.importorskip("kronfluence")
        planned = cli.run_attribute(compose("attribute", [*experiment, f"method={method}", "plan=true"]))
        assert planned.figure("peak_memory") is None
        assert any("cannot be built" in note for note in planned.notes)
    assert not (tmp_path / "outputs").exists()  # a plan writes nothing
