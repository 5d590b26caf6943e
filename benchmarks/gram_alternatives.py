"""Two cheaper-looking ways to form a conv's reconstruction statistics, timed against the library's.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gram_alternatives.py [--images 256] [--sparsity 0.95]

The library (``reconstruction._conv_gram``) multiplies, per kernel row offset, each input column with its partner
columns over bands of rows, each band once for all the kernel rows that read it, leaving zero padding out: about
(kw + (kh - 1)(2 kw - 1)) C^2 multiply-adds per input position for the Gram (13 C^2 for a 3x3 kernel).
``results/gram_alternatives.txt`` was measured against its predecessor, which multiplied kernel-row pairs over the
input rows they share (kh * (kw * C)^2 per output position). The alternatives:

- ``kept``: each output row's Gram restricted to its kept inputs only (what its solve reads): sum over rows of
  |kept|^2, far fewer in a sparse layer, but each row's patch columns must be gathered (R, W, positions) first.
- ``offsets``: one C x C product per kernel offset (13 for a 3x3 kernel, by symmetry) and input position, summed
  over the images, then each kernel-position pair's block summed over its window; the cross term by
  ``torch.nn.grad.conv2d_weight`` (as the library's now). As many multiply-adds as the library's at 28x28, more at
  4x4 (the padded grid is 2.25 times the output), with only the images inside each product.

Each is checked equal (float64) to the library's statistics on a few images, then timed (CPU time, float32, the
whole calibration set as one chunk) on every 3x3 conv of a LAMP-pruned ResNet-18 of width 0.25 at 28x28 (the
shipped model's shape; random weights, as in repair_cost.py), fed the dense network's own activations.
"""

import argparse
import time

import torch
from torch import nn

from lightning_repair.allocation import Allocation, allocate
from lightning_repair.masks import compute_masks
from lightning_repair.models import Network
from lightning_repair.reconstruction import _padded, chunk_statistics, layer_statistics, patches


def kept_statistics(conv: nn.Conv2d, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor):
    """Per bucket of output rows (by kept count, within 25% + 4): (rows, kept inputs, Gram and cross term over
    them)."""
    kept = mask.reshape(conv.out_channels, -1)
    counts = kept.sum(1)
    order = torch.argsort(counts, stable=True).tolist()
    p = patches(conv, x)[0]  # (K, positions); groups = 1 here
    p = torch.cat([p, p.new_zeros(1, p.shape[1])])  # input K: padding, always 0
    targets = y.transpose(0, 1).flatten(1)  # (O, positions), in the patches' order
    grams, start = [], 0
    while start < len(order):
        stop = start + 1
        while stop < len(order) and counts[order[stop]] <= 1.25 * counts[order[start]] + 4:
            stop += 1
        rows = order[start:stop]
        width = int(counts[rows].max())
        index = torch.argsort((~kept[rows]).to(torch.int8), dim=1, stable=True)[:, :width]
        index = torch.where(torch.arange(width) < counts[rows, None], index, len(p) - 1)
        gathered = p.index_select(0, index.flatten()).view(len(rows), width, -1)
        grams.append((rows, index, gathered @ gathered.mT, (gathered @ targets[rows, :, None]).squeeze(2)))
        start = stop
    return grams


