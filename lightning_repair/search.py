"""``search``: a label-free allocation search, scored by what the repair actually achieves (docs/methods.md).

Fixed rules (global, ERK, LAMP) place weights by magnitude or by shape; none of them knows what the repair can
undo, and which one wins changes from cell to cell. ``search`` picks, per cell, the allocation whose *repaired*
network reproduces the dense network's outputs best on unlabeled images:

1. **Objective.** After a repair with the cell's own recipe fitted on the first ``fit_images`` calibration images
   (all of them by default), the distance of the repaired logits to the dense logits on ``held_out_images``
   unlabeled training images outside the calibration set: the mean KL divergence
   KL(softmax(dense) || softmax(repaired)) per image (``kl``), or the mean squared logit difference (``mse``).
   benchmarks/results/search.md measured which variant tracks test top-1: scored on the images it was fitted on,
   the repair's KL picks ERK at 94-95% on the ResNet-18, 0.3-0.5 points below LAMP; on 1024 other training
   images it picks global at 94% (0.2 below LAMP) and LAMP at 95%; a repair fitted on 256-768 images ranks
   allocations unlike the full repair. ``held_out_images: 0`` scores on the last ``score_images`` calibration
   images instead.
2. **Fixed rules first.** Global, ERK and LAMP (with the base allocation's keep_dense/overrides) are always scored;
   the best of them is the starting point, so the result is never worse than the best fixed rule by the objective.
3. **Error table.** e_l(d): each layer's relative output error after the repair's own per-layer fit (for a recipe
   that reconstructs layers, the ridge least-squares residual of the layer re-solved on its dense input, as RR's
   ``reconstruct`` profile; otherwise the least-squares channel-wise affine fit, RR's ``ls``) at a grid of
   densities plus each fixed rule's own keep count, from one streaming pass over the fit images.
4. **Coefficients.** Candidates minimise sum_l c_l e_l(d_l) under the budget exactly (the ``rr`` rule's lower-hull
   Lagrangian). The search starts from the coefficients that make the best fixed rule itself the minimiser
   (c_l = 1 / the geometric mean of the hull's rates on either side of its density) and moves log c_l forward-only
   (SPDY-style: every candidate is scored by the objective, no gradient), by a pattern search along a few
   directions: towards each other fixed rule's implied coefficients, along depth, along log layer size; the first
   improving step is taken, the step is halved after a round without improvement. A step improves when its
   objective is lower by at least ``min_z`` standard errors of the mean per-image difference (a paired test on
   the same images): with 7 candidates on 1024 images, moves of 1-3% in the KL went either way on test top-1
   (benchmarks/results/search.md), so a move must be larger than the objective's noise. Allocations already scored are
   not scored again; at most ``max_candidates`` are.

Everything is deterministic (no random draw; statistics reduced as sums across DDP processes, the objective's sums
too), so every process takes the same decisions and returns the same keep counts.
Cost is reported in F, one dense forward pass over the full calibration set.

When every process fits on its whole calibration shard (the default), the best candidate's repaired copy is exactly
what ``pipeline.prune_and_repair`` would build from the chosen counts: the search keeps it (``Candidate.repaired``,
for the best candidate only) and the pipeline uses it instead of repairing again.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .allocation import FIXED_RULES, OBJECTIVES, Allocation, SearchOptions, allocate, lower_hull
from .diagnostics import layer_damage, magnitude_ranks, reconstruction_residuals, stream_moments
from .evaluation import calibration_forward_time
from .layers import prunable_layers
from .masks import apply_masks, compute_masks
from .operators import Operator, parse_recipe
from .repair import RepairReport, repair
from .stats import all_reduce_sum


@dataclass
class Repaired:
    """A copy of the dense model pruned by magnitude to ``keep`` and repaired: its masks (as the repair left them),
    the repair's report, the seconds the repair took and the warnings it gave."""

    keep: dict[str, int]
    model: nn.Module
    masks: dict[str, torch.Tensor]
    report: RepairReport
    seconds: float
    caught: list[warnings.WarningMessage]

    def warn(self) -> None:
        """Give again the warnings the repair gave (the search silenced them)."""
        for w in self.caught:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


@dataclass
class Candidate:
    label: str  # global, erk, lamp, table:<step>
    keep: dict[str, int]
    objective: float  # the mean over every process's score images
    per_image: torch.Tensor = field(repr=False, compare=False, default=None)  # this process's images
    # the repaired copy, kept for the best candidate only, when its fit images are the whole calibration set
    repaired: Repaired | None = field(repr=False, compare=False, default=None)


