"""Per layer, the error of each mask selection on the dense network's Gram, relative to magnitude's.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/mask_errors.py [--sparsity 0.97] [--allocation lamp]
        [--exact-max-k 600] [--out benchmarks/results/mask_errors_lamp97.txt]

On the shipped Fashion-MNIST ResNet-18 (1024 calibration images, seed 0, as the sweeps), every prunable layer's
Gram H of its dense input (damped as reconstruction damps it, 0.1%) and the allocation's count for the layer. Per
rule, the OBS error sum over rows of (w - w0) H (w - w0)^T of the best weights on the rule's mask (the masked
re-solve, for the dense output w0's), divided by magnitude's, and the selection's seconds. ``exact_obs`` runs on
layers of at most ``--exact-max-k`` inputs per row (O(K^3) per row).
"""

import argparse
import sys
import time
from pathlib import Path

import torch

from lightning_repair.allocation import allocate
from lightning_repair.datamodule import ImageDataModule
from lightning_repair.layers import prunable_layers
from lightning_repair.mask_selection import damped_gram, exact_obs, forward_ols, sparsegpt
from lightning_repair.masks import compute_masks
from lightning_repair.models import Network, load_dense
from lightning_repair.reconstruction import layer_statistics

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_mask_selection import error, resolved  # noqa: E402  (one re-solve for the tests and the benchmarks)

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--sparsity", type=float, default=0.97)
parser.add_argument("--allocation", default="lamp")
parser.add_argument("--exact-max-k", type=int, default=600)
parser.add_argument("--out", default=None)
args = parser.parse_args()


def resolved_error(w0: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor) -> float:
    """Sum over rows of (w - w0) H (w - w0)^T for the best weights w on the rule's mask (the tests' re-solve)."""
    return float(error(w0, gram, resolved(w0, gram, keep)))


def select(rule: str, w0: torch.Tensor, gram: torch.Tensor, kept: int) -> torch.Tensor:
    if rule == "forward_ols":
        return forward_ols(gram, (w0 @ gram).mT, kept)  # the dense output's cross statistic
    return (sparsegpt if rule == "sparsegpt" else exact_obs)(w0, gram, w0.numel() - kept)[0]


torch.manual_seed(0)
dm = ImageDataModule(dataset="fashion_mnist", calibration_size=1024, calibration_seed=0, batch_size=256, augment=False)
dense = load_dense(Network(arch="resnet18", num_classes=10, in_channels=1, stem="cifar", width=0.25),
                   "checkpoints/fashion_mnist_resnet18_w16.pt")  # fmt: skip
batches = dm.calibration_batches("cpu")
masks = compute_masks(dense, allocate(dense, args.sparsity, args.allocation))
layers = prunable_layers(dense)
inputs = {layer.name: [] for layer in layers}
hooks = [layer.module.register_forward_hook(lambda m, i, o, name=layer.name: inputs[name].append(i[0].detach()))
         for layer in layers]  # fmt: skip
with torch.no_grad():
    for b in batches:
        dense(b)
for h in hooks:
    h.remove()

lines = [f"# python benchmarks/mask_errors.py --sparsity {args.sparsity} --allocation {args.allocation} "
         f"--exact-max-k {args.exact_max_k}", "# error / magnitude's (selection seconds)",
         f"{'layer':<24} {'K':>5} {'kept':>6} {'sparsegpt':>15} {'forward_ols':>15} {'exact_obs':>15}"]  # fmt: skip
print("\n".join(lines), flush=True)
ratios: dict[str, list[float]] = {"sparsegpt": [], "forward_ols": [], "exact_obs": []}
for layer in layers:
    xs = inputs.pop(layer.name)
    with torch.no_grad():
        stats = layer_statistics(layer.module, xs, [layer.module(x) for x in xs])
    gram = damped_gram(stats, 0.001)
    groups, k = gram.shape[:2]
    w0 = layer.module.weight.detach().double().reshape(groups, -1, k)
    mask = masks[layer.name].reshape(w0.shape)
    kept = int(mask.sum())
    base = resolved_error(w0, gram, mask)
    cells = []
    for rule in ratios:
        if rule == "exact_obs" and k > args.exact_max_k:
            cells.append(f"{'-':>15}")
            continue
        start = time.perf_counter()
        keep = select(rule, w0, gram, kept)
        seconds = time.perf_counter() - start
        ratio = resolved_error(w0, gram, keep) / base
        ratios[rule].append(ratio)
        cells.append(f"{ratio:>7.3f} ({seconds:>4.1f}s)")
    lines.append(f"{layer.name:<24} {k:>5} {kept:>6} " + " ".join(cells))
    print(lines[-1], flush=True)
for rule, values in ratios.items():
    values.sort()
    lines.append(f"{rule}: median {values[len(values) // 2]:.3f} over {len(values)} layers")
    print(lines[-1])
if args.out:
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