def offset_gram(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """(K, K) Gram from per-position products x[q] x[q + offset]^T summed over images (groups = 1)."""
    xp = _padded(conv, x)
    n, c, hp, wp = xp.shape
    (kh, kw), (dh, dw), (sh, sw) = conv.kernel_size, conv.dilation, conv.stride
    ho, wo = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
    columns = xp.view(n, c, hp * wp).permute(2, 1, 0).contiguous()  # (positions, C, N)
    length = hp * wp
    gram = x.new_empty(c, kh, kw, c, kh, kw)
    for a in range(kh):
        for b in range(-(kw - 1), kw):
            if a == 0 and b < 0:  # the transpose of offset (0, -b)
                continue
            shift = a * dh * wp + b * dw  # >= 0; products that wrap around a row land outside every window
            products = x.new_zeros(length, c, c)
            products[: length - shift] = columns[: length - shift] @ columns[shift:].mT
            products = products.view(hp, wp, c, c)
            for i in range(kh - a):
                for j in range(max(0, -b), min(kw, kw - b)):
                    window = products[
                        i * dh : i * dh + sh * (ho - 1) + 1 : sh, j * dw : j * dw + sw * (wo - 1) + 1 : sw
                    ]
                    block = window.sum((0, 1))
                    gram[:, i, j, :, i + a, j + b] = block
                    gram[:, i + a, j + b, :, i, j] = block.T
    k = c * kh * kw
    return gram.view(k, k)


def offset_cross(conv: nn.Conv2d, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(K, O) cross term as the weight gradient of the conv with output gradient y."""
    w = torch.nn.grad.conv2d_weight(_padded(conv, x), conv.weight.shape, y, conv.stride, 0, conv.dilation, 1)
    return w.flatten(1).T


def cpu_seconds(fn, *args, repeats: int = 3) -> float:
    fn(*args)
    start = time.process_time()
    for _ in range(repeats):
        fn(*args)
    return (time.process_time() - start) / repeats


def offset_statistics(conv: nn.Conv2d, x: torch.Tensor, y: torch.Tensor):
    return offset_gram(conv, x), offset_cross(conv, x, y)


def check(conv: nn.Conv2d, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> None:
    """The alternatives equal the library's statistics (float64, a few images)."""
    conv, x, y = conv.double(), x[:3].double(), y[:3].double()
    reference = layer_statistics(conv, [x], [y])
    torch.testing.assert_close(offset_gram(conv, x), reference.gram[0])
    torch.testing.assert_close(offset_cross(conv, x, y), reference.cross[0])
    for rows, index, grams, crosses in kept_statistics(conv, x, y, mask):
        for row, columns, gram, cross in zip(rows, index, grams, crosses, strict=True):
            inside = columns < reference.gram.shape[1]
            kept = columns[inside]
            torch.testing.assert_close(gram[inside][:, inside], reference.gram[0][kept][:, kept])
            torch.testing.assert_close(cross[inside], reference.cross[0][kept, row])
    conv.float()


parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--images", type=int, default=256)
parser.add_argument("--sparsity", type=float, default=0.95)
args = parser.parse_args()
torch.manual_seed(0)
images = torch.randn(args.images, 1, 28, 28)
dense = Network(arch="resnet18", in_channels=1, width=0.25).build().train()
with torch.no_grad():
    dense(images)  # BN statistics from data
dense.eval()
masks = compute_masks(dense, allocate(dense, args.sparsity, Allocation("lamp")))
convs = {n: m for n, m in dense.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)}
seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
hooks = [m.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, (i[0], o))) for n, m in convs.items()]
with torch.no_grad():
    dense(images)
for h in hooks:
    h.remove()
print(f"CPU seconds per layer, {args.images} images, LAMP {args.sparsity:.0%}; kept = share of weights kept")
print(f"{'layer':<16} {'C_in':>4} {'size':>5} {'kept':>5} {'library':>8} {'kept-only':>9} {'offsets':>8}")
totals = [0.0, 0.0, 0.0]
with torch.no_grad():
    for name, conv in convs.items():
        x, y = seen[name]
        mask = masks[name]
        check(conv, x, y, mask)
        times = [
            cpu_seconds(chunk_statistics, conv, x, y),
            cpu_seconds(kept_statistics, conv, x, y, mask),
            cpu_seconds(offset_statistics, conv, x, y),
        ]
        totals = [t + s for t, s in zip(totals, times, strict=True)]
        size = f"{x.shape[2]}x{x.shape[3]}"
        print(f"{name:<16} {conv.in_channels:>4} {size:>5} {float(mask.float().mean()):>5.3f} "
              + " ".join(f"{t:>8.3f}" for t in times))  # fmt: skip
print(f"{'total':<33} " + " ".join(f"{t:>8.3f}" for t in totals))
