"""Image grids place each image, rescaled to uint8, exactly where the layout says; W&B helpers are inert offline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from das_lightning.viz import (
    SEPARATOR_COLOUR,
    attribution_grid,
    image_grid,
    log_images_to_wandb,
    log_table,
    to_uint8,
)


def random_images(count: int, channels: int, size: int, seed: int) -> torch.Tensor:
    return torch.rand(count, channels, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_to_uint8_maps_the_model_range_onto_bytes():
    images = torch.tensor([-1.0, 0.0, 1.0, 3.0]).reshape(1, 1, 2, 2)
    assert to_uint8(images).reshape(-1).tolist() == [0, 128, 255, 255]


def test_image_grid_size_and_tile_pixels():
    images = random_images(5, 3, 6, seed=0)
    padding = 2
    grid = image_grid(images, nrow=3, padding=padding)
    assert grid.mode == "RGB"
    assert grid.size == (3 * (6 + padding) + padding, 2 * (6 + padding) + padding)
    pixels = np.asarray(grid)
    expected = to_uint8(images)
    for index in range(5):
        top = padding + (index // 3) * (6 + padding)
        left = padding + (index % 3) * (6 + padding)
        np.testing.assert_array_equal(pixels[top : top + 6, left : left + 6], expected[index])
    # the empty sixth cell and the padding stay at the pad value
    assert (pixels[padding + 8 :, padding + 16 :] == 0).all()


def test_image_grid_grayscale():
    images = random_images(2, 1, 4, seed=1)
    grid = image_grid(images, nrow=2, padding=0)
    assert grid.mode == "L" and grid.size == (8, 4)
    np.testing.assert_array_equal(np.asarray(grid)[:, 4:], to_uint8(images)[1, ..., 0])


def test_attribution_grid_upscales_tiny_images_and_places_train_tiles():
    queries = random_images(2, 1, 16, seed=2)
    train = random_images(10, 1, 16, seed=3)
    requested: list[list[int]] = []

    def lookup(indices: list[int]) -> torch.Tensor:
        requested.append(indices)
        return train[indices]

    proponents, opponents = [[3, 1, 4], [0, 9, 2]], [[7, 8], [5, 6]]
    padding, separator_width = 2, 8
    grid = attribution_grid(
        queries,
        lookup,
        proponents,
        opponent_indices=opponents,
        padding=padding,
        separator_width=separator_width,
    )
    tile = 48  # 16 px upscaled x3 to reach min_size 48
    step = tile + padding
    proponent_left = padding + step + separator_width + padding
    opponent_left = proponent_left + 3 * step + separator_width + padding
    assert grid.size == (opponent_left + 2 * step, padding + 2 * step)
    assert requested == [[3, 1, 4], [7, 8], [0, 9, 2], [5, 6]]

    pixels = np.asarray(grid)
    upscale = lambda image: np.repeat(np.repeat(to_uint8(image[None])[0], 3, axis=0), 3, axis=1)  # noqa: E731
    for row in range(2):
        top = padding + row * step
        region = lambda left: pixels[top : top + tile, left : left + tile]  # noqa: E731, B023
        np.testing.assert_array_equal(region(padding), np.repeat(upscale(queries[row]), 3, axis=2))
        for column, index in enumerate(proponents[row]):
            expected = np.repeat(upscale(train[index]), 3, axis=2)
            np.testing.assert_array_equal(region(proponent_left + column * step), expected)
        for column, index in enumerate(opponents[row]):
            expected = np.repeat(upscale(train[index]), 3, axis=2)
            np.testing.assert_array_equal(region(opponent_left + column * step), expected)
        separator = pixels[top : top + tile, padding + step : padding + step + separator_width]
        assert (separator == np.array(SEPARATOR_COLOUR, dtype=np.uint8)).all()


def test_attribution_grid_with_scores_adds_captions():
    queries = random_images(1, 3, 8, seed=4)
    train = random_images(4, 3, 8, seed=5)
    plain = attribution_grid(queries, lambda indices: train[indices], [[0, 1]])
    captioned = attribution_grid(queries, lambda indices: train[indices], [[0, 1]], scores=[[0.5, -0.25]])
    assert captioned.size[0] == plain.size[0] and captioned.size[1] > plain.size[1]
    below_tiles = np.asarray(captioned)[2 + 48 :, :]
    assert below_tiles.any()  # the printed scores


class RecordingRun:
    def __init__(self) -> None:
        self.logged: list[dict] = []

    def log(self, data: dict) -> None:
        self.logged.append(data)


class LoggerWithoutLog:
    experiment = object()


def test_wandb_helpers_are_inert_without_a_run_and_log_to_a_given_run(monkeypatch):
    wandb = pytest.importorskip("wandb")
    # wandb.Image would write a PNG into a system temp folder: record the arguments instead
    monkeypatch.setattr(wandb, "Image", lambda image, caption=None: ("image", image.size, caption))
    monkeypatch.setattr(wandb, "Table", lambda columns, data: ("table", columns, data))
    image = image_grid(random_images(2, 3, 4, seed=6), nrow=2)
    assert log_images_to_wandb(None, "grid", image) is False
    assert log_table(None, "topk", ["query", "top"], [[0, "1 2"]]) is False
    assert log_images_to_wandb(LoggerWithoutLog(), "grid", image) is False

    run = RecordingRun()
    assert log_images_to_wandb(run, "grid", image) is True
    assert log_table(run, "topk", ["query", "top"], [[0, "1 2"]]) is True
    assert log_table(run, "rows", ["query", "image"], [["q0", image]]) is True  # an image cell
    assert run.logged == [
        {"grid": ("image", image.size, None)},
        {"topk": ("table", ["query", "top"], [[0, "1 2"]])},
        {"rows": ("table", ["query", "image"], [["q0", ("image", image.size, None)]])},
    ]