@dataclass
class SearchRecord:
    """What the search did: every candidate scored (in order), the start, the choice and the cost."""

    chosen: str
    start: str
    objective: str
    candidates: list[Candidate] = field(default_factory=list)
    coefficients: dict[str, float] = field(default_factory=dict)  # c_l of the chosen candidate (empty: a fixed rule)
    alpha: dict[str, float] = field(default_factory=dict)  # its position along each search direction
    seconds: float = 0.0
    cost_f: float = 0.0  # seconds / F
    forward_s: float = 0.0  # F
    timings: dict[str, float] = field(default_factory=dict)

    def densities(self, numels: Mapping[str, int]) -> dict[str, float]:
        keep = self.best.keep
        return {name: keep[name] / numels[name] for name in keep}

    @property
    def best(self) -> Candidate:
        return next(c for c in self.candidates if c.label == self.chosen)

    def summary(self) -> dict:
        """JSON-ready: chosen and start labels, the start's keep counts, objective values of every candidate, cost."""
        return {
            "chosen": self.chosen,
            "start": self.start,
            "start_kept": dict(next(c for c in self.candidates if c.label == self.start).keep),
            "objective": self.objective,
            "objectives": {c.label: c.objective for c in self.candidates},
            "candidates": len(self.candidates),
            "cost_f": self.cost_f,
            "seconds": self.seconds,
            "forward_s": self.forward_s,
            "timings_s": dict(self.timings),
            "coefficients": dict(self.coefficients),
            "alpha": dict(self.alpha),
        }


# ----------------------------------------------------------------------------- the objective


def split_batches(
    batches: Sequence[torch.Tensor], first: int, last: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The first ``first`` and the last ``last`` images of ``batches`` (this process's share under DDP: each
    process takes the same fraction of its own shard), re-batched with the original batch size."""
    images = torch.cat(list(batches))
    n = images.shape[0]
    size = batches[0].shape[0]
    world = _world_size()
    first, last = min(n, math.ceil(first / world)), min(n, math.ceil(last / world))
    chunk = lambda x: list(x.split(size))  # noqa: E731
    return chunk(images[:first]), chunk(images[n - last :])


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def logits_of(model: nn.Module, batches: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    was_training = model.training
    model.eval()
    try:
        return [model(b) for b in batches]
    finally:
        model.train(was_training)


@torch.no_grad()
def per_image_distance(
    model: nn.Module, batches: Sequence[torch.Tensor], dense_logits: Sequence[torch.Tensor], objective: str = "kl"
) -> torch.Tensor:
    """This process's per-image KL(softmax(dense) || softmax(model)) (``kl``) or squared logit difference summed
    over classes (``mse``), in float64."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r} is not one of {OBJECTIVES}")
    values = []
    for out, ref in zip(logits_of(model, batches), dense_logits, strict=False):
        out, ref = out.double(), ref.double()
        if objective == "kl":
            p = ref.log_softmax(1)
            values.append((p.exp() * (p - out.log_softmax(1))).sum(1))
        else:
            values.append((out - ref).square().sum(1))
    return torch.cat(values)


def output_distance(
    model: nn.Module, batches: Sequence[torch.Tensor], dense_logits: Sequence[torch.Tensor], objective: str = "kl"
) -> float:
    """Mean per image over all processes of ``per_image_distance``; sums reduced across DDP processes."""
    return mean_over_processes(per_image_distance(model, batches, dense_logits, objective))


def mean_over_processes(per_image: torch.Tensor) -> float:
    total = all_reduce_sum(torch.stack([per_image.sum(), per_image.new_tensor(float(len(per_image)))]))
    value = float(total[0] / total[1])
    return value if math.isfinite(value) else math.inf


def better(a: Candidate, b: Candidate, min_z: float) -> bool:
    """Whether ``a``'s objective is lower than ``b``'s by at least ``min_z`` standard errors of the mean per-image
    difference (a paired test on the same score images; sums reduced across DDP processes, so every process
    decides alike). ``min_z`` 0: any lower objective."""
    if not math.isfinite(b.objective) or min_z == 0:
        return a.objective < b.objective
    d = b.per_image - a.per_image
    n, total, squares = all_reduce_sum(torch.stack([d.new_tensor(float(len(d))), d.sum(), d.square().sum()])).tolist()
    mean = total / n
    variance = max(squares / n - mean * mean, 0.0) * n / max(n - 1, 1)
    return mean > 0 and mean >= min_z * math.sqrt(variance / n)


def stand_in(dense: nn.Module, keep: Mapping[str, int], fit: Sequence[torch.Tensor], recipe) -> nn.Module:
    """A copy of ``dense`` pruned by magnitude to ``keep`` and repaired on ``fit`` with ``recipe``."""
    return repaired_copy(dense, keep, fit, recipe).model


