"""Does the search objective track test top-1? The label-free distance of a repaired network's logits to the
dense logits, against test top-1, over the transition grids (global/ERK/LAMP x sparsity x repair).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/search_objective.py --network resnet18 \
        [--sparsities 0.9 0.92 ...] [--repairs reconstruct_dense_bn default] \
        [--output benchmarks/results/search_objective.csv]
    .venv/bin/python benchmarks/search_objective.py --report   # the rank correlations from the CSV

Per cell: the full repair (all 1024 calibration images) and its test top-1; its KL and MSE on the same calibration
images (``same``) and on 1024 held-out training images (``held``); and the search's stand-in (the same recipe fitted
on the first 256 calibration images, scored on the last 256: ``stand``, and fitted on 512: ``stand512``). Rows are
appended to the CSV as they finish (a rerun skips finished cells). ``--report`` prints, per network and repair, the
Spearman correlation of each objective with top-1 (negated: a lower distance should mean a higher accuracy) over
all cells, and the fraction of same-sparsity pairs of allocations the objective orders as top-1 does.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from search_setup import NETWORKS, held_out_batches, load, read_rows, spearman, write_rows  # noqa: E402

from lightning_repair.allocation import Allocation, allocate  # noqa: E402
from lightning_repair.masks import apply_masks, compute_masks  # noqa: E402
from lightning_repair.operators import parse_recipe  # noqa: E402
from lightning_repair.repair import repair  # noqa: E402
from lightning_repair.search import logits_of, output_distance, split_batches, stand_in  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--network", choices=sorted(NETWORKS), default="resnet18")
parser.add_argument("--allocations", nargs="+", default=["global", "erk", "lamp"])
parser.add_argument("--sparsities", nargs="+", type=float, default=[0.9, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98])
parser.add_argument("--repairs", nargs="+", default=["reconstruct_dense_bn", "default"])
parser.add_argument("--output", type=Path, default=Path("benchmarks/results/search_objective.csv"))
parser.add_argument("--report", action="store_true", help="only print the correlations of the CSV")
args = parser.parse_args()

OBJECTIVES = [f"{o}_{w}" for w in ("same", "held", "stand", "stand512") for o in ("kl", "mse")]


def report(rows: list[dict]) -> str:
    lines = [
        "| network | repair | cells | " + " | ".join(OBJECTIVES) + " |",
        "|---|---|---|" + "---|" * len(OBJECTIVES),
    ]
    groups = sorted({(r["network"], r["repair"]) for r in rows})
    for network, recipe in groups:
        cells = [r for r in rows if (r["network"], r["repair"]) == (network, recipe)]
        top1 = [float(r["top1"]) for r in cells]
        stats = []
        for name in OBJECTIVES:
            values = [-float(r[name]) for r in cells]
            rho = spearman(values, top1)
            agree = total = 0
            for a, b in itertools.combinations(cells, 2):
                if a["sparsity"] != b["sparsity"] or float(a["top1"]) == float(b["top1"]):
                    continue
                total += 1
                agree += (float(a[name]) < float(b[name])) == (float(a["top1"]) > float(b["top1"]))
            stats.append(f"{rho:.3f} / {agree}/{total}")
        lines.append(f"| {network} | {recipe} | {len(cells)} | " + " | ".join(stats) + " |")
    return ("Spearman rho of -objective with test top-1 over all cells / same-sparsity allocation pairs ordered as "
            "top-1 orders them.\n\n" + "\n".join(lines))  # fmt: skip


if args.report:
    print(report(read_rows(args.output)))
    sys.exit()

dense, dm, calibration, test = load(args.network)
held = held_out_batches(dm, 1024)
dense_cal, dense_held = logits_of(dense, calibration), logits_of(dense, held)
fit256, score256 = split_batches(calibration, 256, 256)
fit512, score512 = split_batches(calibration, 512, 256)
dense_s256, dense_s512 = logits_of(dense, score256), logits_of(dense, score512)
rows = read_rows(args.output)
done = {(r["network"], r["allocation"], float(r["sparsity"]), r["repair"]) for r in rows}
for recipe_name, sparsity, method in itertools.product(args.repairs, args.sparsities, args.allocations):
    if (args.network, method, sparsity, recipe_name) in done:
        continue
    start = time.perf_counter()
    recipe = parse_recipe(recipe_name)
    keep = allocate(dense, sparsity, Allocation(method=method))
    masks = compute_masks(dense, keep)
    model = apply_masks(copy.deepcopy(dense), masks)
    repair(model, dense, calibration, recipe, masks=masks)
    row = {"network": args.network, "allocation": method, "sparsity": sparsity, "repair": recipe_name,
           "top1": test(model)}  # fmt: skip
    for o in ("kl", "mse"):
        row[f"{o}_same"] = output_distance(model, calibration, dense_cal, o)
        row[f"{o}_held"] = output_distance(model, held, dense_held, o)
    for suffix, fit, score, ref in (
        ("stand", fit256, score256, dense_s256),
        ("stand512", fit512, score512, dense_s512),
    ):
        fitted = stand_in(dense, keep, fit, recipe)
        for o in ("kl", "mse"):
            row[f"{o}_{suffix}"] = output_distance(fitted, score, ref, o)
    rows.append(row)
    write_rows(args.output, rows)
    print(f"{args.network} {method} {sparsity} {recipe_name}: top1 {row['top1']:.4f} kl_held {row['kl_held']:.4f} "
          f"kl_stand {row['kl_stand']:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
print(report(rows))
