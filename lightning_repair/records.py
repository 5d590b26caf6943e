"""The record of a run: one dict that ``metrics.json`` holds and a sweep's ``results.csv`` rows are cut from, the
state digest that identifies a repaired model, and the flat hyperparameters TensorBoard shows."""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .operators import Operator, describe
from .pipeline import PruneRepairResult
from .stats import world_size


def run_record(
    result: PruneRepairResult,
    dense_accuracy: dict,
    sparsity: float,
    allocation: str,
    recipe: list[Operator],
    timings: Mapping[str, float],
    calibration_samples: int,
    top5: bool = True,
) -> dict[str, Any]:
    """What a prune-and-repair run measured: top-1 (and top-5 if asked: it means something with more than 5
    classes) of the dense, pruned and repaired models, the sparsity reached, the allocation table, the timings in
    seconds, the digest of the repaired model, and what the ``search`` allocation did when it ran."""
    runs = {"dense": dense_accuracy, "pruned": result.pruned, "repaired": result.repaired}
    record: dict[str, Any] = {"accuracy": {k: v["top1"] for k, v in runs.items()}}
    if top5:
        record["accuracy_top5"] = {k: v["top5"] for k, v in runs.items()}
    record |= {
        "sparsity": {"target": sparsity, "achieved": result.achieved_sparsity},
        "allocation": allocation,
        "repair": describe(recipe),
        "layers": result.layers,
        "timings_s": dict(timings),
        "test_samples": result.repaired["samples"],
        "calibration_samples": calibration_samples,
        "state_sha256": replica_digest(result.model),
    }
    if result.search is not None:
        record["search"] = result.search
    return record


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a state_dict: names, dtypes, shapes and the bytes of every tensor, in order."""
    sha = hashlib.sha256()
    for key, tensor in state.items():
        t = tensor.detach().cpu().contiguous()
        sha.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        sha.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


def replica_digest(model: nn.Module) -> str:
    """``state_digest`` of the model, checked to be the same on every DDP process (RuntimeError if not)."""
    digest = state_digest(model.state_dict())
    if world_size() > 1:
        digests = [None] * world_size()
        dist.all_gather_object(digests, digest)
        differing = [rank for rank, d in enumerate(digests) if d != digests[0]]
        if differing:
            raise RuntimeError(
                f"processes {differing} hold a different repaired model than process 0: a calibration "
                "statistic or a repair step was not reduced across processes"
            )
    return digest


def init_args(module) -> dict[str, Any]:
    """A Lightning module's constructor arguments: its hparams without what LightningCLI adds (``_class_path``)."""
    parameters = inspect.signature(type(module)).parameters
    return {k: v for k, v in module.hparams.items() if k in parameters}


def run_hparams(record: dict) -> dict[str, int | float | str | bool]:
    """A run's hyperparameters, flat, for TensorBoard's hparams view: the module's config (``network.arch``,
    ``allocation.rr_power``, ...; lists as text) and the datamodule's (``data.calibration_size``, ...)."""
    flat = {"sparsity": record["sparsity"]["target"], "allocation": record["allocation"],
            "repair": str(record["config"]["repair"])}  # fmt: skip
    for key, value in (_flat(record["config"]) | _flat(record["data_config"], "data.")).items():
        flat.setdefault(key, value if isinstance(value, (int, float, str, bool)) else str(value))
    return flat


def _flat(obj, prefix: str = "") -> dict:
    if not isinstance(obj, dict):
        return {prefix.rstrip("."): obj}
    return {k: v for key, value in obj.items() for k, v in _flat(value, f"{prefix}{key}.").items()}


def plain(obj):
    """Hyperparameters as JSON-serialisable data."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if hasattr(obj, "__dataclass_fields__"):
        return plain({k: getattr(obj, k) for k in obj.__dataclass_fields__})
    return obj if isinstance(obj, (str, int, float, bool, type(None))) else str(obj)
