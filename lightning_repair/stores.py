"""Where a repair walk keeps the per-chunk activations of graph nodes: on the models' device, in host memory or on disk.

The walk (repair.py) stores each node's output chunk by chunk as it is computed and frees it when no later node reads
it. Every store gives back exactly what was stored (same values, dtype and layout), so the repaired model does not
depend on the store.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.fx as fx

Activations = Literal["device", "host", "disk"]


class ActivationStore:
    """The per-chunk activations of graph nodes, kept on the models' device (``activations: device``).

    ``store[node] = chunks`` stores the chunks one by one as the iterable yields them; ``store[node]`` iterates
    over them (as often as asked), each brought to the device as it is reached. Subclasses keep them elsewhere.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.chunks: dict[fx.Node, list] = {}

    def __setitem__(self, node: fx.Node, chunks: Iterable) -> None:
        stored = [self._put(chunk) for chunk in chunks]
        for old in self.chunks.get(node, ()):  # only now: the new chunks may be computed from the old ones
            self._drop(old)
        self.chunks[node] = stored

    def __getitem__(self, node: fx.Node) -> Iterable:
        return _Chunks(self, node)

    def replace(self, node: fx.Node, index: int, value) -> None:
        old, self.chunks[node][index] = self.chunks[node][index], self._put(value)
        self._drop(old)

    def pop(self, node: fx.Node) -> None:
        for old in self.chunks.pop(node):
            self._drop(old)

    def _put(self, value):
        return value

    def _load(self, stored):
        return stored

    def _drop(self, stored) -> None:
        return None


@dataclass
class _Chunks:
    store: ActivationStore
    node: fx.Node

    def __iter__(self) -> Iterator:
        return map(self.store._load, self.store.chunks[self.node])


class HostStore(ActivationStore):
    """In host memory, pinned when the device is a GPU (faster copies), a chunk on the device only while read."""

    def _put(self, value):
        return _map_tensors(value, self._to_host)

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to("cpu")  # the tensor itself on a CPU device: nothing is copied
        return t.pin_memory() if self.device.type == "cuda" else t

    def _load(self, stored):
        return _map_tensors(stored, lambda t: t.to(self.device, non_blocking=True))


class DiskStore(ActivationStore):
    """In a temporary directory, one file per node and chunk, deleted as soon as no later node reads it.

    torch.save / torch.load(weights_only=True): loading runs no pickled code, and the files keep any node value
    (a tensor with its dtype, strides and memory format, tuples of tensors, sizes) exactly. A view is saved with
    its whole storage (exact, and rare in CNNs).
    """

    def __init__(self, device: torch.device, directory: str):
        super().__init__(device)
        self.directory = Path(tempfile.mkdtemp(dir=directory))  # one per store: file names restart at 0
        self.serial = 0

    def _put(self, value) -> Path:
        path, self.serial = self.directory / f"{self.serial}.pt", self.serial + 1
        torch.save(value, path)
        return path

    def _load(self, path: Path):
        return torch.load(path, map_location=self.device, weights_only=True)

    def _drop(self, path: Path) -> None:
        path.unlink()


STORES: dict[str, type[ActivationStore]] = {"device": ActivationStore, "host": HostStore, "disk": DiskStore}


@contextmanager
def store_factory(activations: Activations, device: torch.device) -> Iterator[Callable[[], ActivationStore]]:
    """Makes the walks' stores; the disk stores' directory is deleted on exit, also on error."""
    if activations != "disk":
        yield lambda: STORES[activations](device)
        return
    with tempfile.TemporaryDirectory(prefix="lightning-repair-") as directory:
        yield lambda: DiskStore(device, directory)


def _map_tensors(value, fn: Callable[[torch.Tensor], torch.Tensor]):
    """A node's value (a tensor, tuples or lists of them, anything else) with ``fn`` applied to every tensor."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if type(value) in (tuple, list):
        return type(value)(_map_tensors(v, fn) for v in value)
    return value
