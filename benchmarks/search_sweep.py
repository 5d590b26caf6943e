"""The ``search`` allocation per cell: its choice, its cost in F, and the test top-1 of the full repair of its choice.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/search_sweep.py --network resnet18 \
        [--sparsities 0.9 ... 0.98] [--repair reconstruct_dense_bn] [--max-candidates 30] [--held-out 1024] \
        [--output benchmarks/results/search_sweep.csv]
    .venv/bin/python benchmarks/search_sweep.py --report [--fixed-sweeps RESULTS.csv ...]   # against the fixed rules

Per cell: ``search_allocation`` on the calibration set (F measured on it, the same process), then the chosen keep
counts pruned by magnitude and repaired with the cell's recipe on all calibration images, and evaluated on the test
set, as ``prune_and_repair`` does. Rows are appended as cells finish (a rerun skips finished cells). ``--report``
joins the fixed rules' test top-1 of the same cells from benchmarks/results/search_objective.csv (the same code
path: allocate, magnitude masks, repair on all calibration images) and prints, per cell, the search against the
best of global/ERK/LAMP, its cost in F, and where its densities differ most from the rule it started from.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from search_setup import NETWORKS, load, read_rows, spearman, write_rows  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--network", choices=sorted(NETWORKS), default="resnet18")
parser.add_argument("--sparsities", nargs="+", type=float, default=[0.9, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98])
parser.add_argument("--repair", default="reconstruct_dense_bn")
parser.add_argument("--max-candidates", type=int, default=30)
parser.add_argument("--objective", default="kl")
parser.add_argument("--min-z", type=float, default=2.0, help="search.min_z: 0 takes any lower objective")
parser.add_argument("--held-out", type=int, default=0,
                    help="score on this many training images outside the calibration set (search.held_out_images)")
parser.add_argument("--fit-images", type=int, default=256)
parser.add_argument("--score-images", type=int, default=256)
parser.add_argument("--label", default="search", help="the allocation's name in the CSV (for option variants)")
parser.add_argument("--output", type=Path, default=Path("benchmarks/results/search_sweep.csv"))
parser.add_argument("--fixed", type=Path, default=Path("benchmarks/results/search_objective.csv"))
parser.add_argument("--report", action="store_true")
parser.add_argument("--fixed-sweeps", nargs="*", type=Path, default=[],
                    help="with --report: sweeps' results.csv files that also hold fixed rules' cells (by checkpoint)")
parser.add_argument("--figure", type=Path, default=None,
                    help="with --report: also draw top-1 vs sparsity, search against the fixed rules, to this PNG")
args = parser.parse_args()


def report(rows: list[dict], fixed_rows: list[dict]) -> str:
    fixed = {(r["network"], float(r["sparsity"]), r["repair"], r["allocation"]): float(r["top1"]) for r in fixed_rows}
    lines = ["| network | repair | allocation | sparsity | global | ERK | LAMP | best fixed | search | diff | "
             "start -> chosen | candidates | cost (F) | largest density changes vs start (layer: start -> chosen) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        key = (r["network"], float(r["sparsity"]), r["repair"])
        rules = [fixed.get((*key, rule)) for rule in ("global", "erk", "lamp")]
        known = [v for v in rules if v is not None]
        best = max(known) if known else None
        top1 = float(r["top1"])
        cells = " | ".join("-" if v is None else f"{100 * v:.1f}" for v in rules)
        diff = "-" if best is None else f"{100 * (top1 - best):+.1f}"
        changes = json.loads(r["changes"])[:3]
        moved = "; ".join(f"{c[0]}: {c[1]:.3f} -> {c[2]:.3f}" for c in changes) or "none"
        lines.append(f"| {r['network']} | {r['repair']} | {r['allocation']} | {float(r['sparsity']):.2f} | {cells} | "
                     f"{'-' if best is None else f'{100 * best:.1f}'} | {100 * top1:.1f} | {diff} | "
                     f"{r['start']} -> {r['chosen']} | {r['candidates']} | {float(r['cost_f']):.0f} | {moved} |")  # fmt: skip  # noqa: E501
    return "\n".join(lines)


def sweep_rows(path: Path) -> list[dict]:
    """A sweep's results.csv as fixed-rule rows: its checkpoint as the network, a recipe that is a preset by name."""
    from lightning_repair.operators import PRESETS

    networks = {yaml.safe_load(Path(c).read_text())["model"]["init_args"]["checkpoint"]: n for n, c in NETWORKS.items()}
    presets = {json.dumps(ops, sort_keys=True): name for name, ops in PRESETS.items()}
    rows = []
    for r in read_rows(path):
        repair = r["repair"]
        if repair.startswith("["):  # a recipe spelled out: the preset it equals, if any
            repair = presets.get(json.dumps(json.loads(repair), sort_keys=True))
        rows.append({"network": networks.get(r["checkpoint"]), "sparsity": r["sparsity"], "repair": repair,
                     "allocation": r["allocation"], "top1": r["acc_repaired"]})  # fmt: skip
    return rows


