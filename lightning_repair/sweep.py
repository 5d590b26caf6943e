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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import mean, pstdev
from typing import Any

import matplotlib.image
import numpy as np
import torch
import torch.distributed as dist
from jsonargparse import ActionYesNo
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summaries
from tqdm.auto import tqdm

from . import interrupts
from .allocation import PROFILE_METHODS, Allocation
from .cache import DigestCache, batches_digest, dense_accuracy_key, model_digest, profile_codec
from .cli import ConfigError, RepairCLI, check_full_test_set, fit_epilog, reported_errors
from .datamodule import ImageDataModule
from .diagnostics import DEFAULT_GRID, check_grid, rr_profile
from .evaluation import calibration_forward_time, evaluate
from .export import atomic_write_bytes, atomic_write_json
from .filelock import locked
from .launch import on_every_process
from .models import NetworkSpec, load_dense, network_config
from .module import PruneRepairModule, Sparsity
from .operators import Operator, parse_recipe
from .pipeline import prune_and_repair
from .records import init_args, run_record, state_digest
from .stats import count_over_processes, world_size
from .stats import rank as process_rank
from .stores import Activations
from .utils import timed

RESULTS = "results.csv"
PLOT = "accuracy_vs_sparsity.png"
TABLE = "results.md"
IDENTITY = "sweep.json"
LOCK = ".results.lock"

# results.csv columns and their types; the first five are a cell's key. Times are seconds: the cell's
# phases, and the work its seed shares: one dense forward pass over the calibration batches and the RR
# profile (0 when no allocation of the grid needs it).
def optional_float(text: str = "") -> float | str:
    """A results.csv number that only some cells have (empty in the others)."""
    return float(text) if text else ""


COLUMNS: dict[str, Callable[[str], Any]] = {
    "checkpoint": str, "allocation": str, "sparsity": float, "repair": str, "seed": int,
    "acc_dense": float, "acc_pruned": float, "acc_repaired": float,
    "top5_dense": float, "top5_pruned": float, "top5_repaired": float,
    "achieved_sparsity": float,
    "time_allocation": float, "time_masking": float, "time_repair": float, "time_evaluation": float,
    "time_calibration_forward": float, "time_rr_profile": float,
    "test_samples": int, "calibration_samples": int, "state_sha256": str,
    "search_chosen": str, "search_cost_f": optional_float,
}  # fmt: skip
# columns added since the first results.csv, last: a results.csv written before them is read with them empty and
# rewritten with them
OPTIONAL = ("state_sha256", "search_chosen", "search_cost_f")
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
    """The method name, followed by the options that differ from its defaults (``erk{"power":0.5}``,
    ``search{"search":{"max_candidates":12}}``)."""

    def changed(options: dict, defaults: dict) -> dict:
        return {k: changed(v, defaults[k]) if isinstance(v, dict) else v
                for k, v in options.items() if v != defaults[k]}  # fmt: skip

    diff = changed(asdict(allocation), asdict(Allocation(allocation.method)))
    return allocation.method + (_compact(diff) if diff else "")


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
        # the columns of this version, or of an older one: the same, without the last optional ones
        versions = [list(COLUMNS)[: len(COLUMNS) - n] for n in range(len(OPTIONAL) + 1)]
        if reader.fieldnames not in versions:
            raise ValueError(f"{path} has columns {reader.fieldnames}, expected {list(COLUMNS)}")
        rows = [{k: COLUMNS[k](row.get(k, "")) for k in COLUMNS} for row in reader]
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
    """Test accuracy keyed by the model's parameters and buffers: an identical model is evaluated once. Under DDP
    each process evaluates its own shard of the test set and the counts are summed (``evaluate``)."""

    def __init__(self, dm: ImageDataModule, device: torch.device | str, rank: int = 0, world_size: int = 1):
        self.dm, self.device, self.rank, self.world_size = dm, device, rank, world_size
        self.cache: dict[str, dict] = {}

    def __call__(self, model: nn.Module, _description: str = "") -> dict:  # oneshot.Evaluate
        key = state_digest(model.state_dict())
        if key not in self.cache:
            loader = self.dm.evaluation_dataloader(self.rank, self.world_size)
            self.cache[key] = evaluate(model, loader, self.device)
        return self.cache[key]


