"""TensorBoard views of a prune-and-repair run: per-layer RR, an RR heatmap and repair histograms.

Add ``RepairLogger`` to ``trainer.callbacks`` of any ``PruneRepairModule`` run that has a TensorBoardLogger.
The module does its work in ``on_fit_start``, which Lightning calls after the callbacks' own, so the logger
reads the finished run (``module.results``, ``module.report``) in ``on_fit_end``. Tags (step 0 unless noted):

- ``rr/<layer>``, ``d_raw/<layer>``, ``d_res/<layer>``: at the layer's allocated sparsity (the module logs
  ``density/<layer>`` itself); ``by_depth/{density,rr,d_raw,d_res}``: the same with step = layer index, one
  curve over depth (``by_depth/layers`` is the text table of indices and names).
- ``rr/heatmap``: image, layers x profile sparsities (a numeric axis), with each layer's allocated sparsity marked.
- ``repair/variance_ratio_before``, ``repair/variance_ratio_after``, ``repair/gains``: histograms of the per-channel
  values at each repair site, step = site index in execution order (``repair/sites/<tag>`` names them);
  a quantity the repair report does not hold is skipped.

The run's hyperparameters with its final accuracies (TensorBoard's hparams view) are logged by the module itself
for every logger (``pipeline.run_hparams``): TensorBoard keeps the first hparams record of a run, so a second
one here would be ignored.
"""

from __future__ import annotations

import math
from pathlib import Path

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
    """RGB image (H, W, 3) of ``heatmap_figure``."""
    fig = heatmap_figure(profile, rows)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def _spread(sparsity):
    """The heatmap's x scale: -log10(density), so that 0.5, 0.9, 0.99 are evenly spaced."""
    return -np.log10(np.clip(1.0 - np.asarray(sparsity, dtype=float), 1e-6, None))


def _unspread(x):
    return 1.0 - 10.0 ** -np.asarray(x, dtype=float)


def heatmap_figure(profile: dict, rows: list[dict]) -> Figure:
    """RR, layers (rows, in network order) x profile sparsities on a numeric axis (scale -log10(density));
    undefined cells grey; each layer's allocated sparsity a red dot at its value, a dense layer at 0, and a
    layer pruned entirely a triangle at the right edge."""
    grid, names = profile["grid"], [r["name"] for r in profile["layers"]]
    rr = np.array([[math.nan if v is None else v for v in r["rr"]] for r in profile["layers"]], dtype=float)
    fig = Figure(figsize=(3.5 + 0.65 * len(grid), 1.2 + 0.24 * len(names)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_xscale("function", functions=(_spread, _unspread))
    centers = _spread(grid)  # cell edges halfway between grid points in the scale's coordinates
    gaps = np.diff(centers) if len(grid) > 1 else np.array([0.5])
    inner = (centers[:-1] + centers[1:]) / 2
    edges = _unspread(np.concatenate([[centers[0] - gaps[0] / 2], inner, [centers[-1] + gaps[-1] / 2]]))
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.8")
    mesh = ax.pcolormesh(edges, np.arange(len(names) + 1) - 0.5, np.ma.masked_invalid(rr), cmap=cmap,
                         vmin=0.0, vmax=1.0)  # fmt: skip
    allocated = {r["name"]: 1 - r["density"] for r in rows}
    points = [(allocated[n], i) for i, n in enumerate(names) if n in allocated]
    inside = [(s, i) for s, i in points if s < 1]
    emptied = [i for s, i in points if s >= 1]
    low = min([edges[0], *(s for s, _ in inside)])
    high = edges[-1]
    ax.set_xlim(_unspread(_spread(low) - 0.05), _unspread(_spread(high) + 0.08))  # room for the markers
    if inside:
        ax.scatter(*zip(*inside, strict=True), s=14, c="red", marker="o", label="allocated sparsity")
    if emptied:
        ax.scatter([_unspread(_spread(high) + 0.04)] * len(emptied), emptied, s=14, c="red", marker=">",
                   label="pruned entirely")  # fmt: skip
    ticks = sorted({0.0, *grid} if any(s < edges[0] for s, _ in inside) else set(grid))
    ax.set_xticks(ticks, [f"{s:g}" for s in ticks], fontsize=7)
    ax.minorticks_off()
    ax.set_ylim(len(names) - 0.5, -0.5)  # first layer on top
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("sparsity (scale: -log10 density)")
    ax.set_title("Relative Repairability (0 = repairable, 1 = not)", fontsize=9)
    if points:
        ax.legend(loc="upper left", bbox_to_anchor=(0, -0.12), fontsize=7, frameon=False, ncols=2)
    fig.colorbar(mesh, ax=ax, fraction=0.05)
    fig.tight_layout()
    return fig


class DiscardFailedRun(pl.Callback):
    """Remove the run folder of a failed prune-and-repair run when it holds only what the framework wrote at the
    start (config.yaml, an empty TensorBoard events file, hparams.yaml): the pipeline writes its results at the
    end, so such a folder has nothing to show. Any other file (a previous run's results) keeps the folder."""

    FRAMEWORK_FILES = ("config.yaml", "hparams.yaml", "events.out.tfevents.*")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            folder = getattr(logger, "log_dir", None)
            if folder is None or not Path(folder).is_dir():
                continue
            files = list(Path(folder).iterdir())
            if all(f.is_file() and any(f.match(p) for p in self.FRAMEWORK_FILES) for f in files):
                logger.finalize("failed")  # close the events file before removing it (Lightning's own call follows)
                for f in files:
                    f.unlink()
                Path(folder).rmdir()


def _table(pairs: list[tuple]) -> str:
    return "| index | name |\n|---|---|\n" + "\n".join(f"| {i} | {name} |" for i, name in pairs)