def tracking(rows: list[dict], fixed_rows: list[dict]) -> str:
    """How the search's objective of the fixed rules (the full repair scored as the search scores it) tracks their
    test top-1, per network and repair: Spearman rho over every (cell, rule), and the same-sparsity pairs of rules
    it orders as top-1 does (pairs tied on top-1 left out)."""
    fixed = {(r["network"], float(r["sparsity"]), r["repair"], r["allocation"]): float(r["top1"]) for r in fixed_rows}
    lines = ["| network | repair | cells | Spearman rho | same-sparsity pairs ordered as top-1 |",
             "|---|---|---|---|---|"]  # fmt: skip
    for network, repair in dict.fromkeys((r["network"], r["repair"]) for r in rows):
        points = []  # (sparsity, objective, top1)
        for r in rows:
            if (r["network"], r["repair"]) != (network, repair):
                continue
            for rule, value in json.loads(r["objectives"]).items():
                top1 = fixed.get((network, float(r["sparsity"]), repair, rule))
                if rule in ("global", "erk", "lamp") and top1 is not None:
                    points.append((float(r["sparsity"]), value, top1))
        pairs = [(a, b) for a, b in itertools.combinations(points, 2) if a[0] == b[0] and a[2] != b[2]]
        agree = sum((a[1] < b[1]) == (a[2] > b[2]) for a, b in pairs)
        rho = spearman([-p[1] for p in points], [p[2] for p in points])
        lines.append(f"| {network} | {repair} | {len(points)} | {rho:.3f} | {agree} of {len(pairs)} |")
    return "\n".join(lines)


def figure(rows: list[dict], fixed_rows: list[dict], path: Path) -> None:
    """A panel per (network, repair) of the search's cells: top-1 vs sparsity of global, ERK, LAMP and the search."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = list(dict.fromkeys((r["network"], r["repair"]) for r in rows))
    columns = min(2, len(panels))
    rows_of_panels = -(-len(panels) // columns)
    fig = Figure(figsize=(4.6 * columns, 3.6 * rows_of_panels), dpi=150, layout="constrained")
    axes = fig.subplots(rows_of_panels, columns, squeeze=False).flatten()
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    for ax, (network, repair) in zip(axes, panels, strict=False):
        mine = sorted((float(r["sparsity"]), 100 * float(r["top1"])) for r in rows
                      if (r["network"], r["repair"]) == (network, repair))  # fmt: skip
        sparsities = {s for s, _ in mine}
        for rule, style, color in (("global", ":", "C0"), ("erk", "--", "C1"), ("lamp", "-.", "C2")):
            points = sorted((float(r["sparsity"]), 100 * float(r["top1"])) for r in fixed_rows
                            if (r["network"], r["repair"], r["allocation"]) == (network, repair, rule)
                            and float(r["sparsity"]) in sparsities)  # fmt: skip
            if points:
                ax.plot(*zip(*points, strict=True), style, marker=".", color=color, label=rule)
        ax.plot(*zip(*mine, strict=True), "-", marker="o", color="black", label="search")
        ax.set(title=f"{network}, {repair}", xlabel="sparsity", ylabel="test top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    FigureCanvasAgg(fig).print_png(str(path))


if args.report:
    fixed = read_rows(args.fixed) + [row for path in args.fixed_sweeps for row in sweep_rows(path)]
    print(report(read_rows(args.output), fixed))
    print("\nThe objective against test top-1, over the fixed rules' cells:\n")
    print(tracking(read_rows(args.output), fixed))
    if args.figure:
        figure(read_rows(args.output), fixed, args.figure)
    sys.exit()

from lightning_repair.evaluation import calibration_forward_time  # noqa: E402
from lightning_repair.layers import prunable_layers  # noqa: E402
from lightning_repair.search import SearchOptions, search_allocation, stand_in  # noqa: E402

dense, dm, calibration, test = load(args.network)
held_out = dm.held_out_batches(args.held_out) if args.held_out else None
numels = {layer.name: layer.numel for layer in prunable_layers(dense)}
rows = read_rows(args.output)
done = {(r["network"], float(r["sparsity"]), r["repair"], r["allocation"]) for r in rows}
for sparsity in args.sparsities:
    if (args.network, sparsity, args.repair, args.label) in done:
        continue
    forward_s = calibration_forward_time(dense, calibration)
    options = SearchOptions(objective=args.objective, held_out_images=args.held_out, max_candidates=args.max_candidates,
                            fit_images=args.fit_images, score_images=args.score_images, min_z=args.min_z)  # fmt: skip
    keep, record = search_allocation(dense, calibration, sparsity, args.repair, options, forward_s=forward_s,
                                     held_out=held_out)  # fmt: skip
    start = time.perf_counter()
    top1 = test(stand_in(dense, keep, calibration, args.repair))
    first = record.candidates[[c.label for c in record.candidates].index(record.start)].keep
    changes = sorted(((n, first[n] / numels[n], keep[n] / numels[n]) for n in numels),
                     key=lambda c: -abs(c[2] - c[1]))  # fmt: skip
    rows.append({
        "network": args.network, "allocation": args.label, "sparsity": sparsity, "repair": args.repair,
        "top1": top1, "chosen": record.chosen, "start": record.start, "candidates": len(record.candidates),
        "cost_f": record.cost_f, "forward_s": forward_s, "objectives": json.dumps(record.summary()["objectives"]),
        "densities": json.dumps({n: keep[n] / numels[n] for n in numels}), "changes": json.dumps(changes),
        "alpha": json.dumps(record.alpha),
    })  # fmt: skip
    write_rows(args.output, rows)
    print(f"{args.network} {sparsity} {args.repair}: search {top1:.4f} ({record.start} -> {record.chosen}, "
          f"{len(record.candidates)} candidates, {record.cost_f:.0f} F)", flush=True)  # fmt: skip
print(report(rows, read_rows(args.fixed)))
