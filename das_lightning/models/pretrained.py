"""Pretrained diffusers components from a local folder or the local Hugging Face cache, never downloaded: the
Stable Diffusion parts (models/sd_lora.py) and the VAE of a latent model (models/latent.py) load through here."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from das_lightning.errors import MissingArtifactError


class PretrainedModelNotFoundError(MissingArtifactError):
    """A pretrained pipeline is neither a local folder nor in the local Hugging Face cache."""


def load_pretrained_component(loader: Any, pretrained: str, subfolder: str | None) -> Any:
    """``loader.from_pretrained`` of one pipeline component (a local folder or a hub id already in the local
    Hugging Face cache), never downloading; one clear error naming the model and how to fetch it otherwise."""
    local = Path(pretrained).expanduser()
    source = str(local) if local.is_dir() else pretrained
    options = {"subfolder": subfolder} if subfolder else {}
    try:
        return loader.from_pretrained(source, local_files_only=True, **options)
    except (OSError, ValueError) as error:
        if local.is_dir():
            raise PretrainedModelNotFoundError(
                f"{local} holds no readable '{subfolder or '.'}' component of a diffusers pipeline ({error})"
            ) from error
        cache = os.environ.get("HF_HOME", "~/.cache/huggingface")
        raise PretrainedModelNotFoundError(
            f"the pretrained model {pretrained!r} is not in the local Hugging Face cache ({cache}), and "
            f"das-lightning never downloads weights. Fetch it once with `huggingface-cli download {pretrained}` "
            f"(or `hf download {pretrained}`) on a machine with network access, or set model.pretrained to a "
            "local folder holding a diffusers pipeline (model_index.json, unet/, vae/, text_encoder/, tokenizer/, "
            "scheduler/)."
        ) from error
