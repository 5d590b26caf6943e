"""Datasets by name, the unlabeled calibration subset and a non-padding test split.

Pure PyTorch/torchvision: ``build_datasets(name, ...)`` returns labeled train and test
datasets with the dataset's standard normalisation; ``CalibrationImages`` exposes a
seeded random subset of the training split as images only, so labels never reach a
repair; ``shard_indices`` splits a dataset across processes without padding, so every
test sample is counted exactly once under DDP.
"""

from __future__ import annotations

import gzip
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import datasets as tvd
from torchvision.transforms import v2

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


@dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    location: str | None = None  # the folder the images were read from (build_datasets); None: generated
    resize: int | None = None  # test images: resized to this (shorter side), then center-cropped to image_size


DATASETS: dict[str, DatasetInfo] = {
    "fashion_mnist": DatasetInfo(10, 1, 28, (0.2860,), (0.3530,)),
    "cifar10": DatasetInfo(10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": DatasetInfo(100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenette": DatasetInfo(10, 3, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "imagefolder": DatasetInfo(0, 3, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "synthetic": DatasetInfo(10, 3, 16, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}


def dataset_info(name: str, rgb: bool = False) -> DatasetInfo:
    """A dataset's shape and normalisation without reading it (``rgb``: a grayscale dataset as 3 equal channels, as
    ``build_datasets`` gives it); imagefolder's classes are only known from its folders (0 here)."""
    if name not in DATASETS:
        raise ValueError(f"data.dataset: unknown dataset {name!r}; choose from {sorted(DATASETS)}")
    info = DATASETS[name]
    if rgb and info.in_channels == 1:
        info = DatasetInfo(info.num_classes, 3, info.image_size, info.mean * 3, info.std * 3)
    return info


class TensorImages(Dataset):
    """Labeled images held in memory as uint8 (N, C, H, W). A ``random`` transform (augmentation) runs per
    sample; a deterministic one once per batch (the DataLoader fetches through ``__getitems__``), the same
    numbers several times faster: per-sample transforms cost as much as the model's forward pass here."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform, random: bool):
        self.images, self.labels, self.transform, self.random = images, labels, transform, random

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), int(self.labels[i])

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        if self.random:
            return [self[i] for i in indices]
        images = self.transform(self.images[indices]).as_subclass(torch.Tensor)
        return list(zip(images, self.labels[indices].tolist(), strict=True))


class SyntheticImages(Dataset):
    """Deterministic class-dependent patterns plus noise: learnable, generated on the fly."""

    def __init__(self, size: int, num_classes: int, channels: int, image_size: int, seed: int):
        self.size, self.num_classes, self.seed = size, num_classes, seed
        g = torch.Generator().manual_seed(1234)
        self.prototypes = torch.randn(num_classes, channels, image_size, image_size, generator=g)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        label = int(torch.randint(self.num_classes, (1,), generator=g))
        image = self.prototypes[label] + 0.5 * torch.randn(self.prototypes.shape[1:], generator=g)
        return image, label


class CalibrationImages(Dataset):
    """A seeded random subset of a labeled dataset that yields images only: positions ``skip`` to ``skip + size``
    of the seed's permutation, so subsets of one seed with disjoint position ranges hold disjoint images (the
    ``search`` allocation's held-out images follow the calibration images)."""

    def __init__(self, dataset: Dataset, size: int, seed: int, skip: int = 0):
        if size < 1:
            raise ValueError(f"calibration_size must be >= 1, got {size}")
        if skip + size > len(dataset):
            what = f"calibration_size={size}" if not skip else f"{size} held-out images after {skip} calibration images"
            raise ValueError(f"{what} exceed the training split ({len(dataset)} images)")
        self._dataset = dataset
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
        self.indices = order[skip : skip + size].tolist()

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self._dataset[self.indices[i]][0]


def shard_indices(n: int, rank: int, world_size: int) -> range:
    """Contiguous, non-overlapping, non-padded shard of ``range(n)`` for one process."""
    per, extra = divmod(n, world_size)
    start = rank * per + min(rank, extra)
    return range(start, start + per + (rank < extra))


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def find_fashion_mnist(data_dir: str | Path, download: bool) -> Path:
    """Where the four Fashion-MNIST IDX files are: data_dir, the Debian package, or a download."""
    names = [n for pair in FASHION_MNIST_FILES.values() for n in pair]
    candidates = [Path(data_dir), Path(data_dir) / "FashionMNIST" / "raw", FASHION_MNIST_SYSTEM_DIR]
    for folder in candidates:
        if all((folder / n).is_file() for n in names):
            return folder
    if download:
        tvd.FashionMNIST(str(data_dir), train=True, download=True)
        return Path(data_dir) / "FashionMNIST" / "raw"
    raise FileNotFoundError(
        f"Fashion-MNIST not found in {candidates[0]}, {candidates[1]} or {FASHION_MNIST_SYSTEM_DIR}. "
        "Install it with `apt-get install dataset-fashion-mnist`, copy the four IDX .gz files "
        "into data_dir, or set `data.download: true`."
    )


def _transforms(info: DatasetInfo, train: bool, rgb: bool = False) -> v2.Compose:
    steps: list = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    big = info.image_size >= 64 or info.resize is not None  # resized and cropped (imagefolder, imagenette)
    if big:
        resize = info.resize or int(info.image_size * 8 / 7)  # ImageNet's 256 for 224
        steps.insert(0, v2.RandomResizedCrop(info.image_size) if train else v2.Resize(resize))
        if not train:
            steps.insert(1, v2.CenterCrop(info.image_size))
    elif train:
        steps += [v2.RandomCrop(info.image_size, padding=info.image_size // 8)]
    if train:
        steps.append(v2.RandomHorizontalFlip())
    if rgb:  # the grayscale channel repeated, for models with an RGB stem
        steps.append(v2.Grayscale(num_output_channels=3))
    steps.append(v2.Normalize(info.mean, info.std))
    return v2.Compose(steps)


def build_datasets(
    name: str, data_dir: str | Path = "data", download: bool = False, augment: bool = False,
    synthetic_sizes: Sequence[int] = (512, 257), synthetic_shape: Sequence[int] | None = None, rgb: bool = False,
    image: Mapping[str, Any] | None = None,
) -> tuple[Dataset, Dataset, DatasetInfo]:  # fmt: skip
    """Labeled (train, test) datasets and their info; ``augment`` applies to train only; ``rgb`` gives a grayscale
    dataset's images as 3 equal channels.

    ``synthetic_shape`` (num_classes, in_channels, image_size) gives the synthetic dataset another
    dataset's shape, e.g. to smoke-test a config written for it. ``image`` overrides imagefolder's and imagenette's
    ``image_size``, ``resize``, ``mean`` and ``std`` (ImageNet's 224, 256 and statistics by default).
    """
    if name not in DATASETS:
        raise ValueError(f"data.dataset: unknown dataset {name!r}; choose from {sorted(DATASETS)}")
    info = DATASETS[name]
    overrides = {k: (tuple(v) if k in ("mean", "std") else v) for k, v in (image or {}).items() if v is not None}
    if overrides:
        info = replace(info, **overrides)
    if name in ("imagefolder", "imagenette") and info.resize is None:
        info = replace(info, resize=int(info.image_size * 8 / 7))  # images of any size: always resized and cropped
    root = Path(data_dir)
    if name == "synthetic":
        if synthetic_shape is not None:
            classes, channels, size = synthetic_shape
            info = DatasetInfo(classes, channels, size, (0.0,) * channels, (1.0,) * channels)
        train = SyntheticImages(synthetic_sizes[0], info.num_classes, info.in_channels, info.image_size, seed=0)
        test = SyntheticImages(synthetic_sizes[1], info.num_classes, info.in_channels, info.image_size, seed=1)
        return train, test, info
    if name == "fashion_mnist":
        if rgb:
            info = DatasetInfo(info.num_classes, 3, info.image_size, info.mean * 3, info.std * 3)
        folder = find_fashion_mnist(root, download)
        info = replace(info, location=str(folder))
        splits = []
        for split, (img, lab) in FASHION_MNIST_FILES.items():
            images = torch.from_numpy(_read_idx(folder / img).copy()).unsqueeze(1)
            labels = torch.from_numpy(_read_idx(folder / lab).astype(np.int64))
            random = augment and split == "train"
            splits.append(TensorImages(images, labels, _transforms(info, random, rgb), random))
        return splits[0], splits[1], info
    if name in ("cifar10", "cifar100"):
        cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100

        def make(train):
            return cls(str(root), train=train, download=download, transform=_transforms(info, augment and train))

        info = replace(info, location=str(root))
        return _with_error(make, name, root, True), _with_error(make, name, root, False), info
    if name == "imagenette":
        make = lambda train: tvd.Imagenette(  # noqa: E731
            str(root), split="train" if train else "val", size="full", download=download,
            transform=_transforms(info, augment and train),
        )  # fmt: skip
        info = replace(info, location=str(root))
        return _with_error(make, name, root, True), _with_error(make, name, root, False), info
    # imagefolder: data_dir/train/<class>/*, data_dir/val/<class>/* (ImageNet-100 or any tree)
    folders = {s: root / s for s in ("train", "val")}
    for split, folder in folders.items():
        if not folder.is_dir():
            raise FileNotFoundError(f"imagefolder needs {folder} with one sub-folder per class ({split} split)")
    train = _image_folder(folders["train"], _transforms(info, augment))
    test = _image_folder(folders["val"], _transforms(info, False))
    if test.classes != train.classes:  # labels are class indices in sorted order: they must mean the same
        raise ValueError(
            f"imagefolder: {folders['val']} has classes {test.classes} but {folders['train']} has {train.classes}"
        )
    info = replace(info, num_classes=len(train.classes), location=str(root))
    return train, test, info


def _image_folder(folder: Path, transform) -> tvd.ImageFolder:
    try:
        return tvd.ImageFolder(str(folder), transform=transform, loader=_load_image)
    except FileNotFoundError as err:  # no class folder, or class folders without images
        raise FileNotFoundError(f"imagefolder {folder}: {err}") from err


def _load_image(path: str):
    """torchvision's image loader, naming the file when an image is corrupt or truncated."""
    try:
        return tvd.folder.default_loader(path)
    except OSError as err:
        raise OSError(f"cannot read image {path}: {err}") from err


def _with_error(make, name: str, root: Path, train: bool) -> Dataset:
    try:
        return make(train)
    except RuntimeError as err:  # torchvision's "Dataset not found or corrupted"
        raise FileNotFoundError(f"{name} not found under {root} ({err}); set `data.download: true`") from err
