"""The ``lightning-repair`` console script: one LightningCLI, model chosen by class_path."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI

from .datamodule import ImageDataModule


def build_cli(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Parse ``args`` (default: the command line) and run the subcommand; with ``run=False`` there
    is no subcommand and the returned CLI holds the configured ``trainer``, ``model`` and ``datamodule``."""
    return LightningCLI(
        pl.LightningModule,
        ImageDataModule,
        subclass_mode_model=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> None:
    """The console script. Returns None: a console script's return value becomes its exit status."""
    build_cli(args)


if __name__ == "__main__":
    main()
