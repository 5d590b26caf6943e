"""Cost of each repair preset in dense forward-pass equivalents F (docs/methods.md), on ResNet-18 and ResNet-50.

    .venv/bin/python benchmarks/repair_cost.py [--images 512] [--width 0.25] [--sparsity 0.95] [--cpu-time | --flops]
        [--presets reconstruct ...] [--mask sparsegpt ...] [--mask-gram dense]

Times one dense forward pass over the calibration set (F), then each preset on a LAMP-pruned copy, and prints
each as a multiple of F; for `reconstruct` also the time spent on its statistics (Gram matrices) and on its
solves. Random weights with data-driven BN statistics: cost does not depend on what the network learned.
With --cpu-time every duration is the process's CPU time instead of wall time: run with OMP_NUM_THREADS=1, it
is not inflated by other jobs on the machine. With --flops it counts the floating-point operations of matrix products
and convolutions instead (torch.utils.flop_counter; elementwise work and solves are not counted): the arithmetic a
preset needs, whatever the machine. ``--mask RULE`` adds the recipe ``[{op: reconstruct, mask: RULE, mask_gram: G}]``
(named ``reconstruct+RULE``), timed like the presets, with its mask selection's share (selection Gram and choice)
and its cost relative to ``reconstruct``'s; ``--presets`` restricts the presets timed.
"""

import argparse
import copy
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from lightning_repair.allocation import Allocation, allocate
from lightning_repair.evaluation import calibration_forward_time
from lightning_repair.masks import apply_masks, compute_masks
from lightning_repair.models import Network
from lightning_repair.repair import repair
from lightning_repair.utils import timed

PRESETS = ("bn_recalibration", "asr", "default", "reconstruct", "reconstruct_dense_bn")

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--images", type=int, default=512)
parser.add_argument("--width", type=float, default=0.25)
parser.add_argument("--batch-size", type=int, default=256)
parser.add_argument("--sparsity", type=float, default=0.95)
parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
parser.add_argument("--mask", nargs="*", default=[], help="mask rules to time as reconstruct options")
parser.add_argument("--mask-gram", default="dense", choices=["dense", "repaired"])
cost = parser.add_mutually_exclusive_group()
cost.add_argument("--cpu-time", action="store_true", help="measure CPU time (with OMP_NUM_THREADS=1)")
cost.add_argument("--flops", action="store_true", help="count matrix-product and convolution FLOPs, not time")
args = parser.parse_args()
RECIPES = {p: p for p in args.presets} | {
    f"reconstruct+{rule}": [{"op": "reconstruct", "mask": rule, "mask_gram": args.mask_gram}] for rule in args.mask
}
if args.cpu_time:  # every timer here and in the library reads time.perf_counter
    time.perf_counter = time.process_time


def flops(fn, *args, **kwargs) -> float:
    """Matrix-product and convolution FLOPs of fn(*args, **kwargs)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn(*args, **kwargs)
    return counter.get_total_flops()


torch.manual_seed(0)
batches = list(torch.randn(args.images, 1, 28, 28).split(args.batch_size))
unit = "F (GFLOP)" if args.flops else "F (s)"
print(f"{'arch':<10} {unit:>9} " + " ".join(f"{name:>21}" for name in RECIPES)
      + ("" if args.flops else "  reconstruct: Grams / solves"))  # fmt: skip
for arch in ("resnet18", "resnet50"):
    dense = Network(arch=arch, in_channels=1, width=args.width).build().train()
    with torch.no_grad():
        for b in batches:
            dense(b)  # BN statistics from data, so pruning really perturbs the network
    dense.eval()
    masks = compute_masks(dense, allocate(dense, args.sparsity, Allocation("lamp")))
    pruned = apply_masks(copy.deepcopy(dense), masks)
    if args.flops:
        forward = sum(flops(dense, b) for b in batches)
        ratios = [flops(repair, copy.deepcopy(pruned), dense, batches, p, masks=masks) / forward
                  for p in RECIPES.values()]  # fmt: skip
        print(f"{arch:<10} {forward / 1e9:>9.1f} " + " ".join(f"{r:>20.2f}F" for r in ratios))
        continue
    forward = calibration_forward_time(dense, batches)
    ratios, reports = [], {}
    for name, recipe in RECIPES.items():
        timings: dict[str, float] = {}
        with timed(timings, "repair"):
            reports[name] = repair(copy.deepcopy(pruned), dense, batches, recipe, masks=masks)
        ratios.append(timings["repair"] / forward)
    split = ""
    if "reconstruct" in reports:
        split = "  " + " / ".join(f"{reports['reconstruct'].timings[k] / forward:.2f}F"
                                  for k in ("reconstruction_statistics", "reconstruction_solve"))  # fmt: skip
    print(f"{arch:<10} {forward:>9.2f} " + " ".join(f"{r:>20.2f}F" for r in ratios) + split)
    for rule in args.mask:
        name = f"reconstruct+{rule}"
        selection = reports[name].timings.get("mask_selection", 0.0) / forward
        relative = ""
        if "reconstruct" in RECIPES:
            ratio = ratios[list(RECIPES).index(name)] / ratios[list(RECIPES).index("reconstruct")]
            relative = f", {ratio:.2f}x reconstruct"
        print(f"{'':<10} {name} ({args.mask_gram} Gram): mask selection {selection:.2f}F{relative}")
