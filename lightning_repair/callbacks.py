"""TensorBoard views of a prune-and-repair run: per-layer RR at a glance, an RR heatmap and repair histograms.

Every ``PruneRepairModule`` run with a TensorBoardLogger writes them: the module adds ``RepairLogger`` to the
trainer's callbacks itself (``PruneRepairModule.configure_callbacks``) unless the config already lists one, so a
config does not have to name it. The module does its work in ``on_fit_start``, so the logger reads the finished run
(``module.results``, ``module.report``) in ``on_fit_end``. Tags (TensorBoard dashboard in brackets):

- ``rr/layers`` [Images]: one figure, a row per layer in network order, grouped by stage: D_raw and D_res, RR
  (a line at 1: nothing recovered; above it the repair adds damage) at the allocated sparsity, and the allocated
  density beside them.
- ``rr/heatmap`` [Images]: RR, layers x profile sparsities (a numeric axis), each layer's allocated sparsity marked;
  the colour scale runs past 1 when some RR does.
- ``rr/<layer>``, ``d_raw/<layer>``, ``d_res/<layer>`` [Scalars]: the layer's profile, step = sparsity in per mille
  (``SPARSITY_STEPS``), one curve per layer; the custom-scalar layouts [Custom Scalars] put the curves of one stage
  (``stage_of``) on one chart.
- ``rr/table`` [Text]: per layer its stage, allocated density, D_raw, D_res and RR (the numbers of the figure).
- ``repair/variance_ratio_before``, ``repair/variance_ratio_after``, ``repair/gains`` [Histograms]: the per-channel
  values at each repair site, step = site index in execution order (``repair/sites/<tag>`` names them); a quantity
  the repair report does not hold is skipped.

The run's hyperparameters with its final accuracies (TensorBoard's hparams view) are logged by the module itself
for every logger (``records.run_hparams``): TensorBoard keeps the first hparams record of a run, so a second
one here would be ignored.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import lightning.pytorch as pl
import matplotlib
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap, Normalize, TwoSlopeNorm
from matplotlib.figure import Figure

REPORT_HISTOGRAMS = {"variance_ratio_before": "variance_ratio", "variance_ratio_after": "variance_ratio_after",
                     "gains": "gains"}  # fmt: skip  # tag -> RepairReport attribute
PROFILE_METRICS = ("rr", "d_raw", "d_res")
SPARSITY_STEPS = 1000  # profile scalars: step = round(sparsity * SPARSITY_STEPS), sparsity in per mille


class RepairLogger(pl.Callback):
    """Log a PruneRepairModule run's per-layer RR diagnostics and repair statistics to TensorBoard."""

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        results = getattr(pl_module, "results", None)
        if not results:
            rank_zero_warn(f"RepairLogger: {type(pl_module).__name__} left no results to log (not a prune-repair run?)")
            return
        loggers = tensorboard_loggers(trainer)
        if not loggers:
            if not getattr(pl_module, "reports_rr_location", False):  # the module says where RR went itself
                rank_zero_warn("RepairLogger: the trainer has no TensorBoardLogger; nothing is logged")
            return
        for logger in loggers:
            log_run(logger.experiment, results, getattr(pl_module, "report", None))


