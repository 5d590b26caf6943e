"""lightning-repair: training-free, label-free repair of highly sparse CNNs.

The core is plain PyTorch and imports without Lightning::

    import lightning_repair as lr
    keep = lr.allocate(model, 0.95, "lamp")
    result = lr.prune_and_repair(model, calibration_batches, sparsity=0.95, allocation="lamp", repair="default")

The Lightning shell (``PruneRepairModule``, ``ImageDataModule``, ``DenseClassifier``) loads on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module that defines it; each module is imported on first access, so that importing the core
# never pays for Lightning, jsonargparse or matplotlib
_EXPORTS = {
    "allocate": "allocation",
    "Allocation": "allocation",
    "ALLOCATIONS": "allocation",
    "repair": "repair",
    "RepairReport": "repair",
    "PRESETS": "operators",
    "OPERATORS": "operators",
    "Operator": "operators",
    "prune_and_repair": "pipeline",
    "PruneRepairResult": "pipeline",
    "rr_profile": "diagnostics",
    "evaluate": "evaluation",
    "Network": "models",
    "build_network": "models",
    "load_weights": "models",
    "load_dense": "models",
    "export": "export",
    "load": "export",
    "PruneRepairModule": "module",
    "ImageDataModule": "datamodule",
    "DenseClassifier": "dense",
}
__all__ = [
    "ALLOCATIONS",
    "Allocation",
    "DenseClassifier",
    "ImageDataModule",
    "Network",
    "OPERATORS",
    "Operator",
    "PRESETS",
    "PruneRepairModule",
    "PruneRepairResult",
    "RepairReport",
    "allocate",
    "build_network",
    "evaluate",
    "export",
    "load",
    "load_dense",
    "load_weights",
    "prune_and_repair",
    "repair",
    "rr_profile",
]  # = sorted(_EXPORTS), spelled out for linters

if TYPE_CHECKING:
    from .allocation import ALLOCATIONS, Allocation, allocate
    from .datamodule import ImageDataModule
    from .dense import DenseClassifier
    from .diagnostics import rr_profile
    from .evaluation import evaluate
    from .export import export, load
    from .models import Network, build_network, load_dense, load_weights
    from .module import PruneRepairModule
    from .operators import OPERATORS, PRESETS, Operator
    from .pipeline import PruneRepairResult, prune_and_repair
    from .repair import RepairReport, repair


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lightning_repair' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
