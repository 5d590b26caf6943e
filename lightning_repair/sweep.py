"""``lightning-repair-sweep``: prune and repair one dense model over a grid of settings, resumably.

A sweep config is a ``lightning-repair fit`` config (trainer, model: PruneRepairModule, data) plus
``grid`` and ``output``; the grid replaces the fit config's single values, and a list left out
keeps the fit config's value::

    grid:
      allocations: [erk, lamp]      # model.allocation: method names or {method: ..., ...} dicts
      sparsities: [0.9, 0.95]       # model.sparsity
      repairs: [none, asr]          # model.repair: presets or operator lists
      seeds: [0, 1]                 # data.calibration_seed: which unlabeled calibration subset
      checkpoints: [a.pt, b.pt]     # model.checkpoint: dense models of the same architecture
    output: runs/sweep/my_sweep

An existing fit config is reused as it is: ``lightning-repair-sweep --config fit.yaml --grid grid.yaml
--output DIR``; every fit flag (``--data.data_dir``, ``--trainer.accelerator``, ...) works the same.

Work the cells share is done once: loading each dense model and its test accuracy, the calibration
batches of each seed, the time of one dense pass over them (the cost unit F of docs/methods.md)
and, for the RR-guided allocations, the dense model's RR profile on them.
Test accuracies are cached by model content, so the pruned model that every repair of an
(allocation, sparsity) cell shares, and the unchanged model of repair ``none``, are evaluated once.

``output`` receives ``results.csv`` (one row per cell, rewritten atomically after every cell, so an
interrupted sweep resumes at the first missing cell and never loses or duplicates a row),
``accuracy_vs_sparsity.png``, the same figure under ``tensorboard/``, and ``config.yaml``. A
summary table is printed at the end, on stdout; progress and errors go to stderr, an error as one line
(exit status 2 for a configuration error, 1 for an error while running).

The Fashion-MNIST CPU reproduction (README), from the repository root:

    lightning-repair-sweep --config configs/sweep/fashion_mnist_transition.yaml
    lightning-repair fit --config configs/train/fashion_mnist_resnet18_var.yaml   # dense models for
    lightning-repair fit --config configs/train/fashion_mnist_resnet18_wcr.yaml   # the regularizer study
    lightning-repair-sweep --config configs/sweep/fashion_mnist_regularizers.yaml
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import mean, pstdev
from typing import Any

import matplotlib.image
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summaries
from tqdm.auto import tqdm

from .allocation import PROFILE_METHODS, Allocation
from .cli import ConfigError, RepairCLI, fit_epilog, reported_errors
from .datamodule import ImageDataModule
from .diagnostics import rr_profile
from .evaluation import calibration_forward_time, evaluate
from .export import atomic_write_bytes, atomic_write_json
from .models import NetworkSpec, load_dense, network_config
from .module import PruneRepairModule, Sparsity
from .operators import Operator, parse_recipe
from .pipeline import prune_and_repair
from .records import init_args, run_record, state_digest
from .stores import Activations
from .utils import timed

RESULTS = "results.csv"
PLOT = "accuracy_vs_sparsity.png"
TABLE = "results.md"
IDENTITY = "sweep.json"

# results.csv columns and their types; the first five are a cell's key. Times are seconds: the cell's
# phases, and the work its seed shares: one dense forward pass over the calibration batches and the RR
# profile (0 when no allocation of the grid needs it).
COLUMNS: dict[str, type] = {
    "checkpoint": str, "allocation": str, "sparsity": float, "repair": str, "seed": int,
    "acc_dense": float, "acc_pruned": float, "acc_repaired": float,
    "top5_dense": float, "top5_pruned": float, "top5_repaired": float,
    "achieved_sparsity": float,
    "time_allocation": float, "time_masking": float, "time_repair": float, "time_evaluation": float,
    "time_calibration_forward": float, "time_rr_profile": float,
    "test_samples": int, "calibration_samples": int,
}  # fmt: skip
KEY = ("checkpoint", "allocation", "sparsity", "repair", "seed")

# Data options that change how a sweep runs but not its results: a sweep may resume with other values.
EXECUTION_ONLY = {"data_dir", "download", "num_workers", "batch_size", "calibration_seed"}

Key = tuple[str, str, float, str, int]
Recipe = str | list[dict[str, Any]]


@dataclass
class Grid:
    """The cells of a sweep: every combination of these lists. A list left out keeps the base config's value.

    Args:
        allocations: allocation method names or ``{method: ..., keep_dense: ..., ...}`` dicts.
        sparsities: target global sparsities, each in [0, 1).
        repairs: repair presets (``lightning-repair fit --help`` lists them) or operator lists.
        seeds: calibration subset seeds.
        checkpoints: dense checkpoints of the configured architecture.
    """

    allocations: list[str | Allocation] | None = None
    sparsities: list[Sparsity] | None = None
    repairs: list[str | list[dict[str, Any]]] | None = None
    seeds: list[int] | None = None
    checkpoints: list[str] | None = None

    def __post_init__(self):
        for name in ("allocations", "sparsities", "repairs", "seeds", "checkpoints"):
            if getattr(self, name) == []:
                raise ValueError(f"grid.{name} is empty: leave it out to keep the base config's value")
        if self.allocations is not None:
            self.allocations = [_allocation(a, f"grid.allocations[{i}]") for i, a in enumerate(self.allocations)]
            _no_duplicates("allocations", [allocation_label(a) for a in self.allocations])
        if self.repairs is not None:
            for i, recipe in enumerate(self.repairs):
                _recipe(recipe, f"grid.repairs[{i}]")
            _no_duplicates("repairs", [repair_label(r) for r in self.repairs])
        if self.checkpoints is not None:
            self.checkpoints = [os.path.normpath(c) for c in self.checkpoints]
        for name in ("sparsities", "seeds", "checkpoints"):
            if getattr(self, name) is not None:
                _no_duplicates(name, getattr(self, name))


def _allocation(value: str | dict | Allocation, where: str) -> Allocation:
    try:
        if isinstance(value, Allocation):
            return value
        return Allocation(**value) if isinstance(value, dict) else Allocation(method=value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from None


def _recipe(value: Recipe, where: str) -> list[Operator]:
    try:
        return parse_recipe(value)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def _no_duplicates(name: str, labels: Sequence) -> None:
    repeated = sorted({str(x) for x in labels if labels.count(x) > 1})
    if repeated:
        raise ValueError(f"grid.{name} lists {', '.join(repeated)} more than once")


def _compact(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def allocation_label(allocation: Allocation) -> str:
    """The method name, followed by the options that differ from its defaults (``erk{"power":0.5}``)."""
    options, defaults = asdict(allocation), asdict(Allocation(allocation.method))
    changed = {k: v for k, v in options.items() if v != defaults[k]}
    return allocation.method + (_compact(changed) if changed else "")


def repair_label(recipe: Recipe) -> str:
    """A preset's name, or the operator list as compact JSON."""
    return recipe if isinstance(recipe, str) else _compact(recipe)


