"""Exact top-1/top-5 accuracy over a labeled loader, summed across processes."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    device: torch.device | str = "cpu",
    progress: Callable[[Iterable], Iterable] | None = None,
) -> dict[str, float | int]:
    """Accuracy counted sample by sample; under DDP each process passes its own non-padded shard
    and the counts (not the accuracies) are summed, so every test sample counts exactly once.

    Non-finite logits raise FloatingPointError on every process after the sum, so no process is left
    waiting in a collective for one that stopped."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(4, dtype=torch.float64, device=device)  # correct top-1, correct top-5, seen, non-finite
    try:
        for images, labels in progress(loader) if progress else loader:
            logits = model(images.to(device))
            labels = labels.to(device)
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits = top == labels[:, None]
            seen = torch.tensor(len(labels), device=device)
            non_finite = (~torch.isfinite(logits).all(1)).sum()
            counts += torch.stack([hits[:, 0].sum(), hits.any(1).sum(), seen, non_finite])
    finally:
        model.train(was_training)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(counts)
    top1, top5, seen, non_finite = counts.tolist()
    if non_finite:
        raise FloatingPointError(
            f"non-finite logits during evaluation for {int(non_finite)} of {int(seen)} test images: "
            "the model produced NaN/Inf"
        )
    if seen == 0:
        raise ValueError("evaluation saw no test sample: the test loader is empty")
    return {"top1": top1 / seen, "top5": top5 / seen, "samples": int(seen)}


@torch.no_grad()
def calibration_forward_time(model: nn.Module, batches: list[torch.Tensor]) -> float:
    """Seconds of one forward pass over ``batches`` in eval mode: the cost unit F of docs/methods.md.

    One warm-up batch runs first so the timed pass is representative.
    """
    was_training = model.training
    model.eval()
    try:
        model(batches[0])
        if batches[0].is_cuda:
            torch.cuda.synchronize(batches[0].device)
        start = time.perf_counter()
        for b in batches:
            model(b)
        if batches[0].is_cuda:
            torch.cuda.synchronize(batches[0].device)
        return time.perf_counter() - start
    finally:
        model.train(was_training)
