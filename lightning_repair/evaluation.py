"""Exact top-1/top-5 accuracy over a labeled loader, summed across processes."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from .utils import InMemoryFormat, is_layout_error

MIXED = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}  # Lightning's precision names


def evaluation_precision(precision: str | int | None, device: torch.device | str) -> str:
    """The precision evaluation runs in: a mixed precision (``bf16-mixed``, ``16-mixed``) on a GPU, else float32
    (``32-true``). The repair's statistics never use it."""
    return str(precision) if str(precision) in MIXED and torch.device(device).type == "cuda" else "32-true"


def evaluate(
    model: nn.Module,
    loader: Iterable,
    device: torch.device | str = "cpu",
    progress: Callable[[Iterable], Iterable] | None = None,
    precision: str | None = None,
) -> dict[str, float | int]:
    """Accuracy counted sample by sample; under DDP each process passes its own non-padded shard
    and the counts (not the accuracies) are summed, so every test sample counts exactly once.

    Runs under ``torch.inference_mode``, a convolutional model in channels-last memory format (1.5x faster on a
    CPU, and on GPUs with tensor cores; the model is given back in its own tensors), on a GPU under autocast when
    ``precision`` is ``bf16-mixed`` or ``16-mixed`` (``evaluation_precision``); a batch that does not fit in GPU
    memory is evaluated in halves (the counts are the same). Non-finite logits raise FloatingPointError on
    every process after the sum, so no process is left waiting in a collective for one that stopped."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    cuda = device.type == "cuda"
    layout = torch.channels_last if any(isinstance(m, nn.Conv2d) for m in model.modules()) else None
    precision = evaluation_precision(precision, device)
    counts = torch.zeros(4, dtype=torch.float64, device=device)  # correct top-1, correct top-5, seen, non-finite
    try:
        with InMemoryFormat(layout, model) as swap, torch.inference_mode(), torch.autocast(
            device.type, MIXED.get(precision), enabled=precision in MIXED
        ):
            for index, (images, labels) in enumerate(progress(loader) if progress else loader):
                images, labels = images.to(device, non_blocking=cuda), labels.to(device)
                try:
                    counts += _counts(model, _in_layout(images, layout), labels)
                except RuntimeError as error:
                    if layout is None or index > 0 or not is_layout_error(error):
                        raise
                    # e.g. a forward that calls .view on a conv activation: its own format from the first batch on
                    warnings.warn(f"evaluation: the model does not run channels-last ({error}): evaluating it in "
                                  "its own memory format", stacklevel=2)  # fmt: skip
                    swap.undo()
                    layout = None
                    counts += _counts(model, images, labels)
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


def _in_layout(images: torch.Tensor, layout: torch.memory_format | None) -> torch.Tensor:
    return images.contiguous(memory_format=layout) if layout is not None and images.dim() == 4 else images


def _counts(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(top-1 hits, top-5 hits, images, images with non-finite logits) of one batch, split in halves on a GPU
    out-of-memory error."""
    try:
        logits = model(images).float()
    except torch.cuda.OutOfMemoryError:
        if len(images) == 1:
            raise
        torch.cuda.empty_cache()
        half = len(images) // 2
        return _counts(model, images[:half], labels[:half]) + _counts(model, images[half:], labels[half:])
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    non_finite = (~torch.isfinite(logits).all(1)).sum()
    seen = torch.tensor(len(labels), device=logits.device)
    return torch.stack([hits[:, 0].sum(), hits.any(1).sum(), seen, non_finite]).double()


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
