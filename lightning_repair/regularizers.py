"""Pruning-robustness regularizers for dense training (docs/methods.md).

Both take the prunable weight tensors (Conv2d/Linear weights) and return a scalar that
is added to the task loss, multiplied by its ``lambda``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def var_penalty(weights: Iterable[torch.Tensor]) -> torch.Tensor:
    """VAR (arXiv 2511.14282 v1): sum over layers of 1 / (Var(|w|~) + 1e-8), |w|~ = sqrt(w^2 + 1e-8).

    Var is the population variance mean(x^2) - mean(x)^2 of the smoothed magnitudes. Its
    gradient raises the spread of magnitudes: small weights shrink and large ones grow.
    """
    total = None
    for w in weights:
        mag = torch.sqrt(w.square() + 1e-8)
        term = 1.0 / (mag.square().mean() - mag.mean().square() + 1e-8)
        total = term if total is None else total + term
    if total is None:
        raise ValueError("var_penalty needs at least one weight tensor")
    return total


def wcr_penalty(weights: Iterable[torch.Tensor], density: float) -> torch.Tensor:
    """WCR, our scale-aware form: sum over layers of the share of L1 mass outside the top-k.

    k = ceil(density * numel). Per layer the term is 1 - ||top_k(|w|)||_1 / ||w||_1, in [0, 1),
    and 0 exactly when the layer already holds at most k non-zeros, i.e. when magnitude
    pruning at ``density`` would remove nothing. It is invariant to the layer's scale,
    so it does not fight weight decay; its gradient drives the tail weights to zero and
    pushes the top-k weights away from zero.
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"wcr density must be in (0, 1], got {density}")
    total = None
    for w in weights:
        mag = w.abs().flatten()
        k = max(1, math.ceil(round(density * mag.numel(), 6)))  # round first: 0.07 * 100 is 7.000000000000001
        # the tail's own sum, not 1 - top/total: exactly 0 when at most k non-zeros (and for an all-zero layer)
        term = mag.sort(descending=True).values[k:].sum() / mag.sum().clamp_min(1e-12)
        total = term if total is None else total + term
    if total is None:
        raise ValueError("wcr_penalty needs at least one weight tensor")
    return total
