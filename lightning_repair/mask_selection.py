"""Mask re-selection inside reconstruction: choose which weights a layer keeps from the Gram of its input.

Every rule keeps the allocation's count for the layer, so the allocation is unchanged; only the positions move.
The kept weights are then re-solved by ``reconstruction.reconstruct_layer``. Rules (``Reconstruct.mask``):

- ``wanda``: |w_ij| * ||x_j|| (Sun et al. 2023), from the dense weights and the repaired input's column norms.
- ``obs_oneshot``: the OBS saliency w_ij^2 / [H^-1]_jj of the damped Gram, taken once for all weights.
- ``sparsegpt``: SparseGPT's selection (Frantar & Alistarh 2023). One Cholesky factor U of the damped H^-1 per
  group (H^-1 = U^T U); columns are visited left to right in blocks of ``BLOCK``; at each block the weights to
  remove are those with the lowest w^2 / U_jj^2 among the block's columns of every row (and every group) of the
  layer, from weights already updated for the earlier removals; each column's removal error is then propagated
  to the columns right of it (inside the block at once, to the later blocks lazily, one matrix product per block).
  Block b removes floor(removed * end_b / K) - floor(removed * start_b / K) weights, so the layer's count is exact.
- ``exact_obs``: OBC's ExactOBS (Frantar & Alistarh 2022). Each row removes its weights one at a time, always the
  one of least loss w^2 / [H^-1]_jj, then updates its remaining weights and its own H^-1 (rank-one downdate), which
  gives every row a trajectory of losses; the layer removes the ``removed`` smallest losses over all rows' steps,
  and each row keeps what remains after as many steps as it has among them. Exact, but O(K^3) per row: for small
  layers and as the reference of ``sparsegpt``.

With ``scope="row"`` every row removes the same count (the remainder as ``top_count`` gives it from the one-shot
saliency for ``sparsegpt``, from the next step's loss for ``exact_obs``). Both OBS rules treat dead inputs (zero
Gram diagonal, possible only without damping) as OBC and SparseGPT do: unit diagonal and weights removed first.
The OBS losses are in the units of the Gram: removing weights moves the output error by (dw) H (dw)^T per row.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

from .reconstruction import LayerStatistics

MaskRule = Literal["magnitude", "wanda", "obs_oneshot", "sparsegpt", "exact_obs"]  # magnitude: masks as allocated
MaskScope = Literal["layer", "row"]
BLOCK = 128  # SparseGPT's column block: lazy updates batched 128 columns at a time


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
    elif rule == "sparsegpt":
        removed = _removed_per_unit(w, damped_gram(stats, damping), mask, scope)
        return sparsegpt(w, damped_gram(stats, damping), removed)[0].view(mask.shape).to(mask.device)
    elif rule == "exact_obs":
        return exact_obs(w, damped_gram(stats, damping), mask.numel() - int(mask.sum()), scope)[0].view(
            mask.shape).to(mask.device)  # fmt: skip
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


def _without_dead_inputs(w: torch.Tensor, gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs that are always 0 (zero Gram diagonal) get a unit diagonal, so H is invertible, and their weights are
    set to 0, so they are removed first at no loss: they cannot affect the output (as OBC and SparseGPT do)."""
    dead = gram.diagonal(dim1=1, dim2=2) == 0
    if not dead.any():
        return w, gram
    gram = gram.clone()
    gram.diagonal(dim1=1, dim2=2).masked_fill_(dead, 1)
    return w.masked_fill(dead[:, None, :], 0), gram


def _lowest(score: torch.Tensor, count: int | torch.Tensor) -> torch.Tensor:
    """True at the ``count`` lowest scores: of the whole tensor (an int) or of each row (one count per row, shaped
    as score's leading dimensions). Ties go to the earlier position."""
    if isinstance(count, int):
        chosen = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
        chosen[torch.sort(score.flatten(), stable=True).indices[:count]] = True
        return chosen.view(score.shape)
    steps = torch.arange(score.shape[-1], device=score.device) < count[..., None]
    return torch.zeros_like(steps).scatter(-1, torch.sort(score, dim=-1, stable=True).indices, steps)


def _removed_per_unit(w: torch.Tensor, gram: torch.Tensor, mask: torch.Tensor, scope: str) -> int | torch.Tensor:
    """How many weights ``sparsegpt`` removes: the layer's count, or per row (groups, rows) for ``scope="row"``,
    where the rows' remainder is given, as ``top_count`` does, by the one-shot saliency (sparsegpt decides block by
    block, so it needs each row's total up front)."""
    groups, rows, k = w.shape
    if scope == "layer":
        return mask.numel() - int(mask.sum())
    score = w.square() / torch.linalg.inv(gram).diagonal(dim1=1, dim2=2)[:, None, :]
    kept = top_count(score.reshape(-1, k), int(mask.sum()), "row").sum(1)
    return (k - kept).view(groups, rows)


