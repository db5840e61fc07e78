"""Artifact paths derived from config, never from timestamps, so a later stage finds what an earlier one made.

<root>/<dataset>/<model>/<subset tag>/seed<r>/        one trained model (subset tag: "full" or "lds-<k>")
    unet/                 diffusers save_pretrained folder (safetensors)
    checkpoints/last.ckpt Lightning checkpoint (resume)
    snapshots/step<N>/    intermediate weights for TracIn
    queries/              generated query images
    features/<name>/      feature stores
    scores/<method>/      score matrices, top-k, grids
<root>/<dataset>/<model>/lds/                         LDS ground truth (ground_truth/, shared)
<root>/<dataset>/<model>/lds/full-seed<r>/            the LDS of full model r: lds.json, lds.md, plots
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from das_lightning.errors import ConfigError


def subset_tag(kind: str, index: int | None = None) -> str:
    if kind == "full":
        return "full"
    if kind == "lds":
        return f"lds-{index}"
    raise ConfigError(f"unknown subset kind {kind!r}; choose 'full' or 'lds'")


@dataclass(frozen=True)
class RunPaths:
    """Where one trained model and everything made from it live."""

    root: Path
    dataset: str
    model: str
    tag: str
    seed: int

    @property
    def experiment_dir(self) -> Path:
        return Path(self.root) / self.dataset / self.model

    @property
    def run_dir(self) -> Path:
        return self.experiment_dir / self.tag / f"seed{self.seed}"

    @property
    def unet_dir(self) -> Path:
        return self.run_dir / "unet"

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoints" / "last.ckpt"

    @property
    def snapshots_dir(self) -> Path:
        return self.run_dir / "snapshots"

    @property
    def queries_dir(self) -> Path:
        return self.run_dir / "queries"

    @property
    def subset_path(self) -> Path:
        return self.run_dir / "subset.json"

    @property
    def features_dir(self) -> Path:
        return self.run_dir / "features"

    @property
    def scores_dir(self) -> Path:
        return self.run_dir / "scores"

    @property
    def latents_dir(self) -> Path:
        """Latent models' cache of encoded image sets, shared by every run of the experiment."""
        return self.experiment_dir / "latents"

    @property
    def lds_dir(self) -> Path:
        """The LDS of the experiment: ground-truth caches shared by every full model, and one results folder each."""
        return self.experiment_dir / "lds"

    @property
    def lds_results_dir(self) -> Path:
        """The LDS results of this (full) model: lds.json, lds.md, plots, counterfactual checks."""
        return self.lds_dir / f"{self.tag}-seed{self.seed}"

    def sibling(self, tag: str, seed: int) -> RunPaths:
        return RunPaths(self.root, self.dataset, self.model, tag, seed)
