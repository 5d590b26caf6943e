"""Layer-wise reconstruction against brute force: per output row, torch.linalg.lstsq on explicitly built patches."""

from __future__ import annotations

import copy
import random
import weakref

import pytest
import torch
from torch import nn

from lightning_repair import reconstruction
from lightning_repair.mask_selection import select_mask
from lightning_repair.masks import apply_masks, mask_violations
from lightning_repair.operators import PRESETS, Reconstruct
from lightning_repair.reconstruction import layer_statistics, reconstruct_layer
from lightning_repair.repair import repair

from helpers import pruned_copy


def explicit_patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """(N, out_h, out_w, in_channels, kh, kw) by looping over output positions: no unfold, no F.pad shortcuts."""
    mode = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}
    if conv.padding == "same":  # total d * (k - 1) per side pair, the extra one after (checked against the conv)
        (pt, pb), (pl, pr) = ((d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2)
                              for d, k in zip(conv.dilation, conv.kernel_size, strict=True))  # fmt: skip
    else:
        (pt, pl), (pb, pr) = conv.padding, conv.padding
    x = nn.functional.pad(x, (pl, pr, pt, pb), mode=mode[conv.padding_mode])
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    out_h = (x.shape[2] - dh * (kh - 1) - 1) // sh + 1
    out_w = (x.shape[3] - dw * (kw - 1) - 1) // sw + 1
    rows = torch.empty(x.shape[0], out_h, out_w, x.shape[1], kh, kw, dtype=x.dtype)
    for i in range(out_h):
        for j in range(out_w):
            rows[:, i, j] = x[:, :, i * sh : i * sh + dh * (kh - 1) + 1 : dh, j * sw : j * sw + dw * (kw - 1) + 1 : dw]
    return rows


