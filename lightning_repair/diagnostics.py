"""Relative Repairability (RR, arXiv 2605.25508): how much of a layer's pruning damage a channel-wise repair undoes.

For prunable layer l at sparsity s, on calibration inputs taken from the dense network (docs/methods.md):

    D_raw(l, s) = ||Y_p - Y_d||^2 / ||Y_d||^2
    D_res(l, s) = sum_c ||g_c (Y_p,c - mean_p,c) + mean_d,c - Y_d,c||^2 / ||Y_d||^2
    RR(l, s)    = D_res / D_raw          (0: fully repairable, 1: the repair recovers nothing)

Y_d is the dense layer's output, Y_p the same layer's output on the same (dense) input with a magnitude mask
keeping numel - round(s * numel) weights, ||Y_d||^2 the uncentered energy over all channels and positions. The
repair shifts each channel onto the dense mean and scales it by g_c, which ``repair`` chooses (``rr_repair``):

- ``vm`` (the paper's channel-wise variance matching, the default): g_c = sqrt(var_d / var_p), residual
  n * 2 var_d (1 - rho_c) per channel: above var_d when rho_c < 0, where the repair amplifies noise;
- ``ls``: the least-squares affine fit, residual n (var_d - cov_pd^2 / var_p) = n var_d (1 - rho_c^2);
- ``asr``: the gain of the ``asr`` repair (variance matching shrunk toward the layer gain with weight rho_c^2);
- ``reconstruct``: not a channel-wise repair but the layer's own reconstruction: its kept weights and bias re-solved
  by ridge least squares (the ``reconstruct`` operator's default damping) to the dense output on the dense input;
  the input Gram collected in the same pass serves every grid point (its cost, once: about kw * in/groups / out
  times the layer's forward FLOPs, see reconstruction.py).

A constant P (no weight left, or none seeing a live input) leaves n var_d under every repair. All follow in closed
form from per-channel moments of (P, Y_d), where P = Y_p - bias is the output of the kept weights alone:
||Y_p - Y_d||^2 expands into them. Computing P directly keeps the high-sparsity end exact (a dead channel's P is
exactly 0); the price is float32 cancellation in D_raw when it is tiny (relative error ~1e-7 / D_raw, negligible
at the sparsities RR is for).

One pass of the dense network serves every layer and sparsity: a forward hook on each prunable layer
evaluates the layer's kept weights at every grid sparsity on its input right away and folds the result into
the moments, so nothing is stored across batches and the cost is about len(grid) forward-pass equivalents
(one extra evaluation of each layer per sparsity). Moments are sums reduced across DDP ranks, so the profile
is the same on 1 or N processes however the calibration set is split.

Undefined values are NaN in the tensors and None in JSON rows: every value of a layer whose dense output has
zero energy, and RR where pruning removes nothing but zeros (D_raw and D_res are exactly 0 there).
"""

from __future__ import annotations

import copy
import math
import numbers
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .layers import PrunableLayer, prunable_layers
from .operators import Reconstruct, VarianceMatching
from .reconstruction import LayerStatistics, chunk_statistics, reconstruct_layer
from .stats import Moments, count_over_processes
from .utils import eval_mode

RR_REPAIRS = ("vm", "ls", "asr", "reconstruct")
RR_RECONSTRUCT_DAMPING = Reconstruct.damping  # the reconstruct operator's default

DEFAULT_GRID = (0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.99)

# Fewer calibration images than this trigger a warning. The classifier sees one value per image and channel,
# and its per-channel fit spends 2 of them on (a_c, b_c): below 256 images that in-sample bias (2/n) passes
# ~1%, and the sampling noise of D_res starts to blur the differences between layers that RR is meant to rank.
MIN_CALIBRATION_SAMPLES = 256


