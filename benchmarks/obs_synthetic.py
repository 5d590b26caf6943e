"""Errors of re-selected masks on generated layers, relative to magnitude's, after the masked least-squares re-solve.

    PYTHONPATH=. .venv/bin/python benchmarks/obs_synthetic.py

The layers of tests/test_mask_selection.py's factor test (a Linear 16x40, a 2-group conv 8x36 per group, a depthwise
conv 4x1x9; correlated inputs, damped Gram, iid weights; seeds 10-15) at 50/80/95% sparsity. Per case: the error
sum (w - w0) H (w - w0)^T of the best weights on each mask, divided by magnitude's (layer-wide top-k of |w|).
forward_ols's target is the dense output's cross statistic, H w0.
"""

import sys
from pathlib import Path

import torch

from lightning_repair.mask_selection import exact_obs, forward_ols, sparsegpt, top_count

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_mask_selection import error, problem, resolved  # noqa: E402  (the test's own layers and re-solve, so the two cannot drift apart)


def resolved_error(w0: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor) -> float:
    return float(error(w0, gram, resolved(w0, gram, keep)))


print(f"{'layer (groups, rows, K)':<24} {'sparsity':>8} {'sparsegpt':>9} {'exact_obs':>9} {'forward_ols':>11}")
ratios = {"sparsegpt": [], "exact_obs": [], "forward_ols": []}
for seed, shape in enumerate([(1, 16, 40), (2, 8, 36), (4, 1, 9)] * 2):
    w0, gram = problem(10 + seed, *shape)
    for density in (0.5, 0.2, 0.05):
        removed = round(w0.numel() * (1 - density))
        magnitude = top_count(w0.abs().reshape(-1, shape[2]), w0.numel() - removed, "layer").view(w0.shape)
        base = resolved_error(w0, gram, magnitude)
        row = [resolved_error(w0, gram, sparsegpt(w0, gram, removed, block=16)[0]) / base,
               resolved_error(w0, gram, exact_obs(w0, gram, removed)[0]) / base,
               resolved_error(w0, gram, forward_ols(gram, (w0 @ gram).mT, w0.numel() - removed)) / base]  # fmt: skip
        for name, r in zip(ratios, row, strict=True):
            ratios[name].append(r)
        print(f"{str(shape):<24} {1 - density:>8.2f} {row[0]:>9.3f} {row[1]:>9.3f} {row[2]:>11.3f}")
for name, r in ratios.items():
    print(f"{name}: error / magnitude's from {min(r):.3f} to {max(r):.3f}, median {sorted(r)[len(r) // 2]:.3f}")
