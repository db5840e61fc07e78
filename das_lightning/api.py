"""A Python API for notebooks, on the same code path as ``attribute.py``: it composes the same Hydra config (the
project's ``conf/``, installed with the package as ``das_lightning.conf``: no source checkout is needed) with the
same overrides and calls the same stage, so stores, manifests, resumption and caching are those of the command line
(a second call with the same inputs reuses every feature).

    from das_lightning import attribute
    result = attribute("path/to/ddpm-pipeline", train_dataset="fashion2", queries=["my.png"], method="das")
    result.scores          # queries x train, at the chosen lambda
    result.top(3)          # per query: the 3 highest-scoring training indices

``model``: a diffusers ``DDPMPipeline`` or ``UNet2DModel`` folder (safetensors), a ``UNet2DModel`` object (saved
once under ``root``, named by its weights), or None for the model ``train.py`` trained with the same overrides.
``queries``: a folder or list file of images, or a sequence of image paths, PIL images or tensors (C, H, W) in
[-1, 1] (written once as PNGs under ``root``, named by their content); None keeps the config's query sets.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from das_lightning.errors import ConfigError, MissingArtifactError
from das_lightning.manifest import atomic_folder, atomic_write_bytes, atomic_write_text


def config_dir() -> Path:
    """The installed configs (``conf/`` of the source tree, packaged as ``das_lightning.conf``)."""
    from importlib.resources import files

    return Path(str(files("das_lightning.conf")))


@dataclass
class Attribution:
    """What :func:`attribute` returns for one query set."""

    scores: np.ndarray  # queries x train at ``lambda_scale`` (the only row for methods without lambda)
    all_scores: np.ndarray  # lambdas x queries x train, one row per c of ``lambda_scales``
    lambda_scales: list[float] | None
    lambda_scale: (
        float | None
    )  # the c used for ``scores`` and the top-k (held-out LDS selection, or the default)
    lambda_source: str | None
    topk: dict[str, Any]  # topk.json: proponent/opponent indices and scores per query
    scores_dir: Path
    features_dir: Path  # the feature stores (train and queries), reused by the next call

    def top(self, k: int) -> list[list[int]]:
        """Per query, the ``k`` training indices with the highest score (proponents)."""
        return np.argsort(-self.scores, axis=1, kind="stable")[:, :k].tolist()


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    folder = config_dir()
    if not (folder / "attribute.yaml").is_file():
        raise MissingArtifactError(
            f"the API composes the project's configs from {folder}, which has no attribute.yaml: reinstall "
            "das-lightning (pip install das-lightning, or pip install -e . in a checkout)"
        )
    with initialize_config_dir(config_dir=str(folder), version_base="1.3"):
        return compose(config_name="attribute", overrides=overrides)


def _to_png_bytes(image: Any) -> bytes:
    if isinstance(image, torch.Tensor):
        if image.dim() != 3:
            raise ConfigError(f"query tensors must be (C, H, W) in [-1, 1], got shape {tuple(image.shape)}")
        pixels = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        array = pixels[0].numpy() if pixels.shape[0] == 1 else pixels.permute(1, 2, 0).numpy()
        image = Image.fromarray(array)
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    raise TypeError(f"a query must be a path, a PIL image or a tensor, not {type(image).__name__}")


def _query_source(queries: Any, root: Path) -> Path:
    """A folder or list file that ``queries.files`` can name."""
    if isinstance(queries, str | Path):
        return Path(queries)
    items = list(queries)
    if all(isinstance(item, str | Path) for item in items):
        listing = "\n".join(str(Path(item).resolve()) for item in items) + "\n"
        folder = root / "api_queries" / hashlib.sha256(listing.encode()).hexdigest()[:16]
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "files.txt", listing)
        return folder / "files.txt"
    encoded = [_to_png_bytes(item) for item in items]
    folder = root / "api_queries" / hashlib.sha256(b"".join(encoded)).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    for position, data in enumerate(encoded):
        target = folder / f"query{position:05d}.png"
        if not target.exists():
            atomic_write_bytes(target, data)
    return folder


def _model_folder(model: Any, root: Path) -> Path:
    if isinstance(model, str | Path):
        return Path(model)
    if hasattr(model, "save_pretrained") and hasattr(model, "config"):
        from safetensors.torch import save

        digest = hashlib.sha256(save({k: v.contiguous() for k, v in model.state_dict().items()})).hexdigest()
        folder = root / "api_models" / digest[:16]
        if not (folder / "config.json").exists():
            with atomic_folder(folder) as staging:
                model.save_pretrained(str(staging), safe_serialization=True)
        return folder
    raise TypeError(f"model must be a folder or a diffusers UNet2DModel, not {type(model).__name__}")


def attribute(
    model: Any = None,
    train_dataset: str = "fashion2",
    queries: Any = None,
    method: str = "das",
    overrides: Sequence[str] = (),
    root: str | Path = "outputs",
) -> dict[str, Attribution] | Attribution:
    """Scores of ``method`` for ``queries`` against ``train_dataset``, as ``attribute.py`` computes them.

    ``overrides`` are Hydra overrides as on the command line (``"projector.dim=8192"``). Returns
    the :class:`Attribution` of the ``files`` set when ``queries`` are given, else one per configured query set.
    """
    from das_lightning import cli
    from das_lightning.attribution.pipeline import load_scores, scores_at

    root = Path(root).expanduser().resolve()
    composed = [f"paths.root={root}", f"dataset={train_dataset}", f"method={method}", "logger=none"]
    if model is not None:
        composed += ["model=pretrained", f"model.pretrained={_model_folder(model, root).resolve()}"]
    if queries is not None:
        composed += ["queries.sets=[files]", f"queries.files={_query_source(queries, root).resolve()}"]
    result = cli.run_attribute(_compose([*composed, *overrides]))
    import json

    attributions = {}
    for name, folder in result.folders.items():
        stacked, manifest = load_scores(folder)
        chosen = result.chosen[name]
        attributions[name] = Attribution(
            scores=scores_at(stacked, manifest, None if chosen is None else chosen.scale),
            all_scores=np.asarray(stacked),
            lambda_scales=manifest.get("lambda_scales"),
            lambda_scale=None if chosen is None else chosen.scale,
            lambda_source=None if chosen is None else chosen.source,
            topk=json.loads((folder / "topk.json").read_text()),
            scores_dir=folder,
            features_dir=folder.parents[2] / "features",
        )
    return attributions["files"] if queries is not None else attributions