@dataclass
class RRProfile:
    """D_raw, D_res and RR of every prunable layer at every grid sparsity (and optionally at given keep counts).

    Tensors are float64, indexed (layer, grid point); NaN marks an undefined value (see the module docstring).
    """

    grid: list[float]  # sparsities, ascending
    layers: list[str]
    numels: list[int]
    d_raw: torch.Tensor  # (layers, grid)
    d_res: torch.Tensor  # (layers, grid)
    d_res_empty: torch.Tensor  # (layers,) D_res with every weight removed: the output is the bias, repair = means
    samples: int  # calibration images over all processes
    repair: str = "vm"  # the channel-wise repair behind D_res (RR_REPAIRS)
    keep: list[int] | None = None  # per layer, the keep counts evaluated besides the grid (a run's allocation)
    keep_d_raw: torch.Tensor | None = None  # (layers,)
    keep_d_res: torch.Tensor | None = None  # (layers,)

    @property
    def rr(self) -> torch.Tensor:
        return _rr(self.d_raw, self.d_res)

    def damage_curve(self, name: str, numel: int) -> tuple[list[float], list[float]]:
        """D_res of layer ``name`` against density: knots ascending from density 0 (no weight left: the output is
        the bias, the best repair the channel means) through the grid to density 1 (no damage); duplicate densities
        dropped. 0 throughout where undefined (zero dense energy: pruning does no measurable harm)."""
        i = self._row(name, numel)
        knots = [(0.0, float(self.d_res_empty[i]))]
        grid = zip(self.grid, self.d_res[i].tolist(), strict=True)
        knots += [(_keep_count(numel, s) / numel, d) for s, d in grid][::-1]
        knots.append((1.0, 0.0))
        unique = [knot for j, knot in enumerate(knots) if j == 0 or knot[0] > knots[j - 1][0]]
        return [x for x, _ in unique], [0.0 if math.isnan(y) else y for _, y in unique]

    def rr_at(self, name: str, numel: int, sparsity: float) -> float:
        """RR of layer ``name`` at ``sparsity``, linear between grid points and constant beyond them; NaN if the
        layer has no defined RR."""
        i = self._row(name, numel)
        known = [(s, r) for s, r in zip(self.grid, self.rr[i].tolist(), strict=True) if not math.isnan(r)]
        if not known:
            return math.nan
        xs, ys = zip(*known, strict=True)
        return float(np.interp(sparsity, xs, ys))

    def _row(self, name: str, numel: int) -> int:
        if name not in self.layers:
            raise KeyError(f"the RR profile has no layer {name!r}: was it measured on another model?")
        i = self.layers.index(name)
        if self.numels[i] != numel:
            raise ValueError(f"the RR profile's layer {name!r} has {self.numels[i]} weights, this model's {numel}")
        return i

    def rows(self) -> list[dict]:
        """JSON-ready rows, one per layer: name, numel, and d_raw, d_res, rr over the grid (None if undefined)."""
        rr = self.rr
        return [
            {"name": name, "numel": n, "d_raw": _plain(self.d_raw[i]), "d_res": _plain(self.d_res[i]),
             "rr": _plain(rr[i])}
            for i, (name, n) in enumerate(zip(self.layers, self.numels, strict=True))
        ]  # fmt: skip

    def keep_rows(self) -> list[dict]:
        """One JSON-ready row per layer at the evaluated keep counts: name, kept, d_raw, d_res, rr."""
        if self.keep is None:
            raise ValueError("this profile was computed without keep counts: pass keep= to rr_profile")
        rr = _rr(self.keep_d_raw, self.keep_d_res)
        return [
            {"name": name, "kept": k, "d_raw": _plain(self.keep_d_raw[i]), "d_res": _plain(self.keep_d_res[i]),
             "rr": _plain(rr[i])}
            for i, (name, k) in enumerate(zip(self.layers, self.keep, strict=True))
        ]  # fmt: skip


