"""Fault injection: each fault is followed by the same command again, and the RESULT is checked: either the result
of an uninterrupted run (resumed or recomputed) or exactly one clear ``error:`` line naming the file, never a
silently different result. Fast faults run by default; those that kill a running process are marked ``slow``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from das_lightning.manifest import atomic_path, atomic_write_text


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
