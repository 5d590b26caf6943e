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
- ``forward_ols`` (ours): the reverse of ExactOBS's greedy. Each row *grows* its kept set one weight at a time,
  always the one whose addition lowers the reconstruction's own least-squares error most, with the row's kept
  weights re-solved after each addition (orthogonal least squares, Chen, Billings & Luo 1989, in the metric of the
  Gram); the layer keeps the ``kept`` largest gains over all rows' steps, as ``exact_obs`` removes the smallest
  losses. Its target is the layer's cross statistic X^T Y, the one the re-solve fits (for the dense Gram that is
  H w0, so it ranks masks by the same error as the OBS rules). A row that keeps k of K weights costs O(K k^2),
  not O(K^3): at 95-98% sparsity, cheap.

With ``scope="row"`` every row removes the same count (the remainder as ``top_count`` gives it from the one-shot
saliency for ``sparsegpt``, from the next step's loss for ``exact_obs``). Both OBS rules treat dead inputs (zero
Gram diagonal, possible only without damping) as OBC and SparseGPT do: unit diagonal and weights removed first.
The OBS losses are in the units of the Gram: removing weights moves the output error by (dw) H (dw)^T per row.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

from .reconstruction import LayerStatistics

# magnitude: the masks as allocated
MaskRule = Literal["magnitude", "wanda", "obs_oneshot", "sparsegpt", "exact_obs", "forward_ols"]
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
    elif rule == "forward_ols":
        return forward_ols(damped_gram(stats, damping), stats.cross, int(mask.sum()), scope).view(mask.shape).to(
            mask.device)  # fmt: skip
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


_TRAJECTORY_ELEMENTS = 1 << 25  # float64 entries of the orthogonalised Gram columns forward_ols holds (256 MB)