@dataclass(frozen=True)
class Cell:
    checkpoint: str
    seed: int
    allocation: str
    sparsity: float
    repair: str
    allocation_spec: Allocation = field(compare=False, repr=False)
    recipe: list[Operator] = field(compare=False, repr=False)

    @property
    def key(self) -> Key:
        return (self.checkpoint, self.allocation, self.sparsity, self.repair, self.seed)


def grid_cells(grid: Grid, model: PruneRepairModule, dm: ImageDataModule) -> list[Cell]:
    """Every cell, ordered so that cells sharing a dense model, then a seed, then a pruned model are adjacent."""
    hp = model.hparams
    allocations = grid.allocations or [model.allocation]
    repairs = grid.repairs or [hp.repair]
    recipes = {repair_label(r): _recipe(r, "repair") for r in repairs}
    return [
        Cell(checkpoint, seed, allocation_label(a), sparsity, label, a, recipes[label])
        for checkpoint, seed, a, sparsity, label in itertools.product(
            grid.checkpoints or [os.path.normpath(hp.checkpoint)],
            grid.seeds or [dm.hparams.calibration_seed],
            allocations,
            grid.sparsities or [hp.sparsity],
            recipes,
        )
    ]


# ----------------------------------------------------------------------------- results.csv


def read_results(path: Path) -> list[dict]:
    """Rows of an existing results.csv (none if absent), typed as in ``COLUMNS``."""
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != list(COLUMNS):
            raise ValueError(f"{path} has columns {reader.fieldnames}, expected {list(COLUMNS)}")
        rows = [{k: COLUMNS[k](v) for k, v in row.items()} for row in reader]
    keys = [row_key(r) for r in rows]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{path} holds more than one row for the same cell; remove the duplicates")
    return rows


