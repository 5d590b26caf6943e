"""Layer-wise reconstruction: re-solve a layer's kept weights by masked ridge least squares.

For a Conv2d or Linear with a fixed mask, every output row o minimises

    || X_S(o) w_o + b_o - Y_o ||^2 + lambda ||w_o||^2

over its kept inputs S(o), where X holds the layer's input patches (one row per sample and output position,
``in/groups * kh * kw`` columns: stride, padding, dilation, padding mode and groups as the layer applies them)
and Y the target output. The sufficient statistics are the patch Gram H = X^T X, the cross term X^T Y and, with a
bias, the patch and target sums: they are accumulated over calibration chunks in float64 and summed across
processes, so the solution does not depend on how the data is batched or sharded. A conv's H is formed without
unfolding its patches: one product per kernel offset, each input row band and column multiplied once for every
kernel position pair with that offset (``_conv_gram``): 13/81 of the unfolded Gram's work for a 3x3 kernel; its
cross term is the conv's weight gradient.
lambda = damping times the mean diagonal of the group's H (never exactly 0, so dead inputs and rank-deficient H
are well posed); the bias is not shrunk. Rows are solved in batches padded to a common size (padding is an
identity block with a zero right side, so it solves to 0), in chunks bounded in memory.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from .stats import all_reduce_sum, world_size

_CHUNK_ELEMENTS = 1 << 25  # padded normal-equation entries solved at once (256 MB in float64)
# images x sqrt(output positions per image) per call of a conv's weight gradient (its cross term, ``_conv_sums``): its
# float32 rounding grows as that does, in proportion to the images and to the square root of each one's positions
# (256: 9 images of 28x28, 64 of 4x4; tests/test_reconstruction.py bounds it)
_CROSS_BUDGET = 256
_CONV_SLICE_ELEMENTS = 1 << 22  # input laid out by columns at once (16 MB): faster than whole chunks on CPU


def _padded(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """x with the conv's padding applied (any padding mode, 'same' and 'valid' included)."""
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    return F.pad(x, _explicit_padding(conv), mode=mode)


def _explicit_padding(conv: nn.Conv2d) -> list[int]:
    """F.pad's (left, right, top, bottom) for the conv's padding."""
    if conv.padding == "valid":
        return [0, 0, 0, 0]
    if conv.padding == "same":
        pads = []
        for d, k in zip(reversed(conv.dilation), reversed(conv.kernel_size), strict=True):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return pads
    return [p for p in reversed(conv.padding) for _ in range(2)]


