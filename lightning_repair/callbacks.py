"""TensorBoard views of a prune-and-repair run: per-layer RR, an RR heatmap and repair histograms.

Add ``RepairLogger`` to ``trainer.callbacks`` of any ``PruneRepairModule`` run that has a TensorBoardLogger.
The module does its work in ``on_fit_start``, which Lightning calls after the callbacks' own, so the logger
reads the finished run (``module.results``, ``module.report``) in ``on_fit_end``. Tags (step 0 unless noted):

- ``rr/<layer>``, ``d_raw/<layer>``, ``d_res/<layer>``: at the layer's allocated sparsity (the module logs
  ``density/<layer>`` itself); ``by_depth/{density,rr,d_raw,d_res}``: the same with step = layer index, one
  curve over depth (``by_depth/layers`` is the text table of indices and names).
- ``rr/heatmap``: image, layers x profile sparsities, with each layer's allocated sparsity marked.
- ``repair/variance_ratio_before``, ``repair/variance_ratio_after``, ``repair/gains``: histograms of the per-channel
  values at each repair site, step = site index in execution order (``repair/sites/<tag>`` names them);
  a quantity the repair report does not hold is skipped.

The run's hyperparameters with its final accuracies (TensorBoard's hparams view) are logged by the module itself
for every logger (``pipeline.run_hparams``): TensorBoard keeps the first hparams record of a run, so a second
one here would be ignored.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import matplotlib
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

REPORT_HISTOGRAMS = {"variance_ratio_before": "variance_ratio", "variance_ratio_after": "variance_ratio_after",
                     "gains": "gains"}  # fmt: skip  # tag -> RepairReport attribute
LAYER_METRICS = ("density", "rr", "d_raw", "d_res")


class RepairLogger(pl.Callback):
    """Log a PruneRepairModule run's per-layer RR diagnostics and repair statistics to TensorBoard."""

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        results = getattr(pl_module, "results", None)
        if not results:
            rank_zero_warn(f"RepairLogger: {type(pl_module).__name__} left no results to log (not a prune-repair run?)")
            return
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers:
            rank_zero_warn("RepairLogger: the trainer has no TensorBoardLogger; nothing is logged")
            return
        for logger in loggers:
            writer = logger.experiment
            log_layers(writer, results["layers"])
            if "rr_profile" in results:
                heatmap = rr_heatmap(results["rr_profile"], results["layers"])
                writer.add_image("rr/heatmap", heatmap, 0, dataformats="HWC")
            report = getattr(pl_module, "report", None)
            if report is not None:
                log_report(writer, report)
            writer.flush()


def log_layers(writer, rows: list[dict]) -> None:
    """Per-layer scalars (undefined values skipped) and the same values as curves over depth."""
    for index, row in enumerate(rows):
        for metric in LAYER_METRICS:
            value = row.get(metric)
            if value is None:
                continue
            if metric != "density":
                writer.add_scalar(f"{metric}/{row['name']}", value, 0)
            writer.add_scalar(f"by_depth/{metric}", value, index)
    writer.add_text("by_depth/layers", _table([(i, row["name"]) for i, row in enumerate(rows)]), 0)


def log_report(writer, report) -> None:
    """Histograms of the repair report's per-channel tensors, one step per site."""
    for tag, attribute in REPORT_HISTOGRAMS.items():
        per_site: dict[str, torch.Tensor] = getattr(report, attribute, None) or {}
        for index, values in enumerate(per_site.values()):
            values = values.detach().float().cpu()
            values = values[torch.isfinite(values)]
            if values.numel():
                writer.add_histogram(f"repair/{tag}", values, index)
        if per_site:
            writer.add_text(f"repair/sites/{tag}", _table(list(enumerate(per_site))), 0)


def rr_heatmap(profile: dict, rows: list[dict]) -> np.ndarray:
    """RGB image (H, W, 3) of RR, layers (rows, in network order) x profile sparsities (columns); undefined
    cells grey, each layer's allocated sparsity a dot placed by linear interpolation between columns (a triangle
    on the edge when it lies outside the grid, e.g. a layer kept dense)."""
    grid, names = profile["grid"], [r["name"] for r in profile["layers"]]
    rr = np.array([[math.nan if v is None else v for v in r["rr"]] for r in profile["layers"]], dtype=float)
    fig = Figure(figsize=(2.5 + 0.65 * len(grid), 1.2 + 0.24 * len(names)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.8")
    image = ax.imshow(np.ma.masked_invalid(rr), aspect="auto", cmap=cmap, vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(grid)), [f"{s:g}" for s in grid])
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("sparsity")
    ax.set_title("Relative Repairability (0 = repairable, 1 = not)", fontsize=9)
    allocated = {r["name"]: 1 - r["density"] for r in rows}
    marks = {"o": [], "<": [], ">": []}  # inside the grid; below it (e.g. a dense layer); above it
    for i, sparsity in ((i, allocated[n]) for i, n in enumerate(names) if n in allocated):
        if sparsity < grid[0]:
            marks["<"].append((-0.5, i))
        elif sparsity > grid[-1]:
            marks[">"].append((len(grid) - 0.5, i))
        else:
            marks["o"].append((np.interp(sparsity, grid, range(len(grid))), i))
    labels = {"o": "allocated sparsity", "<": "below the grid", ">": "above the grid"}
    for marker, points in marks.items():
        if points:
            ax.scatter(*zip(*points, strict=True), s=14, c="red", marker=marker, label=labels[marker], clip_on=False)
    if any(marks.values()):
        ax.legend(loc="upper left", bbox_to_anchor=(0, -0.08), fontsize=7, frameon=False, ncols=3)
    fig.colorbar(image, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def _table(pairs: list[tuple]) -> str:
    return "| index | name |\n|---|---|\n" + "\n".join(f"| {i} | {name} |" for i, name in pairs)