def brute_force(
    conv: nn.Conv2d, mask: torch.Tensor, x: torch.Tensor, y: torch.Tensor, damping: float, intercept: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output row o: ridge least squares of y[:, o] on the kept patch entries of its group (plus a constant)."""
    patches = explicit_patches(conv, x)
    per_group_in, per_group_out = conv.in_channels // conv.groups, conv.out_channels // conv.groups
    weight, bias = torch.zeros_like(conv.weight), torch.zeros(conv.out_channels, dtype=x.dtype)
    for o in range(conv.out_channels):
        g = o // per_group_out
        design = patches[..., g * per_group_in : (g + 1) * per_group_in, :, :].reshape(-1, conv.weight[0].numel())
        full_gram = design.T @ design
        kept = mask[o].flatten()
        a = design[:, kept]
        target = y[:, o].reshape(-1)
        lam = damping * full_gram.diagonal().mean()
        if intercept:  # the intercept is not damped: centre, solve, recover it
            mean_a, mean_t = a.mean(0), target.mean()
            a_c, t_c = a - mean_a, target - mean_t
            w = torch.linalg.solve(a_c.T @ a_c + lam * torch.eye(a.shape[1], dtype=x.dtype), a_c.T @ t_c)
            bias[o] = mean_t - mean_a @ w
        else:
            w = torch.linalg.lstsq(torch.cat([a, lam.sqrt() * torch.eye(a.shape[1], dtype=x.dtype)]),
                                   torch.cat([target, torch.zeros(a.shape[1], dtype=x.dtype)])).solution  # fmt: skip
        weight[o].view(-1)[kept] = w
    return weight, bias


CONVS = {
    "stride_padding_bias": dict(in_channels=3, out_channels=4, kernel_size=3, stride=2, padding=1, bias=True),
    "groups": dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, groups=2, bias=False),
    "depthwise_dilation": dict(
        in_channels=4, out_channels=4, kernel_size=3, padding=2, dilation=2, groups=4, bias=True
    ),  # fmt: skip
    "reflect_rectangular": dict(
        in_channels=2, out_channels=3, kernel_size=(3, 1), padding=(1, 0), padding_mode="reflect", bias=False
    ),  # fmt: skip
}


@pytest.mark.parametrize("intercept", [None, True])
@pytest.mark.parametrize("kind", sorted(CONVS))
def test_conv_reconstruction_equals_per_row_least_squares(kind, intercept):
    """A bias is refitted; ``intercept=True`` fits one for a bias-free layer too and returns it."""
    torch.manual_seed(0)
    conv = nn.Conv2d(**CONVS[kind]).double()
    target_conv = copy.deepcopy(conv)  # the "dense" layer: its outputs are the targets
    mask = torch.rand_like(conv.weight) < 0.5
    mask.view(conv.out_channels, -1)[:, 0] = True  # every row keeps something
    x = torch.randn(6, conv.in_channels, 7, 8, dtype=torch.float64)
    x_pruned = x + 0.3 * torch.randn_like(x)  # the pruned network's input differs from the dense one
    y = target_conv(x).detach()
    chunks_x, chunks_y = list(x_pruned.split(4)), list(y.split(4))
    stats = layer_statistics(conv, chunks_x, chunks_y)
    returned = reconstruct_layer(conv, stats, mask, damping=0.01, intercept=intercept)
    fitted = conv.bias is not None or intercept
    ref_w, ref_b = brute_force(conv, mask, x_pruned, y, damping=0.01, intercept=fitted)
    torch.testing.assert_close(conv.weight.detach(), ref_w, rtol=1e-7, atol=1e-9)
    if conv.bias is not None:
        assert returned is None
        torch.testing.assert_close(conv.bias.detach(), ref_b, rtol=1e-7, atol=1e-9)
    elif fitted:
        torch.testing.assert_close(returned, ref_b, rtol=1e-7, atol=1e-9)
    else:
        assert returned is None
    assert (conv.weight[~mask] == 0).all()


def test_linear_reconstruction_with_bias_equals_least_squares():
    torch.manual_seed(1)
    linear = nn.Linear(5, 3).double()
    mask = torch.tensor([[1, 0, 1, 0, 1], [0, 1, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    x = torch.randn(40, 5, dtype=torch.float64)
    y = torch.randn(40, 3, dtype=torch.float64)
    reconstruct_layer(linear, layer_statistics(linear, [x[:25], x[25:]], [y[:25], y[25:]]), mask, damping=0.0)
    for o in range(3):  # damping 0 (floored at 1e-9): plain least squares with an intercept
        design = torch.cat([x[:, mask[o]], torch.ones(40, 1, dtype=torch.float64)], 1)
        solution = torch.linalg.lstsq(design, y[:, o]).solution
        torch.testing.assert_close(linear.weight[o, mask[o]].detach(), solution[:-1], rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(linear.bias[o].detach(), solution[-1], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("budget", [1 << 25, 40])  # one chunk for all rows; chunks of a few rows, one row alone
def test_masked_solve_equals_each_rows_own_solve(budget, monkeypatch):
    """Rows of different widths (none kept included), solved padded in chunks: each as its own small system."""
    monkeypatch.setattr(reconstruction, "_CHUNK_ELEMENTS", budget)
    torch.manual_seed(3)
    k = 7
    a = torch.randn(30, k, dtype=torch.float64)
    gram, cross = a.T @ a, torch.randn(k, 6, dtype=torch.float64)
    penalty = torch.full((k,), 0.1, dtype=torch.float64)
    kept = torch.rand(6, k) < torch.tensor([0.0, 0.3, 0.5, 0.7, 0.9, 1.0])[:, None]
    kept[5] = True  # widths 0 .. 7: with budget 40, several chunks and a row of width 7 (49 entries) alone
    solution = reconstruction._solve_masked(gram, cross, kept, penalty)
    for r in range(6):
        s = kept[r]
        expected = torch.zeros(k, dtype=torch.float64)
        if s.any():
            expected[s] = torch.linalg.solve(gram[s][:, s] + torch.diag(penalty[s]), cross[s, r])
        torch.testing.assert_close(solution[r], expected, rtol=1e-12, atol=1e-12)


def test_dead_inputs_and_rank_deficient_gram_stay_finite():
    """Two input channels always zero and two identical: H is singular; the damping makes the solve well posed."""
    torch.manual_seed(2)
    conv = nn.Conv2d(4, 3, 3, padding=1, bias=False).double()
    x = torch.randn(4, 4, 6, 6, dtype=torch.float64)
    x[:, 0] = 0
    x[:, 1] = x[:, 2]
    y = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    mask = torch.ones_like(conv.weight, dtype=torch.bool)
    reconstruct_layer(conv, layer_statistics(conv, [x], [y]), mask, damping=0.01)
    assert torch.isfinite(conv.weight).all()
    assert (conv.weight[:, 0] == 0).all()  # a dead input gets weight exactly 0 under ridge


def test_fewer_rows_than_unknowns_warns():
    linear = nn.Linear(20, 2, bias=True)
    x, y = torch.randn(8, 20), torch.randn(8, 2)
    with pytest.warns(UserWarning, match="8 calibration rows for up to 20 unknowns"):
        reconstruct_layer(linear, layer_statistics(linear, [x], [y]), torch.ones(2, 20, dtype=torch.bool), 0.01)
    assert torch.isfinite(linear.weight).all()


@pytest.mark.parametrize(
    "mask_rule, scope",
    [("magnitude", "layer"), ("wanda", "layer"), ("obs_oneshot", "layer"), ("wanda", "row"), ("obs_oneshot", "row")],
)
def test_reconstruct_preset_holds_masks_and_beats_bn_recalibration(dense, batches, mask_rule, scope):
    """Every layer re-solved: masks hold exactly (re-selected ones keep each layer's count, row-scoped ones spread
    it evenly over the rows), and the output is closer to the dense output than BN recalibration alone leaves it."""
    pruned, masks = pruned_copy(dense, 0.9)
    recal = copy.deepcopy(pruned)
    report = repair(pruned, dense, batches, [Reconstruct(mask=mask_rule, mask_scope=scope)], masks=masks)
    repair(recal, dense, batches, "bn_recalibration")
    final = report.masks or masks
    assert mask_violations(pruned, final) == {}
    assert {k: int(v.sum()) for k, v in final.items()} == {k: int(v.sum()) for k, v in masks.items()}
    assert (report.masks is None) == (mask_rule == "magnitude")
    if mask_rule != "magnitude":
        assert any(not torch.equal(final[k], masks[k]) for k in masks)
    if scope == "row":
        for name, mask in final.items():
            per_row = mask.reshape(len(mask), -1).sum(1)
            assert int(per_row.max() - per_row.min()) <= 1, name
    x = torch.cat(batches)
    with torch.no_grad():
        target = dense(x)
        errors = [(m(x) - target).square().mean() for m in (pruned, recal)]
    assert errors[0] < 0.5 * errors[1], errors
    assert len(report.layer_sites) == len(masks)


def test_reconstruct_dense_bn_keeps_dense_statistics_and_fits_each_pairs_mean(dense, batches):
    """BNs keep the dense variances; each bias-free conv's intercept, folded into its BN's mean, makes the pair's
    mean output over the calibration set the dense one (the intercept's normal equation), through the network."""
    pruned, masks = pruned_copy(dense, 0.9)
    repair(pruned, dense, batches, "reconstruct_dense_bn", masks=masks)
    pairs = {n: n.replace("conv", "bn").replace("downsample.0", "downsample.1") for n in masks if n != "fc"}
    means = {}
    for model in (pruned, dense):
        modules = dict(model.named_modules())
        outputs = {n: [] for n in pairs}
        hooks = [modules[n].register_forward_hook(lambda m, i, o, n=n, out=outputs: out[n].append(o)) for n in pairs]
        with torch.no_grad():
            for b in batches:
                model(b)
        for h in hooks:
            h.remove()
        means[model] = {n: torch.cat(o).double().mean((0, 2, 3)) for n, o in outputs.items()}
    bns_p, bns_d = dict(pruned.named_modules()), dict(dense.named_modules())
    for conv, bn in pairs.items():
        assert isinstance(bns_p[bn], nn.BatchNorm2d)
        assert torch.equal(bns_p[bn].running_var, bns_d[bn].running_var), bn
        intercept = (bns_d[bn].running_mean - bns_p[bn].running_mean).double()
        assert bool(intercept.abs().max() > 1e-4), conv
        torch.testing.assert_close(means[pruned][conv] + intercept, means[dense][conv], rtol=0, atol=1e-5)


def test_reconstruct_dense_bn_folds_intercepts_only_into_a_bn_that_alone_reads_a_bias_free_layer():
    """A biased conv refits its own bias; a bias-free conv whose output a BN shares with another reader gets none."""
    torch.manual_seed(5)

    class Shared(nn.Module):  # conv3's output feeds bn3 and the sum: no intercept can be folded into bn3
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
            self.conv2, self.bn2 = nn.Conv2d(6, 6, 3, padding=1, bias=True), nn.BatchNorm2d(6)
            self.conv3, self.bn3 = nn.Conv2d(6, 6, 1, bias=False), nn.BatchNorm2d(6)

        def forward(self, x):
            x = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
            y = self.conv3(x)
            return self.bn3(y) + y

    dense = Shared().train()
    with torch.no_grad():
        dense(torch.randn(64, 3, 8, 8))
    dense.eval()
    masks = {n: torch.rand_like(m.weight) < 0.5 for n, m in dense.named_modules() if isinstance(m, nn.Conv2d)}
    pruned = apply_masks(copy.deepcopy(dense), masks)
    repair(pruned, dense, [torch.randn(32, 3, 8, 8) for _ in range(2)], "reconstruct_dense_bn", masks=masks)
    for bn in ("bn1", "bn2", "bn3"):
        assert torch.equal(pruned.get_submodule(bn).running_var, dense.get_submodule(bn).running_var), bn
    assert not torch.equal(pruned.bn1.running_mean, dense.bn1.running_mean)  # conv1's intercept
    assert torch.equal(pruned.bn2.running_mean, dense.bn2.running_mean)  # conv2 refits its bias instead
    assert not torch.equal(pruned.conv2.bias, dense.conv2.bias)
    assert torch.equal(pruned.bn3.running_mean, dense.bn3.running_mean)  # shared output: nothing to fold into


def test_reconstruct_presets_are_one_walk():
    assert [op["op"] for op in PRESETS["reconstruct"]] == ["reconstruct"]
    assert PRESETS["reconstruct_dense_bn"] == [{"op": "reconstruct", "recalibrate_bn": False}]
    with pytest.raises(ValueError, match="reconstruct.damping"):
        Reconstruct(damping=-1)
    with pytest.raises(ValueError, match="reconstruct.mask"):
        Reconstruct(mask="random")
    with pytest.raises(ValueError, match="needs a mask rule, not magnitude"):
        Reconstruct(mask_scope="row")


def test_row_scoped_mask_keeps_each_rows_top_scores():
    """Per row, the kept weights are the row's highest Wanda scores; the remainder goes to the best next scores."""
    torch.manual_seed(4)
    weight = torch.randn(3, 5, dtype=torch.float64)
    x = torch.randn(40, 5, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5], dtype=torch.float64)
    stats = layer_statistics(nn.Linear(5, 3, bias=False).double(), [x], [x[:, :3]])
    count = 7  # 2 per row, one row gets a third
    chosen = select_mask("wanda", "row", weight, stats, torch.arange(15).view(3, 5) < count, 0.01)
    score = weight.abs() * x.square().sum(0).sqrt()
    ranked = score.argsort(1, descending=True)
    third = score.gather(1, ranked[:, 2:3]).squeeze(1).argmax()
    for row in range(3):
        kept = 3 if row == third else 2
        assert set(chosen[row].nonzero().flatten().tolist()) == set(ranked[row, :kept].tolist())


STATISTICS_CONVS = {  # (conv, input height and width): strides, dilations, groups, padding, edges
    "3x3_12x12": (dict(in_channels=3, out_channels=5, kernel_size=3, padding=1), (12, 12)),
    "3x3_7x8": (dict(in_channels=3, out_channels=5, kernel_size=3, padding=1), (7, 8)),
    "stride_rows": (dict(in_channels=3, out_channels=4, kernel_size=3, stride=(2, 1), padding=1), (9, 7)),
    "stride_columns_no_padding": (dict(in_channels=3, out_channels=4, kernel_size=3, stride=(1, 2)), (8, 9)),
    "image_smaller_than_kernel_reach": (dict(in_channels=2, out_channels=3, kernel_size=5, padding=2), (2, 3)),
    "same_dilated_rectangular": (
        dict(in_channels=3, out_channels=5, kernel_size=(5, 3), padding="same", dilation=(2, 1)),
        (9, 6),
    ),
    "same_even_kernel_asymmetric": (dict(in_channels=3, out_channels=2, kernel_size=(2, 4), padding="same"), (5, 6)),
    "grouped_reflect": (
        dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, groups=2, padding_mode="reflect"),
        (6, 6),
    ),
    "pointwise": (dict(in_channels=6, out_channels=4, kernel_size=1), (5, 5)),
    "pointwise_stride": (dict(in_channels=3, out_channels=4, kernel_size=1, stride=2), (7, 6)),
    # the shape whose weight gradient oneDNN cannot form from a channels-last input (``_conv_sums``)
    "pointwise_stride_few_channels": (dict(in_channels=4, out_channels=8, kernel_size=1, stride=2), (28, 28)),
    "stride_2_padded_odd": (dict(in_channels=3, out_channels=4, kernel_size=3, stride=2, padding=1), (9, 7)),
    "stride_3_dilation_2": (
        dict(in_channels=2, out_channels=3, kernel_size=3, stride=(3, 2), dilation=2, padding=(2, 1)),
        (11, 10),
    ),
    "depthwise_stride": (dict(in_channels=4, out_channels=4, kernel_size=3, stride=2, padding=1, groups=4), (8, 7)),
    "grouped_dilated": (dict(in_channels=4, out_channels=6, kernel_size=3, padding=2, dilation=2, groups=2), (7, 8)),
    # every output column reads a padding column only: every patch is 0
    "columns_reading_padding_only": (dict(in_channels=2, out_channels=3, kernel_size=1, stride=(1, 3), padding=(0, 1)),
                                     (4, 1)),  # fmt: skip
    "padding_beyond_the_image": (dict(in_channels=2, out_channels=3, kernel_size=3, padding=3), (2, 3)),
    "circular_dilated_columns": (
        dict(
            in_channels=3, out_channels=2, kernel_size=(2, 3), dilation=(1, 2), padding=(1, 2), padding_mode="circular"
        ),
        (5, 6),
    ),
}


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("one_image_per_slice", [False, True])
@pytest.mark.parametrize("kind", sorted(STATISTICS_CONVS))
def test_conv_statistics_equal_those_of_explicit_patches(kind, one_image_per_slice, layout, monkeypatch):
    """The kernel-offset Gram, cross term and sums equal X^T X, X^T Y and the sums of explicitly built patches,
    whether a chunk is multiplied whole (its cross term image by image) or image by image, and whatever the
    activations' memory format."""
    monkeypatch.setattr(reconstruction, "_CONV_SLICE_ELEMENTS" if one_image_per_slice else "_CROSS_BUDGET", 1)
    torch.manual_seed(3)
    config, size = STATISTICS_CONVS[kind]
    assert_statistics_equal_those_of_explicit_patches(nn.Conv2d(**config).double(), size, layout)


