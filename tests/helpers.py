"""Tiny models shared by the tests: a small ResNet with realistic BN statistics and a pruned copy;
tiny ``lightning-repair fit`` configs on the synthetic dataset and an in-process runner."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
import yaml

from lightning_repair.allocation import Allocation, allocate
from lightning_repair.cli import main
from lightning_repair.masks import apply_masks, compute_masks
from lightning_repair.models import Network

# The architecture of ``calibrated_dense``; it fits ``data.dataset: synthetic`` (10 classes, 3x16x16 images).
TINY_NETWORK = {"arch": "resnet18", "num_classes": 10, "in_channels": 3, "width": 0.125}


def calibrated_dense(arch: str = "resnet18", seed: int = 0, image: int = 16, num_classes: int = 10) -> torch.nn.Module:
    """A random network whose BN running stats come from data, so pruning really perturbs it."""
    torch.manual_seed(seed)
    model = Network(arch=arch, width=0.125, in_channels=3, num_classes=num_classes).build()
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(32, 3, image, image))
    return model.eval()


def pruned_copy(dense: torch.nn.Module, sparsity: float = 0.9, method: str = "lamp"):
    pruned = copy.deepcopy(dense)
    masks = compute_masks(pruned, allocate(pruned, sparsity, Allocation(method)))
    return apply_masks(pruned, masks), masks


def save_dense_checkpoint(path: Path, **kwargs) -> Path:
    """``calibrated_dense(**kwargs)`` saved as a plain state_dict."""
    torch.save(calibrated_dense(**kwargs).state_dict(), path)
    return path


def pipeline_config(root: Path, checkpoint: Path, **model_args) -> dict[str, Any]:
    """A tiny PruneRepairModule run on the synthetic dataset that logs (and writes) into ``run_dir(root)``."""
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(root), "name": "", "version": "run"},
            },
            "enable_checkpointing": False,
            "enable_model_summary": False,
            "enable_progress_bar": False,
        },
        "model": {
            "class_path": "lightning_repair.PruneRepairModule",
            "init_args": {
                "network": dict(TINY_NETWORK),
                "checkpoint": str(checkpoint),
                "sparsity": 0.9,
                "allocation": "erk",
                "repair": "default",
            }
            | model_args,
        },
        "data": {"dataset": "synthetic", "calibration_size": 64, "batch_size": 32, "augment": False},
    }


def run_dir(root: Path) -> Path:
    """Where a run of ``pipeline_config(root, ...)`` writes metrics.json and the repaired model."""
    return root / "run"


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_fit(config_path: Path, *flags: str) -> None:
    """``lightning-repair fit --config CONFIG FLAGS...`` in this process."""
    main(["fit", "--config", str(config_path), *flags])


def read_metrics(root: Path) -> dict[str, Any]:
    return json.loads((run_dir(root) / "metrics.json").read_text())


def leftover_temp_files(root: Path) -> list[Path]:
    """Temporary files of interrupted atomic writes (``export.atomic_write_bytes`` names them ``.*.tmp``)."""
    return sorted(root.rglob(".*.tmp"))


@torch.no_grad()
def plain_accuracy(model: torch.nn.Module, dataset) -> tuple[float, float]:
    """Top-1 and top-5 accuracy counted image by image with a plain loop: a reference for ``evaluation.evaluate``
    (a label ranks k-th when k classes score strictly higher)."""
    model.eval()
    top1 = top5 = 0
    for i in range(len(dataset)):
        image, label = dataset[i]
        scores = model(image[None])[0]
        rank = int((scores > scores[label]).sum())
        top1, top5 = top1 + (rank == 0), top5 + (rank < 5)
    return top1 / len(dataset), top5 / len(dataset)
