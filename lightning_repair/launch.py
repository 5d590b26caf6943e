"""Running work outside ``Trainer.fit`` on every process of the trainer's strategy (``lightning-repair evaluate``,
``lightning-repair-sweep``), started the way ``fit`` starts them, and the test-set limit of ``--trainer``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import lightning.pytorch as pl
import torch.distributed as dist
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from lightning.pytorch.trainer.connectors.signal_connector import _get_sigkill_signal

T = TypeVar("T")


def on_every_process(trainer: pl.Trainer, work: Callable[[], T]) -> T:
    """``work()`` on every process of ``trainer.strategy``, each joined to the process group as in ``Trainer.fit``.

    Under ``--trainer.devices N --trainer.strategy ddp`` Lightning's launcher starts processes 1..N-1 by re-running
    the command; under torchrun or SLURM's srun those started every process and Lightning starts none. On one
    device there is no launcher and no process group. ``trainer.global_rank`` and ``trainer.world_size`` are valid
    inside ``work``. If this process fails, the processes it started are killed (they would wait in a collective).
    """
    strategy = trainer.strategy

    def body() -> T:
        strategy.setup_environment()  # DDP: init_process_group (gloo on CPU, NCCL on GPUs)
        try:
            return work()
        finally:
            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()

    launcher = strategy.launcher
    if launcher is None:
        return body()
    try:
        return launcher.launch(body, trainer=trainer)
    except BaseException:
        if isinstance(launcher, _SubprocessScriptLauncher):
            launcher.kill(_get_sigkill_signal())
        raise


def limited_test_size(trainer: pl.Trainer, size: int, batch_size: int) -> int:
    """How many test images ``--trainer.limit_test_batches`` selects, from the start of the test set, whatever the
    number of processes: all ``size`` (the default 1.0), the first ``n * batch_size`` for an integer n, the first
    ``int(f * size)`` for a fraction f. ValueError if that is no image."""
    limit = trainer.limit_test_batches
    if limit is None or (isinstance(limit, float) and limit >= 1.0):
        return size
    n = min(size, limit * batch_size) if isinstance(limit, int) else int(limit * size)
    if n <= 0:
        raise ValueError(f"trainer.limit_test_batches={limit} selects no test image (of {size})")
    return n