def tensorboard_loggers(trainer: pl.Trainer) -> list[TensorBoardLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


def log_run(writer, results: dict, report=None) -> None:
    """Every view of one run's results (``PruneRepairModule.results``) into a SummaryWriter."""
    rows = results["layers"]
    if any(row.get("rr") is not None or row.get("d_raw") is not None for row in rows):
        writer.add_figure("rr/layers", layers_figure(rows), 0, close=True)
        writer.add_text("rr/table", layers_table(rows), 0)
    if "rr_profile" in results:
        log_profile(writer, results["rr_profile"])
        writer.add_image("rr/heatmap", rr_heatmap(results["rr_profile"], rows), 0, dataformats="HWC")
    if report is not None:
        log_report(writer, report)
    writer.flush()


# ----------------------------------------------------------------------------- stages


def stage_of(names: list[str]) -> list[str]:
    """Each layer's stage: the first part of its name (``layer2`` of ``layer2.0.conv1``; ``conv1``, ``fc``), or the
    first two parts when most layers share the first one (``features.3`` in torchvision's MobileNetV2)."""
    heads = [name.split(".")[0] for name in names]
    common = max(set(heads), key=heads.count) if heads else ""
    deeper = heads.count(common) > len(names) / 2 and len(set(heads)) < len(names) / 2
    return [".".join(name.split(".")[:2]) if deeper and head == common else head for name, head in zip(names, heads,
            strict=True)]  # fmt: skip


def _steps(grid) -> list[int]:
    steps = [round(s * SPARSITY_STEPS) for s in grid]
    if len(set(steps)) != len(steps):
        raise ValueError(f"RR grid {list(grid)}: two sparsities share a per-mille step")
    return steps


def log_profile(writer, profile: dict) -> None:
    """Per-layer curves over the profile's sparsities and one custom-scalar chart per stage and quantity."""
    try:
        steps = _steps(profile["grid"])
    except ValueError as err:
        rank_zero_warn(f"RepairLogger: {err}; the per-layer RR curves are not logged")
        return
    rows = profile["layers"]
    for row in rows:
        for metric in PROFILE_METRICS:
            for step, value in zip(steps, row[metric], strict=True):
                if value is not None:
                    writer.add_scalar(f"{metric}/{row['name']}", value, step)
    stages: dict[str, list[str]] = {}
    for name, stage in zip([r["name"] for r in rows], stage_of([r["name"] for r in rows]), strict=True):
        stages.setdefault(stage, []).append(name)
    writer.add_custom_scalars(custom_scalar_layout(stages))


def custom_scalar_layout(stages: dict[str, list[str]]) -> dict:
    """TensorBoard's custom-scalar layout: a category per quantity, a multiline chart per stage."""
    titles = {"rr": "RR", "d_raw": "D_raw", "d_res": "D_res"}
    return {
        f"{titles[metric]} per stage (x: sparsity in per mille)": {
            f"{titles[metric]} {stage}": ["Multiline", [f"^{metric}/({'|'.join(map(re.escape, names))})$"]]
            for stage, names in stages.items()
        }
        for metric in ("rr", "d_res", "d_raw")
    }


# ----------------------------------------------------------------------------- the per-layer figure


def _value(row: dict, key: str) -> float:
    value = row.get(key)
    return math.nan if value is None else float(value)


def layers_table(rows: list[dict]) -> str:
    stages = stage_of([r["name"] for r in rows])
    fmt = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
    lines = ["| layer | stage | density | D_raw | D_res | RR |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {s} | {r['density']:.4f} | {fmt(r.get('d_raw'))} | {fmt(r.get('d_res'))} | "
              f"{fmt(r.get('rr'))} |" for r, s in zip(rows, stages, strict=True)]  # fmt: skip
    return "\n".join(lines)


def layers_figure(rows: list[dict], title: str | None = None) -> Figure:
    """Per layer (rows, network order, stages shaded and named): D_raw and D_res, RR and the allocated density, as
    horizontal bars at each layer's allocated sparsity. RR above 1 (the channel-wise repair adds damage) in red;
    undefined values (no damage) leave the row empty, marked ``n/a``."""
    names = [r["name"] for r in rows]
    stages = stage_of(names)
    y = np.arange(len(rows))
    d_raw, d_res = (np.array([_value(r, k) for r in rows]) for k in ("d_raw", "d_res"))
    rr, density = np.array([_value(r, "rr") for r in rows]), np.array([float(r["density"]) for r in rows])
    fig = Figure(figsize=(13, 1.6 + 0.24 * len(rows)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3, sharey=True, gridspec_kw={"width_ratios": [1.3, 1.0, 0.8], "wspace": 0.05})
    ax_d, ax_rr, ax_den = axes
    bands = _stage_bands(stages)
    for ax in axes:
        for i, (start, stop, _) in enumerate(bands):
            if i % 2:
                ax.axhspan(start - 0.5, stop - 0.5, color="0.93", zorder=0)
        ax.grid(axis="x", color="0.85", lw=0.5, zorder=0)
        ax.set_axisbelow(True)
    ax_d.barh(y - 0.2, np.nan_to_num(d_raw), height=0.4, color="#d95f02", label="D_raw (pruned)")
    ax_d.barh(y + 0.2, np.nan_to_num(d_res), height=0.4, color="#1b9e77", label="D_res (after channel-wise repair)")
    ax_d.set_xlabel("output damage ||Y - Y_dense||² / ||Y_dense||²")
    ax_d.legend(loc="lower left", bbox_to_anchor=(0, 1.0), fontsize=8, frameon=False, ncols=2)
    colors = np.where(np.nan_to_num(rr) > 1, "#c51b7d", "#4c72b0")
    ax_rr.barh(y, np.nan_to_num(rr), height=0.7, color=colors)
    ax_rr.axvline(1.0, color="k", lw=0.8, ls="--")
    for i in np.flatnonzero(np.isnan(rr)):
        ax_rr.text(0.01, i, "n/a", va="center", fontsize=7, color="0.4", transform=ax_rr.get_yaxis_transform())
    ax_rr.set_xlim(0, max(1.1, float(np.nanmax(rr)) * 1.08) if np.isfinite(rr).any() else 1.1)
    ax_rr.set_xlabel("RR = D_res / D_raw")
    ax_rr.set_title("0 repairable, 1 nothing recovered, > 1 worse", fontsize=8)
    ax_den.barh(y, density, height=0.7, color="0.45")
    ax_den.set_xscale("log")
    ax_den.set_xlim(min(0.5 * max(density[density > 0].min(initial=1.0), 1e-4), 0.5), 1.6)
    for i, d in enumerate(density):
        ax_den.text(1.5, i, f"{d:.3f}", va="center", ha="right", fontsize=7)
    ax_den.set_xlabel("allocated density (log)")
    ax_d.set_yticks(y, names, fontsize=7)
    ax_d.set_ylim(len(rows) - 0.5, -0.5)  # first layer on top
    for start, stop, stage in bands:
        ax_den.annotate(stage, xy=(1.02, (start + stop - 1) / 2), xycoords=("axes fraction", "data"), va="center",
                        fontsize=8, fontweight="bold")  # fmt: skip
    fig.suptitle(title or "Per-layer damage and Relative Repairability at the allocated sparsity", fontsize=10)
    fig.subplots_adjust(left=0.13, right=0.93, top=1 - 0.75 / fig.get_figheight(), bottom=0.6 / fig.get_figheight())
    return fig


def _stage_bands(stages: list[str]) -> list[tuple[int, int, str]]:
    """(first row, row after the last, stage) of each run of equal stages."""
    bands = []
    for i, stage in enumerate(stages):
        if bands and bands[-1][2] == stage:
            bands[-1] = (bands[-1][0], i + 1, stage)
        else:
            bands.append((i, i + 1, stage))
    return bands


def render(fig: Figure) -> np.ndarray:
    """RGB image (H, W, 3) of a figure."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


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
    return render(heatmap_figure(profile, rows))


def _spread(sparsity):
    """The heatmap's x scale: -log10(density), so that 0.5, 0.9, 0.99 are evenly spaced."""
    return -np.log10(np.clip(1.0 - np.asarray(sparsity, dtype=float), 1e-6, None))


def _unspread(x):
    return 1.0 - 10.0 ** -np.asarray(x, dtype=float)


def rr_colors(rr_max: float) -> tuple[ListedColormap, Normalize]:
    """The heatmap's colour scale: viridis from 0 to 1, and past 1 (when some RR is) a yellow-to-red ramp up to
    the largest RR, so that RR > 1 (the channel-wise repair adds damage) stands out instead of being clipped."""
    viridis = matplotlib.colormaps["viridis"](np.linspace(0, 1, 256))
    if not rr_max > 1.0:
        return ListedColormap(viridis).with_extremes(bad="0.8"), Normalize(0.0, 1.0)
    above = matplotlib.colormaps["YlOrRd"](np.linspace(0.35, 1.0, 256))
    cmap = ListedColormap(np.concatenate([viridis, above])).with_extremes(bad="0.8")
    return cmap, TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(rr_max, 1.1))  # not a sliver just above 1


def heatmap_figure(profile: dict, rows: list[dict]) -> Figure:
    """RR, layers (rows, in network order) x profile sparsities on a numeric axis (scale -log10(density));
    undefined cells grey; each layer's allocated sparsity a red dot at its value, a dense layer at 0, and a
    layer pruned entirely a triangle at the right edge. The colour bar reaches the largest RR when it is above 1."""
    grid, names = profile["grid"], [r["name"] for r in profile["layers"]]
    rr = np.array([[math.nan if v is None else v for v in r["rr"]] for r in profile["layers"]], dtype=float)
    fig = Figure(figsize=(3.8 + 0.65 * len(grid), 1.2 + 0.24 * len(names)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_xscale("function", functions=(_spread, _unspread))
    centers = _spread(grid)  # cell edges halfway between grid points in the scale's coordinates
    gaps = np.diff(centers) if len(grid) > 1 else np.array([0.5])
    inner = (centers[:-1] + centers[1:]) / 2
    edges = _unspread(np.concatenate([[centers[0] - gaps[0] / 2], inner, [centers[-1] + gaps[-1] / 2]]))
    cmap, norm = rr_colors(float(np.nanmax(rr)) if np.isfinite(rr).any() else 0.0)
    mesh = ax.pcolormesh(edges, np.arange(len(names) + 1) - 0.5, np.ma.masked_invalid(rr), cmap=cmap, norm=norm)
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
    ax.set_title("Relative Repairability (0 = repairable, 1 = nothing recovered, > 1 = worse)", fontsize=9)
    if points:
        ax.legend(loc="upper left", bbox_to_anchor=(0, -0.12), fontsize=7, frameon=False, ncols=2)
    bar = fig.colorbar(mesh, ax=ax, fraction=0.05)
    if isinstance(norm, TwoSlopeNorm):
        bar.set_ticks(sorted({0.0, 0.5, 1.0, round(norm.vmax, 2)}))
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
