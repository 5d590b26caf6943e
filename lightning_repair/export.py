"""Writing results: atomic files, dense-shaped and compact sparse checkpoints.

Every file is written to a temporary name in the same folder and renamed into place, so
an interrupted run leaves either the previous file or the complete new one, never a part.
"""

from __future__ import annotations

import io
import json
import math
import os
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


def load_sparse(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a compact sparse file (``weights_only=True``) as a dense-shaped state_dict."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointMismatchError(f"cannot read sparse checkpoint {path} safely: {err}") from err
    return dense_from_sparse(state)


def size_report(state: dict[str, torch.Tensor], sparse: dict[str, torch.Tensor]) -> dict[str, int | float]:
    """Bytes of the dense-shaped tensors against the compact sparse tensors."""
    dense_bytes = sum(t.numel() * t.element_size() for t in state.values())
    sparse_bytes = sum(t.numel() * t.element_size() for t in sparse.values())
    return {"dense_bytes": dense_bytes, "sparse_bytes": sparse_bytes, "ratio": sparse_bytes / max(dense_bytes, 1)}


def export(model: nn.Module, masks: dict[str, torch.Tensor], folder: str | Path, stem: str = "repaired") -> dict:
    """Write ``<stem>.pt`` (dense-shaped state_dict) and ``<stem>.sparse.pt``; return paths and sizes."""
    folder = Path(folder)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    sparse = sparse_state(model, masks)
    dense_path = atomic_torch_save(folder / f"{stem}.pt", state)
    sparse_path = atomic_torch_save(folder / f"{stem}.sparse.pt", sparse)
    return {"state_dict": str(dense_path), "sparse": str(sparse_path), **size_report(state, sparse)}
