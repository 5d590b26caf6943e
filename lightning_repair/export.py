"""Writing results: atomic files, dense-shaped and compact sparse checkpoints.

Every file is written to a temporary name in the same folder and renamed into place, so
an interrupted run leaves either the previous file or the complete new one, never a part.

Both files are ``torch.save`` dicts of plain data, read with ``torch.load(path, weights_only=True)``::

    {"state_dict": {name: tensor, ...},       # repaired.pt: the dense-shaped weights, pruned ones stored as zeros
     "lightning_repair": {"format": 1,        # what the checkpoint is (models.checkpoint_metadata)
                          "network": {"arch": "resnet18", ...} or {"class_path": ..., "init_args": {...}},
                          "input": {"dataset": ..., "channels": 1, "image_size": 28, "mean": [...], "std": [...]}}}

``repaired.sparse.pt`` holds the same, with each pruned weight ``W`` stored as three entries: ``W::values`` (the
kept values, in row-major order), ``W::mask`` (uint8, the mask bit-packed 8 per byte, little-endian bit order) and
``W::shape`` (int64). ``load(path)`` gives the model ready to use::

    model, normalize = lightning_repair.load("repaired.pt")   # or repaired.sparse.pt; in eval mode
    logits = model(normalize(images))                         # images: float in [0, 1], (N, C, H, W)

and ``load_weights(model, load_exported(path))`` loads either file into a model built otherwise.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import tempfile
from pathlib import Path

import torch
from torch import nn

from .models import (
    METADATA_KEY,
    CheckpointMismatchError,
    build_network,
    check_recorded_network,
    check_running_stats,
    load_weights,
)

_UMASK = os.umask(0)
os.umask(_UMASK)  # read the process umask once: os.umask can only read it by setting it
_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp's 0600 would hide results from the rest of a cluster group
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | Path, obj) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, allow_nan=False) + "\n").encode())


def atomic_torch_save(path: str | Path, obj) -> Path:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Boolean tensor -> uint8 bytes, 8 entries per byte (little-endian bit order)."""
    flat = mask.detach().flatten().cpu().to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros(-len(flat) % 8)])
    return (flat.view(-1, 8) * _BITS).sum(1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    n = int(torch.tensor(shape).prod()) if shape else 1
    bits = (packed.view(-1, 1) & _BITS) != 0
    return bits.flatten()[:n].view(shape)


def sparse_state(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Compact form: masked weights as kept values plus packed masks; all else as is."""
    state = {}
    for key, tensor in model.state_dict().items():
        layer = key.removesuffix(".weight")
        if key.endswith(".weight") and layer in masks:
            mask = masks[layer].to(tensor.device, torch.bool)
            state[f"{key}::values"] = tensor[mask].cpu()
            state[f"{key}::mask"] = pack_mask(mask)
            state[f"{key}::shape"] = torch.tensor(tensor.shape, dtype=torch.long)
        else:
            state[key] = tensor.cpu()
    return state


def dense_from_sparse(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Invert ``sparse_state``: a dense-shaped state_dict for the plain architecture."""
    out = {}
    for key, tensor in state.items():
        if key.endswith("::values"):
            name = key.removesuffix("::values")
            missing = [part for part in ("shape", "mask") if f"{name}::{part}" not in state]
            if missing:
                raise CheckpointMismatchError(f"sparse entry {name}: no {' or '.join(missing)} stored with its values")
            shape = tuple(state[f"{name}::shape"].tolist())
            packed = state[f"{name}::mask"]
            if packed.dtype != torch.uint8 or packed.numel() != -(-math.prod(shape) // 8):
                raise CheckpointMismatchError(
                    f"sparse entry {name}: packed mask ({packed.numel()} x {packed.dtype}) does not fit shape {shape}"
                )
            mask = unpack_mask(packed, shape)
            if int(mask.sum()) != tensor.numel():
                raise CheckpointMismatchError(f"sparse entry {name}: mask keeps {int(mask.sum())} of {tensor.numel()}")
            dense = tensor.new_zeros(shape)
            dense[mask] = tensor
            out[name] = dense
        elif "::" not in key:
            out[key] = tensor
    return out


def unpickling_reason(err: BaseException) -> str:
    """Why ``torch.load(..., weights_only=True)`` refused a file, without torch's advice to load it with
    ``weights_only=False``, which would run whatever code the file holds."""
    lines = [line.strip() for line in str(err).splitlines()]
    reasons = [
        line.removeprefix("WeightsUnpickler error: ").split(" Please use")[0]  # not the advice to allowlist it
        for line in lines
        if line and "weights_only" not in line and not line.startswith("Weights only load failed")
    ]
    return " ".join(reasons) or "it holds objects that only a full unpickler, which can run code, would load"


def _safe_load(path: str | Path, what: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointMismatchError(f"refused to read {what} {path}: {unpickling_reason(err)}") from err
    except Exception as err:
        raise CheckpointMismatchError(f"cannot read {what} {path}: {err}") from err


def _read(path: str | Path, what: str) -> tuple[dict[str, torch.Tensor], dict | None]:
    """A file's state_dict (as stored: sparse entries kept) and its metadata (None for a bare state_dict)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    obj = _safe_load(path, what)
    metadata = None
    if isinstance(obj, dict) and "state_dict" in obj:
        metadata, obj = obj.get(METADATA_KEY), obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointMismatchError(f"{path} holds no state_dict of tensors")
    if obj and all(k.startswith("model.") for k in obj):  # a Lightning checkpoint
        obj = {k.removeprefix("model."): v for k, v in obj.items()}
    return obj, metadata


def load_sparse(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a compact sparse file (``weights_only=True``) as a dense-shaped state_dict."""
    return dense_from_sparse(_read(path, "sparse checkpoint")[0])


def load_exported(path: str | Path) -> dict[str, torch.Tensor]:
    """Either file ``export`` writes (or any plain state_dict), as a dense-shaped state_dict."""
    return dense_from_sparse(_read(path, "model file")[0])


def read_metadata(path: str | Path) -> dict | None:
    """What a checkpoint records about itself (``models.checkpoint_metadata``), or None for a bare state_dict."""
    return _read(path, "model file")[1]


class Normalize:
    """The input transform a checkpoint records: images as floats in [0, 1], (N, C, H, W) or (C, H, W); a
    single-channel image is repeated for a 3-channel model; then (x - mean) / std per channel. ``mean``, ``std``,
    ``channels`` and ``image_size`` are the recorded values (the image size the model was trained at)."""

    def __init__(self, mean: list[float], std: list[float], channels: int, image_size: int | None = None):
        self.mean, self.std, self.channels, self.image_size = list(mean), list(std), channels, image_size

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        axis = images.dim() - 3
        if images.shape[axis] == 1 and self.channels == 3:
            images = images.repeat_interleave(3, dim=axis)
        shape = [-1, 1, 1]
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device).view(shape)
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device).view(shape)
        return (images - mean) / std

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std}, channels={self.channels}, image_size={self.image_size})"


