"""What depends only on the dense model and the data, computed once: a cache keyed by content digests.

The dense model's test accuracy depends on the checkpoint's content and the test set; its RR profile on the
checkpoint, the calibration set, the grid and ``rr_repair``; neither on the allocation, the sparsity or the repair.
``DigestCache`` keeps such values in a folder (a run's root: ``<logger root>/cache``, or a sweep's output folder),
one file per value, named by the SHA-256 of its key:

- the key (a JSON-able dict of digests and settings) is stored in the file and compared on every read: a file
  whose key, format or content does not match is ignored with a warning (and replaced once recomputed), never used;
- files are written atomically (a temporary file in the same folder, then ``os.replace``), so a reader sees a whole
  file or none, also when several processes (shards of a sweep) write the same value at once;
- under DDP, rank 0 reads and broadcasts what it read, so every rank takes the same branch (cached or computed)
  and runs the same collectives; only rank 0 writes.

Files are ``torch.save`` dicts of tensors and plain values, read with ``torch.load(weights_only=True)``: reading
runs no pickled code.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from . import __version__
from .records import state_digest
from .stats import rank, world_size

CACHE_FORMAT = 1


def _same(value: Any) -> Any:
    return value


def _plain_key(key: Mapping) -> dict:
    """The key as it reads back from a file (tuples as lists, other values as strings)."""
    return json.loads(json.dumps(key, sort_keys=True, default=str))


def dense_accuracy_key(digests: Mapping, dm, precision: str) -> dict:
    """The key of a dense model's test accuracy: the model's ``digests`` (content, architecture), the identity of
    the datamodule's test split (dataset and its options, the folder read, its files' sizes and times, its length)
    and the evaluation's precision."""
    hp, info = dm.hparams, dm.info
    location = None if info.location is None else str(Path(info.location).resolve())
    test_set = {"dataset": hp.dataset, "rgb": hp.rgb, "synthetic_shape": hp.synthetic_shape, "location": location,
                "files": files_fingerprint(location), "samples": len(dm.test_set)}  # fmt: skip
    return dict(digests) | {"test_set": test_set, "precision": precision, "version": __version__}


def key_digest(key: Mapping) -> str:
    """SHA-256 of a JSON-able key, independent of its dicts' order."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def model_digest(model: nn.Module) -> str:
    """The content digest of a model: every parameter and buffer, with names, dtypes and shapes."""
    return state_digest(model.state_dict())


def batches_digest(batches: Iterable[torch.Tensor]) -> str:
    """The content digest of a calibration set given as this process's contiguous shard of batches: every image's
    bytes, dtype and shape, in order, over all processes. The same on 1 or N processes however it is batched."""
    images = []
    for batch in batches:
        t = batch.detach().cpu().contiguous()
        for image in t:
            header = f"{image.dtype}:{tuple(image.shape)};".encode()
            images.append(hashlib.sha256(header + image.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest())
    if world_size() > 1:
        shards: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(shards, images)
        images = [d for shard in shards for d in shard]  # rank order: the shards are contiguous
    return hashlib.sha256("".join(images).encode()).hexdigest()


def files_fingerprint(location: str | None) -> str | None:
    """Relative path, size and modification time of every file under ``location`` (a folder or a file), as a digest:
    the identity of a dataset on disk without reading it. None for a generated dataset (no location)."""
    if location is None:
        return None
    root = Path(location)
    sha = hashlib.sha256()
    paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for path in paths:
        stat = path.stat()
        sha.update(
            f"{path.relative_to(root) if path != root else path.name}:{stat.st_size}:{stat.st_mtime_ns};".encode()
        )
    return sha.hexdigest()


class DigestCache:
    """Values keyed by content digests, in ``directory`` (None: no cache, every value is computed)."""

    def __init__(self, directory: str | Path | None, log: Callable[[str], None] | None = None):
        self.directory = None if directory is None else Path(directory)
        self.log = log or (lambda message: None)

    def path(self, kind: str, key: Mapping) -> Path:
        return self.directory / f"{kind}-{key_digest(key)[:24]}.pt"

    def get(self, kind: str, key: Mapping, what: str, decode: Callable[[Any], Any] = _same) -> Any | None:
        """The cached value of ``kind`` for ``key`` (the same on every rank), or None; says so in one log line when
        it is reused (``what`` names it). ``decode`` rebuilds the value from its plain form, raising if invalid."""
        if self.directory is None:
            return None
        key = _plain_key(key)
        value = self._broadcast(self._read(kind, key, decode) if rank() == 0 else None)
        if value is not None:
            self.log(f"reusing {what} from {self.path(kind, key)}: same {', '.join(key)}")
        return value

    def put(self, kind: str, key: Mapping, value: Any, encode: Callable[[Any], Any] = _same) -> None:
        """Store ``value`` (made plain by ``encode``: tensors, numbers, strings, lists, dicts); rank 0 writes."""
        if self.directory is not None and rank() == 0:
            self._write(kind, _plain_key(key), encode(value))

    def get_or_compute(
        self, kind: str, key: Mapping, compute: Callable[[], Any], what: str,
        encode: Callable[[Any], Any] = _same, decode: Callable[[Any], Any] = _same,
    ) -> tuple[Any, bool]:  # fmt: skip
        """The cached value (``get``) or ``compute()``, stored for next time (``put``); and whether it was reused."""
        value = self.get(kind, key, what, decode)
        if value is not None:
            return value, True
        value = compute()
        self.put(kind, key, value, encode)
        return value, False

    def _read(self, kind: str, key: Mapping, decode: Callable[[Any], Any]) -> Any | None:
        path = self.path(kind, key)
        if not path.exists():
            return None
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(stored, dict) or stored.get("format") != CACHE_FORMAT or stored.get("kind") != kind:
                raise ValueError("not a cache file of this kind and format")
            if stored.get("key") != key:
                raise ValueError("its key differs from this run's")
            return decode(stored["value"])
        except Exception as err:  # noqa: BLE001 - any unreadable file is ignored, never used
            warnings.warn(f"ignoring cache file {path}: {err}; recomputing it", stacklevel=3)
            return None

    def _write(self, kind: str, key: Mapping, value: Any) -> None:
        path = self.path(kind, key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as handle:
                    torch.save({"format": CACHE_FORMAT, "kind": kind, "key": key, "value": value}, handle)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as err:  # a read-only or full disk costs the next run time, not this run's result
            warnings.warn(f"could not write cache file {path}: {err}", stacklevel=3)

    @staticmethod
    def _broadcast(value: Any) -> Any:
        if not world_size() > 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


# -- the RR profile as a cache value (plain dict of tensors and lists)


def profile_codec() -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    """(encode, decode) of an RR profile for ``DigestCache``."""
    return profile_to_value, profile_from_value


def profile_to_value(profile) -> dict:
    """The grid part of an RR profile (what the key determines; a run's own keep counts are not cached)."""
    return {f.name: getattr(profile, f.name) for f in fields(profile)} | dict.fromkeys(("keep", "keep_d_raw",
                                                                                       "keep_d_res"))  # fmt: skip


def profile_from_value(value: dict):
    from .diagnostics import RRProfile

    profile = RRProfile(**value)
    if not isinstance(profile.d_raw, torch.Tensor) or profile.d_raw.shape != (len(profile.layers), len(profile.grid)):
        raise ValueError("a cached RR profile's tensors do not match its layers and grid")
    return profile
