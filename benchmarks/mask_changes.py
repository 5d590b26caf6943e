"""Where re-selected masks differ from magnitude's: per layer, the share of kept positions that moved.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/mask_changes.py [--sparsity 0.97] [--mask sparsegpt]
        [--mask-gram dense] [--no-recalibrate-bn] [--allocation lamp]

On the shipped Fashion-MNIST ResNet-18 (1024 calibration images, seed 0, as the sweeps), prunes by magnitude at the
allocation's per-layer counts, runs ``[{op: reconstruct, mask: ...}]`` and prints, per prunable layer, its inputs per
row K, its kept count, the share of the kept weights that are not magnitude's, and the dense weight energy the
kept weights hold (sum of w^2 kept / sum of w^2), for magnitude's masks and the re-selected ones.
"""

import argparse
import copy

import torch

from lightning_repair.allocation import Allocation, allocate
from lightning_repair.datamodule import ImageDataModule
from lightning_repair.masks import apply_masks, compute_masks
from lightning_repair.models import Network, load_dense
from lightning_repair.operators import Reconstruct
from lightning_repair.repair import repair

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--sparsity", type=float, default=0.97)
parser.add_argument("--allocation", default="lamp")
parser.add_argument("--mask", default="sparsegpt")
parser.add_argument("--mask-gram", default="dense", choices=["dense", "repaired"])
parser.add_argument("--no-recalibrate-bn", action="store_true")
args = parser.parse_args()

torch.manual_seed(0)
dm = ImageDataModule(dataset="fashion_mnist", calibration_size=1024, calibration_seed=0, batch_size=256, augment=False)
network = Network(arch="resnet18", num_classes=10, in_channels=1, stem="cifar", width=0.25)
dense = load_dense(network, "checkpoints/fashion_mnist_resnet18_w16.pt")
batches = dm.calibration_batches("cpu")
masks = compute_masks(dense, allocate(dense, args.sparsity, Allocation(args.allocation)))
op = Reconstruct(mask=args.mask, mask_gram=args.mask_gram, recalibrate_bn=not args.no_recalibrate_bn)
report = repair(apply_masks(copy.deepcopy(dense), masks), dense, batches, [op], masks=masks)
weights = dict(dense.named_parameters())
print(f"{args.allocation} {args.sparsity} {op}")
print(f"{'layer':<28} {'K':>5} {'kept':>6} {'moved':>6} {'energy mag':>10} {'energy new':>10}")
for name, mask in masks.items():
    new = report.masks[name]
    kept = int(mask.sum())
    moved = 1 - int((mask & new).sum()) / max(kept, 1)
    w2 = weights[f"{name}.weight"].detach().double().square()
    energy = [float(w2[m].sum() / w2.sum()) for m in (mask, new)]
    print(f"{name:<28} {mask[0].numel():>5} {kept:>6} {moved:>6.1%} {energy[0]:>10.3f} {energy[1]:>10.3f}")
total = sum(int(m.sum()) for m in masks.values())
print(f"all layers: {1 - sum(int((m & report.masks[n]).sum()) for n, m in masks.items()) / total:.1%} of kept moved")