@pytest.mark.parametrize("seed", range(6))
def test_statistics_of_random_convs_equal_those_of_explicit_patches(seed):
    """Ten random convs per seed: kernels of 1-4 per side, strides 1-4, dilations 1-2, groups (depthwise among
    them), any padding mode and amount, images down to one pixel, either memory format."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    for _ in range(10):
        groups, per_group = rng.choice([1, 1, 2, 3]), rng.choice([1, 1, 2, 3])
        (kh, kw), (sh, sw), (dh, dw) = ((rng.randint(1, 4), rng.randint(1, 4)) for _ in range(3))
        dh, dw = min(dh, 2), min(dw, 2)  # dilations 1-2
        mode = rng.choice(["zeros", "zeros", "reflect", "replicate", "circular"])
        h, w = rng.randint(1, 9), rng.randint(1, 9)
        limit = (h - 1, w - 1) if mode == "reflect" else (h, w) if mode == "circular" else (dh * kh, dw * kw)
        ph, pw = rng.randint(0, limit[0]), rng.randint(0, limit[1])
        h, w = max(h, dh * (kh - 1) + 1 - 2 * ph), max(w, dw * (kw - 1) + 1 - 2 * pw)  # at least one output
        conv = nn.Conv2d(groups * per_group, groups * rng.randint(1, 2), (kh, kw), (sh, sw), (ph, pw), (dh, dw),
                         groups, padding_mode=mode).double()  # fmt: skip
        layout = rng.choice([torch.contiguous_format, torch.channels_last])
        assert_statistics_equal_those_of_explicit_patches(conv, (h, w), layout)


def assert_statistics_equal_those_of_explicit_patches(conv: nn.Conv2d, size: tuple[int, int], layout) -> None:
    """Three images of ``size``, in two chunks of ``layout``, against the explicit patches of every group."""
    x = torch.randn(3, conv.in_channels, *size, dtype=torch.float64)
    y = torch.randn_like(conv(x))
    chunks = [t.contiguous(memory_format=layout) for t in (x[:2], x[2:], y[:2], y[2:])]
    stats = layer_statistics(conv, chunks[:2], chunks[2:])
    patches = explicit_patches(conv, x)  # (N, out_h, out_w, C, kh, kw)
    g, per_group_in, per_group_out = conv.groups, conv.in_channels // conv.groups, conv.out_channels // conv.groups
    for group in range(g):
        design = patches[..., group * per_group_in : (group + 1) * per_group_in, :, :].flatten(3).flatten(0, 2)
        outputs = slice(group * per_group_out, (group + 1) * per_group_out)
        target = y[:, outputs].permute(0, 2, 3, 1).flatten(0, 2)
        convolved = conv(x)[:, outputs].permute(0, 2, 3, 1).flatten(0, 2)  # the reference patches are the conv's
        torch.testing.assert_close(design @ conv.weight[outputs].flatten(1).T + conv.bias[outputs], convolved)
        torch.testing.assert_close(stats.gram[group], design.T @ design, rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(stats.cross[group], design.T @ target, rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(stats.patch_sum[group], design.sum(0), rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(stats.target_sum[group], target.sum(0), rtol=1e-12, atol=1e-10)
    assert stats.rows == patches.shape[0] * patches.shape[1] * patches.shape[2]


def test_chunks_joined_into_slices_give_the_statistics_of_each_chunk_alone(monkeypatch):
    """Consecutive chunks are joined into one slice of a conv's products (images of one size only): the sums are
    those of the chunks taken one by one."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    inputs = [torch.randn(2, 3, *size, dtype=torch.float64) for size in ((6, 6), (6, 6), (7, 5), (7, 5), (6, 6))]
    outputs = [torch.randn_like(conv(x)) for x in inputs]
    joined = layer_statistics(conv, inputs, outputs)
    monkeypatch.setattr(reconstruction, "_CONV_SLICE_ELEMENTS", 1)  # one chunk per slice
    alone = layer_statistics(conv, inputs, outputs)
    for mine, theirs in zip(joined.sums, alone.sums, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-10)
    assert joined.rows == alone.rows == 2 * (3 * 36 + 2 * 35)