def repaired_copy(dense: nn.Module, keep: Mapping[str, int], fit: Sequence[torch.Tensor], recipe) -> Repaired:
    """``stand_in`` with its masks, report, time and warnings: the same steps as ``pipeline.prune_and_repair``'s,
    so on the same batches the same model bit for bit (on the activations store ``device``, which gives the same
    model as ``host`` and ``disk``: ``repair.repair``)."""
    masks = compute_masks(dense, dict(keep))
    model = apply_masks(copy.deepcopy(dense), masks)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:  # not shown: e.g. few fit images' fewer-rows warning
        warnings.simplefilter("always")
        report = repair(model, dense, fit, recipe, masks=masks)
    return Repaired(dict(keep), model, report.masks or masks, report, time.perf_counter() - start, caught)


# ----------------------------------------------------------------------------- the error table


@dataclass
class ErrorTable:
    """Per layer, knots (densities ascending from 0 to 1, errors) of e_l(d); ``scale`` weighs each layer (c_l).

    Has the interface of an RR profile that the ``rr`` allocation reads (``damage_curve``), so the exact budgeted
    minimiser of sum_l c_l e_l(d_l) is the ``rr`` rule run on this table."""

    curves: dict[str, tuple[list[float], list[float]]]
    scale: dict[str, float] = field(default_factory=dict)

    def damage_curve(self, name: str, numel: int) -> tuple[list[float], list[float]]:
        xs, ys = self.curves[name]
        c = self.scale.get(name, 1.0)
        return list(xs), [c * y for y in ys]

    def scaled(self, scale: Mapping[str, float]) -> ErrorTable:
        return ErrorTable(self.curves, dict(scale))


