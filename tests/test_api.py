"""The Python API runs the README's example on the same code path as attribute.py."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import torch

import das_lightning
from das_lightning import api

from conftest import REPO, TINY_ATTRIBUTE

RUN = Path("fashion2") / "tiny" / "full" / "seed0"


def _readme_example() -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(r"<!-- api-example: .*? -->\n```python\n(.*?)```", text, re.DOTALL)
    assert match, "the README's API example is missing"
    return match.group(1)


def test_the_readme_example_runs_and_matches_the_command_line(
    trained_root: Path, tmp_path: Path, monkeypatch, capsys
):
    shutil.copytree(trained_root / RUN / "unet", tmp_path / "outputs" / RUN / "unet")
    (tmp_path / "docs").mkdir()
    shutil.copy(REPO / "docs" / "example_query.png", tmp_path / "docs" / "example_query.png")
    monkeypatch.chdir(tmp_path)
    calls = []
    full_attribute = api.attribute

    def tiny_attribute(
        *args, **kwargs
    ):  # the example as written, with the test suite's tiny feature settings
        kwargs["overrides"] = [*kwargs.get("overrides", ()), *TINY_ATTRIBUTE]
        calls.append(full_attribute(*args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(api, "attribute", tiny_attribute)
    exec(_readme_example(), {})
    (result,) = calls
    assert "(1, 48)" in capsys.readouterr().out
    assert result.scores.shape == (1, 48) and np.isfinite(result.scores).all()
    assert result.lambda_scale in result.lambda_scales and result.lambda_source == "method.lambda_scale"
    assert result.top(5)[0] == result.topk["proponent_indices"][0][:5]
    assert (result.features_dir / "das" / "train" / "features.npy").exists()
    # a second call with the same inputs reuses the stores; tensors and PIL images are accepted as queries
    stamp = (result.features_dir / "das" / "train" / "features.npy").stat().st_mtime_ns
    from PIL import Image

    with Image.open("docs/example_query.png") as image:
        again = tiny_attribute("outputs/fashion2/tiny/full/seed0/unet", queries=[image.copy()])
    assert (result.features_dir / "das" / "train" / "features.npy").stat().st_mtime_ns == stamp
    as_tensor = tiny_attribute(
        "outputs/fashion2/tiny/full/seed0/unet", queries=[torch.zeros(1, 8, 8), torch.ones(1, 8, 8)]
    )
    assert again.scores.shape == (1, 48) and as_tensor.scores.shape == (2, 48)
    assert not np.allclose(as_tensor.scores[0], as_tensor.scores[1])


def test_the_package_exports_attribute_lazily() -> None:
    assert das_lightning.attribute is api.attribute
