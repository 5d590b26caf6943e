"""Small idioms the package uses in several places, written once."""

from __future__ import annotations

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


class InMemoryFormat:
    """``with InMemoryFormat(memory_format, *models):`` runs the block with every 4-d parameter and buffer of
    ``models`` in ``memory_format`` (nothing changes when it is None), without copying the modules: each tensor's
    ``.data`` is swapped for a copy, the 4-d ones in that format.

    Invariant: on exit every tensor gets its own storage back (the same object, storage and data pointer, so what
    is keyed on them stays valid); where the block changed it in place (its version counter moved), the new values
    are copied into that storage. On an exception, or after ``undo()``, the block's changes are dropped instead, so
    the models are exactly as they were: every tensor is swapped, not only the 4-d ones, for that."""

    def __init__(self, memory_format: torch.memory_format | None, *models: nn.Module):
        self.memory_format, self.models = memory_format, models
        self.swapped: list[tuple[torch.Tensor, torch.Tensor, int]] = []  # (tensor, its own data, version in)
        self.changed = False  # whether any tensor's format changed

    def __enter__(self) -> InMemoryFormat:
        if self.memory_format is None:
            return self
        tensors = {id(t): t for model in self.models for t in (*model.parameters(), *model.buffers())}
        for t in tensors.values():
            own = t.data
            t.data = own.clone(memory_format=self.memory_format) if t.dim() == 4 else own.clone()
            self.swapped.append((t, own, t._version))
            self.changed |= t.dim() == 4 and not own.is_contiguous(memory_format=self.memory_format)
        return self

    def __exit__(self, kind, *_) -> None:
        with torch.no_grad():
            for t, own, version in self.swapped:
                if kind is None and t._version != version:
                    own.copy_(t.data)
                t.data = own
        self.swapped = []

    def undo(self) -> None:
        """Give every tensor its own data back now, dropping the block's changes."""
        self.__exit__(RuntimeError)


def is_layout_error(error: BaseException) -> bool:
    """Whether ``error`` is a forward's refusal of a memory format: a ``.view`` the strides do not allow, or an op
    that needs contiguous tensors (what running a model channels-last can raise, and nothing else should)."""
    message = str(error)
    return isinstance(error, RuntimeError) and ("view size is not compatible" in message or "contiguous" in message)
