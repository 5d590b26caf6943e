"""The ``lightning-repair`` console script: one LightningCLI, model chosen by class_path."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI

from .datamodule import ImageDataModule


def main(args: list[str] | None = None) -> None:
    LightningCLI(
        pl.LightningModule,
        ImageDataModule,
        subclass_mode_model=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