def write_results(path: Path, rows: list[dict]) -> None:
    """The whole table to a temporary file, then renamed into place: a kill leaves the old or the new table."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, buffer.getvalue().encode())


def row_key(row: dict) -> Key:
    return tuple(row[k] for k in KEY)


def check_identity(output: Path, network: NetworkSpec | dict, dm: ImageDataModule) -> None:
    """Refuse to resume into a folder whose results come from another architecture or dataset."""
    data = {k: v for k, v in init_args(dm).items() if k not in EXECUTION_ONLY}
    identity = json.loads(json.dumps({"network": network_config(network), "data": data}))
    path = output / IDENTITY
    if path.is_file():
        previous = json.loads(path.read_text())
        changed = [
            f"{group}.{k}"
            for group in identity
            for k in sorted(set(identity[group]) | set(previous.get(group, {})))
            if identity[group].get(k) != previous.get(group, {}).get(k)
        ]
        if changed:
            raise ValueError(
                f"{output} holds a sweep with a different {', '.join(changed)}: choose another output or delete it"
            )
    else:
        atomic_write_json(path, identity)


# ----------------------------------------------------------------------------- running


class CachedEvaluation:
    """Test accuracy keyed by the model's parameters and buffers: an identical model is evaluated once."""

    def __init__(self, dm: ImageDataModule, device: torch.device | str):
        self.dm, self.device = dm, device
        self.cache: dict[str, dict] = {}

    def __call__(self, model: nn.Module, _description: str = "") -> dict:  # oneshot.Evaluate
        key = state_digest(model.state_dict())
        if key not in self.cache:
            self.cache[key] = evaluate(model, self.dm.evaluation_dataloader(), self.device)
        return self.cache[key]


def with_calibration_seed(dm: ImageDataModule, seed: int) -> ImageDataModule:
    """The datamodule itself, or a copy whose calibration subset is drawn with ``seed``."""
    if seed == dm.hparams.calibration_seed:
        return dm
    return type(dm)(**{**init_args(dm), "calibration_seed": seed})


def run_sweep(
    network: NetworkSpec | dict,
    dm: ImageDataModule,
    cells: list[Cell],
    output: Path,
    device: torch.device | str = "cpu",
    config: str | None = None,
    rr_repair: str = "vm",
    activations: Activations = "device",
) -> list[dict]:
    """Run the cells missing from ``output/results.csv``, adding each row as it finishes; return the cells' rows.

    ``config`` (the sweep's YAML) is saved as ``output/config.yaml``. Rows of cells that are not in
    ``cells`` (an earlier, larger grid) stay in results.csv.
    """
    output.mkdir(parents=True, exist_ok=True)
    check_identity(output, network, dm)
    if config is not None:
        atomic_write_bytes(output / "config.yaml", config.encode())
    rows = read_results(output / RESULTS)
    done = {row_key(r) for r in rows}
    todo = [c for c in cells if c.key not in done]
    if len(todo) < len(cells):
        print(f"resuming the sweep in {output}: {len(cells) - len(todo)} of {len(cells)} cells are already in "
              f"{RESULTS}, {len(todo)} to run", file=sys.stderr)  # fmt: skip
    test = CachedEvaluation(dm, device)
    bar = tqdm(total=len(cells), initial=len(cells) - len(todo), desc="sweep", unit="cell", dynamic_ncols=True)
    for checkpoint, by_checkpoint in itertools.groupby(todo, key=lambda c: c.checkpoint):
        dm.setup("fit")
        dense = load_dense(network, checkpoint, device, dm.hparams.dataset, dm.info)
        acc_dense = test(dense)
        for seed, by_seed in itertools.groupby(by_checkpoint, key=lambda c: c.seed):
            seed_cells = list(by_seed)
            calibration = with_calibration_seed(dm, seed).calibration_batches(device)
            shared = {"calibration_forward": calibration_forward_time(dense, calibration), "rr_profile": 0.0}
            profile = None
            if any(c.allocation_spec.method in PROFILE_METHODS for c in seed_cells):
                with timed(shared, "rr_profile"):
                    profile = rr_profile(dense, calibration, repair=rr_repair)
            for cell in seed_cells:
                bar.set_postfix_str(f"{cell.allocation} {cell.sparsity} {cell.repair} seed {seed}")
                start = time.perf_counter()
                result = prune_and_repair(dense, calibration, cell.sparsity, cell.allocation_spec, cell.recipe, test,
                                          profile=profile, activations=activations)  # fmt: skip
                record = run_record(result, acc_dense, cell.sparsity, cell.allocation, cell.recipe,
                                    result.timings | shared, sum(map(len, calibration)))  # fmt: skip
                rows.append(results_row(cell, record))
                write_results(output / RESULTS, rows)
                bar.write(
                    f"{cell.allocation} {cell.sparsity} {cell.repair} seed {seed}: accuracy dense "
                    f"{acc_dense['top1']:.4f} pruned {result.pruned['top1']:.4f} repaired "
                    f"{result.repaired['top1']:.4f} ({time.perf_counter() - start:.1f} s)"
                )
                bar.update()
    bar.close()
    wanted = {c.key for c in cells}
    return [r for r in rows if row_key(r) in wanted]


