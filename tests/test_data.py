"""Datasets, the unlabeled calibration subset, DDP sharding and the data module."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from lightning_repair import data, datamodule
from lightning_repair.data import (
    CalibrationImages,
    SyntheticImages,
    TensorImages,
    build_datasets,
    find_fashion_mnist,
    shard_indices,
)
from lightning_repair.datamodule import ImageDataModule


def test_synthetic_shapes_labels_and_determinism():
    train, test, info = build_datasets("synthetic", synthetic_sizes=(40, 13))
    assert (len(train), len(test)) == (40, 13)
    assert (info.num_classes, info.in_channels, info.image_size) == (10, 3, 16)
    image, label = train[5]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    assert isinstance(label, int) and 0 <= label < 10
    again, _, _ = build_datasets("synthetic", synthetic_sizes=(40, 13))
    for i in (39, 5, 0):  # generated on the fly from the index alone: the same whatever the order of access
        assert torch.equal(train[i][0], again[i][0]) and train[i][1] == again[i][1]
    # train and test are different draws
    assert not torch.equal(train[0][0], test[0][0])
    # several classes occur, and images of one class share their prototype (learnable signal)
    labels = [train[i][1] for i in range(40)]
    assert len(set(labels)) >= 5
    same = [i for i in range(40) if labels[i] == labels[0]][:2]
    other = next(i for i in range(40) if labels[i] != labels[0])
    if len(same) == 2:
        d_same = (train[same[0]][0] - train[same[1]][0]).norm()
        d_other = (train[same[0]][0] - train[other][0]).norm()
        assert d_same < d_other


class _Labeled(torch.utils.data.Dataset):
    """Item i is (a tensor holding i, label 1000 + i), so indices and labels are visible."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.full((1, 2, 2), float(i)), 1000 + i


def test_calibration_images_are_tensors_only_and_a_seeded_subset():
    base = _Labeled(50)
    calib = CalibrationImages(base, size=12, seed=3)
    assert len(calib) == 12
    items = [calib[i] for i in range(len(calib))]
    assert all(isinstance(x, torch.Tensor) for x in items)  # no (image, label) tuples
    seen = [int(x[0, 0, 0]) for x in items]
    assert seen == calib.indices
    assert len(set(seen)) == 12 and all(0 <= i < 50 for i in seen)
    assert seen != list(range(12))  # a random subset, not the first images

    assert CalibrationImages(base, size=12, seed=3).indices == calib.indices
    assert CalibrationImages(base, size=12, seed=4).indices != calib.indices
    # the whole dataset is a permutation of it
    assert sorted(CalibrationImages(base, size=50, seed=0).indices) == list(range(50))


def test_held_out_images_follow_the_calibration_images_in_the_seeds_order():
    base = _Labeled(50)
    calib, held = CalibrationImages(base, size=12, seed=3), CalibrationImages(base, size=20, seed=3, skip=12)
    assert not set(calib.indices) & set(held.indices)
    assert calib.indices + held.indices == CalibrationImages(base, size=32, seed=3).indices
    with pytest.raises(ValueError, match="39 held-out images after 12 calibration images exceed the training split"):
        CalibrationImages(base, size=39, seed=3, skip=12)


def test_datamodule_held_out_batches_are_sharded_and_outside_the_calibration_set():
    dm = ImageDataModule(dataset="synthetic", calibration_size=40, batch_size=16, augment=False)
    calibration = torch.cat(dm.calibration_batches())
    held = torch.cat(dm.held_out_batches(30))
    assert held.shape[0] == 30
    assert not (held[:, None] == calibration[None]).flatten(2).all(2).any()  # no calibration image among them
    shards = [torch.cat(dm.held_out_batches(30, rank=r, world_size=3)) for r in range(3)]
    assert torch.equal(torch.cat(shards), held)
    with pytest.raises(ValueError, match="lower model.allocation.search.held_out_images or data.calibration_size"):
        dm.held_out_batches(len(dm.train_set))


@pytest.mark.parametrize("size", [0, -1, 51])
def test_calibration_size_errors(size):
    with pytest.raises(ValueError, match="calibration_size"):
        CalibrationImages(_Labeled(50), size=size, seed=0)


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 10, 257, 1000])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_shard_indices_cover_range_exactly_once(n, world):
    shards = [shard_indices(n, rank, world) for rank in range(world)]
    flat = [i for s in shards for i in s]
    assert flat == list(range(n))  # contiguous, in order, no duplicates, no padding
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1


def test_datamodule_synthetic_loaders():
    dm = ImageDataModule(dataset="synthetic", calibration_size=20, batch_size=8, calibration_seed=1)
    dm.setup("fit")
    assert len(dm.calibration_set) == 20
    batches = list(dm.calibration_dataloader())
    assert [len(b) for b in batches] == [8, 8, 4]
    for b in batches:
        assert type(b) is torch.Tensor and b.shape[1:] == (3, 16, 16)  # images only, no labels
    # calibration images come from the (non-augmented) training split at the seeded indices
    first = dm.calibration_set.indices[0]
    plain_train, _, _ = build_datasets("synthetic")
    assert torch.equal(batches[0][0], plain_train[first][0])

    n_test = len(dm.test_set)
    for world in (1, 2, 3, 4):
        counts = [sum(len(y) for _, y in dm.evaluation_dataloader(rank, world)) for rank in range(world)]
        assert sum(counts) == n_test
    # the shards are disjoint and cover the calibration subset too
    shard_sizes = [sum(len(b) for b in dm.calibration_dataloader(rank, 3)) for rank in range(3)]
    assert shard_sizes == [7, 7, 6]
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (8, 3, 16, 16) and y.dtype == torch.int64


