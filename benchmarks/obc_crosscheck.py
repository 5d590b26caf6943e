"""Reference masks from OBC's official ExactOBS code (IST-DASLab/OBC, trueobs.py) for tests/test_mask_selection.py.

    git clone https://github.com/IST-DASLab/OBC /tmp/obc
    PYTHONPATH=. .venv/bin/python benchmarks/obc_crosscheck.py --obc /tmp/obc [--out tests/data/obc_crosscheck.pt]

On fixed generated layers (a Linear and a Conv2d, seeded inputs), OBC's own TrueOBS accumulates the Hessian from the
inputs, runs its unstructured trajectories (prepare_unstr) and its layer-wide choice (prune_unstr) at a few counts.
Saved as plain tensors per case: the layer's weight and inputs, OBC's Hessian H (2/n X X^T, float64), its relative
damping, the count removed, and OBC's pruned weights (float32, 0 where removed). Nothing of OBC is saved or imported
by the package; the test compares ``mask_selection.exact_obs`` to these tensors.
"""

import argparse
import contextlib
import io
import sys

import torch
from torch import nn

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--obc", required=True, help="a checkout of github.com/IST-DASLab/OBC")
parser.add_argument("--out", default="tests/data/obc_crosscheck.pt")
args = parser.parse_args()
sys.path.insert(0, args.obc)
torch.cuda.synchronize = lambda *a, **k: None  # OBC times its loops with CUDA syncs; this runs on the CPU
from trueobs import TrueOBS  # noqa: E402

REL_DAMP = 0.01
DENSITIES = (0.5, 0.2, 0.05)  # fractions of the layer kept


def layers():
    """(name, layer, inputs): inputs correlated across features, so H is far from diagonal."""
    torch.manual_seed(0)
    linear = nn.Linear(24, 16, bias=False)
    x = torch.randn(256, 24) @ (torch.eye(24) + 0.3 * torch.randn(24, 24))
    yield "linear", linear, x
    conv = nn.Conv2d(4, 8, 3, padding=1, bias=False)
    x = torch.randn(32, 4, 6, 6)
    x = x + 0.5 * x.roll(1, dims=1) + 0.3 * x.roll(1, dims=3)  # correlated channels and neighbours
    yield "conv", conv, x


cases = []
for name, layer, x in layers():
    rows, columns = layer.weight.flatten(1).shape
    for density in DENSITIES:
        removed = round(rows * columns * (1 - density))
        obs = TrueOBS(layer, rel_damp=REL_DAMP)
        obs.add_batch(x, layer(x))
        hessian = obs.H.clone()
        with contextlib.redirect_stdout(io.StringIO()):  # OBC prints its timings and errors
            obs.prepare_unstr(parallel=rows)
            # prune_unstr removes ceil(rows * columns * sparsity): half a weight below the count makes it exact
            (pruned,) = obs.prune_unstr([(removed - 0.5) / (rows * columns)])
        assert int((pruned == 0).sum()) == removed, (name, density)
        cases.append({"name": name, "weight": layer.weight.detach().clone(), "inputs": x, "hessian": hessian,
                      "rel_damp": REL_DAMP, "removed": removed, "obc_weight": pruned.clone()})  # fmt: skip
        print(f"{name:<6} {rows}x{columns} removed {removed:>4}: OBC done")
torch.save(cases, args.out)
print(f"saved {len(cases)} cases to {args.out}")
