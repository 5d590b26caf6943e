"""The one-shot pipeline, pure PyTorch: allocate, mask, repair, check the masks, and evaluate if asked.

    import lightning_repair as lr
    result = lr.prune_and_repair(dense, calibration_batches, sparsity=0.95, allocation="lamp", repair="default")
    result.model  # the repaired model, plain architecture; result.report says what the repair did

``lightning-repair fit`` (module.PruneRepairModule) runs it once; a sweep runs it per grid cell while sharing the
dense model, the calibration batches and the dense accuracy.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from .allocation import DATA_METHODS, Allocation, allocate, allocation_table, as_allocation
from .diagnostics import RRProfile
from .evaluation import evaluate as evaluate_on
from .masks import apply_masks, compute_masks, mask_violations
from .operators import Operator, parse_recipe
from .repair import RepairReport
from .repair import repair as run_repair
from .stores import Activations
from .utils import timed

if TYPE_CHECKING:
    from .search import SearchRecord

Evaluate = Callable[[nn.Module, str], dict]  # (model, description) -> {"top1", "top5", "samples"}


@dataclass
class PruneRepairResult:
    model: nn.Module  # pruned and repaired, plain architecture
    masks: dict[str, torch.Tensor]
    layers: list[dict]  # allocation rows: name, role, shape, numel, kept, density
    report: RepairReport
    timings: dict[str, float]
    pruned: dict | None = None  # accuracy of the pruned, unrepaired model (when evaluated)
    repaired: dict | None = None  # accuracy of the repaired model (when evaluated)
    search: dict | None = None  # what the ``search`` allocation did (SearchRecord.summary, repair_reused), if it ran

    @property
    def achieved_sparsity(self) -> float:
        return 1 - sum(r["kept"] for r in self.layers) / sum(r["numel"] for r in self.layers)


def check_operators_fit(model: nn.Module, recipe: Sequence[Operator]) -> None:
    """Refuse operators that act only at BatchNorm layers when the model has none (they would silently do
    nothing), naming the model and the operators; operators with another site (classifier, layers) run."""
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return
    bn_only = [op.op for op in recipe if op.needs_batchnorm]
    if bn_only:
        raise ValueError(
            f"{type(model).__name__} has no BatchNorm layer, so repair operator(s) {', '.join(bn_only)} cannot run "
            "(they correct BatchNorm statistics); operators that need none: classifier_refit, reconstruct"
        )


def choose_keep(
    dense: nn.Module,
    calibration: list[torch.Tensor],
    sparsity: float,
    allocation: str | Mapping | Allocation,
    recipe: Sequence[Operator],
    profile: RRProfile | None = None,
    forward_s: float | None = None,
    progress: Callable[[Iterable, str], Iterable] | None = None,
    held_out: Sequence[torch.Tensor] | None = None,
) -> tuple[dict[str, int], SearchRecord | None]:
    """Keep counts per layer, and the record of the search when ``allocation`` is ``search`` (None otherwise).

    ``search`` scores candidate allocations by repairing them with ``recipe`` on ``calibration`` (search.py), so
    it needs what ``allocate`` does not have; every other method is ``allocate``. ``forward_s``: the time of one
    dense pass over ``calibration`` if already measured (the search reports its cost in it); ``progress``
    wraps the search's candidates (a progress bar); ``held_out``: batches of the ``allocation.held_out_images``
    unlabeled images outside ``calibration`` that the search scores candidates on. Pass the record on to
    ``prune_and_repair(..., keep=keep, search=record)``: it holds the chosen candidate's repaired copy when the
    search fitted it on the whole of ``calibration``, which the pipeline then uses instead of repairing again."""
    allocation = as_allocation(allocation)
    if allocation.method not in DATA_METHODS:
        return allocate(dense, sparsity, allocation, profile=profile), None
    from .search import search_allocation  # the search imports the repair, which the rules do not need

    return search_allocation(dense, calibration, sparsity, recipe, allocation.search, allocation, forward_s,
                             progress, held_out)  # fmt: skip


def prune_and_repair(
    dense: nn.Module,
    calibration: Iterable[torch.Tensor],
    sparsity: float = 0.95,
    allocation: str | Mapping | Allocation = "lamp",
    repair: str | Sequence[dict | Operator] = "default",
    evaluate: Evaluate | Iterable | None = None,
    progress: Callable[[Iterable, str], Iterable] | None = None,
    profile: RRProfile | None = None,
    keep: Mapping[str, int] | None = None,
    activations: Activations = "device",
    held_out: Iterable[torch.Tensor] | None = None,
    search: SearchRecord | None = None,
) -> PruneRepairResult:
    """Prune a copy of ``dense`` to ``sparsity`` and repair it from unlabeled ``calibration`` batches (image tensors).

    ``allocation`` is a method name (``allocation.methods()``), a dict of its options or an ``Allocation``;
    ``repair`` a preset name (``operators.PRESETS``) or a list of operators. ``evaluate`` is optional: a labeled
    test loader (accuracy on the model's device), or a function ``(model, description) -> {"top1", ...}``; the
    pruned and the repaired model are then evaluated. ``profile`` is the RR profile of ``dense`` that the RR-guided
    allocations need (a sweep computes it once for all its cells); ``keep``, per-layer keep counts already
    allocated for ``sparsity``, skips the allocation; allocation ``search`` repairs candidates with ``repair``'s
    recipe on ``calibration`` first and scores them on ``held_out`` images (``choose_keep``, recorded in
    ``result.search``); ``search`` is that record when the caller ran ``choose_keep`` for ``keep`` itself. When the
    search fitted its candidates on the whole of ``calibration``, its chosen candidate is already repaired exactly as
    here, so it is not repaired again: ``result.search["repair_reused"]`` is then true and ``timings["repair"]`` is
    the time that repair took inside the search (also counted in ``timings["allocation"]``). ``activations`` is
    where the repair keeps activations (``repair.repair``). ``dense`` is left untouched. Masks are checked after the
    repair: a pruned weight that is not exactly zero is an error, never a silently denser model.
    """
    recipe = parse_recipe(repair)
    check_operators_fit(dense, recipe)
    if evaluate is not None and not callable(evaluate):
        evaluate = _loader_evaluation(evaluate, next(dense.parameters()).device)
    calibration = list(calibration)
    timings: dict[str, float] = {}
    if keep is None:
        with timed(timings, "allocation"):
            keep, search = choose_keep(dense, calibration, sparsity, allocation, recipe, profile, None, progress,
                                       None if held_out is None else list(held_out))  # fmt: skip
    reused = search.best.repaired if search is not None else None
    if reused is not None and reused.keep != dict(keep):
        reused = None
    pruned = repaired = None
    if reused is None or evaluate is not None:
        with timed(timings, "masking"):
            masks = compute_masks(dense, keep)
            model = apply_masks(copy.deepcopy(dense), masks)
        if evaluate is not None:
            with timed(timings, "evaluation"):
                pruned = evaluate(model, "evaluate pruned")
    if reused is None:
        with timed(timings, "repair"):
            report = run_repair(model, dense, calibration, recipe, masks=masks, activations=activations,
                                progress=progress and (lambda it: progress(it, "repair")))  # fmt: skip
        masks = report.masks or masks  # reconstruction may re-select masks from its statistics (same counts)
    else:  # the search's repair of these counts on these very batches: the model this repair would give
        model, masks, report = reused.model, reused.masks, reused.report
        timings["repair"] = reused.seconds
        reused.warn()
    timings.update(report.timings)  # the reconstruction's share of the repair time
    violations = mask_violations(model, masks)
    if violations:
        raise RuntimeError(f"repair broke the masks (non-zero pruned weights): {violations}")
    if evaluate is not None:
        with timed(timings, "evaluation"):
            repaired = evaluate(model, "evaluate repaired")
    summary = None if search is None else search.summary() | {"repair_reused": reused is not None}
    return PruneRepairResult(model, masks, allocation_table(dense, keep), report, timings, pruned, repaired, summary)


def _loader_evaluation(loader: Iterable, device: torch.device) -> Evaluate:
    return lambda model, _description: evaluate_on(model, loader, device)
