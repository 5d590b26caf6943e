"""Writing results: atomic files, dense-shaped and compact sparse checkpoints.

Every file is written to a temporary name in the same folder and renamed into place, so
an interrupted run leaves either the previous file or the complete new one, never a part.

Loading an exported model into its architecture (the run's ``model.network``)::

    model = Network(arch="resnet18", num_classes=10, in_channels=1, stem="cifar", width=0.25).build()
    load_weights(model, "repaired.pt")                      # dense-shaped state_dict
    load_weights(model, load_sparse("repaired.sparse.pt"))  # compact: kept values + packed masks
    # or load_weights(model, load_exported(path)) for either; inputs normalised as in data.DATASETS
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

from .models import CheckpointMismatchError

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


def load_sparse(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a compact sparse file (``weights_only=True``) as a dense-shaped state_dict."""
    return dense_from_sparse(_safe_load(path, "sparse checkpoint"))


def load_exported(path: str | Path) -> dict[str, torch.Tensor]:
    """Either file ``export`` writes (or any plain state_dict), as a dense-shaped state_dict."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    state = _safe_load(path, "model file")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointMismatchError(f"{path} holds no state_dict of tensors")
    return dense_from_sparse(state)


def export(model: nn.Module, masks: dict[str, torch.Tensor], folder: str | Path, stem: str = "repaired") -> dict:
    """Write ``<stem>.pt`` (dense-shaped state_dict) and ``<stem>.sparse.pt``; return their paths and sizes on
    disk in bytes (``dense_bytes``, ``sparse_bytes``) and ``ratio`` = sparse / dense."""
    folder = Path(folder)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    dense_path = atomic_torch_save(folder / f"{stem}.pt", state)
    sparse_path = atomic_torch_save(folder / f"{stem}.sparse.pt", sparse_state(model, masks))
    dense_bytes, sparse_bytes = dense_path.stat().st_size, sparse_path.stat().st_size
    return {"state_dict": str(dense_path), "sparse": str(sparse_path), "dense_bytes": dense_bytes,
            "sparse_bytes": sparse_bytes, "ratio": sparse_bytes / dense_bytes}  # fmt: skip