def results_row(cell: Cell, record: dict) -> dict:
    """A results.csv row: the cell's key and the columns of ``COLUMNS`` read off the run record."""
    row = dict(zip(KEY, cell.key, strict=True))
    row |= {f"acc_{k}": v for k, v in record["accuracy"].items()}
    row |= {f"top5_{k}": v for k, v in record["accuracy_top5"].items()}
    row["achieved_sparsity"] = record["sparsity"]["achieved"]
    timings = record["timings_s"]
    row |= {f"time_{k[5:]}": timings.get(k[5:], 0.0) for k in COLUMNS if k.startswith("time_")}
    row |= {"test_samples": record["test_samples"], "calibration_samples": record["calibration_samples"]}
    return row


# ----------------------------------------------------------------------------- reporting


def _curves(rows: list[dict]) -> dict[tuple[str, str, str], dict[float, list[float]]]:
    """Repaired accuracies by (checkpoint, allocation, repair), then by sparsity (one value per seed)."""
    curves: dict[tuple[str, str, str], dict[float, list[float]]] = {}
    for r in rows:
        curve = curves.setdefault((r["checkpoint"], r["allocation"], r["repair"]), {})
        curve.setdefault(r["sparsity"], []).append(r["acc_repaired"])
    return curves


def _dense_accuracy(rows: list[dict]) -> dict[str, float]:
    return {r["checkpoint"]: r["acc_dense"] for r in rows}


def plot(rows: list[dict]) -> Figure:
    """Repaired top-1 accuracy vs sparsity: a panel per dense model (row) and allocation (column), a line per
    repair (mean over seeds, error bar = std; one color per repair in every panel), the dense accuracy dashed."""
    dense = _dense_accuracy(rows)
    curves = _curves(rows)
    allocations = list(dict.fromkeys(k[1] for k in curves))
    repairs = list(dict.fromkeys(k[2] for k in curves))
    fig = Figure(figsize=(2.5 + 4.5 * len(allocations), 0.5 + 3.8 * len(dense)), dpi=150, layout="constrained")
    axes = fig.subplots(len(dense), len(allocations), sharex=True, sharey=True, squeeze=False)
    for (checkpoint, allocation, repair), curve in curves.items():
        ax, xs = axes[list(dense).index(checkpoint), allocations.index(allocation)], sorted(curve)
        several_seeds = any(len(curve[x]) > 1 for x in xs)  # else there is no spread to draw, only empty caps
        ax.errorbar(
            xs, [mean(curve[x]) for x in xs], yerr=[pstdev(curve[x]) for x in xs] if several_seeds else None,
            capsize=3, marker="o", markersize=3 if len(xs) > 1 else 6, color=f"C{repairs.index(repair) % 10}",
            label=repair,
        )  # fmt: skip
    for i, (checkpoint, acc) in enumerate(dense.items()):
        for j, allocation in enumerate(allocations):
            ax = axes[i, j]
            ax.axhline(acc, color="black", linestyle="--", linewidth=1, label="dense")
            ax.set_title(f"{Path(checkpoint).name}: {allocation}", fontsize=9)
            ax.grid(alpha=0.3)
        axes[i, 0].set_ylabel("top-1 accuracy (repaired)")
    for ax in axes[-1]:
        ax.set_xlabel("target sparsity")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize="small")
    return fig