def with_calibration_seed(dm: ImageDataModule, seed: int) -> ImageDataModule:
    """The datamodule itself, or a copy whose calibration subset is drawn with ``seed``."""
    if seed == dm.hparams.calibration_seed:
        return dm
    return type(dm)(**{**init_args(dm), "calibration_seed": seed})


def shard_cells(cells: list[Cell], shard: tuple[int, int] | None) -> list[Cell]:
    """Shard I/N: every N-th cell of the grid, from the I-th. The shards of a grid are disjoint and cover it."""
    return cells if shard is None else cells[shard[0] :: shard[1]]


class Results:
    """``output/results.csv``, shared by every shard of a sweep: each change reads the table, merges and rewrites it
    (atomically) under a lock on ``output/.results.lock``, so shards finishing at the same moment lose no row and
    repeat none. Rows are kept in grid order (rows of cells outside the grid first, as they were)."""

    def __init__(self, output: Path, cells: list[Cell]):
        self.path, self.lock = output / RESULTS, output / LOCK
        self.order = {c.key: i for i, c in enumerate(cells)}

    def read(self) -> list[dict]:
        with locked(self.lock):
            return read_results(self.path)

    def add(self, row: dict) -> bool:
        """Add a cell's row, unless a row for that cell is there already (another process ran it): False then."""
        with locked(self.lock):
            rows = read_results(self.path)
            if row_key(row) in {row_key(r) for r in rows}:
                return False
            rows = sorted([*rows, row], key=lambda r: self.order.get(row_key(r), -1))
            write_results(self.path, rows)
            return True

    def saved(self) -> str:
        """What an interrupted sweep leaves, and how to go on: for the interruption's one line."""
        done = sum(row_key(r) in self.order for r in read_results(self.path))
        rest = len(self.order) - done
        then = f"run the same command again to run the other {rest}" if rest else "the grid is complete"
        return f"{done} of {len(self.order)} cells are saved in {self.path}; {then}"