def rr_profile(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    grid: Sequence[float] = DEFAULT_GRID,
    keep: dict[str, int] | None = None,
    repair: str = "vm",
) -> RRProfile:
    """The RR profile of ``model`` (dense) from one streaming pass over unlabeled ``batches``.

    Args:
        model: the dense network; it runs in eval mode and is left as it was found.
        batches: calibration image tensors (this process's shard under DDP).
        grid: sparsities in (0, 1) at which every prunable layer is measured.
        keep: optional keep count per layer name, measured in the same pass (a run's chosen allocation).
        repair: the channel-wise repair behind D_res: ``vm`` (the paper's), ``ls`` or ``asr``.
    """
    if repair not in RR_REPAIRS:
        raise ValueError(f"rr_repair: {repair!r} is not one of {RR_REPAIRS}")
    grid = check_grid(grid)
    layers = prunable_layers(model)
    if keep is not None:
        missing = [layer.name for layer in layers if layer.name not in keep]
        if missing:
            raise KeyError(f"keep counts are missing prunable layers: {missing}")
        for layer in layers:
            if not 0 <= keep[layer.name] <= layer.numel:
                raise ValueError(f"keep count {keep[layer.name]} of layer {layer.name!r} is outside [0, {layer.numel}]")
    if not grid and keep is None:
        raise ValueError("rr_profile: nothing to measure (empty grid and no keep counts)")
    keeps = [
        [_keep_count(layer.numel, s) for s in grid] + ([keep[layer.name]] if keep is not None else [])
        for layer in layers
    ]
    ranks = [magnitude_ranks(layer.module.weight) for layer in layers]
    masks = [[rank < k for k in ks] for rank, ks in zip(ranks, keeps, strict=True)]
    moments, samples, grams = stream_moments(model, batches, layers, masks, with_grams=repair == "reconstruct")
    if samples < MIN_CALIBRATION_SAMPLES:
        warnings.warn(
            f"RR profile from only {samples} calibration images (fewer than {MIN_CALIBRATION_SAMPLES}): "
            "per-channel statistics, above all the classifier's, are noisy",
            stacklevel=2,
        )
    residuals = [None] * len(layers) if grams is None else [
        reconstruction_residuals(layer, g, m, layer_masks)
        for layer, g, m, layer_masks in zip(layers, grams, moments, masks, strict=True)
    ]  # fmt: skip
    damage = [layer_damage(m, len(ks), layer.module.bias, repair, r)
              for m, ks, layer, r in zip(moments, keeps, layers, residuals, strict=True)]  # fmt: skip
    d_raw, d_res, d_res_empty = ([t.cpu() for t in values] for values in zip(*damage, strict=True))
    d_raw, d_res = torch.stack(d_raw), torch.stack(d_res)
    # pruning that removes only zeros does no damage: exactly 0 (RR undefined), not the rounding of the moments
    untouched = torch.tensor(
        [_removes_only_zeros(layer.module.weight, ks) for ks, layer in zip(keeps, layers, strict=True)]
    )
    d_raw[untouched & ~d_raw.isnan()], d_res[untouched & ~d_res.isnan()] = 0.0, 0.0
    s = len(grid)
    return RRProfile(
        grid=grid,
        layers=[layer.name for layer in layers],
        numels=[layer.numel for layer in layers],
        d_raw=d_raw[:, :s],
        d_res=d_res[:, :s],
        d_res_empty=torch.stack(d_res_empty),
        samples=samples,
        repair=repair,
        keep=None if keep is None else [keep[layer.name] for layer in layers],
        keep_d_raw=None if keep is None else d_raw[:, s],
        keep_d_res=None if keep is None else d_res[:, s],
    )


def check_grid(grid: Sequence[float]) -> list[float]:
    """Sorted, de-duplicated sparsities; ValueError naming the first value outside (0, 1)."""
    for s in grid:
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not 0.0 < s < 1.0:  # NaN fails too
            raise ValueError(f"rr grid: sparsity {s!r} is not a number in (0, 1)")
    return sorted({float(s) for s in grid})


def magnitude_ranks(weight: torch.Tensor) -> torch.Tensor:
    """Every weight's position in ``masks.magnitude_mask``'s order (descending magnitude, ties by flat position),
    so that ``magnitude_mask(weight, k) == (ranks < k)`` for every k: one sort serves the whole grid."""
    order = torch.sort(weight.detach().abs().flatten(), descending=True, stable=True).indices
    ranks = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return ranks.view_as(weight)