def error_table(
    dense: nn.Module, batches: Sequence[torch.Tensor], keeps: Mapping[str, Sequence[int]], reconstruct: bool = True
) -> ErrorTable:
    """e_l at the given keep counts of each layer (plus 0 and all weights), from one streaming pass of ``dense``
    over ``batches``: the relative output error left by the layer's own least-squares reconstruction
    (``reconstruct``) or by the least-squares channel-wise affine fit, on the dense input (diagnostics.py)."""
    layers = prunable_layers(dense)
    counts = [sorted({k for k in keeps[layer.name] if 0 < k < layer.numel}) for layer in layers]
    counts = [ks or [max(1, layer.numel // 2)] for ks, layer in zip(counts, layers, strict=False)]
    ranks = [magnitude_ranks(layer.module.weight) for layer in layers]
    masks = [[rank < k for k in ks] for rank, ks in zip(ranks, counts, strict=False)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        moments, _, grams = stream_moments(dense, batches, layers, masks, with_grams=reconstruct)
        curves = {}
        for i, layer in enumerate(layers):
            residual = reconstruction_residuals(layer, grams[i], moments[i], masks[i]) if reconstruct else None
            _, d_res, d_empty = layer_damage(moments[i], len(counts[i]), layer.module.bias,
                                        "reconstruct" if reconstruct else "ls", residual)  # fmt: skip
            ys = [0.0 if math.isnan(v) else max(0.0, v) for v in d_res.tolist()]
            empty = float(d_empty)
            xs = [0.0] + [k / layer.numel for k in counts[i]] + [1.0]
            ys = [0.0 if math.isnan(empty) else empty] + ys + [0.0]
            curves[layer.name] = (xs, ys)
    return ErrorTable(curves)


def table_knots(counts: Sequence[int], numel: int, factors: Sequence[float]) -> list[int]:
    """Keep counts at which a layer's error is measured: ``counts`` and ``factors`` times their geometric mean."""
    centre = math.exp(sum(math.log(max(k, 1)) for k in counts) / len(counts))
    return sorted({*counts, *(min(numel, max(1, round(f * centre))) for f in factors)})


def implied_coefficients(table: ErrorTable, keep: Mapping[str, int], numels: Mapping[str, int]) -> dict[str, float]:
    """c_l that make ``keep`` the minimiser of sum_l c_l e_l(d_l): at each layer's density on its lower hull,
    1 / the geometric mean of the error removed per kept weight by the hull segments on either side (a density
    inside a segment: 1 / that segment's rate), so every layer's marginal rate is 1 at the given allocation."""
    coefficients = {}
    for name, (xs, ys) in table.curves.items():
        n, d = numels[name], keep[name] / numels[name]
        hull = lower_hull(list(zip(xs, ys, strict=False)))
        rates = [(y0 - y1) / ((x1 - x0) * n) for (x0, y0), (x1, y1) in zip(hull, hull[1:], strict=False)]
        left = [r for (x0, _), (x1, _), r in zip(hull, hull[1:], rates, strict=False) if x1 <= d + 1e-12]
        right = [r for (x0, _), (x1, _), r in zip(hull, hull[1:], rates, strict=False) if x0 >= d - 1e-12]
        inside = [
            r for (x0, _), (x1, _), r in zip(hull, hull[1:], rates, strict=False) if x0 < d - 1e-12 < d + 1e-12 < x1
        ]
        floor = 1e-30
        if inside:
            rate = inside[0]
        elif left and right:
            rate = math.sqrt(max(left[-1], floor) * max(right[0], floor))
        else:
            rate = (left[-1] if left else right[0]) if (left or right) else 1.0
        coefficients[name] = 1.0 / max(rate, floor)
    return coefficients


def search_directions(
    names: Sequence[str], numels: Mapping[str, int], implied: Mapping[str, Mapping[str, float]], start: str
) -> dict[str, dict[str, float]]:
    """Directions in log c_l the search moves along, from the start rule's implied coefficients:
    ``to_<rule>`` towards each other fixed rule's implied coefficients (1 reaches it), ``depth`` (first layer -1,
    last +1: a positive step makes late layers' errors weigh more, so they keep more weights) and ``size``
    (log numel, standardised: a positive step favours large layers)."""
    directions = {}
    for rule, coefficients in implied.items():
        if rule != start:
            directions[f"to_{rule}"] = {n: math.log(coefficients[n]) - math.log(implied[start][n]) for n in names}
    last = max(len(names) - 1, 1)
    directions["depth"] = {n: 2 * i / last - 1 for i, n in enumerate(names)}
    logs = [math.log(numels[n]) for n in names]
    mean = sum(logs) / len(logs)
    std = math.sqrt(sum((x - mean) ** 2 for x in logs) / len(logs)) or 1.0
    directions["size"] = {n: (x - mean) / std for n, x in zip(names, logs, strict=False)}
    return directions


def minimise(
    dense: nn.Module, sparsity: float, table: ErrorTable, coefficients: Mapping[str, float], base: Allocation
) -> dict[str, int]:
    """Keep counts minimising sum_l c_l e_l(d_l) at ``sparsity`` (exact budget), with ``base``'s forced layers."""
    rule = Allocation(method="rr", keep_dense=list(base.keep_dense), overrides=list(base.overrides))
    return allocate(dense, sparsity, rule, profile=table.scaled(coefficients))


# ----------------------------------------------------------------------------- the search


def uses_reconstruction(recipe: Sequence[Operator]) -> bool:
    """Whether ``recipe`` re-solves every prunable layer (the ``reconstruct`` operator on all layers)."""
    return any(getattr(op, "op", None) == "reconstruct" and getattr(op, "layers", None) == "all" for op in recipe)


def search_allocation(
    dense: nn.Module,
    batches: Sequence[torch.Tensor],
    sparsity: float,
    recipe: str | Sequence[dict | Operator],
    options: SearchOptions | None = None,
    base: Allocation | None = None,
    forward_s: float | None = None,
    progress: Callable[[Iterable, str], Iterable] | None = None,
    held_out: Sequence[torch.Tensor] | None = None,
) -> tuple[dict[str, int], SearchRecord]:
    """Keep counts per layer at ``sparsity`` chosen by the label-free search, and the record of the search.

    Args:
        dense: the dense network (left untouched).
        batches: this process's calibration batches.
        sparsity: target global sparsity over prunable weights.
        recipe: the repair the cell will run (the stand-in repair is the same recipe on fewer images).
        options: SearchOptions.
        base: keep_dense and overrides shared by every candidate (its method is ignored).
        forward_s: F in seconds, if already measured (else measured here, and counted).
        progress: wraps an iterable of the candidate slots (a progress bar), advanced as each candidate is scored.
        held_out: this process's batches of the ``options.held_out_images`` images outside the calibration set
            that the objective is measured on (required unless that is 0).
    """
    start_time = time.perf_counter()
    options = options or SearchOptions()
    base = base or Allocation()
    recipe = parse_recipe(recipe)
    timings: dict[str, float] = {}
    if forward_s is None:
        forward_s = calibration_forward_time(dense, list(batches))
    numels = {layer.name: layer.numel for layer in prunable_layers(dense)}
    if options.held_out_images:
        if held_out is None:
            raise ValueError(
                f"search.held_out_images={options.held_out_images}: pass held_out=, batches of unlabeled images "
                "outside the calibration set (ImageDataModule.held_out_batches), or set held_out_images to 0 to "
                "score candidates on the calibration images"
            )
        fit, score = split_batches(batches, options.fit_images, 0)[0], list(held_out)
    else:
        fit, score = split_batches(batches, options.fit_images, options.score_images)
    whole = [b.shape for b in fit] == [b.shape for b in batches]  # the same images in the same batches
    if whole:
        fit = list(batches)  # the very tensors the pipeline's repair reads
    # keep the best candidate's repaired copy only if every process fits on its whole shard (one decision for all)
    reusable = all_reduce_sum(torch.tensor(float(not whole), device=batches[0].device)).item() == 0

    t = time.perf_counter()
    dense_logits = logits_of(dense, score)
    timings["dense_logits"] = time.perf_counter() - t

    scored: dict[tuple, Candidate] = {}
    order: list[Candidate] = []
    slots = range(options.max_candidates)
    ticks = iter(progress(slots, "allocation search") if progress else slots)

    def score_of(label: str, keep: dict[str, int]) -> Candidate:
        key = tuple(keep[name] for name in numels)
        if key in scored:
            return scored[key]
        t0 = time.perf_counter()
        repaired = repaired_copy(dense, keep, fit, recipe)
        per_image = per_image_distance(repaired.model, score, dense_logits, options.objective)
        timings["candidates"] = timings.get("candidates", 0.0) + time.perf_counter() - t0
        candidate = Candidate(label, dict(keep), mean_over_processes(per_image), per_image,
                              repaired if reusable else None)  # fmt: skip
        scored[key] = candidate
        order.append(candidate)
        next(ticks, None)
        return candidate

    def drop_all_but_best() -> None:  # at most one repaired copy alive besides the one being scored
        for c in order:
            if c is not best:
                c.repaired = None

    fixed = {}
    best = None
    for rule in FIXED_RULES:  # the lowest objective, the first on ties
        rule_allocation = Allocation(method=rule, keep_dense=list(base.keep_dense), overrides=list(base.overrides))
        fixed[rule] = allocate(dense, sparsity, rule_allocation)
        candidate = score_of(rule, fixed[rule])
        if best is None or candidate.objective < best.objective:
            best = candidate
        drop_all_but_best()
    start = best

    t = time.perf_counter()
    knots = {name: table_knots([fixed[r][name] for r in FIXED_RULES], n, options.factors) for name, n in numels.items()}
    table = error_table(dense, fit, knots, reconstruct=uses_reconstruction(recipe))
    timings["error_table"] = time.perf_counter() - t

    names = list(numels)
    implied = {r: implied_coefficients(table, fixed[r], numels) for r in FIXED_RULES}
    base_log_c = {name: math.log(c) for name, c in implied[start.label].items()}
    directions = search_directions(names, numels, implied, start.label)
    alpha = dict.fromkeys(directions, 0.0)

    def coefficients(a: Mapping[str, float]) -> dict[str, float]:
        return {n: math.exp(base_log_c[n] + sum(a[k] * directions[k][n] for k in directions)) for n in names}

    def try_alpha(a: dict[str, float], label: str) -> Candidate | None:
        t0 = time.perf_counter()
        keep = minimise(dense, sparsity, table, coefficients(a), base)
        timings["minimise"] = timings.get("minimise", 0.0) + time.perf_counter() - t0
        if tuple(keep[name] for name in names) in scored:
            return None
        return score_of(label, keep)

    best_alpha: dict[str, float] | None = None
    # pattern search: a step along +-each direction from the best point, the first improvement taken, the step
    # halved when no direction improves
    step, steps = options.step, 0
    while len(order) < options.max_candidates and step >= options.min_step:
        improved = False
        for key in directions:
            for sign in (1.0, -1.0):
                if len(order) >= options.max_candidates:
                    break
                trial = dict(alpha)
                trial[key] += sign * step
                steps += 1
                candidate = try_alpha(trial, f"table:{key}{sign * step:+g}@{steps}")
                if candidate is not None and better(candidate, best, options.min_z):
                    best, alpha, best_alpha, improved = candidate, trial, trial, True
                drop_all_but_best()
                if improved:
                    break
            if improved:
                break
        if not improved:
            step /= 2
    best_coefficients = coefficients(best_alpha) if best_alpha is not None else {}

    seconds = time.perf_counter() - start_time
    record = SearchRecord(
        chosen=best.label, start=start.label, objective=options.objective, candidates=order,
        coefficients=best_coefficients, alpha=best_alpha or {}, seconds=seconds, cost_f=seconds / forward_s, forward_s=forward_s,  # noqa: E501
        timings=timings,
    )  # fmt: skip
    return dict(best.keep), record