def load(path: str | Path, network=None) -> tuple[nn.Module, Normalize | None]:
    """The model a checkpoint holds, built from the network it records and in eval mode, and the normalisation to
    apply to its inputs (None when the file does not record it). Reads ``repaired.pt``, ``repaired.sparse.pt``, the
    shipped checkpoints and Lightning checkpoints of dense training (``weights_only=True``: no code is run). A bare
    state_dict needs ``network`` (a spec as in ``model.network``); a given one must agree with a recorded one."""
    state, metadata = _read(path, "model file")
    recorded = (metadata or {}).get("network")
    if network is None and recorded is None:
        raise CheckpointMismatchError(f"{path} records no network (a bare state_dict): pass network=")
    if network is not None:
        check_recorded_network(network, recorded, path, what="network=")
    model = build_network(network if network is not None else recorded)
    check_running_stats(model)
    load_weights(model, dense_from_sparse(state))
    data = (metadata or {}).get("input")
    normalize = Normalize(data["mean"], data["std"], data["channels"], data.get("image_size")) if data else None
    return model.eval(), normalize


def export(model: nn.Module, masks: dict[str, torch.Tensor], folder: str | Path, stem: str = "repaired",
           metadata: dict | None = None) -> dict:  # fmt: skip
    """Write ``<stem>.pt`` (dense-shaped state_dict) and ``<stem>.sparse.pt``; return their paths and sizes on
    disk in bytes (``dense_bytes``, ``sparse_bytes``) and ``ratio`` = sparse / dense. With ``metadata``
    (``models.checkpoint_metadata``), each file is ``{"state_dict": ..., "lightning_repair": metadata}``; without,
    a bare state_dict."""
    folder = Path(folder)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    wrap = (lambda s: s) if metadata is None else (lambda s: {"state_dict": s, METADATA_KEY: metadata})  # noqa: E731
    dense_path = atomic_torch_save(folder / f"{stem}.pt", wrap(state))
    sparse_path = atomic_torch_save(folder / f"{stem}.sparse.pt", wrap(sparse_state(model, masks)))
    dense_bytes, sparse_bytes = dense_path.stat().st_size, sparse_path.stat().st_size
    return {"state_dict": str(dense_path), "sparse": str(sparse_path), "dense_bytes": dense_bytes,
            "sparse_bytes": sparse_bytes, "ratio": sparse_bytes / dense_bytes}  # fmt: skip