def patches(layer: nn.Conv2d | nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as (groups, K, rows): the columns the layer's weight multiplies, one per output position."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, layer.in_features).T.unsqueeze(0)
    cols = F.unfold(_padded(layer, x), layer.kernel_size, dilation=layer.dilation, stride=layer.stride)
    n, k, length = cols.shape
    return (
        cols.view(n, layer.groups, k // layer.groups, length).permute(1, 2, 0, 3).reshape(layer.groups, -1, n * length)
    )


def targets(layer: nn.Conv2d | nn.Linear, y: torch.Tensor) -> torch.Tensor:
    """The target output as (groups, rows, out/groups), rows ordered as in ``patches``."""
    if isinstance(layer, nn.Linear):
        return y.reshape(-1, layer.out_features).unsqueeze(0)
    n, c = y.shape[:2]
    g = layer.groups
    return y.reshape(n, g, c // g, -1).permute(1, 0, 3, 2).reshape(g, -1, c // g)


@dataclass
class LayerStatistics:
    """Sums over calibration rows, per group: Gram (g, K, K), cross (g, K, O), patch sum (g, K), target sum (g, O)."""

    gram: torch.Tensor
    cross: torch.Tensor
    patch_sum: torch.Tensor
    target_sum: torch.Tensor
    rows: int

    def __iadd__(self, other: LayerStatistics) -> LayerStatistics:  # in place: a layer's Gram can be 100s of MB
        for mine, theirs in zip(self.sums, other.sums, strict=True):
            mine += theirs
        self.rows += other.rows
        return self

    @property
    def sums(self) -> tuple[torch.Tensor, ...]:
        return self.gram, self.cross, self.patch_sum, self.target_sum

    def check_finite(self, where: str) -> LayerStatistics:
        # a sum of float64 entries is finite exactly when they all are (short of entries near float64's limit):
        # one pass, no mask the size of the Gram
        if not all(torch.isfinite(t.sum()) for t in self.sums):
            raise FloatingPointError(f"non-finite activations at {where}: check the checkpoint and the input data")
        return self

    def residuals(self, weight: torch.Tensor, bias: torch.Tensor | None, target_energy: torch.Tensor) -> torch.Tensor:
        """Per output channel, ||X w + b - Y||^2 over the rows, for the layer's ``weight`` and ``bias``, given each
        channel's target energy sum Y^2 (channels in the layer's order)."""
        groups, k = self.gram.shape[:2]
        w = weight.detach().double().reshape(groups, -1, k)
        b = (
            torch.zeros(w.shape[:2], dtype=w.dtype, device=w.device)
            if bias is None
            else bias.detach().double().view(groups, -1)
        )
        quadratic = torch.einsum("gok,gkj,goj->go", w, self.gram, w)
        linear = torch.einsum("gok,gk->go", w, self.patch_sum)
        cross = torch.einsum("gok,gko->go", w, self.cross)
        residual = quadratic + 2 * b * linear + self.rows * b.square() - 2 * (cross + b * self.target_sum)
        return residual.flatten() + target_energy

    def all_reduce(self) -> LayerStatistics:
        if world_size() == 1:  # nothing to reduce: no flat copy of a Gram of up to 170 MB
            return self
        rows = torch.tensor([float(self.rows)], dtype=torch.float64, device=self.gram.device)
        flat = all_reduce_sum(torch.cat([t.flatten() for t in self.sums] + [rows]))
        parts = flat.split([t.numel() for t in self.sums] + [1])
        self.gram, self.cross, self.patch_sum, self.target_sum = (
            p.view_as(t) for p, t in zip(parts, self.sums, strict=False)
        )
        self.rows = int(parts[-1].item())
        return self


# GPUs whose float64 throughput is half their float32 one (P100, V100, A100, H100: compute capability x.0 for
# x >= 6): a conv's Gram products run in float64 there; elsewhere float64 is 1/32-1/64 of float32, so they run in
# float32 and are accumulated in float64 (benchmarks/gpu.sh measures both; tests/test_reconstruction.py bounds the
# float32 products' effect on the solve)
_FAST_FLOAT64_CAPABILITIES = {(6, 0), (7, 0), (8, 0), (9, 0)}
PRODUCT_DTYPE: torch.dtype | None = None  # None: per device (``product_dtype``); set to force one


def product_dtype(device: torch.device) -> torch.dtype:
    """The dtype of a conv's Gram products on ``device`` (accumulation is always float64)."""
    if PRODUCT_DTYPE is not None:
        return PRODUCT_DTYPE
    if device.type == "cuda" and torch.cuda.get_device_capability(device) in _FAST_FLOAT64_CAPABILITIES:
        return torch.float64
    return torch.float32


def chunk_statistics(layer: nn.Conv2d | nn.Linear, x: torch.Tensor, y: torch.Tensor) -> LayerStatistics:
    """This chunk's sums: ``layer`` fed ``x``, target output ``y``."""
    # convs have one row per output position: their products run in ``product_dtype`` (the cost of
    # reconstruction); a Linear has one row per image, so its products run in float64 at little cost
    if isinstance(layer, nn.Linear):
        dtype = torch.float64
    else:
        dtype = torch.promote_types(x.dtype, product_dtype(x.device))
    x, y = x.detach().to(dtype), y.detach().to(dtype)
    if x.is_cuda and dtype == torch.float32:
        with _no_tf32():
            return _chunk_statistics(layer, x, y)
    return _chunk_statistics(layer, x, y)


@contextmanager
def _no_tf32():
    """Full float32 products (TF32 keeps 10 mantissa bits: too few for a Gram), in matrix products and in cuDNN's
    convolutions (a conv's cross term)."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def _chunk_statistics(layer: nn.Conv2d | nn.Linear, x: torch.Tensor, y: torch.Tensor) -> LayerStatistics:
    if isinstance(layer, nn.Conv2d):  # in slices of images, each formed and multiplied while still in cache
        sums = None  # float64, added slice by slice
        size = _slice_images(layer, x)
        for a, b in zip(x.split(size), y.split(size), strict=True):
            part = _conv_sums(layer, a, b)
            if sums is None:
                sums = [piece.double() for piece in part]
            else:
                for total, piece in zip(sums, part, strict=True):
                    total += piece
            del part  # else this slice's sums stay alive while the next slice's are formed
        gram, cross, patch_sum = sums
        target_sum, rows = y.sum((0, 2, 3)).view(layer.groups, -1), y.numel() // y.shape[1]
    else:
        p, t = patches(layer, x), targets(layer, y)
        gram, cross, patch_sum = p @ p.mT, p @ t, p.sum(2)
        target_sum, rows = t.sum(1), t.shape[1]
    return LayerStatistics(gram.double(), cross.double(), patch_sum.double(), target_sum.double(), rows)


def _slice_images(conv: nn.Conv2d, x: torch.Tensor) -> int:
    """Images of ``x`` per slice of the conv's products: their input, counted once per kernel column (a grouped or
    dilated conv's factors are copies, one per partner column), within ``_CONV_SLICE_ELEMENTS``."""
    return max(1, _CONV_SLICE_ELEMENTS // (x[0].numel() * conv.kernel_size[1]))


def _conv_sums(conv: nn.Conv2d, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(Gram, cross, patch sum) of the conv's patches, per group: the Gram from ``_conv_gram`` (in float64), the
    cross term as the conv's weight gradient for output gradient y, the patch sum from the images' sum. Zero padding
    is never computed with: the Gram's products leave its rows out and read its columns as zeros, and the weight
    gradient pads as the conv does."""
    x, pads = _zero_padding(conv, x)
    (left, right, top, bottom), g, k = pads, conv.groups, conv.weight[0].numel()
    # the weight gradient pads symmetrically only
    xc, padding = (x, (top, left)) if (left, top) == (right, bottom) else (F.pad(x, pads), 0)
    if conv.kernel_size == (1, 1) and conv.stride != (1, 1):
        # oneDNN (torch 2.14.1, CPU) corrupts the heap forming a strided 1x1 conv's weight gradient from a
        # channels-last input of 2-7 channels: these convs (a ResNet's projections, 1/9 of a 3x3's work) take theirs
        # from contiguous tensors, on every device
        xc, y = xc.contiguous(), y.contiguous()
    images = max(1, int(_CROSS_BUDGET / math.sqrt(y[0, 0].numel())))  # per call
    cross = sum(torch.nn.grad.conv2d_weight(a, conv.weight.shape, b, conv.stride, padding, conv.dilation, g).double()
                for a, b in zip(xc.split(images), y.split(images), strict=True))  # fmt: skip
    summed = F.unfold(F.pad(_image_sum(x), pads), conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
    return _conv_gram(conv, x, pads, y.shape[2:]), cross.reshape(g, -1, k).mT, summed.sum(2).view(g, k)


def _image_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of the images ``x`` (1, C, H, W), read in ``x``'s own memory order: summed over images into another
    order (a channels-last input into a contiguous sum), the reduction runs several times slower."""
    order = sorted(range(1, x.dim()), key=lambda d: -x.stride(d))  # the image's dimensions, outermost first
    return x.permute(0, *order).sum(0).permute(*(order.index(d) for d in range(1, x.dim())))[None]


def _zero_padding(conv: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """``x`` with any non-zero padding mode applied, and the zero padding still to apply (F.pad's order)."""
    if conv.padding_mode == "zeros":
        return x, _explicit_padding(conv)
    return _padded(conv, x), [0, 0, 0, 0]


def _conv_gram(conv: nn.Conv2d, x: torch.Tensor, pads: list[int], out_size: tuple[int, int]) -> torch.Tensor:
    """The patch Gram (g, K, K), float64, of the input ``x`` with zero padding ``pads`` (F.pad's order), from one
    product per kernel offset and input column.

    Entry ((c, i, j), (c', i + di, j + dj)) sums x[c, a, b] x[c', a + di*dh, b + dj*dw] over the input positions
    (a, b) that kernel position (i, j) reads: rows i*dh + sh*p and columns j*dw + sw*q (p, q over the output). So
    for one row offset di, each input column b is multiplied with its partner columns b + dj*dw, every dj at once,
    rows and images summed inside the product; the rows are split into bands read by the same kernel rows, each band
    multiplied once and added to every kernel row that reads it. A kernel position's block is its kernel row's sum
    over the columns it reads. With zero padding, rows that are padding in either factor are left out and padding
    columns are zeros (their products are 0). About (kw + (kh - 1)(2 kw - 1)) (C/g)^2 multiply-adds per input
    position: 13/81 of the unfolded Gram's for a 3x3 kernel.

    The input is laid out once (``_column_layout``), channels innermost, or images innermost where a group has one
    channel: every product's factors are then strided views of that copy (one batched product over the columns and
    groups), except the windows of a dilated conv, or of a grouped one with several channels per group, which are
    copies of the columns they read (``_columns``). From a channels-last input the channels-innermost layout is a
    copy of whole image rows.
    """
    (kh, kw), (dh, dw), (sh, sw), g = conv.kernel_size, conv.dilation, conv.stride, conv.groups
    ho, wo = out_size
    _, c, h, w = x.shape
    cg = c // g
    left, right, top, bottom = pads
    hp, wp = top + h + bottom, left + w + right  # the padded input's size
    (top, bottom), (left, right) = (top, top + h), (left, left + w)  # where the image lies in it
    margin = (kw - 1) * dw  # columns on both sides: every column's partner window lies inside
    first_col, end_col = left, min(right, (kw - 1) * dw + sw * (wo - 1) + 1)  # read and not padding
    gram = x.new_zeros(g, cg, kh, kw, cg, kh, kw, dtype=torch.float64)
    k = cg * kh * kw
    if end_col <= first_col:  # every output column reads padding only: every patch is 0
        return gram.view(g, k, k)
    laid = _column_layout(x, conv, top, left, hp, wp + 2 * margin, margin)
    reads = x.new_zeros(kw, end_col - first_col)  # reads[j, b]: 1 where kernel column j reads column first_col + b
    for j in range(kw):
        read = _strided_slice(j * dw, sw, wo, first_col, end_col)
        if read is not None:
            reads[j, read] = 1
    for di in range(kh):
        lowest = 0 if di == 0 else 1 - kw  # partners dj = lowest, ..., kw - 1 (at di = 0, dj < 0 are transposes)
        m = kw - lowest
        columns = (margin + first_col, margin + first_col + lowest * dw, end_col - first_col)
        sums = _row_band_products(laid, columns, (m, dw), reads, di, (kh, dh, sh, ho), (top, bottom - di * dh))
        for i, blocks in sums.items():
            blocks = blocks.view(kw, g, cg, m, cg)  # [j, g, c, e, c']: partner column j + lowest + e
            for j in range(kw):
                e_lo, e_hi = max(0, -j - lowest), min(m, kw - j - lowest)
                partners = slice(j + lowest + e_lo, j + lowest + e_hi)
                block = blocks[j, :, :, e_lo:e_hi]
                gram[:, :, i, j, :, i + di, partners] = block.permute(0, 1, 3, 2)
                gram[:, :, i + di, partners, :, i, j] = block.permute(0, 3, 2, 1)
    return gram.view(g, k, k)


def _column_layout(x: torch.Tensor, conv: nn.Conv2d, top: int, left: int, hp: int, width: int, margin: int):
    """The zero-padded input as (row mod sh, row // sh, images, groups, columns, C/g): the image at padded rows from
    ``top``, columns from ``margin + left`` of ``width``, zeros around it (padding and margins).

    In memory, channels innermost (in that order), so that a column's channels and its window of partner columns
    are contiguous runs; with one channel per group (depthwise, a one-channel input), images innermost instead,
    (row mod sh, columns, groups, C/g, row // sh, images), so that a product's rows x images are the contiguous run
    and a column's groups follow one another. Either way the rows and images of a band merge into one dimension, so
    the products' factors are views (``_columns``)."""
    sh, g = conv.stride[0], conv.groups
    n, c, h, w = x.shape
    shape = (sh, -(-hp // sh), n, g, width, c // g)  # -(-hp // sh): rows per residue class mod sh
    order = (0, 1, 2, 3, 4, 5) if c // g > 1 else (0, 4, 3, 5, 1, 2)
    laid = x.new_zeros([shape[d] for d in order]).permute(*(order.index(d) for d in range(6)))
    rows = x.view(n, g, c // g, h, w).permute(3, 0, 1, 4, 2)  # (rows, images, groups, columns, channels)
    for r in range(sh):
        first_row = -(-(top - r) // sh)  # padded row r + sh*first_row is the image's row r + sh*first_row - top
        band = rows[r + sh * first_row - top :: sh]
        laid[r, first_row : first_row + len(band), :, :, margin + left : margin + left + w] = band
    return laid


def _row_band_products(
    laid: torch.Tensor,
    columns: tuple[int, int, int],
    window: tuple[int, int],
    reads: torch.Tensor,
    di: int,
    rows: tuple[int, int, int, int],
    support: tuple[int, int],
) -> dict[int, torch.Tensor]:
    """Per kernel row i paired with i + di, and per kernel column j: the sum, over the rows i reads (inside
    ``support``) and the columns b that j reads (``reads``), of column b's channels times its window of m partner
    columns (dw apart), as (kw, g * C/g * m * C/g).

    ``laid`` is the input in ``_column_layout``; ``columns`` = (the first column read, its window's first column,
    the number of columns). Per residue of the rows mod the stride, the rows are split at every kernel row's first
    and last: each band is read by the same kernel rows, multiplied once and summed over each kernel column's
    columns at once (so only one band's products are held)."""
    (kh, dh, sh, ho), (top, bottom), (m, dw) = rows, support, window
    first_col, first_partner, count = columns
    sums: dict[int, torch.Tensor] = {}
    for r in range(sh):
        # row r + sh*k pairs with row partner_r + sh*(k + offset)
        partner_r, offset = (r + di * dh) % sh, (r + di * dh) // sh
        lo, hi = -(-(top - r) // sh), -(-(bottom - r) // sh)  # rows r + sh*k inside the support
        spans = {  # kernel row i: the rows r + sh*k it reads, k in [first, end)
            i: (max(lo, i * dh // sh), min(hi, i * dh // sh + ho)) for i in range(kh - di) if i * dh % sh == r
        }
        edges = sorted({k for first_k, end_k in spans.values() if first_k < end_k for k in (first_k, end_k)})
        for start, stop in pairwise(edges):
            readers = [i for i, (first_k, end_k) in spans.items() if first_k <= start and stop <= end_k]
            if not readers:
                continue
            a = _columns(laid[r, start:stop], first_col, count, (1, dw))
            b = _columns(laid[partner_r, start + offset : stop + offset], first_partner, count, (m, dw))
            product = (a.mT @ b).view(count, -1)  # per column, per group: (c, e, c')
            product = reads @ product  # summed over each kernel column's columns
            for i in readers:
                sums[i] = product if i not in sums else sums[i] + product
    return sums


def _columns(band: torch.Tensor, first: int, count: int, window: tuple[int, int]) -> torch.Tensor:
    """Of ``band`` (rows, images, g, columns, C/g; laid out as ``_column_layout`` says): per column from ``first``
    (``count`` of them) and group, its window of m columns dw apart (``window``), each with its C/g channels, as a
    (rows * images) x (m * C/g) matrix: (count * g, rows * images, m * C/g). A view of ``band`` where its strides
    allow (no groups, or one channel per group; the window's channels one run); else a copy, made in the band's
    memory order."""
    rows, n, g, width, cg = band.shape
    _, image, group, column, channel = band.stride()
    m, dw = window
    sizes, strides = (count, g, rows * n, m, cg), (column, group, image, dw * column, channel)
    view = band.as_strided(sizes, strides, band.storage_offset() + first * column)
    if not (_merge(sizes, strides, 0) and _merge(sizes, strides, 3)):
        order = sorted((2, 3, 4), key=lambda d: -strides[d])  # the window's dimensions, outermost first in memory
        view = view.permute(0, 1, *order).contiguous().permute(0, 1, *(order.index(d) + 2 for d in (2, 3, 4)))
    return view.reshape(count * g, rows * n, m * cg)


def _merge(sizes: tuple[int, ...], strides: tuple[int, ...], d: int) -> bool:
    """Whether dimensions d and d + 1 merge into one (a view)."""
    return sizes[d] == 1 or sizes[d + 1] == 1 or strides[d] == sizes[d + 1] * strides[d + 1]


def _strided_slice(start: int, step: int, count: int, lo: int, hi: int) -> slice | None:
    """Where start, start + step, ... (``count`` of them) fall in [lo, hi), as a slice counted from lo; None if
    nowhere."""
    skip = max(0, -(-(lo - start) // step))
    first, last = start + step * skip, min(start + step * (count - 1), hi - 1)
    return slice(first - lo, last - lo + 1, step) if first <= last else None


def layer_statistics(
    layer: nn.Conv2d | nn.Linear, inputs: Iterable[torch.Tensor], outputs: Iterable[torch.Tensor]
) -> LayerStatistics:
    """Sufficient statistics of ``layer`` fed ``inputs`` (chunks) for the target ``outputs`` (same chunks),
    summed over this process's chunks and across processes."""
    total = None
    for x, y in _joined(layer, inputs, outputs):
        part = chunk_statistics(layer, x, y)
        if total is None:
            total = part
        else:
            total += part
        # else this chunk's sums (a float64 Gram of up to 170 MB) and activations stay alive while the next chunk
        # is loaded and its statistics formed: one more Gram from the third chunk on
        del part, x, y
    if total is None:
        raise ValueError("reconstruction needs calibration data: no chunk reached the layer")
    return total.all_reduce().check_finite("a reconstructed layer")


def _joined(
    layer: nn.Conv2d | nn.Linear, inputs: Iterable[torch.Tensor], outputs: Iterable[torch.Tensor]
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The (input, output) chunks, for a conv with consecutive chunks joined while they fit one slice of its
    products (``_slice_images``): the costs paid per product and per Gram are then paid once per slice, not once per
    chunk (a few chunks of a small image each, deep in a network). A Linear's chunks pass as they are."""
    if not isinstance(layer, nn.Conv2d):
        yield from zip(inputs, outputs, strict=True)
        return
    held: list[tuple[torch.Tensor, torch.Tensor]] = []
    for x, y in zip(inputs, outputs, strict=True):
        fits = sum(len(a) for a, _ in held) + len(x) <= _slice_images(layer, x)
        if held and not (fits and held[0][0].shape[1:] == x.shape[1:]):  # images of one size only
            yield _concatenated(held)
        held.append((x, y))
    if held:
        yield _concatenated(held)


def _concatenated(held: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The held chunks as one; ``held`` is emptied, so they are released with the result."""
    xs, ys = zip(*held, strict=True)
    held.clear()
    return (xs[0], ys[0]) if len(xs) == 1 else (torch.cat(xs), torch.cat(ys))


@torch.no_grad()
def reconstruct_layer(
    layer: nn.Conv2d | nn.Linear,
    stats: LayerStatistics,
    mask: torch.Tensor,
    damping: float,
    name: str = "layer",
    intercept: bool | None = None,
) -> torch.Tensor | None:
    """Overwrite ``layer``'s kept weights (and bias, if it has one) with the masked ridge solution; pruned weights
    are set to exactly 0. ``intercept`` (default: whether the layer has a bias) fits a per-output constant too: it
    goes into the bias, or, for a layer without one, is returned (float64, per output) for the caller to fold."""
    fit_intercept = layer.bias is not None if intercept is None else intercept
    groups, k = stats.gram.shape[:2]
    out_per_group = stats.cross.shape[2]
    kept = mask.reshape(groups, out_per_group, k).to(stats.gram.device, torch.bool)
    widest = int(kept.sum(2).max())
    if widest + fit_intercept > stats.rows:
        warnings.warn(
            f"reconstruction of {name}: {stats.rows} calibration rows for up to {widest} unknowns per output; "
            "the damping keeps the solve well posed, but more calibration images would fit it better",
            stacklevel=2,
        )
    weight = torch.zeros(groups, out_per_group, k, dtype=torch.float64, device=stats.gram.device)
    bias = torch.zeros(groups, out_per_group, dtype=torch.float64, device=stats.gram.device)
    for g in range(groups):
        gram, cross = stats.gram[g], stats.cross[g]
        if fit_intercept:  # append the constant input 1: [[H, s], [s^T, n]] and [X^T Y; sum Y]
            gram = torch.cat([torch.cat([gram, stats.patch_sum[g, :, None]], 1),
                              torch.cat([stats.patch_sum[g], gram.new_tensor([stats.rows])])[None]], 0)  # fmt: skip
            cross = torch.cat([cross, stats.target_sum[g][None]], 0)
        scale = float(stats.gram[g].diagonal().mean().clamp_min(1e-12))
        penalty = torch.full((len(gram),), max(damping, 1e-9) * scale, dtype=gram.dtype, device=gram.device)
        if fit_intercept:
            penalty[k] = 1e-9 * scale  # the intercept is (almost) not shrunk
        rows_kept = kept[g]
        if fit_intercept:
            rows_kept = torch.cat([rows_kept, rows_kept.new_ones(out_per_group, 1)], 1)
        solution = _solve_masked(gram, cross, rows_kept, penalty)
        weight[g] = solution[:, :k]
        if fit_intercept:
            bias[g] = solution[:, k]
    layer.weight.copy_(weight.reshape(layer.weight.shape).to(layer.weight.dtype))
    if not fit_intercept:
        return None
    if layer.bias is None:
        return bias.flatten()
    layer.bias.copy_(bias.flatten().to(layer.bias.dtype))
    return None


def _solve_masked(gram: torch.Tensor, cross: torch.Tensor, kept: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """Per row r, solve (gram + diag(penalty))[S, S] w = cross[S, r] over S = kept[r]; 0 outside S. (rows, K)."""
    rows, k = kept.shape
    counts = kept.sum(1)
    order = torch.argsort(counts, stable=True)
    widths = counts[order].tolist()  # one read of the counts, not one per row (each a device sync on a GPU)
    solution = torch.zeros(rows, k, dtype=gram.dtype, device=gram.device)
    start = 0
    while start < rows:
        stop = start + 1  # grow the chunk while its padded systems fit the budget (rows sorted by width)
        while stop < rows and (stop + 1 - start) * widths[stop] ** 2 <= _CHUNK_ELEMENTS:
            stop += 1
        chunk = order[start:stop]
        width = widths[stop - 1]
        if width > 0:
            # kept indices first, padding after: argsort of ~kept puts kept positions (in order) in front
            idx = torch.argsort((~kept[chunk]).to(torch.int8), dim=1, stable=True)[:, :width]
            valid = torch.arange(width, device=gram.device)[None] < counts[chunk, None]
            # gram[idx[:, :, None], idx[:, None, :]], as one flat gather: faster than indexing by two index tensors
            a = gram.flatten().take(idx[:, :, None] * k + idx[:, None, :])
            # in place: the padded systems are the solve's largest tensor (up to 256 MB)
            a.diagonal(dim1=1, dim2=2).add_(penalty[idx])
            a.masked_fill_(~(valid[:, :, None] & valid[:, None, :]), 0)
            a.diagonal(dim1=1, dim2=2).masked_fill_(~valid, 1)  # padding: identity, zero right side
            rhs = torch.where(valid, cross.T[chunk[:, None], idx], torch.zeros((), dtype=gram.dtype))
            w = torch.linalg.solve(a, rhs)
            solution[chunk[:, None], idx] = torch.where(valid, w, torch.zeros((), dtype=gram.dtype))
        start = stop
    return solution
