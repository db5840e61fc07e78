"""The HTML report shows, row by row, each query and exactly the training images its top-k lists name."""

from __future__ import annotations

import base64
import io
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from das_lightning.report import write_report
from das_lightning.viz import to_uint8


class _Cells(HTMLParser):
    """(row, src, alt) for every <img>, rows counted by <tr> after the header row."""

    def __init__(self) -> None:
        super().__init__()
        self.row = -2  # the header row is row -1
        self.images: list[tuple[int, str, str]] = []
        self.title = ""
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.row += 1
        if tag == "img":
            attributes = dict(attrs)
            self.images.append((self.row, attributes["src"], attributes["alt"]))
        self._in_title = tag == "title"

    def handle_data(self, data):
        if self._in_title:
            self.title += data

    def handle_endtag(self, tag):
        if tag == "title":
            self._in_title = False


def _decode(uri: str) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert uri.startswith(prefix), uri[:40]
    with Image.open(io.BytesIO(base64.b64decode(uri[len(prefix) :]))) as image:
        return np.asarray(image.convert("RGB"))


def _page(tmp_path: Path) -> tuple[Path, torch.Tensor, torch.Tensor, dict]:
    generator = torch.Generator().manual_seed(0)
    queries = torch.rand(3, 3, 8, 8, generator=generator) * 2 - 1
    train = torch.rand(12, 3, 8, 8, generator=generator) * 2 - 1
    top = {
        "proponent_indices": [[4, 1, 7], [0, 11, 2], [9, 9, 3]],
        "proponent_scores": [[3.0, 2.0, 1.0], [5.0, 4.0, 0.5], [1.0, 1.0, 0.1]],
        "opponent_indices": [[5, 6, 8], [10, 3, 1], [0, 2, 4]],
        "opponent_scores": [[-1.0, -2.0, -3.0], [-0.1, -0.2, -0.3], [0.0, -1.0, -2.0]],
    }
    path = write_report(
        tmp_path / "index.html",
        "das: val",
        "das | c=0.01",
        ("query", "proponents", "opponents"),
        lambda i: queries[i],
        [f"q{i}" for i in range(3)],
        lambda i: train[i],
        lambda i: f"#{i}",
        top,
        shown=2,
    )
    return path, queries, train, top


def test_each_row_shows_its_query_then_its_proponents_then_its_opponents(tmp_path: Path) -> None:
    path, queries, train, top = _page(tmp_path)
    cells = _Cells()
    cells.feed(path.read_text())
    assert cells.title == "das: val"
    assert len(cells.images) == 3 * (1 + 2 + 2)
    for query in range(3):
        row = [(src, alt) for r, src, alt in cells.images if r == query]
        expected = [queries[query]]
        expected += [train[i] for i in top["proponent_indices"][query][:2]]
        expected += [train[i] for i in top["opponent_indices"][query][:2]]
        for (src, _), image in zip(row, expected, strict=True):
            np.testing.assert_array_equal(_decode(src), to_uint8(image[None])[0])
        captions = [alt for _, alt in row]
        assert captions[0] == f"q{query}"
        first = top["proponent_indices"][query][0], top["proponent_scores"][query][0]
        assert captions[1] == f"#{first[0]} {first[1]:.3g}"


def test_the_page_loads_offline_in_a_headless_browser_with_every_image_decoded(tmp_path: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium); the HTML itself is checked above")
    path, *_ = _page(tmp_path)
    dom = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            path.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    # the page's load handler counts decoded images into the title
    assert "<title>das: val (15/15 images)</title>" in dom
