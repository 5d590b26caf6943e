"""LightningDataModules a user would bring, importable by class_path (``user_data.X``: tests/ is on the path)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset


class TensorData(pl.LightningDataModule):
    """Images and labels generated in memory, 3 x size x size: the contract of a datamodule of your own."""

    def __init__(self, size: int = 16, calibration: int = 64, test: int = 96, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str | None = None) -> None:
        g = torch.Generator().manual_seed(self.hparams.seed)
        n, size = self.hparams.calibration + self.hparams.test, self.hparams.size
        self.images = torch.randn(n, 3, size, size, generator=g)
        self.labels = torch.randint(0, 10, (n,), generator=g)

    def calibration_dataloader(self) -> DataLoader:  # images only: the repair uses no labels
        return DataLoader(self.images[: self.hparams.calibration], batch_size=32)

    def test_dataloader(self) -> DataLoader:
        k = self.hparams.calibration
        return DataLoader(TensorDataset(self.images[k:], self.labels[k:]), batch_size=32)


class LabeledCalibration(TensorData):
    """Breaks the contract: its calibration batches carry labels."""

    def calibration_dataloader(self) -> DataLoader:
        k = self.hparams.calibration
        return DataLoader(TensorDataset(self.images[:k], self.labels[:k]), batch_size=32)


class NoCalibration(pl.LightningDataModule):
    """Breaks the contract: no calibration loader."""

    def test_dataloader(self):
        return []
