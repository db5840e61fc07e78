"""The data layer: loaders read back exactly what the official formats hold, subsets are deterministic and
stratified, absent data fails with one actionable message, and augmentation never touches the index."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from das_lightning.data import (
    DATASETS,
    DatasetNotFoundError,
    DiffusionDataModule,
    HorizontalFlipDataset,
    build_dataset,
    lds_subset_indices,
    load_index_list,
    load_index_record,
    make_loader,
    save_index_list,
)
from das_lightning.data.formats import RemoteFile, download_verified, read_cifar_binary, read_idx
from das_lightning.data.subsets import class_quotas

from data_fixtures import write_celeba, write_cifar_batch, write_idx, write_idx_split, write_image


def uint8_images(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def stored_pixels(dataset, index: int) -> torch.Tensor:
    """The image of a sample mapped back from [-1, 1] to the uint8 values it was made from."""
    return ((dataset[index]["image"] + 1.0) * 127.5).round().to(torch.uint8)


# ----------------------------------------------------------------------------------------------- formats


@pytest.mark.parametrize("compress", [False, True])
def test_fashion_mnist_reads_back_written_pixels_and_labels(tmp_path, compress):
    rng = np.random.default_rng(0)
    images, labels = uint8_images(rng, 30, 28, 28), np.arange(30, dtype=np.uint8) % 10
    write_idx_split(tmp_path, "test", images, labels, compress=compress)

    dataset = build_dataset("fashion_mnist", "test", str(tmp_path), image_size=28)

    assert len(dataset) == 30 and dataset.channels == 1
    assert dataset.class_names[7] == "Sneaker"
    for i in (0, 13, 29):
        assert dataset[i]["index"] == i and dataset[i]["label"] == labels[i]
        assert torch.equal(stored_pixels(dataset, i)[0], torch.from_numpy(images[i]))
    assert np.array_equal(dataset.labels, labels.astype(np.int64))


def test_class_selection_remaps_labels_in_the_given_order(tmp_path):
    rng = np.random.default_rng(1)
    images, labels = uint8_images(rng, 40, 28, 28), np.arange(40, dtype=np.uint8) % 10
    write_idx_split(tmp_path / "MNIST" / "raw", "train", images, labels)  # torchvision's layout is found too

    selected = build_dataset("mnist", "train", tmp_path, image_size=28, classes=[8, "3"])
    full = build_dataset("mnist", "train", tmp_path, image_size=28)

    assert selected.class_names == ["8", "3"]
    source_rows = np.flatnonzero(np.isin(labels, [3, 8]))
    assert len(selected) == len(source_rows) == 8
    for position, row in enumerate(source_rows):
        assert selected[position]["label"] == (0 if labels[row] == 8 else 1)
        assert torch.equal(stored_pixels(selected, position)[0], torch.from_numpy(images[row]))
    assert selected.set_name != full.set_name  # index i means another image
    with pytest.raises(ValueError, match="unknown class"):
        build_dataset("mnist", "train", tmp_path, image_size=28, classes=["eleven"])


def test_idx_reader_rejects_wrong_magic_and_truncated_data(tmp_path):
    bad_magic = tmp_path / "bad"
    bad_magic.write_bytes(bytes([1, 2, 8, 1]) + np.asarray([3], ">i4").tobytes() + b"abc")
    truncated = write_idx(tmp_path / "short", np.zeros((4, 2, 2), np.uint8))
    truncated.write_bytes(truncated.read_bytes()[:-1])
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(bad_magic)
    with pytest.raises(ValueError, match="header says"):
        read_idx(truncated)


def test_cifar_binary_planes_are_red_green_blue(tmp_path):
    record = np.concatenate([[7], np.full(1024, 10), np.full(1024, 20), np.full(1024, 30)]).astype(np.uint8)
    (tmp_path / "one.bin").write_bytes(record.tobytes())

    images, labels = read_cifar_binary([tmp_path / "one.bin"])

    assert labels.tolist() == [7]
    assert [int(images[0, channel].max()) for channel in range(3)] == [10, 20, 30]
    (tmp_path / "broken.bin").write_bytes(record.tobytes()[:-5])
    with pytest.raises(ValueError, match="whole number"):
        read_cifar_binary([tmp_path / "broken.bin"])


def write_cifar(root, train_labels, test_labels, rng):
    folder = root / "cifar-10-batches-bin"
    train_images = uint8_images(rng, len(train_labels), 3, 32, 32)
    for batch, part in enumerate(np.array_split(np.arange(len(train_labels)), 5), start=1):
        write_cifar_batch(folder / f"data_batch_{batch}.bin", train_images[part], train_labels[part])
    write_cifar_batch(folder / "test_batch.bin", uint8_images(rng, len(test_labels), 3, 32, 32), test_labels)
    return train_images


def test_cifar10_reads_all_five_training_batches_in_order(tmp_path):
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 10, size=23).astype(np.uint8)
    images = write_cifar(tmp_path, labels, labels[:4], rng)

    dataset = build_dataset("cifar10", "train", tmp_path, image_size=32)

    assert len(dataset) == 23 and np.array_equal(dataset.labels, labels)
    for i in (0, 11, 22):
        assert torch.equal(stored_pixels(dataset, i), torch.from_numpy(images[i]))
    assert len(build_dataset("cifar10", "test", tmp_path / "cifar-10-batches-bin", image_size=32)) == 4


def test_cifar2_defaults_are_5000_train_and_1000_test_stratified(tmp_path):
    rng = np.random.default_rng(3)
    # automobile (1) and horse (7) in unequal numbers, plus other classes that must be dropped
    train_labels = np.repeat([1, 7, 0, 9], [2600, 2400, 50, 50]).astype(np.uint8)
    test_labels = np.repeat([1, 7, 3], [700, 500, 30]).astype(np.uint8)
    write_cifar(tmp_path, rng.permutation(train_labels), rng.permutation(test_labels), rng)

    train = build_dataset("cifar2", "train", tmp_path, image_size=32)
    test = build_dataset("cifar2", "test", tmp_path, image_size=32)

    assert train.class_names == ["automobile", "horse"]
    assert np.bincount(train.labels).tolist() == [2600, 2400]  # 5000 of 5000: proportions kept
    assert np.bincount(test.labels).tolist() == [583, 417]  # 1000 * 700/1200 = 583.3
    assert (train.set_name, test.set_name) == ("cifar2:train", "cifar2:test:n1000")
    assert [sample["index"] for sample in (test[0], test[999])] == [0, 999]
    again = build_dataset("cifar2", "test", tmp_path, image_size=32)
    assert torch.equal(again[500]["image"], test[500]["image"])  # seed 42 every time


# ----------------------------------------------------------------------------------------------- folders


def test_celeba_center_crops_140_before_resizing(tmp_path):
    face = np.full((218, 178, 3), 200, dtype=np.uint8)  # the official aligned size
    face[:39] = face[-39:] = face[:, :19] = face[:, -19:] = 0  # black everywhere outside the center 140x140
    write_celeba(tmp_path, partitions=[0, 1, 2, 0], pixels=[face] * 4)

    train = build_dataset("celeba", "train", tmp_path, image_size=16)
    test = build_dataset("celeba", "test", tmp_path, image_size=16)

    assert (len(train), len(test)) == (2, 1)
    assert train.set_name != test.set_name and train[1]["label"] == 0
    pixels = stored_pixels(train, 0).int()
    # JPEG is lossy near edges; a crop off by even a few pixels would pull the border in far more
    assert (pixels - 200).abs().max() <= 8


def test_imagefolder_reads_png_exactly_and_selects_classes(tmp_path):
    rng = np.random.default_rng(4)
    pictures = {(name, k): uint8_images(rng, 8, 8, 3) for name in ("dog", "cat") for k in range(3)}
    for (name, k), pixels in pictures.items():
        write_image(tmp_path / name / f"{k}.png", pixels)

    dataset = build_dataset("imagefolder", "train", tmp_path, image_size=8)
    dogs = build_dataset("imagefolder", "train", tmp_path, image_size=8, classes=["dog"])

    assert dataset.class_names == ["cat", "dog"] and dataset.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.equal(stored_pixels(dataset, 4), torch.from_numpy(pictures["dog", 1]).permute(2, 0, 1))
    assert dogs.labels.tolist() == [0, 0, 0] and dogs.set_name != dataset.set_name
    assert torch.equal(dogs[1]["image"], dataset[4]["image"])
    with pytest.raises(DatasetNotFoundError, match="test"):
        build_dataset("imagefolder", "test", tmp_path, image_size=8)


def test_artbench2_takes_its_two_styles_from_split_folders(tmp_path):
    rng = np.random.default_rng(5)
    for split in ("train", "test"):
        for style in ("baroque", "post_impressionism", "ukiyo_e"):
            for k in range(2 if split == "train" else 1):
                write_image(tmp_path / split / style / f"{k}.jpg", uint8_images(rng, 24, 24, 3))

    train = build_dataset("artbench2", "train", tmp_path, image_size=16)
    test = build_dataset("artbench2", "test", tmp_path, image_size=16)
    five = DATASETS["artbench5"].default_classes

    assert train.class_names == ["post_impressionism", "ukiyo_e"] and train.labels.tolist() == [0, 0, 1, 1]
    assert len(test) == 2 and train.set_name == "artbench2:train"
    assert train[0]["image"].shape == (3, 16, 16)
    assert five == ("romanticism", "art_nouveau", "baroque", "post_impressionism", "ukiyo_e")
    with pytest.raises(DatasetNotFoundError, match="romanticism"):
        build_dataset("artbench5", "train", tmp_path, image_size=16)


# ----------------------------------------------------------------------------------------------- absent data


@pytest.mark.parametrize(
    ("name", "downloadable"),
    [("fashion_mnist", True), ("mnist", True), ("cifar10", True), ("cifar2", True), ("celeba", False)]
    + [("artbench2", False), ("imagefolder", False)],
)
def test_absent_data_offline_says_where_and_how(tmp_path, name, downloadable):
    empty = tmp_path / "empty"
    empty.mkdir()
    for root in (empty, tmp_path / "does-not-exist"):
        with pytest.raises(DatasetNotFoundError) as caught:
            build_dataset(name, "train", root, image_size=8)
        message = str(caught.value)
        assert isinstance(caught.value, FileNotFoundError)
        assert str(root) in message and "dataset.root=" in message and name in message
        assert ("dataset.download=true" in message) == downloadable


def test_failed_download_becomes_the_same_clear_error(tmp_path, monkeypatch):
    def refuse(url, timeout):
        raise OSError(f"network unreachable for {url}")

    monkeypatch.setattr("das_lightning.data.formats.urllib.request.urlopen", refuse)
    with pytest.raises(DatasetNotFoundError, match="download failed") as caught:
        build_dataset("mnist", "test", tmp_path, image_size=28, download=True)
    assert "dataset.root=" in str(caught.value) and not list(tmp_path.iterdir())


def test_download_keeps_only_files_with_the_official_checksum(tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "archive.gz").write_bytes(b"official bytes")
    good = RemoteFile("archive.gz", (mirror.as_uri(),), hashlib.md5(b"official bytes").hexdigest())
    tampered = RemoteFile("archive.gz", (mirror.as_uri(),), hashlib.md5(b"other bytes").hexdigest())

    assert download_verified(good, tmp_path / "a").read_bytes() == b"official bytes"
    with pytest.raises(OSError, match="MD5"):
        download_verified(tampered, tmp_path / "b")
    assert not list((tmp_path / "b").iterdir())


def test_unknown_dataset_lists_the_choices():
    with pytest.raises(ValueError, match="unknown dataset 'cifar3'") as caught:
        build_dataset("cifar3", "train", None, image_size=32)
    assert all(name in str(caught.value) for name in ("fashion2", "cifar2", "celeba", "imagefolder"))
    with pytest.raises(ValueError, match="split"):
        build_dataset("fashion2", "valid", None, image_size=28)


# ----------------------------------------------------------------------------------------------- fashion2


def test_fashion2_ships_with_the_package():
    train = build_dataset("fashion2", "train", None, image_size=28)
    test = build_dataset("fashion2", "test", None, image_size=28)

    assert (len(train), len(test)) == (12000, 2000)
    assert train.class_names == ["Sneaker", "Bag"] and train.channels == 1
    assert np.bincount(train.labels).tolist() == [6000, 6000] and np.bincount(test.labels).tolist() == [
        1000,
        1000,
    ]
    assert train.set_name != test.set_name
    assert float(train.images.min()) == 0 and float(train.images.max()) == 255  # full [-1, 1] range used
    sample = test[1999]
    assert sample["index"] == 1999 and -1.0 <= sample["image"].min() < sample["image"].max() <= 1.0


def test_fashion2_resize_preserves_brightness_and_subset_is_stratified():
    full = build_dataset("fashion2", "train", None, image_size=28)
    small = build_dataset("fashion2", "train", None, image_size=14)
    subset = build_dataset("fashion2", "train", None, image_size=28, num_train=1000)

    # halving averages each 2x2 block (no aliasing): the block means of the original, up to uint8 rounding
    block_means = full.images[:500].float().unflatten(2, (14, 2)).unflatten(4, (14, 2)).mean((3, 5))
    assert (small.images[:500].float() - block_means).abs().max() <= 0.5
    assert subset.set_name == "fashion2:train:n1000" and np.bincount(subset.labels).tolist() == [500, 500]
    full_rows = {bytes(full.images[i].numpy()) for i in range(len(full))}
    assert all(bytes(subset.images[i].numpy()) in full_rows for i in range(0, 1000, 97))


# ----------------------------------------------------------------------------------------------- subsets


def test_lds_subsets_are_deterministic_and_differ_by_index():
    labels = np.repeat([0, 1, 2], [50, 30, 21])
    first = lds_subset_indices(labels, alpha=0.5, index=3)

    assert np.array_equal(first, lds_subset_indices(labels, alpha=0.5, index=3))
    assert not np.array_equal(first, lds_subset_indices(labels, alpha=0.5, index=4))
    assert first.dtype == np.int64 and np.all(np.diff(first) > 0)


@pytest.mark.parametrize("alpha", [0.1, 0.37, 0.5, 0.9])
def test_lds_subsets_are_stratified_and_exact_in_size(alpha):
    labels = np.random.default_rng(6).permutation(np.repeat([0, 1, 2, 3], [133, 71, 40, 7]))
    indices = lds_subset_indices(labels, alpha=alpha, index=0)

    assert len(indices) == round(alpha * len(labels))
    counts = np.bincount(labels[indices], minlength=4)
    assert np.all(np.abs(counts - alpha * np.bincount(labels)) < 1.0)  # every class within rounding


def test_lds_subset_all_and_invalid_arguments():
    labels = np.array([0, 1, 1, 0, 1])
    assert lds_subset_indices(labels, alpha=1.0, index=9).tolist() == [0, 1, 2, 3, 4]
    for alpha in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="alpha"):
            lds_subset_indices(labels, alpha=alpha, index=0)
    with pytest.raises(ValueError, match="index"):
        lds_subset_indices(labels, alpha=0.5, index=-1)


def test_quotas_give_leftovers_to_largest_remainders():
    labels = np.repeat([0, 1, 2], [6, 3, 1])
    assert class_quotas(labels, 5) == {0: 3, 1: 2, 2: 0}  # exact shares 3, 1.5, 0.5: the tie goes to class 1


def test_index_list_round_trips_as_readable_json(tmp_path):
    indices = lds_subset_indices(np.repeat([0, 1], [10, 10]), alpha=0.5, index=2)
    path = tmp_path / "subset.json"
    save_index_list(path, indices, alpha=0.5, index=2, num_total=20)

    assert np.array_equal(load_index_list(path), indices)
    record = load_index_record(path)
    assert (record["alpha"], record["index"], record["N"]) == (0.5, 2, 20)
    assert json.loads(path.read_text())["indices"] == indices.tolist()


# ----------------------------------------------------------------------------------------------- loading


@pytest.fixture(scope="module")
def fashion_test():
    return build_dataset("fashion2", "test", None, image_size=28)


def test_flip_mirrors_the_image_and_keeps_index_and_label(fashion_test):
    always, never = HorizontalFlipDataset(fashion_test, 1.0), HorizontalFlipDataset(fashion_test, 0.0)
    original, mirrored = fashion_test[17], always[17]

    assert (mirrored["index"], mirrored["label"]) == (original["index"], original["label"])
    assert torch.equal(mirrored["image"], original["image"].flip(-1))
    assert not torch.equal(mirrored["image"], original["image"])  # a shoe is not left-right symmetric
    assert torch.equal(never[17]["image"], original["image"])


def test_training_batches_cover_the_subset_with_random_mirrors(fashion_test):
    subset = lds_subset_indices(fashion_test.labels, alpha=0.05, index=0)
    module = DiffusionDataModule(fashion_test, subset, batch_size=16, seed=11)

    torch.manual_seed(0)
    batches = list(module.train_dataloader())
    seen = torch.cat([batch["index"] for batch in batches])
    flipped = 0
    for batch in batches:
        for index, image in zip(batch["index"].tolist(), batch["image"], strict=True):
            original = fashion_test[index]["image"]
            assert torch.equal(image, original) or torch.equal(image, original.flip(-1))
            flipped += torch.equal(image, original.flip(-1))

    assert sorted(seen.tolist()) == subset.tolist()  # indices are full-dataset indices, each once
    assert 0 < flipped < len(subset)
    order = [b["index"] for b in DiffusionDataModule(fashion_test, subset, 16, seed=11).train_dataloader()]
    other = [b["index"] for b in DiffusionDataModule(fashion_test, subset, 16, seed=12).train_dataloader()]
    assert torch.equal(torch.cat(order), seen) and not torch.equal(torch.cat(other), seen)


def test_prediction_loader_keeps_order_and_pixels(fashion_test):
    indices = np.array([5, 1999, 0, 42])
    batch = next(iter(make_loader(fashion_test, batch_size=4, indices=indices)))

    assert batch["index"].tolist() == [5, 1999, 0, 42]
    assert torch.equal(batch["image"][1], fashion_test[1999]["image"])
    assert batch["label"].tolist() == fashion_test.labels[indices].tolist()


def test_a_fresh_draw_of_validation_images_shares_none_with_the_earlier_draws() -> None:
    """queries.val_draw: draw 0 is the set every run used; draw d picks other test images, still class-stratified,
    under a name of its own (so its noise and caches are its own)."""
    from das_lightning.data import stratified_sample
    from das_lightning.errors import ConfigError
    from das_lightning.queries import validation_indices, validation_queries
    from das_lightning.seeding import derive_seed

    test_set = build_dataset("fashion2", "test", None, image_size=16)
    first, second, third = (validation_indices(test_set, 128, draw) for draw in range(3))
    assert not set(first) & set(second) and not (set(first) | set(second)) & set(third)
    labels = np.asarray(test_set.labels)
    for indices in (first, second, third):
        assert np.bincount(labels[indices]).tolist() == [64, 64]
    rng = np.random.default_rng(
        derive_seed("val-queries", test_set.set_name, 128)
    )  # the rule before val_draw
    np.testing.assert_array_equal(first, stratified_sample(test_set.labels, 128, rng))
    assert validation_queries(test_set, 128).set_name.endswith(":q128")
    assert validation_queries(test_set, 128, 1).set_name.endswith(":q128:d1")
    with pytest.raises(ConfigError, match="val_draw 7"):
        validation_indices(test_set, 500, 7)
