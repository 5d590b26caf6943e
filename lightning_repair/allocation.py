"""Layerwise sparsity allocation: how many weights each prunable layer keeps.

Every method is a registry entry that, for the layers it is free to allocate, returns
keep counts summing to the free budget. The shared solver first fixes the layers with a
forced sparsity (``keep_dense`` is sparsity 0), then hands the rest of the budget to
the method, honouring per-layer density caps, so the achieved global sparsity over all
prunable weights equals the target to within one weight per layer.

Methods (docs/methods.md):
- ``uniform``: one density d for every free layer (capped layers sit at their cap).
- ``global``: one magnitude threshold across layers (``prune.global_unstructured``, L1).
- ``erk``: density proportional to ((out+in+kh+kw)/(out*in*kh*kw))**power, with
  google-research/rigl's re-solve when a density would exceed 1 (or its cap).
- ``lamp``: LAMP scores w_u^2 / sum_{v>=u} w_v^2 (Lee et al. 2021), one global top-k.

RR-guided methods (docs/methods.md) need an RR profile (``diagnostics.rr_profile``) passed to ``allocate``:
- ``rr``: densities minimising the total post-repair damage sum_l D_res_l(d_l) under the budget, each D_res_l
  piecewise linear in density through the profile (density 0: the channel-mean repair; density 1: no damage).
  Every layer weighs the same (w_l = 1): D_res is a noise-to-signal ratio at the layer's output, and behind
  BatchNorm each layer's signal enters the next at the same scale, so to first order the relative noises of
  the layers add up at the output. (A residual branch's noise is diluted by the identity path; that is ignored.)
  The Lagrangian min sum_l D_res_l(d_l) + lam * kept_l, bisected on lam to meet the budget, picks points of each
  curve's lower convex hull; ``lagrangian_densities`` solves it exactly by filling hull segments in order of
  damage removed per kept weight, the last one partially, so the budget is met with no bisection tolerance.
- ``erk_rr``: ERK scores times (RR_l / RR_mean)^rr_power, RR_l interpolated in the profile at the free layers'
  mean sparsity (the target when no layer is forced), RR_mean their geometric mean. Layers whose damage the
  repair cannot undo (RR near 1) keep more weights than ERK gives them; well repairable ones fewer. A layer with
  undefined RR (zero dense energy, or no damage) gets RR_mean (its plain ERK share), and RR is floored at
  ``RR_FLOOR`` so a layer measured as perfectly repairable still keeps weights.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from .layers import ROLES, PrunableLayer, prunable_layers
from .utils import is_real

if TYPE_CHECKING:
    from .diagnostics import RRProfile


@dataclass
class Override:
    """A per-layer rule.

    Args:
        select: ``role:<role>`` (first, classifier, projection, depthwise, conv, linear) or
            a regular expression that must match the whole layer name (``layer4\\..*``).
        sparsity: forced sparsity of the selected layers; they leave the budget.
        max_density: cap on the density the method may give the selected layers.
    """

    select: str
    sparsity: float | None = None
    max_density: float | None = None

    def __post_init__(self):
        if not isinstance(self.select, str):
            raise TypeError(f"override select must be a string (role:<role> or a name regex), got {self.select!r}")
        for name in ("sparsity", "max_density"):
            value = getattr(self, name)
            if value is not None and not is_real(value):
                raise TypeError(f"override {self.select!r}: {name} must be a number, got {value!r}")
        if (self.sparsity is None) == (self.max_density is None):
            raise ValueError(f"override {self.select!r}: give exactly one of sparsity or max_density")
        if self.sparsity is not None and not 0.0 <= self.sparsity <= 1.0:
            raise ValueError(f"override {self.select!r}: sparsity must be in [0, 1], got {self.sparsity}")
        if self.max_density is not None and not 0.0 < self.max_density <= 1.0:
            raise ValueError(f"override {self.select!r}: max_density must be in (0, 1], got {self.max_density}")
        _selector(self.select)  # validates role names and regexes early


FIXED_RULES = ("global", "erk", "lamp")  # the rules ``search`` always scores
OBJECTIVES = ("kl", "mse")
TABLE_FACTORS = (0.25, 0.4, 0.63, 1.6, 2.5, 4.0)


@dataclass
class SearchOptions:
    """Options of the ``search`` allocation (search.py).

    Args:
        objective: ``kl`` (mean KL divergence of the repaired from the dense softmax) or ``mse`` (mean squared
            logit difference), on the score images.
        held_out_images: unlabeled training images outside the calibration set that the objective is measured
            on (the data module draws them: ``ImageDataModule.held_out_set``); 0: measure it on the last
            ``score_images`` calibration images instead. Held out is the default: scored on the images it was
            fitted on, the repair favours allocations that fit those images better than it generalises
            (benchmarks/results/search.md).
        fit_images: calibration images the candidates' repair and the error table are fitted on (the first ones).
        score_images: with ``held_out_images: 0``, the calibration images the objective is measured on (the last
            ones; disjoint from the fit images when the calibration set holds both).
        max_candidates: allocations scored, the three fixed rules included.
        min_z: a candidate replaces the best so far only if its objective is lower by at least this many standard
            errors of the mean per-image difference between the two (a paired test on the score images; 0: any
            lower objective). The fixed rules' start is their plain minimum.
        step: initial step of the pattern search along each direction of log c (search_directions).
        min_step: the search ends when the step, halved after every round without improvement, falls below it.
        factors: the error table's knots of a layer, besides the fixed rules' keep counts: these multiples of the
            geometric mean of those counts (capped at the layer's size).
    """

    objective: str = "kl"
    held_out_images: int = 1024
    fit_images: int = 1024
    score_images: int = 1024
    max_candidates: int = 7
    min_z: float = 2.0
    step: float = 0.5
    min_step: float = 0.06
    factors: tuple[float, ...] = TABLE_FACTORS

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"search.objective: {self.objective!r} is not one of {OBJECTIVES}")
        for name in ("fit_images", "score_images", "max_candidates"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"search.{name} must be an integer >= 1, got {value!r}")
        held_out = self.held_out_images
        if isinstance(held_out, bool) or not isinstance(held_out, int) or held_out < 0:
            raise ValueError(f"search.held_out_images must be an integer >= 0, got {held_out!r}")
        if self.max_candidates < len(FIXED_RULES):
            raise ValueError(f"search.max_candidates must be >= {len(FIXED_RULES)} (the fixed rules are scored)")
        if not is_real(self.min_z) or not 0 <= self.min_z < math.inf:
            raise ValueError(f"search.min_z must be a finite number >= 0, got {self.min_z!r}")
        for name in ("step", "min_step"):
            if not is_real(getattr(self, name)):
                raise TypeError(f"search.{name} must be a number, got {getattr(self, name)!r}")
        if isinstance(self.factors, str):
            raise TypeError(f"search.factors must be a list of numbers, got {self.factors!r}")
        if not 0 < self.min_step <= self.step:
            raise ValueError(f"search: need 0 < min_step <= step, got {self.min_step!r}, {self.step!r}")
        self.factors = tuple(sorted({float(f) for f in self.factors}))
        if any(not f > 0 for f in self.factors):
            raise ValueError(f"search.factors must be > 0, got {list(self.factors)}")


@dataclass
class Allocation:
    """Which allocation method, with its options.

    Args:
        method: uniform, global, erk, lamp, the RR-guided rr and erk_rr (which need an RR profile), or ``search``
            (which repairs candidate allocations on the calibration images: ``pipeline.choose_keep``).
        power: ERK exponent on the raw score (1 = Evci et al.).
        rr_power: erk_rr's exponent on the RR reweighting (0 = plain ERK).
        keep_dense: selectors (``role:first``, a name regex) of layers kept dense.
        overrides: per-layer forced sparsities and density caps.
        search: the ``search`` method's options (its defaults when not given; an error for another method).
    """

    method: str = "erk"
    power: float = 1.0
    rr_power: float = 1.0
    keep_dense: list[str] = field(default_factory=list)
    overrides: list[Override] = field(default_factory=list)
    search: SearchOptions | None = None

    def __post_init__(self):
        if not isinstance(self.method, str) or self.method not in methods():
            raise ValueError(f"allocation.method: unknown method {self.method!r}; choose from {methods()}")
        if self.search is not None and self.method != "search":
            raise ValueError(f"allocation.search applies to method search only, not {self.method!r}")
        if self.method == "search" and self.search is None:
            self.search = SearchOptions()
        if isinstance(self.search, Mapping):
            try:
                self.search = SearchOptions(**self.search)
            except TypeError as err:
                raise ValueError(f"allocation.search: {err}") from None
        if self.search is not None and not isinstance(self.search, SearchOptions):
            raise TypeError(f"allocation.search must be a dict of search options, got {self.search!r}")
        for name in ("power", "rr_power"):
            value = getattr(self, name)
            if not is_real(value):
                raise TypeError(f"allocation.{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"allocation.{name} must be finite, got {value}")
        if isinstance(self.keep_dense, str) or not all(isinstance(s, str) for s in self.keep_dense):
            raise TypeError(f"allocation.keep_dense must be a list of selectors, got {self.keep_dense!r}")
        if isinstance(self.overrides, (str, Mapping)):
            raise TypeError(f"allocation.overrides must be a list of rules, got {self.overrides!r}")
        self.overrides = [_override(i, o) for i, o in enumerate(self.overrides)]
        self.rules = [Override(s, sparsity=0.0) for s in self.keep_dense] + self.overrides

    @property
    def held_out_images(self) -> int:
        """How many images outside the calibration set the method needs (``search`` scores candidates on them)."""
        return self.search.held_out_images if self.method == "search" else 0


def as_allocation(value: str | Mapping | Allocation | None) -> Allocation:
    """An ``Allocation`` from a method name, a dict of its options, or itself (None: the default, ERK)."""
    if value is None or isinstance(value, Allocation):
        return value or Allocation()
    if isinstance(value, str):
        return Allocation(method=value)
    if isinstance(value, Mapping):
        try:
            return Allocation(**value)
        except TypeError as err:
            raise ValueError(f"allocation: {err}") from err
    raise TypeError(f"allocation must be a method name, a dict of options or an Allocation, got {value!r}")


def _override(index: int, rule: Override | Mapping) -> Override:
    if isinstance(rule, Override):
        return rule
    if not isinstance(rule, Mapping):
        raise TypeError(f"allocation.overrides[{index}] must be a mapping with select and a rule, got {rule!r}")
    try:
        return Override(**rule)
    except TypeError as err:
        raise TypeError(f"allocation.overrides[{index}]: {err}") from err


def _selector(select: str) -> Callable[[PrunableLayer], bool]:
    if select.startswith("role:"):
        role = select.removeprefix("role:")
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r} in selector {select!r}; choose from {list(ROLES)}")
        return lambda layer: layer.role == role
    try:
        pattern = re.compile(select)
    except re.error as err:
        raise ValueError(f"selector {select!r} is not a valid regular expression: {err}") from err
    return lambda layer: pattern.fullmatch(layer.name) is not None


# A method gets the free layers, their caps (max kept counts) and the free budget, and
# returns keep counts (one per free layer) that sum to the budget and respect the caps.
Method = Callable[[list[PrunableLayer], list[int], int, Allocation], list[int]]
ALLOCATIONS: dict[str, Method] = {}


PROFILE_METHODS: set[str] = set()  # methods that also get the RR profile passed to allocate, as ``profile=``
# methods that repair candidate allocations on calibration images, so need the data and the recipe that ``allocate``
# does not have: pipeline.choose_keep runs them
DATA_METHODS = ("search",)


def methods() -> list[str]:
    """Every allocation method's name: the registry's and the data-driven ones."""
    return sorted([*ALLOCATIONS, *DATA_METHODS])


def register(name: str, needs_profile: bool = False) -> Callable[[Method], Method]:
    def add(fn: Method) -> Method:
        ALLOCATIONS[name] = fn
        if needs_profile:
            PROFILE_METHODS.add(name)
        return fn

    return add


def allocate(
    model: nn.Module,
    sparsity: float,
    allocation: str | Mapping | Allocation | None = None,
    profile: RRProfile | None = None,
) -> dict[str, int]:
    """Keep count of every prunable layer so that global sparsity over prunable weights is ``sparsity``.

    ``allocation`` is a method name (``"lamp"``), a dict of ``Allocation`` options or an ``Allocation``;
    default ERK.
    ``profile`` (``diagnostics.rr_profile`` of ``model``) is required by the RR-guided methods, ignored by others.
    When the forced and dense layers use the whole budget, the free layers keep nothing (emptied, as a forced
    sparsity of 1 would); a target that needs more weights than the free layers can hold, or fewer than the
    forced layers keep, is refused.
    """
    allocation = as_allocation(allocation)
    if allocation.method in DATA_METHODS:
        raise ValueError(
            f"allocation {allocation.method!r} repairs candidate allocations on calibration images, so allocate() "
            "cannot run it: use prune_and_repair(...) or pipeline.choose_keep(model, batches, sparsity, allocation, "
            "recipe)"
        )
    method = ALLOCATIONS[allocation.method]
    if allocation.method in PROFILE_METHODS:
        if profile is None:
            raise ValueError(
                f"allocation {allocation.method!r} needs an RR profile: "
                "allocate(..., profile=diagnostics.rr_profile(model, calibration_batches))"
            )
        method = partial(method, profile=profile)
    if not is_real(sparsity) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    layers = prunable_layers(model)
    forced: dict[str, int] = {}
    caps = {layer.name: layer.numel for layer in layers}
    for rule in allocation.rules:
        match = _selector(rule.select)
        selected = [layer for layer in layers if match(layer)]
        if not selected and not rule.select.startswith("role:"):  # a role may be absent (no projection in MobileNet)
            names = ", ".join(layer.name for layer in layers[:8]) + (" ..." if len(layers) > 8 else "")
            raise ValueError(f"selector {rule.select!r} matches no prunable layer; layers are: {names}")
        for layer in selected:
            if rule.sparsity is not None:
                forced[layer.name] = layer.numel - round(rule.sparsity * layer.numel)
            else:
                caps[layer.name] = min(caps[layer.name], max(1, math.floor(rule.max_density * layer.numel)))
    total = sum(layer.numel for layer in layers)
    budget = round((1.0 - sparsity) * total) - sum(forced.values())
    free = [layer for layer in layers if layer.name not in forced]
    free_caps = [caps[layer.name] for layer in free]
    if budget < 0 or budget > sum(free_caps):
        raise ValueError(
            f"target sparsity {sparsity} is unreachable: forced/dense layers keep {sum(forced.values())} of "
            f"{total} weights, leaving {budget} for {len(free)} free layers that can hold at most {sum(free_caps)}"
        )
    keep = dict(forced)
    if free:
        counts = method(free, free_caps, budget, allocation)
        keep.update(zip([layer.name for layer in free], counts, strict=True))
    return {layer.name: keep[layer.name] for layer in layers}


def round_to_budget(densities: list[float], numels: list[int], caps: list[int], budget: int) -> list[int]:
    """Largest-remainder rounding of density * numel so counts sum exactly to ``budget`` within caps."""
    exact = [d * n for d, n in zip(densities, numels, strict=True)]
    counts = [min(c, math.floor(x)) for x, c in zip(exact, caps, strict=True)]
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - math.floor(exact[i])), i))
    short = budget - sum(counts)  # the dropped fractional parts: fewer than len(counts)
    for i in order:
        if short > 0 and counts[i] < caps[i]:
            counts[i] += 1
            short -= 1
    if short:
        raise RuntimeError(f"cannot place {short} weights within the layer caps")
    return counts


def water_fill(scores: list[float], numels: list[int], caps: list[int], budget: int) -> list[float]:
    """Densities eps * score_i, solved so kept weights meet ``budget``; a layer whose density would
    exceed its cap is fixed at the cap and eps re-solved (rigl's rule, one layer at a time,
    the most over-cap first)."""
    cap_density = [c / n for c, n in zip(caps, numels, strict=True)]
    fixed: dict[int, float] = {}
    while True:
        rest = [i for i in range(len(scores)) if i not in fixed]
        if not rest:  # budget == sum(caps): rounding error fixed the last layer too; all sit at their caps
            return [fixed[i] for i in range(len(scores))]
        remaining = budget - sum(fixed[i] * numels[i] for i in fixed)
        eps = remaining / sum(scores[i] * numels[i] for i in rest)
        over = [i for i in rest if eps * scores[i] > cap_density[i]]
        if not over:
            return [fixed.get(i, eps * scores[i]) for i in range(len(scores))]
        worst = max(over, key=lambda i: eps * scores[i] / cap_density[i])
        fixed[worst] = cap_density[worst]


@register("uniform")
def _uniform(layers, caps, budget, allocation):
    numels = [layer.numel for layer in layers]
    return round_to_budget(water_fill([1.0] * len(layers), numels, caps, budget), numels, caps, budget)


def erk_score(shape: tuple[int, ...], power: float = 1.0) -> float:
    """Erdos-Renyi-Kernel raw score: (sum of dims / product of dims) ** power."""
    return (sum(shape) / math.prod(shape)) ** power


@register("erk")
def _erk(layers, caps, budget, allocation):
    numels = [layer.numel for layer in layers]
    scores = [erk_score(layer.shape, allocation.power) for layer in layers]
    return round_to_budget(water_fill(scores, numels, caps, budget), numels, caps, budget)


def top_k_per_layer(scores: list[torch.Tensor], caps: list[int], budget: int) -> list[int]:
    """How many of each layer's scores fall in the global top ``budget``, each layer limited to its
    top ``cap`` scores. Ties are broken by layer order, then by position (stable sort)."""
    pooled, owner = [], []
    for i, (s, cap) in enumerate(zip(scores, caps, strict=True)):
        top = torch.sort(s.detach().flatten().float().cpu(), descending=True, stable=True).values[:cap]
        pooled.append(top)
        owner.append(torch.full((len(top),), i, dtype=torch.long))
    order = torch.sort(torch.cat(pooled), descending=True, stable=True).indices[:budget]
    return torch.bincount(torch.cat(owner)[order], minlength=len(scores)).tolist()


@register("global")
def _global(layers, caps, budget, allocation):
    return top_k_per_layer([layer.module.weight.abs() for layer in layers], caps, budget)


def lamp_scores(weight: torch.Tensor) -> torch.Tensor:
    """LAMP score of every weight, in the weight's shape: w_u^2 / sum_{v >= u} w_v^2 (ascending order)."""
    sq = weight.detach().flatten().double().square()
    sorted_sq, order = torch.sort(sq, stable=True)
    suffix = sorted_sq.flip(0).cumsum(0).flip(0)
    sorted_scores = torch.where(suffix > 0, sorted_sq / suffix.clamp_min(1e-300), torch.zeros_like(suffix))
    return torch.empty_like(sq).scatter_(0, order, sorted_scores).view_as(weight)


@register("lamp")
def _lamp(layers, caps, budget, allocation):
    return top_k_per_layer([lamp_scores(layer.module.weight) for layer in layers], caps, budget)


def lower_hull(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Lower convex hull of points sorted by x (Andrew's monotone chain); of equal x the first is kept."""
    hull: list[tuple[float, float]] = []
    for x, y in points:
        if hull and x <= hull[-1][0]:
            continue
        while len(hull) >= 2:
            (x0, y0), (x1, y1) = hull[-2], hull[-1]
            if (x1 - x0) * (y - y0) - (y1 - y0) * (x - x0) > 0:  # a left turn: hull[-1] stays
                break
            hull.pop()
        hull.append((x, y))
    return hull


def lagrangian_densities(
    curves: list[tuple[list[float], list[float]]], numels: list[int], caps: list[int], budget: int
) -> list[float]:
    """Densities minimising sum_l D_l(d_l) subject to sum_l d_l * numel_l = budget and d_l * numel_l <= cap_l.

    Each curve D_l is piecewise linear through knots (densities ascending from 0, damages). Within the caps,
    only its lower convex hull matters to the Lagrangian; a hull segment removes damage at a constant rate per
    kept weight, decreasing along the curve, so filling all layers' segments in order of that rate (the last one
    partially) is the exact optimum of the relaxation and meets the budget exactly.
    """
    segments = []
    for i, ((xs, ys), n, cap) in enumerate(zip(curves, numels, caps, strict=True)):
        limit = cap / n
        knots = [(x, y) for x, y in zip(xs, ys, strict=True) if x < limit] + [(limit, float(np.interp(limit, xs, ys)))]
        hull = lower_hull(knots)
        rate = math.inf
        for j, ((x0, y0), (x1, y1)) in enumerate(itertools.pairwise(hull)):
            rate = min(rate, (y0 - y1) / ((x1 - x0) * n))  # rounding must not reorder a layer's own segments
            segments.append((-rate, i, j, (x1 - x0) * n))
    densities, left = [0.0] * len(numels), float(budget)
    for _, i, _, weights in sorted(segments):
        if left <= 0:
            break
        take = min(weights, left)
        densities[i] += take / numels[i]
        left -= take
    return densities


@register("rr", needs_profile=True)
def _rr(layers, caps, budget, allocation, profile):
    numels = [layer.numel for layer in layers]
    curves = [profile.damage_curve(layer.name, layer.numel) for layer in layers]
    return round_to_budget(lagrangian_densities(curves, numels, caps, budget), numels, caps, budget)


RR_FLOOR = 1e-3  # erk_rr: smallest RR used, so a layer measured as perfectly repairable keeps a share


@register("erk_rr", needs_profile=True)
def _erk_rr(layers, caps, budget, allocation, profile):
    numels = [layer.numel for layer in layers]
    sparsity = 1.0 - budget / sum(numels)
    rr = [profile.rr_at(x.name, x.numel, sparsity) for x in layers]
    rr = [r if math.isnan(r) else max(r, RR_FLOOR) for r in rr]
    known = [r for r in rr if not math.isnan(r)]
    mean = math.exp(sum(map(math.log, known)) / len(known)) if known else 1.0
    factors = [1.0 if math.isnan(r) else r / mean for r in rr]
    scores = [
        erk_score(x.shape, allocation.power) * f**allocation.rr_power for x, f in zip(layers, factors, strict=True)
    ]
    return round_to_budget(water_fill(scores, numels, caps, budget), numels, caps, budget)


def allocation_table(model: nn.Module, keep: dict[str, int]) -> list[dict]:
    """Per-layer rows: name, role, shape, numel, kept, density."""
    return [
        {"name": layer.name, "role": layer.role, "shape": list(layer.shape), "numel": layer.numel,
         "kept": keep[layer.name], "density": keep[layer.name] / layer.numel}
        for layer in prunable_layers(model)
    ]  # fmt: skip


def format_table(rows: list[dict]) -> str:
    """A readable fixed-width table of allocation rows plus the achieved global sparsity."""
    head = f"{'layer':<28} {'role':<10} {'shape':<18} {'numel':>9} {'kept':>8} {'density':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        lines.append(f"{r['name']:<28} {r['role']:<10} {shape:<18} {r['numel']:>9} {r['kept']:>8} {r['density']:>8.4f}")
    total, kept = sum(r["numel"] for r in rows), sum(r["kept"] for r in rows)
    lines.append(f"global: kept {kept} of {total} prunable weights, sparsity {1 - kept / total:.4f}")
    return "\n".join(lines)