def _removes_only_zeros(weight: torch.Tensor, keeps: list[int]) -> list[bool]:
    """Per keep count k, whether every weight outside the k largest magnitudes is exactly zero."""
    magnitudes = torch.sort(weight.detach().abs().flatten(), descending=True).values
    return [k >= len(magnitudes) or bool(magnitudes[k] == 0) for k in keeps]


def _keep_count(numel: int, sparsity: float) -> int:
    return numel - round(sparsity * numel)


@torch.no_grad()
def stream_moments(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    layers: list[PrunableLayer],
    masks: list[list[torch.Tensor]],
    with_grams: bool = False,
) -> tuple[list[Moments], int, list[LayerStatistics] | None]:
    """Per layer, joint moments of (P, Y_d) for its K masks, stacked along channels (K * C channels), and with
    ``with_grams`` the reconstruction statistics of the layer on its dense input."""
    totals: list[Moments | None] = [None] * len(layers)
    grams: list[LayerStatistics | None] = [None] * len(layers)

    def hook(index: int):
        def fold(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            m = _moments(module, inputs[0], _channels_first(module, output), masks[index])
            totals[index] = m if totals[index] is None else totals[index] + m
            if with_grams:
                g = chunk_statistics(module, inputs[0], output)
                if grams[index] is None:
                    grams[index] = g
                else:
                    grams[index] += g

        return fold

    handles = [layer.module.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    images = 0
    try:
        with eval_mode(model):
            for batch in batches:
                model(batch)
                images += batch.shape[0]
    finally:
        for handle in handles:
            handle.remove()
    unseen = [layer.name for layer, m in zip(layers, totals, strict=True) if m is None]
    if unseen:
        raise ValueError(f"no calibration data reached layers {unseen} (an empty loader, or layers forward skips)")
    # reduce first, then check: a NaN on one rank reaches every rank, which all raise the same error
    moments = [
        m.all_reduce().check_finite(f"RR profile of {layer.name}") for layer, m in zip(layers, totals, strict=True)
    ]
    if with_grams:
        grams = [
            g.all_reduce().check_finite(f"RR profile of {layer.name}") for layer, g in zip(layers, grams, strict=True)
        ]
    return moments, count_over_processes(images, moments[0].count.device), grams if with_grams else None


def reconstruction_residuals(
    layer: PrunableLayer, stats: LayerStatistics, moments: Moments, masks: list[torch.Tensor]
) -> torch.Tensor:
    """(K, C): per mask and output channel, what the layer's own reconstruction leaves of the dense output."""
    energy = moments.grams.view(2, 2, len(masks), -1)[1, 1, 0]  # sum of Y_d^2 per channel (bias included)
    residuals = []
    for mask in masks:
        solved = copy.deepcopy(layer.module)
        with warnings.catch_warnings():  # the fewer-rows-than-unknowns warning is the profile's own
            warnings.simplefilter("ignore")
            reconstruct_layer(solved, stats, mask, RR_RECONSTRUCT_DAMPING, layer.name)
        residuals.append(stats.residuals(solved.weight, solved.bias, energy).clamp_min(0))
    return torch.stack(residuals)


def _linear_part(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The layer's output for ``weight`` without its bias."""
    if isinstance(module, nn.Conv2d):
        return module._conv_forward(x, weight, None)  # honours padding_mode, stride, groups
    return F.linear(x, weight)


def _channels_first(module: nn.Module, y: torch.Tensor) -> torch.Tensor:
    return y.movedim(-1, 1) if isinstance(module, nn.Linear) and y.dim() > 2 else y


def _moments(module: nn.Module, x: torch.Tensor, dense: torch.Tensor, masks: list[torch.Tensor]) -> Moments:
    """Moments of (P_k, Y_d) for every mask k, stacked along channels: what Moments.of([P_k, Y_d]) gives, but
    built for speed, since these statistics are bound by memory traffic rather than arithmetic: one P_k in
    memory at a time, each read as few times as possible with no output-sized temporary (the product P_k Y_d
    overwrites P_k), and the dense statistics computed once for all k."""
    d_sum, dd = _channel_sum(dense), _channel_square_sum(dense)
    sums, grams = [], []
    for mask in masks:
        p = _channels_first(module, _linear_part(module, x, module.weight * mask))
        p_sum, pp = _channel_sum(p), _channel_square_sum(p)
        pd = _channel_sum(p.mul_(dense))
        sums.append(torch.stack([p_sum, d_sum]))
        grams.append(torch.stack([torch.stack([pp, pd]), torch.stack([pd, dd])]))
    count = torch.tensor(float(dense.numel() // dense.shape[1]), dtype=torch.float64, device=dense.device)
    return Moments(count, torch.cat(sums, 1), torch.cat(grams, 2))


def _channel_sum(a: torch.Tensor) -> torch.Tensor:
    """Per channel, the sum over samples and positions: float32 per (sample, channel), float64 over samples."""
    return a.reshape(a.shape[0], a.shape[1], -1).sum(2).double().sum(0)


def _channel_square_sum(a: torch.Tensor) -> torch.Tensor:
    """Per channel, the sum of squares: float32 norms per (sample, channel), squared and summed in float64."""
    return torch.linalg.vector_norm(a.reshape(a.shape[0], a.shape[1], -1), dim=2).double().square().sum(0)


def layer_damage(
    m: Moments, k: int, bias: torch.Tensor | None, repair: str, reconstructed: torch.Tensor | None = None
) -> tuple[torch.Tensor, ...]:
    """D_raw (k,), D_res (k,) and D_res with every weight removed, from the stacked moments of (P, Y_d)."""
    sums, grams, cov = m.sums.view(2, k, -1), m.grams.view(2, 2, k, -1), m.cov.view(2, 2, k, -1)
    b = torch.zeros_like(sums[0, 0]) if bias is None else bias.detach().double().to(sums.device)
    # ||P + b - Y_d||^2 per channel, expanded into the moments
    error = grams[0, 0] - 2 * grams[0, 1] + grams[1, 1] + 2 * b * (sums[0] - sums[1]) + m.count * b.square()
    energy = grams[1, 1].sum(1)
    var_p, cov_pd, var_d = cov[0, 0], cov[0, 1], cov[1, 1].clamp_min(0)
    # the uncentered float32 sums carry relative rounding ~1e-7: a variance below 1e-6 of the second moment
    # cannot be told from 0, and a constant P (no weight left, or none seeing a live input) leaves var_d
    constant = var_p <= 1e-6 * grams[0, 0] / m.count
    if reconstructed is not None:
        residual = reconstructed / m.count  # the sums over positions, as a per-position mean like the others
    elif repair == "ls":
        residual = var_d - (cov_pd.square() / var_p.clamp_min(1e-300)).clamp(max=var_d)  # rounding never beats the fit
    else:
        op = VarianceMatching(shrinkage="adaptive" if repair == "asr" else "none")
        g = op.correction(var_p, var_d, cov_pd, sums[0] / m.count, sums[1] / m.count)[0]
        residual = (g.square() * var_p - 2 * g * cov_pd + var_d).clamp_min(0)
    if reconstructed is None:  # the reconstruction's residual is exact: without a bias it cannot fit a mean
        residual = torch.where(constant, var_d, residual)
    residual = residual * m.count
    undefined = energy <= 0
    d_raw = torch.where(undefined, math.nan, error.sum(1).clamp_min(0) / energy)
    d_res = torch.where(undefined, math.nan, residual.sum(1) / energy)
    d_res_empty = torch.where(undefined[0], math.nan, var_d[0].sum() * m.count / energy[0])
    return d_raw, d_res, d_res_empty


def _rr(d_raw: torch.Tensor, d_res: torch.Tensor) -> torch.Tensor:
    return torch.where(d_raw > 0, d_res / d_raw, math.nan)


def _plain(values: torch.Tensor) -> float | None | list:
    if values.dim() == 0:
        v = float(values)
        return None if math.isnan(v) else v
    return [_plain(v) for v in values]
