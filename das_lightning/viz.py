"""Pictures of attributions: image grids, a query-by-query grid of proponents and opponents, and W&B helpers.

Images are tensors B x C x H x W in [-1, 1] (the diffusion models' range), C = 1 (grayscale) or 3 (RGB).
No torchvision (it breaks lightning on this stack); the W&B helpers do nothing when no run is active and never
fail to import when wandb is absent.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

SEPARATOR_COLOUR = (255, 255, 255)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """B x C x H x W in [-1, 1] to B x H x W x C uint8 in [0, 255] (values outside [-1, 1] are clipped)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images B x C x H x W with C in (1, 3), got shape {tuple(images.shape)}")
    scaled = ((images.detach().cpu().to(torch.float32).clamp(-1, 1) + 1) * 127.5).round()
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _to_pil(pixels: np.ndarray) -> Image.Image:
    """H x W x C uint8 to a PIL image ("L" for one channel, "RGB" for three)."""
    # uint8 H x W becomes mode "L", uint8 H x W x 3 becomes "RGB" (fromarray's mode argument is deprecated)
    return Image.fromarray(np.ascontiguousarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels))


def image_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2, pad_value: int = 0) -> Image.Image:
    """Tile images into a grid of ``nrow`` images per row, ``padding`` pixels between and around tiles.

    Size: width = ncol * (W + padding) + padding, height = nrows * (H + padding) + padding, with
    ncol = min(nrow, B). Tile (r, c) starts at (padding + c * (W + padding), padding + r * (H + padding)).
    """
    pixels = to_uint8(images)
    count, height, width, channels = pixels.shape
    columns = min(nrow, count)
    rows = math.ceil(count / columns)
    canvas = np.full(
        (rows * (height + padding) + padding, columns * (width + padding) + padding, channels),
        pad_value,
        dtype=np.uint8,
    )
    for index in range(count):
        top = padding + (index // columns) * (height + padding)
        left = padding + (index % columns) * (width + padding)
        canvas[top : top + height, left : left + width] = pixels[index]
    return _to_pil(canvas)


def upscale_factor(size: int, min_size: int) -> int:
    """The smallest integer factor that brings ``size`` pixels to at least ``min_size`` (nearest-neighbour)."""
    return max(1, math.ceil(min_size / size))


LINE_HEIGHT = 11  # PIL's default bitmap font: ~6 px per character, 11 px per line


def _fit(text: str, width: int) -> str:
    """``text`` cut to what fits in ``width`` pixels of the default font (an ellipsis marks a cut)."""
    room = max(1, width // 6)
    return text if len(text) <= room else text[: max(1, room - 1)] + "~"


def attribution_grid(
    query_images: torch.Tensor,
    train_images_lookup: Callable[[list[int]], torch.Tensor],
    top_indices: Sequence[Sequence[int]],
    scores: Sequence[Sequence[float]] | None = None,
    opponent_indices: Sequence[Sequence[int]] | None = None,
    opponent_scores: Sequence[Sequence[float]] | None = None,
    min_size: int = 48,
    padding: int = 2,
    separator_width: int = 8,
    header: Sequence[str] | None = None,
    legend: str | None = None,
    query_captions: Sequence[str] | None = None,
    train_caption: Callable[[int], str] | None = None,
) -> Image.Image:
    """One row per query: the query, a separator, its top proponents, then (optionally) a separator and opponents.

    ``train_images_lookup`` maps a list of train indices to their images (B x C x H x W in [-1, 1]), so the
    caller decides how images are fetched (a dataset, a cache). Tiny images are upscaled by an integer factor
    (nearest) to at least ``min_size`` pixels. Optional text: ``header`` (three column titles, e.g. query /
    proponents / opponents) on a first row, ``train_caption(index)`` (e.g. "#12 Bag") and the tile's score under
    each train tile, ``query_captions`` under each query, and a ``legend`` line at the bottom. Lists of indices may
    be shorter than others; missing tiles stay blank.
    """
    if len(top_indices) != len(query_images):
        raise ValueError(f"{len(query_images)} query images but {len(top_indices)} rows of indices")
    if header is not None and len(header) != 3:
        raise ValueError(f"header needs three titles (query, proponents, opponents), got {list(header)}")
    query_pixels = to_uint8(query_images)
    _, height, width, channels = query_pixels.shape
    factor = upscale_factor(min(height, width), min_size)
    tile_height, tile_width = height * factor, width * factor
    has_scores = scores is not None or opponent_scores is not None
    caption_lines = max(int(has_scores) + int(train_caption is not None), int(query_captions is not None))
    caption_height = LINE_HEIGHT * caption_lines
    cell_height = tile_height + caption_height + padding
    header_height = LINE_HEIGHT + padding if header is not None else 0
    legend_height = LINE_HEIGHT + padding if legend is not None else 0

    num_proponents = max((len(row) for row in top_indices), default=0)
    num_opponents = (
        max((len(row) for row in opponent_indices), default=0) if opponent_indices is not None else 0
    )
    # x layout: pad | query | pad | separator | pad | proponents, each followed by pad [| separator | pad | opponents]
    step = tile_width + padding
    query_separator_left = padding + step
    proponent_left = query_separator_left + separator_width + padding
    opponent_separator_left = proponent_left + num_proponents * step
    opponent_left = opponent_separator_left + separator_width + padding
    total_width = opponent_left + num_opponents * step if num_opponents else opponent_separator_left
    total_height = header_height + padding + cell_height * len(query_images) + legend_height
    canvas = Image.new("RGB", (total_width, total_height))
    draw = ImageDraw.Draw(canvas)
    if header is not None:
        titles = [(padding, header[0], step), (proponent_left, header[1], num_proponents * step)]
        if num_opponents:
            titles.append((opponent_left, header[2], num_opponents * step))
        for left, title, room in titles:
            draw.text((left, padding), _fit(title, room), fill=(255, 255, 255))

    def paste(pixels: np.ndarray, left: int, top: int, lines: list[str]) -> None:
        tile = _to_pil(pixels).convert("RGB").resize((tile_width, tile_height), Image.Resampling.NEAREST)
        canvas.paste(tile, (left, top))
        for line_number, line in enumerate(lines):
            draw.text(
                (left, top + tile_height + line_number * LINE_HEIGHT),
                _fit(line, tile_width),
                fill=(255, 255, 255),
            )

    def separator(left: int, top: int) -> None:
        draw.rectangle([left, top, left + separator_width - 1, top + tile_height - 1], fill=SEPARATOR_COLOUR)

    for row, query in enumerate(query_pixels):
        top = header_height + padding + row * cell_height
        paste(query, padding, top, [] if query_captions is None else [str(query_captions[row])])
        separator(query_separator_left, top)
        groups = [(top_indices[row], scores, proponent_left)]
        if opponent_indices is not None and num_opponents:
            separator(opponent_separator_left, top)
            groups.append((opponent_indices[row], opponent_scores, opponent_left))
        for indices, group_scores, left in groups:
            indices = [int(index) for index in indices]
            if not indices:
                continue
            train_pixels = to_uint8(train_images_lookup(indices))
            if train_pixels.shape[1:] != (height, width, channels):
                raise ValueError(
                    f"train images have shape {train_pixels.shape[1:]}, queries {(height, width, channels)}"
                )
            for column, pixels in enumerate(train_pixels):
                lines = [] if train_caption is None else [train_caption(indices[column])]
                if group_scores is not None:
                    lines.append(f"{float(group_scores[row][column]):.3g}")
                paste(pixels, left + column * step, top, lines)
    if legend is not None:
        draw.text((padding, total_height - legend_height), _fit(legend, total_width), fill=(255, 255, 255))
    return canvas


def active_run(logger_or_run: Any) -> Any:
    """The W&B run behind a Lightning WandbLogger, a run, or None (the global run, if any)."""
    if logger_or_run is not None:
        # Lightning's WandbLogger exposes the run as .experiment; a run logs with .log (other loggers do not)
        run = getattr(logger_or_run, "experiment", logger_or_run)
        return run if callable(getattr(run, "log", None)) else None
    try:
        import wandb
    except ImportError:
        return None
    return wandb.run


def _run_and_wandb(logger_or_run: Any) -> tuple[Any, Any] | None:
    """(the active W&B run, the wandb module), or None without either."""
    run = active_run(logger_or_run)
    if run is None:
        return None
    try:
        import wandb
    except ImportError:
        return None
    return run, wandb


def log_images_to_wandb(
    logger_or_run: Any, key: str, pil_image: Image.Image, caption: str | None = None
) -> bool:
    """Log one image under ``key``; returns whether anything was logged (False without wandb or a run)."""
    target = _run_and_wandb(logger_or_run)
    if target is None:
        return False
    run, wandb = target
    run.log({key: wandb.Image(pil_image, caption=caption)})
    return True


def log_table(logger_or_run: Any, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> bool:
    """Log a table (e.g. one row per query with its top proponents); PIL images in a row become image cells.
    Returns whether anything was logged."""
    target = _run_and_wandb(logger_or_run)
    if target is None:
        return False
    run, wandb = target

    def cell(value: Any) -> Any:
        return wandb.Image(value) if isinstance(value, Image.Image) else value

    run.log({key: wandb.Table(columns=list(columns), data=[[cell(value) for value in row] for row in rows])})
    return True
