"""Cost of the repair in forward-pass equivalents (DESIGN.md section 6), on ResNet-18 and ResNet-50.

    python benchmarks/repair_cost.py [--images 1024] [--width 0.25]

Times one dense forward pass over the calibration set (F), then BN recalibration + `asr` and the
`default` recipe on a LAMP-pruned copy (95%), and prints each as a multiple of F. Random weights
with data-driven BN statistics: cost does not depend on what the network learned.
"""

import argparse
import copy

import torch

from lightning_repair.allocation import Allocation, allocate
from lightning_repair.evaluation import calibration_forward_time
from lightning_repair.masks import apply_masks, compute_masks
from lightning_repair.models import Network
from lightning_repair.oneshot import timed
from lightning_repair.repair import repair

RECIPES = {
    "bn_recalibration + asr": [{"op": "bn_recalibration"}, {"op": "variance_matching", "shrinkage": "adaptive"}],
    "default": "default",
}

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--images", type=int, default=1024)
parser.add_argument("--width", type=float, default=0.25)
parser.add_argument("--batch-size", type=int, default=256)
args = parser.parse_args()
torch.manual_seed(0)
batches = list(torch.randn(args.images, 1, 28, 28).split(args.batch_size))
print(f"{'arch':<10} {'F (s)':>7} " + " ".join(f"{name:>24}" for name in RECIPES))
for arch in ("resnet18", "resnet50"):
    dense = Network(arch=arch, in_channels=1, width=args.width).build().train()
    with torch.no_grad():
        for b in batches:
            dense(b)  # BN statistics from data, so pruning really perturbs the network
    dense.eval()
    pruned = apply_masks(copy.deepcopy(dense), compute_masks(dense, allocate(dense, 0.95, Allocation("lamp"))))
    forward = calibration_forward_time(dense, batches)
    ratios = []
    for recipe in RECIPES.values():
        timings: dict[str, float] = {}
        with timed(timings, "repair"):
            repair(copy.deepcopy(pruned), dense, batches, recipe)
        ratios.append(timings["repair"] / forward)
    print(f"{arch:<10} {forward:>7.2f} " + " ".join(f"{r:>23.2f}x" for r in ratios))
