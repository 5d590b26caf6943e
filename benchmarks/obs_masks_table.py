"""Magnitude masks against re-selected ones under reconstruction, per cell, from two sweeps' results.csv files.

    python benchmarks/obs_masks_table.py BASELINE.csv SELECTED.csv [--mask sparsegpt] [--mask-gram repaired]

BASELINE holds `reconstruct` and `reconstruct_dense_bn` (magnitude masks), SELECTED the same cells with
`[{op: reconstruct, mask: M}]` and `[{op: reconstruct, recalibrate_bn: false, mask: M}]` (same checkpoint, data and
seed). Prints a markdown table, top-1 in %: magnitude, re-selected and the difference, with and without BN
recalibration, for every (allocation, sparsity) the two files share.
"""

import argparse
import csv
import json

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("baseline")
parser.add_argument("selected")
parser.add_argument("--mask", default="sparsegpt")
parser.add_argument("--mask-gram", default="repaired")
args = parser.parse_args()


def recipe(repair: str) -> tuple[str, bool] | None:
    """(mask rule, recalibrate_bn) of a one-reconstruct recipe, or None."""
    if repair in ("reconstruct", "reconstruct_dense_bn"):
        return "magnitude", repair == "reconstruct"
    try:
        (op,) = json.loads(repair)
    except (ValueError, TypeError):
        return None
    if op.get("op") != "reconstruct" or op.get("mask_gram", "repaired") != args.mask_gram:
        return None
    return op.get("mask", "magnitude"), op.get("recalibrate_bn", True)


acc: dict[tuple, float] = {}
for path in (args.baseline, args.selected):
    for row in csv.DictReader(open(path)):
        key = recipe(row["repair"])
        if key is not None:
            acc[(row["allocation"], float(row["sparsity"]), *key)] = 100 * float(row["acc_repaired"])
cells = sorted({(a, s) for a, s, m, _ in acc if m == args.mask}, key=lambda c: (c[0], c[1]))
print(
    f"| allocation | sparsity | `reconstruct` | `{args.mask}` | diff | `reconstruct_dense_bn` | `{args.mask}`, "
    "`recalibrate_bn: false` | diff |"
)
print("|---|---|---|---|---|---|---|---|")
for a, s in cells:
    parts = []
    for recal in (True, False):
        mag, new = acc.get((a, s, "magnitude", recal)), acc.get((a, s, args.mask, recal))
        if mag is None or new is None:
            parts += [f"{mag:.1f}" if mag is not None else "-", f"{new:.1f}" if new is not None else "-", "-"]
        else:
            parts += [f"{mag:.1f}", f"{new:.1f}", f"{new - mag:+.1f}"]
    print(f"| {a} | {s:.2f} | " + " | ".join(parts) + " |")
