"""LightningDataModule: labeled train/test loaders and the unlabeled calibration loader."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import SimpleNamespace

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
        image_size: imagefolder/imagenette: the side of the square the model sees: the training images' random crop,
            the test and calibration images' center crop (default ImageNet's 224).
        resize: imagefolder/imagenette: the shorter side test and calibration images are resized to before the
            center crop (default image_size * 8 / 7: ImageNet's 256 for 224).
        mean: imagefolder/imagenette: per-channel mean of the normalisation (default ImageNet's).
        std: imagefolder/imagenette: per-channel standard deviation of the normalisation (default ImageNet's).
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
        image_size: PositiveInt | None = None,
        resize: PositiveInt | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
    ):
        super().__init__()
        image = {"image_size": image_size, "resize": resize, "mean": mean, "std": std}
        given = [k for k, v in image.items() if v is not None]
        if given and dataset not in ("imagefolder", "imagenette"):
            raise ValueError(f"data.{given[0]} applies to imagefolder and imagenette only, not {dataset!r}")
        for field in ("mean", "std"):
            if image[field] is not None and len(image[field]) != 3:
                raise ValueError(f"data.{field} needs one value per channel (3), got {list(image[field])}")
        if std is not None and min(std) <= 0:
            raise ValueError(f"data.std must be positive, got {list(std)}")
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
        self._plain_train_set = None

    @property
    def _image(self) -> dict:
        return {k: self.hparams.get(k) for k in ("image_size", "resize", "mean", "std")}

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        hp = self.hparams
        self.train_set, self.test_set, self.info = build_datasets(
            hp.dataset, hp.data_dir, hp.download, hp.augment, synthetic_shape=hp.synthetic_shape, rgb=hp.rgb,
            image=self._image,
        )
        location = self.info.location
        if location is not None and not Path(location).resolve().is_relative_to(Path(hp.data_dir).resolve()):
            rank_zero_info(f"data.data_dir {hp.data_dir!r} holds no {hp.dataset}: reading it from {location}")

    @property
    def calibration_set(self) -> CalibrationImages:
        """The unlabeled calibration subset, built on first use: dense training never needs it, so a
        training split smaller than ``calibration_size`` is an error for a repair run only."""
        if self._calibration_set is None:
            hp = self.hparams
            self._calibration_set = CalibrationImages(self._plain_train(), hp.calibration_size, hp.calibration_seed)
        return self._calibration_set

    def held_out_set(self, size: int) -> CalibrationImages:
        """``size`` unlabeled training images outside the calibration subset: the next ``size`` of its seed's
        permutation (the ``search`` allocation scores its candidates on them)."""
        hp = self.hparams
        try:
            return CalibrationImages(self._plain_train(), size, hp.calibration_seed, skip=hp.calibration_size)
        except ValueError as err:
            raise ValueError(f"data: {err}: lower model.allocation.search.held_out_images or data.calibration_size") \
                from None

    def _plain_train(self):
        """The training split without augmentation, as the repair sees it."""
        self.setup()
        hp = self.hparams
        if not hp.augment:
            return self.train_set
        if self._plain_train_set is None:
            self._plain_train_set = build_datasets(
                hp.dataset, hp.data_dir, False, augment=False, synthetic_shape=hp.synthetic_shape, rgb=hp.rgb,
                image=self._image,
            )[0]  # fmt: skip
        return self._plain_train_set

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

    def held_out_batches(self, size: int, device: torch.device | str = "cpu", rank: int = 0,
                         world_size: int = 1) -> list[torch.Tensor]:  # fmt: skip
        """This process's shard of ``held_out_set(size)``, batched as the calibration images, on ``device``."""
        images = self.held_out_set(size)
        return [b.to(device) for b in self._loader(Subset(images, shard_indices(len(images), rank, world_size)))]

    def evaluation_dataloader(self, rank: int = 0, world_size: int = 1, samples: int | None = None) -> DataLoader:
        """Labeled test images (the first ``samples`` only, if given); every sample is in exactly one process's shard
        (no padding)."""
        n = len(self.test_set) if samples is None else min(samples, len(self.test_set))
        return self._loader(Subset(self.test_set, shard_indices(n, rank, world_size)))


# ----------------------------------------------------------------------------- your own LightningDataModule

CONTRACT = (
    "a LightningDataModule of your own (data: {class_path: ..., init_args: ...}) defines calibration_dataloader(), "
    "batches of unlabeled image tensors (N, C, H, W), and test_dataloader(), batches of (images, labels) with "
    "integer class labels; both normalised as the model was trained"
)