def sparsegpt(
    w: torch.Tensor, gram: torch.Tensor, removed: int | torch.Tensor, block: int = BLOCK
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SparseGPT's selection on dense weights ``w`` (groups, rows, K) with the damped Gram ``gram`` (groups, K, K):
    ``removed`` weights of the layer (an int) or of each row (groups, rows). Returns the kept mask, the OBS-updated
    weights SparseGPT would leave (0 where removed) and their loss, sum over rows of (w - w0) H (w - w0)^T."""
    w, gram = _without_dead_inputs(w, gram)
    groups, rows, k = w.shape
    # H^-1 = U^T U with U upper: row i of U / U_ii is the optimal change of columns i.. when column i is zeroed and
    # columns < i are held; U_ii^2 is the inverse Hessian of columns i.. at i, so w_i^2 / U_ii^2 is its OBS loss
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(gram)), upper=True)
    w = w.clone()
    keep = torch.ones_like(w, dtype=torch.bool)
    loss = w.new_zeros(())
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        u1 = u[:, i1:i2, i1:i2]
        d = u1.diagonal(dim1=1, dim2=2)[:, None, :]  # (groups, 1, block)
        w1 = w[..., i1:i2]  # a view: updated in place
        # the block's removals, chosen over all rows and groups from weights that already carry earlier updates;
        # cumulative rounding makes the blocks' counts add up to exactly `removed`
        count = removed * i2 // k - removed * i1 // k
        keep[..., i1:i2] = ~_lowest(w1.square() / d.square(), count)
        err = torch.zeros_like(w1)
        for i in range(i2 - i1):  # column by column inside the block: each removal updates the block's rest
            e = torch.where(keep[..., i1 + i], 0, w1[..., i]) / d[..., i]
            w1[..., i:] -= e[..., None] * u1[:, None, i, i:]
            err[..., i] = e
        w1.masked_fill_(~keep[..., i1:i2], 0)  # already 0 up to rounding
        loss += err.square().sum()
        w[..., i2:] -= err @ u[:, i1:i2, i2:]  # lazy: the later columns get the whole block's update at once
    return keep, w, loss


_BATCH_ELEMENTS = 1 << 24  # inverse-Hessian entries held at once by exact_obs (128 MB in float64)


def exact_obs(
    w: torch.Tensor, gram: torch.Tensor, removed: int, scope: str = "layer"
) -> tuple[torch.Tensor, torch.Tensor]:
    """OBC's ExactOBS selection on dense weights ``w`` (groups, rows, K) with the damped Gram ``gram``: ``removed``
    weights across the layer (``scope="layer"``) or the same count per row (``"row"``). Returns the kept mask and its
    loss, sum over rows of (w - w0) H (w - w0)^T at the OBS-updated weights, which are also the best weights the
    mask allows (each OBS step keeps the remaining weights at their optimum)."""
    w, gram = _without_dead_inputs(w, gram)
    groups, rows, k = w.shape
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(gram))
    flat = w.reshape(-1, k)
    group_of = torch.arange(groups, device=w.device).repeat_interleave(rows)
    losses, order = torch.empty_like(flat), torch.empty(flat.shape, dtype=torch.long, device=w.device)
    batch = max(1, _BATCH_ELEMENTS // (k * k))
    for r1 in range(0, len(flat), batch):  # rows of any groups together: each carries its own H^-1
        r2 = min(r1 + batch, len(flat))
        losses[r1:r2], order[r1:r2] = _greedy_rows(flat[r1:r2], hinv[group_of[r1:r2]])
    if scope == "layer":
        # as OBC: the layer removes its `removed` smallest step losses, wherever they are; a row with m of them
        # takes the first m steps of its trajectory
        chosen = torch.sort(losses.flatten(), stable=True).indices[:removed]
        steps = torch.bincount(chosen // k, minlength=len(flat))
    else:
        base, extra = divmod(removed, len(flat))
        steps = torch.full((len(flat),), base, device=w.device)
        if extra:  # the remainder to the rows whose next step costs least
            steps[torch.sort(losses[:, base], stable=True).indices[:extra]] += 1
    taken = torch.arange(k, device=w.device)[None] < steps[:, None]
    keep = torch.ones_like(taken).scatter(1, order, ~taken)
    return keep.view(w.shape), (losses * taken).sum()


def _greedy_rows(w: torch.Tensor, hinv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ExactOBS on rows (n, K), each with its own H^-1 (n, K, K): every step removes each row's weight of least
    loss w_j^2 / [H^-1]_jj, moves its other weights optimally and downdates its H^-1 to the remaining inputs
    (H^-1 - h_j h_j^T / [H^-1]_jj, h_j its column j). Returns each row's losses and columns, step by step."""
    n, k = w.shape
    w, hinv = w.clone(), hinv.clone()
    rows = torch.arange(n, device=w.device)
    removed = torch.zeros_like(w, dtype=torch.bool)
    losses, order = torch.empty_like(w), torch.empty(n, k, dtype=torch.long, device=w.device)
    for step in range(k):
        diagonal = hinv.diagonal(dim1=1, dim2=2)
        score = (w.square() / diagonal).masked_fill(removed, float("inf"))
        j = score.argmin(1)  # ties: the first column, as torch.argmin
        losses[:, step], order[:, step] = score[rows, j], j
        h = hinv[rows, j]  # (n, K): a copy
        d = h[rows, j]
        w -= h * (w[rows, j] / d)[:, None]
        removed[rows, j] = True
        w.masked_fill_(removed, 0)  # already 0 up to rounding
        if step < k - 1:  # in place, one pass over H^-1: the step's cost is this memory traffic
            u = h / d.sqrt()[:, None]
            hinv.baddbmm_(u.unsqueeze(2), u.unsqueeze(1), alpha=-1)
    return losses, order