def test_datamodule_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset 'mnist3d'"):
        ImageDataModule(dataset="mnist3d")


def test_build_datasets_unknown_name():
    with pytest.raises(ValueError, match="unknown dataset 'imagenet21k'"):
        build_datasets("imagenet21k")


def test_fashion_mnist_missing_points_to_the_debian_package(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError) as err:
        find_fashion_mnist(tmp_path, download=False)
    assert "apt-get install dataset-fashion-mnist" in str(err.value)
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        build_datasets("fashion_mnist", data_dir=tmp_path)


def _write_idx(path, array: np.ndarray) -> None:
    """IDX format: two zero bytes, type code 0x08 (uint8), ndim, big-endian dims, raw data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _write_fashion_mnist(folder, n_train=5, n_test=3, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train": (rng.integers(0, 256, (n_train, 28, 28)), rng.integers(0, 10, n_train)),
        "test": (rng.integers(0, 256, (n_test, 28, 28)), rng.integers(0, 10, n_test)),
    }
    for split, (img_name, lab_name) in data.FASHION_MNIST_FILES.items():
        _write_idx(folder / img_name, arrays[split][0])
        _write_idx(folder / lab_name, arrays[split][1])
    return arrays


def test_fashion_mnist_idx_round_trip(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "nowhere")
    arrays = _write_fashion_mnist(tmp_path)
    assert find_fashion_mnist(tmp_path, download=False) == tmp_path
    train, test, info = build_datasets("fashion_mnist", data_dir=tmp_path)
    assert isinstance(train, TensorImages) and (len(train), len(test)) == (5, 3)
    assert (info.num_classes, info.in_channels, info.image_size) == (10, 1, 28)
    mean, std = info.mean[0], info.std[0]
    for ds, (images, labels) in ((train, arrays["train"]), (test, arrays["test"])):
        for i in range(len(ds)):
            x, y = ds[i]
            assert y == int(labels[i])
            assert x.shape == (1, 28, 28) and x.dtype == torch.float32
            expected = (torch.from_numpy(images[i].astype(np.float32)) / 255.0 - mean) / std
            torch.testing.assert_close(x[0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("augment", [False, True])
def test_batched_fetch_equals_per_sample_transforms(tmp_path, monkeypatch, augment):
    """The DataLoader fetches through __getitems__: the test split (deterministic transform) is transformed as a
    batch, bit for bit what per-sample fetching gives; augmented training images keep one random draw each."""
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "nowhere")
    _write_fashion_mnist(tmp_path, n_train=64, n_test=7)
    train, test, _ = build_datasets("fashion_mnist", data_dir=tmp_path, augment=augment)
    indices = [6, 0, 3]
    batch = test.__getitems__(indices)
    for (x, y), i in zip(batch, indices, strict=True):
        assert type(x) is torch.Tensor and torch.equal(x, test[i][0]) and y == test[i][1]
    (images, labels), *_ = torch.utils.data.DataLoader(test, batch_size=7)
    assert torch.equal(images, torch.stack([test[i][0] for i in range(7)]))
    assert labels.tolist() == [test[i][1] for i in range(7)]
    torch.manual_seed(0)
    same = [x for x, _ in train.__getitems__([5] * 8)]  # one image, drawn 8 times
    assert any(not torch.equal(same[0], x) for x in same[1:]) == augment


def test_fashion_mnist_found_in_torchvision_layout(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "nowhere")
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    _write_fashion_mnist(raw, n_train=2, n_test=2)
    assert find_fashion_mnist(tmp_path, download=False) == raw


def test_fashion_mnist_datamodule_calibration_is_unlabeled(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "nowhere")
    arrays = _write_fashion_mnist(tmp_path, n_train=6, n_test=3)
    dm = ImageDataModule(
        dataset="fashion_mnist", data_dir=str(tmp_path), calibration_size=4, batch_size=4, augment=True
    )
    dm.setup()
    (batch,) = list(dm.calibration_dataloader())
    assert type(batch) is torch.Tensor and batch.shape == (4, 1, 28, 28)
    # calibration images are never augmented, even when the training split is
    info = dm.info
    for row, index in zip(batch, dm.calibration_set.indices, strict=True):
        pixels = torch.from_numpy(arrays["train"][0][index].astype(np.float32)) / 255.0
        torch.testing.assert_close(row[0], (pixels - info.mean[0]) / info.std[0], rtol=1e-5, atol=1e-5)
    assert (
        sum(len(y) for _, y in dm.evaluation_dataloader(0, 2)) + sum(len(y) for _, y in dm.evaluation_dataloader(1, 2))
        == 3
    )


def test_synthetic_dataset_class_directly():
    ds = SyntheticImages(size=4, num_classes=3, channels=1, image_size=8, seed=5)
    assert len(ds) == 4 and ds[0][0].shape == (1, 8, 8) and ds[3][1] in (0, 1, 2)


def test_fallback_to_the_system_copy_is_announced_and_recorded(tmp_path, monkeypatch):
    system = tmp_path / "system"
    system.mkdir()
    _write_fashion_mnist(system, n_train=2, n_test=2)
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", system)
    messages = []
    monkeypatch.setattr(datamodule, "rank_zero_info", messages.append)
    empty = tmp_path / "empty"
    empty.mkdir()
    dm = ImageDataModule(dataset="fashion_mnist", data_dir=str(empty), calibration_size=2, augment=False)
    dm.setup()
    assert dm.info.location == str(system)
    (message,) = messages
    assert str(empty) in message and str(system) in message

    messages.clear()  # found in data_dir itself: nothing to announce
    local = ImageDataModule(dataset="fashion_mnist", data_dir=str(system), calibration_size=2, augment=False)
    local.setup()
    assert local.info.location == str(system) and messages == []
