"""Per-channel sufficient statistics: streaming sums that reduce exactly across processes.

Moments are (count, sums, Gram sums) over every dimension but the channel dimension 1,
reduced per chunk in float32 around the chunk's channel means and accumulated as raw sums in float64, and summed
(never averaged) across DDP ranks, so a statistic is the same on 1 or N processes however the calibration set is split.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


def world_size() -> int:
    """The number of processes of torch.distributed's default group; 1 when it is not initialised."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in torch.distributed's default group; 0 when it is not initialised."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def count_over_processes(count: int, device: torch.device | str) -> int:
    """An integer summed over all processes (on ``device``: NCCL reduces only tensors on the GPU)."""
    if world_size() == 1:
        return count
    return int(all_reduce_sum(torch.tensor(float(count), dtype=torch.float64, device=device)).item())


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over all processes when torch.distributed is initialised (as is otherwise)."""
    if world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


@dataclass
class Moments:
    """Joint per-channel moments of k variables observed on the same positions."""

    count: torch.Tensor  # scalar, float64
    sums: torch.Tensor  # (k, C)
    grams: torch.Tensor  # (k, k, C)

    @staticmethod
    def of(tensors: Sequence[torch.Tensor]) -> Moments:
        # Products in float32 around the chunk's channel means a, raw sums restored in float64. Raw float32 sums
        # of x*y would lose cov = E[xy] - E[x]E[y] to cancellation when |mean| >> std, enough to change a
        # repaired weight by > 1e-5 with the batch size or the number of processes.
        dtype = torch.promote_types(tensors[0].dtype, torch.float32)
        xs = [t.detach().to(dtype).reshape(t.shape[0], t.shape[1], -1) for t in tensors]
        shifts = [x.mean((0, 2), keepdim=True) for x in xs]
        xs = [x - s for x, s in zip(xs, shifts, strict=True)]
        k, c = len(xs), xs[0].shape[1]
        count = torch.tensor(float(xs[0].shape[0] * xs[0].shape[2]), dtype=torch.float64, device=xs[0].device)
        a = torch.cat([s.view(1, c) for s in shifts]).double()
        sums = torch.stack([x.sum((0, 2)) for x in xs]).double()  # of the shifted values
        grams = torch.empty(k, k, c, dtype=torch.float64, device=xs[0].device)
        for i in range(k):
            for j in range(i, k):
                grams[i, j] = grams[j, i] = (xs[i] * xs[j]).sum((0, 2))
        # sum (x + a)(y + b) = sum x y + b sum x + a sum y + n a b
        grams += sums[:, None] * a[None] + a[:, None] * sums[None] + count * a[:, None] * a[None]
        return Moments(count, sums + count * a, grams)

    def __add__(self, other: Moments) -> Moments:
        return Moments(self.count + other.count, self.sums + other.sums, self.grams + other.grams)

    def all_reduce(self) -> Moments:
        """Sum over all processes when torch.distributed is initialised (a no-op otherwise)."""
        flat = all_reduce_sum(torch.cat([self.count.view(1), self.sums.flatten(), self.grams.flatten()]))
        k, c = self.sums.shape
        self.count, self.sums, self.grams = flat[0], flat[1 : 1 + k * c].view(k, c), flat[1 + k * c :].view(k, k, c)
        return self

    @property
    def mean(self) -> torch.Tensor:
        return self.sums / self.count

    @property
    def cov(self) -> torch.Tensor:
        """Population covariance (k, k, C)."""
        m = self.mean
        return self.grams / self.count - m[:, None] * m[None, :]

    def check_finite(self, where: str) -> Moments:
        if not (torch.isfinite(self.sums).all() and torch.isfinite(self.grams).all()):
            raise FloatingPointError(f"non-finite activations at {where}: check the checkpoint and the input data")
        return self


def accumulate(chunks: Iterable[Sequence[torch.Tensor]]) -> Moments:
    """Moments over chunks, each a sequence of k same-shaped tensors; reduced across processes."""
    total = None
    for tensors in chunks:
        m = Moments.of(tensors)
        total = m if total is None else total + m
    if total is None:
        raise ValueError("no calibration data: the calibration loader yielded no batch")
    return total.all_reduce()


def channel_moments(chunks: Iterable[torch.Tensor]) -> Moments:
    """Per-channel moments of one variable (k = 1) over chunks; reduced across processes.

    Faster than ``accumulate`` for one variable, and no less accurate: each chunk is centred per channel on its own
    float32 mean m (one reduction, in the chunk's own memory order), then the sum and the square sum of x - m are
    formed, and the raw sums restored in float64, so the variance does not cancel in float32 when |mean| >> std.
    x - m is written into one buffer reused by the chunks of a shape: a new tensor per chunk costs more than its
    arithmetic (its pages touched for the first time). The float64 sums are formed once, over all chunks.
    """
    rows = []  # per chunk, per channel: m, the sum and the square sum of x - m, and n, its positions
    centred = None
    for t in chunks:
        x = t.detach().to(torch.promote_types(t.dtype, torch.float32))
        x = x[:, :, None] if x.dim() == 2 else x
        reduced = (0, *range(2, x.dim()))  # all but the channels, in place (no reshaped copy)
        m = x.mean(reduced, keepdim=True)
        layout = (x.shape, x.stride(), x.dtype, x.device)
        if centred is None or (centred.shape, centred.stride(), centred.dtype, centred.device) != layout:
            centred = torch.empty_like(x)
        d = torch.sub(x, m, out=centred)
        count = torch.full((1,), float(x.numel() // x.shape[1]), dtype=torch.float64, device=x.device)
        rows.append((m.flatten(), d.sum(reduced), d.square_().sum(reduced), count))
    if not rows:
        raise ValueError("no calibration data: the calibration loader yielded no batch")
    m, s, q, n = (torch.stack(parts).double() for parts in zip(*rows, strict=True))
    # sum x = n m + s, sum x^2 = q + 2 m s + n m^2 (m is the rounded mean: s != 0)
    sums, grams = (n * m + s).sum(0), (q + 2 * m * s + n * m.square()).sum(0)
    return Moments(n.sum(), sums[None], grams[None, None]).all_reduce()