def _from_rank_zero(value: Any) -> Any:
    """Rank 0's ``value`` on every process (itself without a process group)."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run_sweep(
    network: NetworkSpec | dict,
    dm: ImageDataModule,
    cells: list[Cell],
    output: Path,
    device: torch.device | str = "cpu",
    config: str | None = None,
    rr_repair: str = "vm",
    activations: Activations = "device",
    shard: tuple[int, int] | None = None,
) -> list[dict]:
    """Run the cells (of ``shard`` I/N only, if given: ``shard_cells``) missing from ``output/results.csv``, adding
    each row as it finishes; return the rows of ``cells`` that results.csv now holds (all the shards' so far).

    ``config`` (the sweep's YAML) is saved as ``output/config.yaml``. Rows of cells that are not in ``cells`` (an
    earlier, larger grid) stay in results.csv. Several processes may run shards into one ``output`` at once (see
    ``Results``). Under DDP (a process group is initialized) every process runs every cell on its own shard of the
    calibration and test sets, every statistic and count summed across processes as in ``lightning-repair fit``, and
    process 0 alone reads and writes ``output``.
    """
    rank, world = process_rank(), world_size()
    results = Results(output, cells)
    state: dict[str, Any] = {}
    if rank == 0:
        try:
            output.mkdir(parents=True, exist_ok=True)
            with locked(output / LOCK):
                check_identity(output, network, dm)
                if config is not None:
                    atomic_write_bytes(output / "config.yaml", config.encode())
                state["done"] = {row_key(r) for r in read_results(output / RESULTS)}
        except (OSError, ValueError) as err:
            state["error"] = err
    state = _from_rank_zero(state)  # one decision for every process: none may wait in a collective for another
    if "error" in state:
        raise state["error"]
    mine = shard_cells(cells, shard)
    todo = [c for c in mine if c.key not in state["done"]]
    show = rank == 0
    of = f" of shard {shard[0]}/{shard[1]}" if shard else ""
    if len(todo) < len(mine) and show:
        print(f"resuming the sweep in {output}: {len(mine) - len(todo)} of {len(mine)} cells{of} are already in "
              f"{RESULTS}, {len(todo)} to run", file=sys.stderr)  # fmt: skip
    interrupts.set_note(results.saved)
    test = CachedEvaluation(dm, device, rank, world)
    cache = DigestCache(output / "cache", log=tqdm.write)  # the dense accuracy and RR profile, across sweeps
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc="sweep" + of.replace(" of shard", ""),
               unit="cell", dynamic_ncols=True, disable=not show)  # fmt: skip
    for checkpoint, by_checkpoint in itertools.groupby(todo, key=lambda c: c.checkpoint):
        dm.setup("fit")
        dense = load_dense(network, checkpoint, device, dm.hparams.dataset, dm.info)
        digests = {"model": model_digest(dense), "network": network_config(network)}  # as fit's cache keys
        acc_dense, _ = cache.get_or_compute(
            "dense_accuracy", dense_accuracy_key(digests, dm, "32-true"), lambda d=dense: test(d), "the dense accuracy"
        )
        for seed, by_seed in itertools.groupby(by_checkpoint, key=lambda c: c.seed):
            seed_cells = list(by_seed)
            seeded = with_calibration_seed(dm, seed)
            calibration = seeded.calibration_batches(device, rank, world)
            held_out = {n: seeded.held_out_batches(n, device, rank, world)  # what the cells' allocations score on
                        for n in {c.allocation_spec.held_out_images for c in seed_cells} if n}  # fmt: skip
            calibration_samples = count_over_processes(sum(map(len, calibration)), device)
            shared = {"calibration_forward": calibration_forward_time(dense, calibration), "rr_profile": 0.0}
            profile = None
            if any(c.allocation_spec.method in PROFILE_METHODS for c in seed_cells):
                key = digests | {"calibration": batches_digest(calibration), "grid": check_grid(DEFAULT_GRID),
                                 "rr_repair": rr_repair}  # fmt: skip
                compute = lambda d=dense, c=calibration: rr_profile(d, c, repair=rr_repair)  # noqa: E731
                with timed(shared, "rr_profile"):
                    profile, _ = cache.get_or_compute("rr_profile", key, compute, "the RR profile", *profile_codec())
            for cell in seed_cells:
                bar.set_postfix_str(f"{cell.allocation} {cell.sparsity} {cell.repair} seed {seed}")
                start = time.perf_counter()
                result = prune_and_repair(dense, calibration, cell.sparsity, cell.allocation_spec, cell.recipe, test,
                                          profile=profile, activations=activations,
                                          held_out=held_out.get(cell.allocation_spec.held_out_images))  # fmt: skip
                record = run_record(result, acc_dense, cell.sparsity, cell.allocation, cell.recipe,
                                    result.timings | shared, calibration_samples)  # fmt: skip
                if show:
                    added = results.add(results_row(cell, record))
                    bar.write(
                        f"{cell.allocation} {cell.sparsity} {cell.repair} seed {seed}: accuracy dense "
                        f"{acc_dense['top1']:.4f} pruned {result.pruned['top1']:.4f} repaired "
                        f"{result.repaired['top1']:.4f} ({time.perf_counter() - start:.1f} s)"
                        + ("" if added else "; another process had saved this cell first, its row is kept")
                    )
                bar.update()
    bar.close()
    if rank != 0:
        return []
    return [r for r in results.read() if row_key(r) in results.order]


def results_row(cell: Cell, record: dict) -> dict:
    """A results.csv row: the cell's key and the columns of ``COLUMNS`` read off the run record."""
    row = dict(zip(KEY, cell.key, strict=True))
    row |= {f"acc_{k}": v for k, v in record["accuracy"].items()}
    row |= {f"top5_{k}": v for k, v in record["accuracy_top5"].items()}
    row["achieved_sparsity"] = record["sparsity"]["achieved"]
    timings = record["timings_s"]
    row |= {f"time_{k[5:]}": timings.get(k[5:], 0.0) for k in COLUMNS if k.startswith("time_")}
    row |= {"test_samples": record["test_samples"], "calibration_samples": record["calibration_samples"],
            "state_sha256": record["state_sha256"]}  # fmt: skip
    search = record.get("search") or {}  # allocation ``search``: the candidate it chose, its cost in F
    row |= {"search_chosen": search.get("chosen", ""), "search_cost_f": search.get("cost_f", "")}
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
    """The ``lightning-repair fit`` parser with ``grid``, ``output``, ``shard`` and ``report`` added."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_class_arguments(Grid, "grid")
        parser.add_argument("--output", type=str, default="sweep", help="folder for results.csv and the figures")
        parser.add_argument(
            "--shard", type=str | None, default=None,
            help="I/N: run every N-th cell of the grid from the I-th (I in 0..N-1), for N jobs sharing one output "
            "folder; in a SLURM job array it defaults to the array task's index and count",
        )  # fmt: skip
        parser.add_argument(
            "--report", action=ActionYesNo, default=False,
            help="run nothing: rebuild results.md, the figure and the TensorBoard summary from results.csv",
        )  # fmt: skip


def build_cli(args: list[str] | None = None) -> SweepCLI:
    """Parse ``args`` (default: the command line) and build the trainer, model, datamodule and grid."""
    return SweepCLI(
        PruneRepairModule, ImageDataModule, subclass_mode_model=True, seed_everything_default=0, run=False,
        auto_configure_optimizers=False, args=args,
        parser_kwargs={"description": "Prune and repair over an allocation x sparsity x repair grid.",
                       "epilog": fit_epilog()},
    )  # fmt: skip


def parse_shard(spec: str | None, environ: Mapping[str, str] = os.environ) -> tuple[int, int] | None:
    """``--shard I/N`` as (I, N); without it, a SLURM job array task's (index - min) / step and count; else None."""
    if spec is None:
        if "SLURM_ARRAY_TASK_ID" not in environ:
            return None
        try:
            task, count = int(environ["SLURM_ARRAY_TASK_ID"]), int(environ["SLURM_ARRAY_TASK_COUNT"])
            low, step = int(environ.get("SLURM_ARRAY_TASK_MIN", "0")), int(environ.get("SLURM_ARRAY_TASK_STEP", "1"))
        except (KeyError, ValueError) as err:
            raise ConfigError(f"SLURM job array variables unreadable ({err}): pass --shard I/N") from None
        index, rest = divmod(task - low, step) if step > 0 else (-1, 0)
        if rest or not 0 <= index < count:
            raise ConfigError(
                f"SLURM array task {task} is not one of {count} evenly spaced indices from {low}: submit with "
                f"--array=0-{count - 1}, or pass --shard I/N"
            )
        return index, count
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
    if not match:
        raise ConfigError(f"--shard {spec!r}: expected I/N, e.g. 0/4 (shard I of N, I in 0..N-1)")
    index, count = int(match[1]), int(match[2])
    if count < 1 or index >= count:
        raise ConfigError(f"--shard {spec}: I must be in 0..N-1" + (f" (0..{count - 1})" if count else ""))
    return index, count


def main(args: list[str] | None = None) -> None:
    with reported_errors("lightning-repair-sweep"):
        sweep(args)


def sweep(args: list[str] | None = None) -> None:
    cli = build_cli(args)
    trainer = cli.trainer
    output = Path(cli.config.output)
    model, dm = cli.model, cli.datamodule
    cells = grid_cells(cli.config_init.grid, model, dm)
    if cli.config.report:
        rows = Results(output, cells).read() if output.is_dir() else []
        if not rows:
            raise ValueError(f"{output / RESULTS} holds no row: nothing to report")
        print(report(rows, output))
        print(f"\n{len(rows)} rows of {output / RESULTS}; figure {output / PLOT}; table {output / TABLE}")
        return
    check_full_test_set(trainer, "sweeps")
    shard = parse_shard(cli.config.shard)
    saved = cli.config.clone()
    saved.shard, saved.report = None, False  # config.yaml reruns the whole sweep, whichever shard wrote it
    config = cli.parser.dump(saved)
    network = model.hparams.network  # the config form: it names the architecture in sweep.json

    def work() -> None:
        rows = run_sweep(network, dm, cells, output, trainer.strategy.root_device, config, model.hparams.rr_repair,
                         model.hparams.activations, shard)  # fmt: skip
        if not trainer.is_global_zero:
            return
        with locked(output / LOCK):  # the last shard to finish reports the whole grid
            rows = read_results(output / RESULTS)
            rows = [r for r in rows if row_key(r) in {c.key for c in cells}]
            if not rows:  # a shard with no cell (more shards than cells) ending first
                which = f"shard {shard[0]}/{shard[1]}" if shard else "sweep"
                print(f"{which} done: no cell of the grid in {output / RESULTS} yet")
                return
            print(report(rows, output))
        where = f"figure {output / PLOT}; table {output / TABLE}"
        if shard is None or len(rows) == len(cells):
            print(f"\n{len(rows)} cells in {output / RESULTS}; {where}")
        else:
            print(f"\nshard {shard[0]}/{shard[1]} done: {len(rows)} of {len(cells)} cells in {output / RESULTS} so "
                  f"far; {where} (rebuilt by every shard as it ends, or by --report)")  # fmt: skip

    on_every_process(trainer, work)


if __name__ == "__main__":
    main()
