"""What pip installs: every package of the source tree, and the Hydra configs as das_lightning.conf (so the API
composes them without a source checkout)."""

from __future__ import annotations

import tomllib
from setuptools import find_packages

from das_lightning.api import config_dir

from conftest import REPO


def test_every_package_of_the_tree_is_installed() -> None:
    listed = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    found = find_packages(REPO, include=["das_lightning", "das_lightning.*", "das_lightning_testing"])
    config_folders = [
        ".".join(["das_lightning", *folder.relative_to(REPO).parts])
        for folder in [REPO / "conf", *(REPO / "conf").rglob("*")]
        if folder.is_dir() and folder.name != "__pycache__"
    ]
    data_folders = ["das_lightning.data.assets"]  # the embedded dataset, no code
    assert sorted(listed) == sorted([*found, *config_folders, *data_folders])


def test_the_api_finds_the_installed_configs_with_every_yaml() -> None:
    installed = config_dir()
    assert (installed / "attribute.yaml").is_file()
    source = sorted(path.relative_to(REPO / "conf") for path in (REPO / "conf").rglob("*.yaml"))
    assert sorted(path.relative_to(installed) for path in installed.rglob("*.yaml")) == source