def _sparsity_label(sparsity: float) -> str:
    """0.90, 0.95, but 0.945 (a 0.5% grid) unrounded."""
    return f"{sparsity:.2f}" if round(sparsity, 2) == sparsity else f"{sparsity:g}"


def markdown_table(rows: list[dict]) -> str:
    """Top-1 accuracy in % (mean over seeds) per dense model, allocation and sparsity (rows, in grid order):
    pruned (what ``none`` gives), then repaired by each other repair (columns)."""
    repairs = [r for r in dict.fromkeys(r["repair"] for r in rows) if r != "none"]
    order = {k: list(dict.fromkeys(r[k] for r in rows)) for k in ("checkpoint", "allocation")}
    by_line: dict[tuple, dict[str, list[float]]] = {}
    for r in rows:
        line = by_line.setdefault((r["checkpoint"], r["allocation"], r["sparsity"]), {})
        line.setdefault("pruned", []).append(r["acc_pruned"])
        line.setdefault(r["repair"], []).append(r["acc_repaired"])
    several = len(order["checkpoint"]) > 1
    head = (["checkpoint"] if several else []) + ["allocation", "sparsity", "pruned"] + [f"`{r}`" for r in repairs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    key = lambda k: (order["checkpoint"].index(k[0]), order["allocation"].index(k[1]), k[2])  # noqa: E731
    for checkpoint, allocation, sparsity in sorted(by_line, key=key):
        line = by_line[checkpoint, allocation, sparsity]
        cells = ([Path(checkpoint).name] if several else []) + [allocation, _sparsity_label(sparsity)]
        cells += [f"{100 * mean(line[k]):.1f}" if k in line else "-" for k in ("pruned", *repairs)]
        lines.append("| " + " | ".join(cells) + " |")
    dense = ", ".join(f"{Path(c).name} {100 * a:.2f}" for c, a in _dense_accuracy(rows).items())
    return f"Top-1 accuracy in % (dense: {dense}).\n\n" + "\n".join(lines) + "\n"


def summary_table(rows: list[dict]) -> str:
    """Mean repaired top-1 accuracy (+- std over seeds) per allocation x repair (rows) and sparsity (columns)."""
    curves = _curves(rows)
    sparsities = sorted({r["sparsity"] for r in rows})
    seeds = len({r["seed"] for r in rows})
    head = "allocation + repair"
    labels = {k: f"{k[1]} + {k[2]}" for k in curves}
    width = max(len(head), *map(len, labels.values()))
    cell_width = 15 if seeds > 1 else 7
    lines = []
    for checkpoint, acc in _dense_accuracy(rows).items():
        lines += ["", f"{checkpoint}: dense top-1 {acc:.4f}; repaired top-1 over {seeds} seed(s)"]
        lines.append(f"{head:<{width}}  " + "  ".join(f"{s:>{cell_width}}" for s in sparsities))
        for key, curve in curves.items():
            if key[0] != checkpoint:
                continue
            cells = [
                f"{mean(curve[s]):.4f}" + (f" +- {pstdev(curve[s]):.4f}" if seeds > 1 else "") if s in curve else "-"
                for s in sparsities
            ]
            lines.append(f"{labels[key]:<{width}}  " + "  ".join(f"{c:>{cell_width}}" for c in cells))
    return "\n".join(lines[1:])


def report(rows: list[dict], output: Path) -> str:
    """Write the figure as PNG and to TensorBoard (step = number of rows) and the markdown table, and return
    the summary table."""
    canvas = FigureCanvasAgg(plot(rows))
    canvas.draw()  # rendered once for both
    image = np.asarray(canvas.buffer_rgba())
    png = io.BytesIO()
    matplotlib.image.imsave(png, image, format="png")
    atomic_write_bytes(output / PLOT, png.getvalue())
    atomic_write_bytes(output / TABLE, markdown_table(rows).encode())
    table = summary_table(rows)
    with SummaryWriter(str(output / "tensorboard")) as writer:
        writer.add_image("sweep/accuracy_vs_sparsity", image[..., :3], global_step=len(rows), dataformats="HWC")
        writer.add_text("sweep/summary", "```\n" + table + "\n```", global_step=len(rows))
    log_cells(rows, output / "tensorboard" / "cells")
    return table


CELL_METRICS = ("acc_dense", "acc_pruned", "acc_repaired", "top5_repaired", "achieved_sparsity", "time_repair")


def cell_run_name(row: dict) -> str:
    """A cell's TensorBoard run: ``<checkpoint file>/<allocation>-<sparsity>/<repair>/seed<seed>``."""
    repair = re.sub(r"[^\w.+-]+", "_", row["repair"]).strip("_")
    return f"{Path(row['checkpoint']).stem}/{row['allocation']}-{row['sparsity']:g}/{repair}/seed{row['seed']}"


def log_cells(rows: list[dict], folder: Path) -> None:
    """One TensorBoard run per cell under ``folder``, holding its hparams (checkpoint, allocation, sparsity, repair,
    seed) and metrics (``CELL_METRICS``, as ``hp/<metric>`` scalars): TensorBoard's HParams view filters and
    compares the cells. A cell's run is rewritten on every report, so a resumed sweep leaves one record per cell."""
    for row in rows:
        run = folder / cell_run_name(row)
        for old in run.glob("events.out.tfevents.*") if run.is_dir() else ():
            old.unlink()
        hparams = {k: row[k] for k in ("checkpoint", "allocation", "sparsity", "repair", "seed")}
        metrics = {f"hp/{m}": row[m] for m in CELL_METRICS}
        with SummaryWriter(str(run)) as writer:  # one events file per cell (add_hparams would open a second one)
            for summary in hparams_summaries(hparams, metrics):
                writer._get_file_writer().add_summary(summary)
            for tag, value in metrics.items():
                writer.add_scalar(tag, value, 0)


# ----------------------------------------------------------------------------- command line


class SweepCLI(RepairCLI):
    """The ``lightning-repair fit`` parser with ``grid`` and ``output`` added."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_class_arguments(Grid, "grid")
        parser.add_argument("--output", type=str, default="sweep", help="folder for results.csv and the figures")


def build_cli(args: list[str] | None = None) -> SweepCLI:
    """Parse ``args`` (default: the command line) and build the trainer, model, datamodule and grid."""
    return SweepCLI(
        PruneRepairModule, ImageDataModule, subclass_mode_model=True, seed_everything_default=0, run=False,
        auto_configure_optimizers=False, args=args,
        parser_kwargs={"description": "Prune and repair over an allocation x sparsity x repair grid.",
                       "epilog": fit_epilog()},
    )  # fmt: skip


def main(args: list[str] | None = None) -> None:
    with reported_errors("lightning-repair-sweep"):
        sweep(args)


def sweep(args: list[str] | None = None) -> None:
    cli = build_cli(args)
    trainer = cli.trainer
    if trainer.num_devices * trainer.num_nodes > 1:
        raise ConfigError("a sweep runs in one process; set trainer.devices: 1")
    output = Path(cli.config.output)
    model, dm = cli.model, cli.datamodule
    cells = grid_cells(cli.config_init.grid, model, dm)
    network = model.hparams.network  # the config form: it names the architecture in sweep.json
    rows = run_sweep(network, dm, cells, output, trainer.strategy.root_device, cli.parser.dump(cli.config),
                     model.hparams.rr_repair, model.hparams.activations)  # fmt: skip
    print(report(rows, output))
    print(f"\n{len(rows)} cells in {output / RESULTS}; figure {output / PLOT}; table {output / TABLE}")


if __name__ == "__main__":
    main()
