"""One-shot prune and repair of a dense model: allocate, mask, evaluate, repair, evaluate.

Pure PyTorch. The Lightning module runs it once; a sweep runs it per grid cell while
sharing the dense model, the calibration batches and the dense accuracy.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .allocation import Allocation, allocate, allocation_table
from .diagnostics import RRProfile
from .masks import apply_masks, compute_masks, mask_violations
from .operators import Operator
from .repair import RepairReport, repair
from .stores import Activations
from .utils import timed

Evaluate = Callable[[nn.Module, str], dict]  # (model, description) -> {"top1", "top5", "samples"}


@dataclass
class OneShotResult:
    model: nn.Module  # pruned and repaired, plain architecture
    masks: dict[str, torch.Tensor]
    layers: list[dict]  # allocation rows: name, role, shape, numel, kept, density
    pruned: dict  # accuracy of the pruned, unrepaired model
    repaired: dict  # accuracy of the repaired model
    report: RepairReport
    timings: dict[str, float]

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


def prune_and_repair(
    dense: nn.Module,
    calibration: Sequence[torch.Tensor],
    sparsity: float,
    allocation: Allocation,
    recipe: Sequence[Operator],
    evaluate: Evaluate,
    progress: Callable[[Iterable, str], Iterable] | None = None,
    profile: RRProfile | None = None,
    keep: Mapping[str, int] | None = None,
    activations: Activations = "device",
) -> OneShotResult:
    """Prune a copy of ``dense`` to ``sparsity`` and repair it from unlabeled ``calibration`` batches.

    ``profile`` is the RR profile of ``dense`` that the RR-guided allocations need (a sweep computes it
    once for all its cells); ``keep``, per-layer keep counts already allocated for ``sparsity``, skips the
    allocation. ``activations`` is where the repair keeps activations (``repair.repair``). ``dense`` is left
    untouched. Masks are checked after the repair: a pruned
    weight that is not exactly zero is an error, never a silently denser model.
    """
    check_operators_fit(dense, recipe)
    timings: dict[str, float] = {}
    if keep is None:
        with timed(timings, "allocation"):
            keep = allocate(dense, sparsity, allocation, profile=profile)
    with timed(timings, "masking"):
        masks = compute_masks(dense, keep)
        model = apply_masks(copy.deepcopy(dense), masks)
    with timed(timings, "evaluation"):
        pruned = evaluate(model, "evaluate pruned")
    with timed(timings, "repair"):
        report = repair(model, dense, calibration, recipe, progress=progress and (lambda it: progress(it, "repair")),
                        masks=masks, activations=activations)  # fmt: skip
    masks = report.masks or masks  # reconstruction may re-select masks from its statistics (same counts)
    timings.update(report.timings)  # the reconstruction's share of the repair time
    violations = mask_violations(model, masks)
    if violations:
        raise RuntimeError(f"repair broke the masks (non-zero pruned weights): {violations}")
    with timed(timings, "evaluation"):
        repaired = evaluate(model, "evaluate repaired")
    return OneShotResult(model, masks, allocation_table(dense, keep), pruned, repaired, report, timings)