def test_statistics_release_each_chunk_before_the_next(monkeypatch):
    """Only the running total outlives a chunk: its sums (a Gram can be 170 MB) and activations are released before
    the next chunk's are formed, so the memory does not grow with the number of chunks."""
    conv = nn.Conv2d(3, 4, 3, padding=1)
    alive = weakref.WeakSet()  # every chunk's tensors and sums, as long as something holds them
    seen = []
    original = reconstruction.chunk_statistics

    def tracked(layer, x, y):
        seen.append(len(alive))  # what is still held when this chunk's statistics start
        part = original(layer, x, y)
        alive.update([x, y, *part.sums])
        return part

    monkeypatch.setattr(reconstruction, "chunk_statistics", tracked)
    monkeypatch.setattr(reconstruction, "_CONV_SLICE_ELEMENTS", 1)  # no two chunks joined into one slice
    inputs = (torch.randn(2, 3, 5, 5) for _ in range(5))  # generated chunks: nothing else holds them
    outputs = (torch.randn(2, 4, 5, 5) for _ in range(5))
    stats = layer_statistics(conv, inputs, outputs)
    assert stats.rows == 5 * 2 * 25
    assert seen == [0, 4, 4, 4, 4]  # the total's four sums (the first chunk's, added to in place), nothing else


