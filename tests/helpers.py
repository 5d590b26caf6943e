"""Tiny models shared by the tests: a small ResNet with realistic BN statistics and a pruned copy."""

from __future__ import annotations

import copy

import torch

from lightning_repair.allocation import Allocation, allocate
from lightning_repair.masks import apply_masks, compute_masks
from lightning_repair.models import Network


def calibrated_dense(arch: str = "resnet18", seed: int = 0, image: int = 16) -> torch.nn.Module:
    """A random network whose BN running stats come from data, so pruning really perturbs it."""
    torch.manual_seed(seed)
    model = Network(arch=arch, width=0.125, in_channels=3, num_classes=10).build()
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(32, 3, image, image))
    return model.eval()


def pruned_copy(dense: torch.nn.Module, sparsity: float = 0.9, method: str = "lamp"):
    pruned = copy.deepcopy(dense)
    masks = compute_masks(pruned, allocate(pruned, sparsity, Allocation(method)))
    return apply_masks(pruned, masks), masks
