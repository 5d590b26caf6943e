"""Magnitude masks inside each layer, applied in place and checked."""

from __future__ import annotations

import torch
from torch import nn

from .layers import prunable_layers


def magnitude_mask(weight: torch.Tensor, keep: int) -> torch.Tensor:
    """Boolean mask of the ``keep`` largest-magnitude entries.

    Ties are broken by flat position (stable sort), so the same weights give the same mask on
    any device.
    """
    if not 0 <= keep <= weight.numel():
        raise ValueError(f"keep={keep} is outside [0, {weight.numel()}]")
    order = torch.sort(weight.detach().abs().flatten(), descending=True, stable=True).indices
    mask = torch.zeros(weight.numel(), dtype=torch.bool, device=weight.device)
    mask[order[:keep]] = True
    return mask.view_as(weight)


def compute_masks(model: nn.Module, keep: dict[str, int]) -> dict[str, torch.Tensor]:
    """Per-layer magnitude masks for the keep counts of an allocation."""
    layers = {layer.name: layer for layer in prunable_layers(model)}
    unknown = sorted(set(keep) - set(layers))
    if unknown:
        raise KeyError(f"keep counts name layers the model does not have: {unknown}")
    return {name: magnitude_mask(layers[name].module.weight, k) for name, k in keep.items()}


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """Zero the pruned weights in place; the model keeps its plain architecture and keys."""
    for name, mask in masks.items():
        weight = model.get_submodule(name).weight
        weight.mul_(mask.to(weight.device, weight.dtype))
    return model


def mask_violations(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, int]:
    """Number of pruned positions that are not exactly zero, per layer (empty when masks hold)."""
    bad = {}
    for name, mask in masks.items():
        n = int((model.get_submodule(name).weight.detach()[~mask.to(torch.bool)] != 0).sum())
        if n:
            bad[name] = n
    return bad
