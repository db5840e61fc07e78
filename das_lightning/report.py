"""A static HTML page of every query with its top-k training images (``index.html`` beside each grid).

The page opens from disk without a server: images are embedded as PNG data URIs, nothing is fetched. A script at
the end counts the images that decoded and writes the count into the page title ("... (12/12 images)"), which is
what the headless-browser check reads.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from das_lightning.manifest import atomic_write_text
from das_lightning.viz import _to_pil, to_uint8

_STYLE = """
body { font-family: sans-serif; background: #111; color: #eee; margin: 1em; }
table { border-collapse: collapse; }
td { padding: 4px; vertical-align: top; text-align: center; font-size: 11px; }
td.sep { border-left: 3px solid #c33; }
img { width: 64px; height: 64px; image-rendering: pixelated; display: block; margin: auto; }
th { text-align: left; font-weight: normal; color: #aaa; }
"""


def _data_uri(image: torch.Tensor) -> str:
    buffer = io.BytesIO()
    _to_pil(to_uint8(image[None])[0]).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _cell(uri: str, caption: str, separator: bool = False) -> str:
    klass = ' class="sep"' if separator else ""
    return f'<td{klass}><img src="{uri}" alt="{html.escape(caption)}"><div>{html.escape(caption)}</div></td>'


def write_report(
    path: Path,
    title: str,
    legend: str,
    headers: Sequence[str],
    query_image: Callable[[int], torch.Tensor],
    query_names: Sequence[str],
    train_image: Callable[[int], torch.Tensor],
    train_caption: Callable[[int], str],
    top: dict[str, Any],
    shown: int = 8,
) -> Path:
    """Write the page: one table row per query (image and name), its ``shown`` proponents, then opponents."""
    cache: dict[int, str] = {}

    def train_uri(index: int) -> str:
        if index not in cache:
            cache[index] = _data_uri(train_image(index))
        return cache[index]

    rows = []
    for query, name in enumerate(query_names):
        cells = [_cell(_data_uri(query_image(query)), name)]
        groups = (("proponent", False), ("opponent", True))
        for group, separator in groups:
            indices = top[f"{group}_indices"][query][:shown]
            values = top[f"{group}_scores"][query][:shown]
            for column, (index, value) in enumerate(zip(indices, values, strict=True)):
                caption = f"{train_caption(int(index))} {value:.3g}"
                cells.append(_cell(train_uri(int(index)), caption, separator and column == 0))
        rows.append("<tr>" + "".join(cells) + "</tr>")
    header = (
        f"<tr><th>{html.escape(headers[0])}</th><th colspan={shown}>{html.escape(headers[1])}</th>"
        f"<th colspan={shown}>{html.escape(headers[2])}</th></tr>"
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_STYLE}</style></head>
<body><h1>{html.escape(title)}</h1><p>{html.escape(legend)}</p>
<table>{header}{"".join(rows)}</table>
<script>
window.addEventListener("load", function () {{
  var images = Array.from(document.images);
  var ok = images.filter(function (image) {{ return image.complete && image.naturalWidth > 0; }}).length;
  document.title = document.title + " (" + ok + "/" + images.length + " images)";
}});
</script>
</body></html>
"""
    atomic_write_text(path, page)
    return path