class UserDataModule:
    """A user's LightningDataModule as the pipeline reads it, checked against ``CONTRACT``: the calibration
    batches (images only, no labels: the repair uses none) and the labeled test batches. Runs in one process; the
    input normalisation is the datamodule's own business (no ``info``: the exported files record none)."""

    def __init__(self, dm: pl.LightningDataModule):
        name = type(dm).__qualname__
        missing = [m for m in ("calibration_dataloader", "test_dataloader") if not callable(getattr(dm, m, None))]
        if missing:
            raise TypeError(f"data: {name} has no {' and no '.join(f'{m}()' for m in missing)}: {CONTRACT}")
        self.dm, self.name = dm, name
        self.info = None
        self.hparams = SimpleNamespace(dataset=f"{type(dm).__module__}.{name}")

    def setup(self, stage: str | None = None) -> None:
        """Lightning has set the datamodule up for ``fit`` already."""

    def calibration_dataloader(self, rank: int = 0, world_size: int = 1):
        self._one_process(world_size)
        return self.dm.calibration_dataloader()

    def calibration_batches(
        self, device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1,
        progress: Callable[[Iterable, str], Iterable] | None = None,
    ) -> list[torch.Tensor]:  # fmt: skip
        loader = self.calibration_dataloader(rank, world_size)
        batches = []
        for i, batch in enumerate(progress(loader, "calibration data") if progress else loader):
            if not (isinstance(batch, torch.Tensor) and batch.dim() == 4 and batch.is_floating_point()):
                raise TypeError(f"data: {self.name}.calibration_dataloader() gave {describe(batch)} as batch {i}: "
                                f"{CONTRACT}")  # fmt: skip
            batches.append(batch.to(device))
        if not batches:
            raise ValueError(f"data: {self.name}.calibration_dataloader() gave no batch")
        return batches

    def held_out_batches(self, size: int, device: torch.device | str = "cpu", rank: int = 0,
                         world_size: int = 1) -> list[torch.Tensor]:  # fmt: skip
        raise ValueError(
            f"data: {self.name} has no images outside its calibration set for allocation search to score its "
            "candidates on: set model.allocation.search.held_out_images: 0 to score them on the calibration images"
        )

    def evaluation_dataloader(self, rank: int = 0, world_size: int = 1) -> Iterable:
        self._one_process(world_size)
        return _checked_test_batches(self.dm.test_dataloader(), self.name)

    def _one_process(self, world_size: int) -> None:
        if world_size > 1:
            raise ValueError(f"data: {self.name} is not sharded across processes: run it with trainer.devices: 1")


def _checked_test_batches(loader: Iterable, name: str) -> Iterator:
    for i, batch in enumerate(loader):
        images, labels = batch if isinstance(batch, (tuple, list)) and len(batch) == 2 else (batch, None)
        if not (isinstance(images, torch.Tensor) and images.dim() == 4 and isinstance(labels, torch.Tensor)
                and labels.dim() == 1 and not labels.is_floating_point() and len(labels) == len(images)):
            raise TypeError(f"data: {name}.test_dataloader() gave {describe(batch)} as batch {i}: {CONTRACT}")
        yield images, labels


def describe(value) -> str:
    """A batch's structure, e.g. ``(Tensor(32, 3, 16, 16), Tensor(32,))``."""
    if isinstance(value, torch.Tensor):
        return f"Tensor{tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(describe(v) for v in value) + ")"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {describe(v)}" for k, v in value.items()) + "}"
    return type(value).__name__


def pipeline_data(dm: pl.LightningDataModule | None) -> ImageDataModule | UserDataModule:
    """The datamodule as the pipeline reads it: an ImageDataModule as it is, any other one checked (``CONTRACT``)."""
    if dm is None:
        raise TypeError(
            f"PruneRepairModule needs data: the built-in ImageDataModule (data: {{dataset: ...}}) or {CONTRACT}"
        )
    return dm if isinstance(dm, ImageDataModule) else UserDataModule(dm)


def data_config(dm) -> dict:
    """The data's config, as metrics.json records it: ImageDataModule's arguments, or a datamodule's class_path and
    the init_args it saved (``save_hyperparameters``)."""
    module = dm.dm if isinstance(dm, UserDataModule) else dm
    parameters = inspect.signature(type(module)).parameters
    saved = {k: v for k, v in (getattr(module, "hparams", None) or {}).items() if k in parameters}
    return {"class_path": dm.hparams.dataset, "init_args": saved} if isinstance(dm, UserDataModule) else saved