def forward_ols(gram: torch.Tensor, cross: torch.Tensor, kept: int, scope: str = "layer") -> torch.Tensor:
    """Greedy forward selection of each output row's kept weights: ``kept`` weights across the layer
    (``scope="layer"``) or the same count per row (``"row"``), for the damped Gram ``gram`` (groups, K, K) and the
    cross statistic ``cross`` (groups, K, rows per group) of the least-squares fit. Returns the mask (groups, rows, K).

    Each row's trajectory is the order in which it would add weights and the gain of each addition; a layer-wide
    count takes the ``kept`` largest gains, each row's gains made non-increasing first (a running minimum), so that
    a row always takes a prefix of its own trajectory. The trajectories are computed as long as the count needs:
    a row whose every step so far was taken is extended (its prefix does not change), until none is.
    """
    groups, k = gram.shape[:2]
    targets = cross.mT.reshape(-1, k)  # (groups * rows, K)
    n = len(targets)
    if not 0 <= kept <= n * k:
        raise ValueError(f"forward_ols: cannot keep {kept} of {n * k} weights")
    if kept == 0:  # an allocation may empty a layer
        return torch.zeros(groups, n // groups, k, dtype=torch.bool, device=gram.device)
    if scope == "row":
        base, extra = divmod(kept, n)
        gains, order = _forward_trajectories(gram, targets, min(k, base + 1))
        steps = torch.full((n,), base, device=gram.device)
        if extra:  # the remainder to the rows whose next addition gains most
            steps[torch.sort(gains[:, base], descending=True, stable=True).indices[:extra]] += 1
    else:
        length = torch.full((n,), min(k, 2 * -(-kept // n) + 8), device=gram.device)
        gains, order = _forward_trajectories(gram, targets, int(length[0]), kept=kept)
        while True:
            envelope = gains.cummin(1).values
            chosen = torch.sort(envelope.flatten(), descending=True, stable=True).indices[:kept]
            steps = torch.bincount(chosen // gains.shape[1], minlength=n)
            short = (steps == length) & (length < k)  # rows that might take more than they have computed
            if not short.any():
                break
            width = min(k, 2 * gains.shape[1])
            known = envelope[~short]
            more_gains, more_order = _forward_trajectories(
                gram, targets, width, rows=short, kept=kept, known=known[known.isfinite()]
            )
            gains = torch.cat([gains, gains.new_full((n, width - gains.shape[1]), -torch.inf)], 1)  # not computed
            order = torch.cat([order, order.new_zeros(n, width - order.shape[1])], 1)
            gains[short], order[short], length[short] = more_gains, more_order, width
    taken = torch.arange(order.shape[1], device=gram.device)[None] < steps[:, None]
    keep = torch.zeros(n, k, dtype=torch.bool, device=gram.device)
    rows = torch.arange(n, device=gram.device)[:, None].expand_as(order)
    keep[rows[taken], order[taken]] = True  # only the taken prefix: past a row's length its order is padding
    return keep.view(groups, -1, k)


def _forward_trajectories(
    gram: torch.Tensor,
    targets: torch.Tensor,
    steps: int,
    rows: torch.Tensor | None = None,
    kept: int | None = None,
    known: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``steps`` additions of each row (all, or the boolean ``rows``): gains (n, steps) and columns.

    In the metric of H, the kept columns are orthonormalised as they are added (q_t^T H q_s = delta_ts); c_t = H q_t
    is all a step needs. For a candidate j, d_j = H_jj - sum_t c_tj^2 is its squared distance to the kept span and
    r_j = b_j - sum_t c_tj (q_t^T b) its correlation with the residual; adding j lowers the error by r_j^2 / d_j.

    With a layer-wide count ``kept``, a row stops early (its later gains -inf) once its running-minimum gain is
    below the ``kept``-th largest of those computed so far here and in ``known`` (other rows' running minima): more
    gains only raise that value, and the row's later ones are no larger, so none of them would be taken.
    """
    groups, k = gram.shape[:2]
    group_of = torch.arange(len(targets), device=gram.device) // (len(targets) // groups)
    index = torch.arange(len(targets), device=gram.device) if rows is None else rows.nonzero().flatten()
    gains = gram.new_full((len(index), steps), -torch.inf)
    order = torch.zeros(len(index), steps, dtype=torch.long, device=gram.device)
    known = gram.new_empty(0) if known is None else known
    chunk = max(1, _TRAJECTORY_ELEMENTS // (steps * k))
    for start in range(0, len(index), chunk):
        out = torch.arange(start, min(start + chunk, len(index)), device=gram.device)  # rows of gains it writes
        g = group_of[index[out]]
        r = targets[index[out]].clone()
        d = gram.diagonal(dim1=1, dim2=2)[g]  # a copy (advanced indexing)
        # a column within rounding of the kept span has nothing left to add (and a dead input, H_jj = 0, never did)
        floor = 1e-10 * d.amax(1, keepdim=True)
        c = gram.new_empty(len(out), steps, k)
        running = gram.new_full((len(out),), torch.inf)
        for t in range(steps):
            at = torch.arange(len(out), device=gram.device)
            score = torch.where(d > floor, r.square() / d, 0)
            if t:
                score.scatter_(1, order[out, :t], -1)  # kept already
            gain, j = score.max(1)
            gains[out, t], order[out, t] = gain, j
            column = gram[g, :, j] - torch.einsum("ntk,nt->nk", c[:, :t], c[at, :t, j])
            pivot = d[at, j].clamp_min(floor[:, 0]).sqrt()
            c[:, t] = column / pivot[:, None]
            r -= c[:, t] * (r[at, j] / pivot)[:, None]
            d -= c[:, t].square()
            if kept is None:
                continue
            running = torch.minimum(running, gain)
            computed = torch.cat([known, gains[:, : t + 1].cummin(1).values.flatten()])
            computed = computed[computed.isfinite()]
            if len(computed) < kept:
                continue
            going = running >= torch.kthvalue(computed, len(computed) - kept + 1).values
            if int((~going).sum()) * 4 >= len(out):  # drop a quarter or more at once: a copy of c per drop
                out, g, r, d, floor, c, running = (x[going] for x in (out, g, r, d, floor, c, running))
                if not len(out):
                    break
    return gains, order