def test_float32_gram_products_solve_within_tolerance_of_float64(dense, batches, monkeypatch):
    """The Gram products' dtype is chosen per device (float32 on a CPU and most GPUs, accumulated in float64;
    float64 where a GPU's float64 is fast). One layer's solve from float32 products is within 1e-5 (relative to its
    largest weight) of the float64 solve on the same inputs; a whole `reconstruct` repair, where each layer's input
    comes from the layers solved before it, within 1e-3. The choice is honoured: the two differ."""
    assert reconstruction.product_dtype(torch.device("cpu")) == torch.float32
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, padding=1)
    x = torch.relu(torch.randn(64, 16, 12, 12) + 0.5)  # non-negative, mean > 0: the Gram's hard case
    y = conv(x).detach() + 0.1 * torch.randn(64, 24, 12, 12)
    mask = torch.rand_like(conv.weight) < 0.3
    layers, models = {}, {}
    pruned, masks = pruned_copy(dense, 0.9)
    for dtype in (torch.float32, torch.float64):
        monkeypatch.setattr(reconstruction, "PRODUCT_DTYPE", dtype)
        layers[dtype] = copy.deepcopy(conv)
        reconstruct_layer(layers[dtype], layer_statistics(conv, x.split(16), y.split(16)), mask, 1e-3)
        models[dtype] = copy.deepcopy(pruned)
        repair(models[dtype], dense, batches, "reconstruct", masks=masks)

    def error(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).detach().abs().max() / b.detach().abs().max().clamp_min(1e-12))

    one = error(layers[torch.float32].weight, layers[torch.float64].weight)
    assert 0 < one < 1e-5
    walk = [error(models[torch.float32].state_dict()[k], v) for k, v in models[torch.float64].state_dict().items()
            if k.endswith("weight")]  # fmt: skip
    assert 0 < max(walk) < 1e-3


@pytest.mark.parametrize("size", [(28, 28), (4, 4), (4, 56)])
def test_cross_term_rounding_stays_bounded_whatever_the_image_size(size):
    """A conv's cross term is its float32 weight gradient, in calls of at most ``_CROSS_BUDGET`` images x sqrt(output
    positions per image), as its rounding grows: more images per call where images are smaller, within 2e-7 of
    float64 at 28x28 (9 images per call; 16 would be 2.7e-7), 4x4 (64; 256 would be 5.7e-7) and 4x56 (17; 64, as
    many as 4x4 images, would be 5.6e-7)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, padding=1, bias=False)
    x = torch.relu(torch.randn(256, 16, *size)).contiguous(memory_format=torch.channels_last)
    y = conv(x).detach() + 0.5  # a mean offset, as after a BN shift
    stats = layer_statistics(conv, [x], [y])
    reference = torch.nn.grad.conv2d_weight(x.double(), conv.weight.shape, y.double(), 1, 1).reshape(16, -1).T
    assert float((stats.cross[0] - reference).norm() / reference.norm()) < 2e-7
