"""Small idioms the package uses in several places, written once."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Run the block with ``models`` in eval mode (dropout off, BN on running statistics); their modes are restored
    on exit, also on error."""
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(models, modes, strict=True):
            m.train(mode)


@contextmanager
def timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Add the wall time of the block to ``timings[key]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - start


def is_real(value) -> bool:
    """An int or a float, not a bool (which Python counts as an int); NaN and infinities included."""
    return not isinstance(value, bool) and isinstance(value, (int, float))


def in_memory_format(model: nn.Module, memory_format: torch.memory_format | None) -> nn.Module:
    """``model`` itself when ``memory_format`` is None or every 4-d parameter and buffer is in it already, else a
    copy with them in it (``model`` is not changed)."""
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.dim() == 4]
    if memory_format is None or all(t.is_contiguous(memory_format=memory_format) for t in tensors):
        return model
    return copy.deepcopy(model).to(memory_format=memory_format)
