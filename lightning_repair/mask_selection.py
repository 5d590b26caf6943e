"""Mask re-selection inside reconstruction: choose which weights a layer keeps from the Gram of its input.

Every rule keeps the allocation's count for the layer, so the allocation is unchanged; only the positions move.
The kept weights are then re-solved by ``reconstruction.reconstruct_layer``. Rules (``Reconstruct.mask``):

- ``wanda``: |w_ij| * ||x_j|| (Sun et al. 2023), from the dense weights and the repaired input's column norms.
- ``obs_oneshot``: the OBS saliency w_ij^2 / [H^-1]_jj of the damped Gram, taken once for all weights.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

from .reconstruction import LayerStatistics

MaskRule = Literal["magnitude", "wanda", "obs_oneshot"]  # magnitude: keep the masks as the allocation gave them
MaskScope = Literal["layer", "row"]


def select_mask(
    rule: str, scope: str, dense_weight: torch.Tensor, stats: LayerStatistics, mask: torch.Tensor, damping: float
) -> torch.Tensor:
    """The layer's mask re-selected by ``rule``, keeping ``mask``'s count: top-k of the whole layer or the same
    count per output row (``scope``); ties by position."""
    groups, k = stats.gram.shape[:2]
    w = dense_weight.detach().double().reshape(groups, -1, k)
    diagonal = stats.gram.diagonal(dim1=1, dim2=2)  # (groups, K)
    if rule == "wanda":
        score = w.abs() * diagonal.clamp_min(0).sqrt()[:, None, :]
    elif rule == "obs_oneshot":
        score = w.square() / torch.linalg.inv(damped_gram(stats, damping)).diagonal(dim1=1, dim2=2)[:, None, :]
    else:
        raise ValueError(f"mask rule {rule!r} is not one of {get_args(MaskRule)[1:]}")
    return top_count(score.reshape(-1, k), int(mask.sum()), scope).view(mask.shape).to(mask.device)


def damped_gram(stats: LayerStatistics, damping: float) -> torch.Tensor:
    """H + lambda I per group, lambda = damping times the group's mean diagonal (as the reconstruction's ridge)."""
    groups, k = stats.gram.shape[:2]
    lam = damping * stats.gram.diagonal(dim1=1, dim2=2).mean(1, keepdim=True).clamp_min(1e-12)
    return stats.gram + torch.diag_embed(lam.expand(groups, k))


def top_count(score: torch.Tensor, count: int, scope: str) -> torch.Tensor:
    """Boolean (rows, K) keeping the ``count`` highest scores: across the whole ``layer``, or per ``row`` (the same
    count in every row; the remainder goes to the rows whose next weight scores highest). Ties by position."""
    rows, k = score.shape
    if scope == "layer":
        ranked = torch.sort(score.flatten(), descending=True, stable=True).indices
        chosen = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
        chosen[ranked[:count]] = True
        return chosen.view(rows, k)
    ranked = torch.sort(score, dim=1, descending=True, stable=True)
    base, extra = divmod(count, rows)
    per_row = torch.full((rows,), base, device=score.device)
    if extra:
        next_best = ranked.values[:, base]
        per_row[torch.sort(next_best, descending=True, stable=True).indices[:extra]] += 1
    keep = torch.arange(k, device=score.device)[None] < per_row[:, None]
    return torch.zeros_like(keep).scatter(1, ranked.indices, keep)
