"""LightningDataModule: labeled train/test loaders and the unlabeled calibration loader."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import lightning.pytorch as pl
import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Subset

from .data import DATASETS, CalibrationImages, build_datasets, shard_indices


class ImageDataModule(pl.LightningDataModule):
    """Datasets by name with an unlabeled calibration subset of the training split.

    Args:
        dataset: fashion_mnist, cifar10, cifar100, imagenette, imagefolder or synthetic.
        data_dir: where the dataset lives (for imagefolder: a folder with train/ and val/). Fashion-MNIST
            missing there (and download false) is read from Debian's copy, /usr/share/datasets/fashion-mnist,
            with a message; metrics.json records the folder actually read (``data_location``).
        download: download the dataset if it is not found (never done in tests).
        calibration_size: number of unlabeled training images used for repair.
        calibration_seed: seed of the random calibration subset.
        batch_size: batch size of every loader. A calibration set smaller than it is one batch; the repair's
            statistics are sums over the whole calibration set, so its batching does not change the result.
        num_workers: DataLoader worker processes.
        augment: random crop and flip on the training split (dense training only).
        synthetic_shape: (num_classes, in_channels, image_size) of dataset=synthetic, to mimic another
            dataset's shape (default 10 classes of 3x16x16 images).
        rgb: give a grayscale dataset's images as 3 equal channels, for models with an RGB stem (torchvision's).
    """

    def __init__(
        self,
        dataset: str = "fashion_mnist",
        data_dir: str = "data",
        download: bool = False,
        calibration_size: PositiveInt = 1024,
        calibration_seed: int = 0,
        batch_size: PositiveInt = 256,
        num_workers: NonNegativeInt = 0,
        augment: bool = True,
        synthetic_shape: tuple[PositiveInt, PositiveInt, PositiveInt] | None = None,
        rgb: bool = False,
    ):
        super().__init__()
        if not isinstance(dataset, str) or dataset not in DATASETS:
            raise ValueError(f"data.dataset: unknown dataset {dataset!r}; choose from {sorted(DATASETS)}")
        if synthetic_shape is not None and dataset != "synthetic":
            raise ValueError(f"data.synthetic_shape applies to dataset 'synthetic' only, not {dataset!r}")
        # the CLI's types enforce these; checked again for the Python API
        for field, value, low in (
            ("calibration_size", calibration_size, 1),
            ("batch_size", batch_size, 1),
            ("num_workers", num_workers, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"data.{field} must be an integer >= {low}, got {value!r}")
        if isinstance(calibration_seed, bool) or not isinstance(calibration_seed, int):
            raise ValueError(f"data.calibration_seed must be an integer, got {calibration_seed!r}")
        self.save_hyperparameters()
        self.train_set = self.test_set = self.info = None
        self._calibration_set: CalibrationImages | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        hp = self.hparams
        self.train_set, self.test_set, self.info = build_datasets(
            hp.dataset, hp.data_dir, hp.download, hp.augment, synthetic_shape=hp.synthetic_shape, rgb=hp.rgb
        )
        location = self.info.location
        if location is not None and not Path(location).resolve().is_relative_to(Path(hp.data_dir).resolve()):
            rank_zero_info(f"data.data_dir {hp.data_dir!r} holds no {hp.dataset}: reading it from {location}")

    @property
    def calibration_set(self) -> CalibrationImages:
        """The unlabeled calibration subset, built on first use: dense training never needs it, so a
        training split smaller than ``calibration_size`` is an error for a repair run only."""
        if self._calibration_set is None:
            self.setup()
            hp = self.hparams
            plain_train = (
                build_datasets(
                    hp.dataset, hp.data_dir, False, augment=False, synthetic_shape=hp.synthetic_shape, rgb=hp.rgb
                )[0]
                if hp.augment
                else self.train_set
            )
            self._calibration_set = CalibrationImages(plain_train, hp.calibration_size, hp.calibration_seed)
        return self._calibration_set

    def _loader(self, dataset, shuffle: bool = False) -> DataLoader:
        hp = self.hparams
        return DataLoader(
            dataset, batch_size=hp.batch_size, shuffle=shuffle, num_workers=hp.num_workers,
            persistent_workers=hp.num_workers > 0, pin_memory=False,
        )  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.test_set)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set)

    def calibration_dataloader(self, rank: int = 0, world_size: int = 1) -> DataLoader:
        """Images only; this process's contiguous, non-padded shard of the calibration subset."""
        return self._loader(Subset(self.calibration_set, shard_indices(len(self.calibration_set), rank, world_size)))

    def calibration_batches(
        self, device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1,
        progress: Callable[[Iterable, str], Iterable] | None = None,
    ) -> list[torch.Tensor]:  # fmt: skip
        """This process's shard of the unlabeled calibration batches, on ``device``. A calibration set smaller than
        ``batch_size`` is one batch: the repair's statistics are sums over the whole set, whatever its batching."""
        self.setup("fit")
        if len(self.calibration_set) < world_size:
            raise ValueError(
                f"data.calibration_size={len(self.calibration_set)} is smaller than the number of processes"
            )
        loader = self.calibration_dataloader(rank, world_size)
        return [b.to(device) for b in (progress(loader, "calibration data") if progress else loader)]

    def evaluation_dataloader(self, rank: int = 0, world_size: int = 1, samples: int | None = None) -> DataLoader:
        """Labeled test images (the first ``samples`` only, if given); every sample is in exactly one process's shard
        (no padding)."""
        n = len(self.test_set) if samples is None else min(samples, len(self.test_set))
        return self._loader(Subset(self.test_set, shard_indices(n, rank, world_size)))
