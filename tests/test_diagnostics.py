"""RR profiles against brute force (prune one layer, run the whole model, fit the correction), and the
RR-guided allocations against exhaustive search."""

from __future__ import annotations

import copy
import itertools
import json
import math
import warnings

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from lightning_repair.allocation import (
    ALLOCATIONS,
    PROFILE_METHODS,
    Allocation,
    Override,
    allocate,
    lagrangian_densities,
)
from lightning_repair.diagnostics import (
    DEFAULT_GRID,
    MIN_CALIBRATION_SAMPLES,
    RRProfile,
    magnitude_ranks,
    rr_profile,
)
from lightning_repair.layers import prunable_layers
from lightning_repair.masks import magnitude_mask
from lightning_repair.operators import Reconstruct
from lightning_repair.reconstruction import layer_statistics, reconstruct_layer

from helpers import calibrated_dense

GRID = (0.5, 0.9, 0.99)


@pytest.fixture(autouse=True)
def quiet_small_calibration(recwarn):
    """The tests' calibration sets are far below MIN_CALIBRATION_SAMPLES on purpose."""


class Odd(nn.Module):
    """Layer kinds a ResNet lacks: conv bias, reflect padding, a grouped conv, a Linear on (N, T, C) input."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect")
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
        self.mix = nn.Linear(8, 6)
        self.head = nn.Linear(6 * 16, 4)

    def forward(self, x):
        x = nn.functional.avg_pool2d(torch.relu(self.grouped(torch.relu(self.stem(x)))), 4)  # (N, 8, 4, 4)
        tokens = self.mix(x.flatten(2).transpose(1, 2))  # (N, 16, 6): channels last
        return self.head(torch.relu(tokens).flatten(1))


def odd_model() -> nn.Module:
    torch.manual_seed(3)
    model = Odd().eval()
    with torch.no_grad():
        model.stem.bias.add_(0.5)  # a bias that matters: Y_p = P + b
    return model


def layer_outputs(model: nn.Module, name: str, batches) -> torch.Tensor:
    """The layer's output over all batches as (channels, positions), float64."""
    store = []
    handle = model.get_submodule(name).register_forward_hook(lambda m, i, o: store.append(o.double()))
    with torch.no_grad():
        for b in batches:
            model(b)
    handle.remove()
    y = torch.cat(store)
    y = y.movedim(-1, 1) if isinstance(model.get_submodule(name), nn.Linear) else y
    return y.transpose(0, 1).reshape(y.shape[1], -1)


def brute_force(model: nn.Module, batches, grid, repair: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune one layer in a copy, run the whole model, repair each channel of its output explicitly: ``vm`` scales
    the centred pruned channel by std_d / std_p and adds the dense mean, ``ls`` fits a_c * Y_p + b_c with lstsq."""
    layers, pruned = prunable_layers(model), copy.deepcopy(model)
    d_raw, d_res = torch.empty(len(layers), len(grid)), torch.empty(len(layers), len(grid))
    for i, layer in enumerate(layers):
        y_d = layer_outputs(model, layer.name, batches)
        energy = y_d.square().sum()
        for j, s in enumerate(grid):
            mask = magnitude_mask(layer.module.weight, layer.numel - round(s * layer.numel))
            with torch.no_grad():  # the only pruned layer of the copy
                pruned.get_submodule(layer.name).weight.copy_(layer.module.weight * mask)
            y_p = layer_outputs(pruned, layer.name, batches)
            if repair == "ls":
                design = torch.stack([y_p, torch.ones_like(y_p)], -1)  # (C, positions, 2)
                fit = torch.linalg.lstsq(design, y_d.unsqueeze(-1), driver="gelsd").solution
                repaired = (design @ fit).squeeze(-1)
            else:
                std_p, std_d = y_p.std(1, unbiased=False, keepdim=True), y_d.std(1, unbiased=False, keepdim=True)
                gain = torch.where(std_p > 1e-6 * y_p.abs().mean(1, keepdim=True), std_d / std_p, 1.0)
                repaired = gain * (y_p - y_p.mean(1, keepdim=True)) + y_d.mean(1, keepdim=True)
            d_raw[i, j] = (y_p - y_d).square().sum() / energy
            d_res[i, j] = (repaired - y_d).square().sum() / energy
        with torch.no_grad():
            pruned.get_submodule(layer.name).weight.copy_(layer.module.weight)
    return d_raw, d_res


@pytest.mark.parametrize("repair", ["vm", "ls"])
@pytest.mark.parametrize("kind", ["resnet", "odd"])
def test_profile_equals_brute_force(kind, repair, batches):
    model = calibrated_dense() if kind == "resnet" else odd_model()
    profile = rr_profile(model, batches, GRID, repair=repair)
    d_raw, d_res = brute_force(model, batches, GRID, repair)
    assert profile.layers == [layer.name for layer in prunable_layers(model)]
    assert profile.grid == list(GRID) and profile.samples == 32 and profile.repair == repair
    torch.testing.assert_close(profile.d_raw, d_raw.double(), rtol=1e-4, atol=0)
    torch.testing.assert_close(profile.d_res, d_res.double(), rtol=1e-4, atol=1e-12)
    torch.testing.assert_close(profile.rr, d_res.double() / d_raw.double(), rtol=2e-4, atol=1e-12)
    if (
        repair == "ls"
    ):  # a = 1, b = 0 is one of the fits; every weight gone leaves the channel means, which any fit beats
        assert ((profile.rr > 0) & (profile.rr <= 1 + 1e-9)).all()
        assert (profile.d_res_empty >= profile.d_res.max(1).values - 1e-9).all()


def _layer_io(model: nn.Module, module: nn.Module, batches) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The module's inputs and outputs over the batches."""
    inputs, outputs = [], []

    def record(_module, inp, out):
        inputs.append(inp[0])
        outputs.append(out)

    handle = module.register_forward_hook(record)
    with torch.no_grad():
        for b in batches:
            model(b)
    handle.remove()
    return inputs, outputs


@pytest.mark.parametrize("kind", ["resnet", "odd"])
def test_reconstruct_repair_equals_explicit_reconstruction(kind, batches):
    """rr_repair reconstruct: D_res is what re-solving the layer's kept weights (reconstruction.py, on the dense
    input, to the dense output) leaves, computed here by running the re-solved layer on the captured inputs."""
    model = calibrated_dense() if kind == "resnet" else odd_model()
    profile = rr_profile(model, batches, GRID, repair="reconstruct")
    for i, layer in enumerate(prunable_layers(model)):
        inputs, outputs = _layer_io(model, layer.module, batches)
        stats = layer_statistics(layer.module, inputs, outputs)
        energy = sum(y.double().square().sum() for y in outputs)
        for j, s in enumerate(GRID):
            solved = copy.deepcopy(layer.module)
            mask = magnitude_mask(layer.module.weight, layer.numel - round(s * layer.numel))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                reconstruct_layer(solved, stats, mask, Reconstruct.damping)  # the operator's default
            with torch.no_grad():
                errors = [
                    (solved(x).double() - y.double()).square().sum() for x, y in zip(inputs, outputs, strict=True)
                ]
            expected = (sum(errors) / energy).item()
            assert profile.d_res[i, j].item() == pytest.approx(expected, rel=1e-3, abs=1e-7), (layer.name, s)


def test_variance_matching_residual_is_the_least_squares_residual_times_two_over_one_plus_rho(dense, batches):
    """Per channel, 2 var_d (1 - rho) = var_d (1 - rho^2) * 2 / (1 + rho): vm never beats ls."""
    vm, ls = (rr_profile(dense, batches, GRID, repair=r) for r in ("vm", "ls"))
    assert (vm.d_res >= ls.d_res - 1e-12).all()
    assert (vm.d_res > 1.05 * ls.d_res).any()


def test_float32_statistics_hold_when_the_mean_dwarfs_the_spread(dense, batches):
    """Inputs offset by 20 standard deviations: the float32 profile still matches a float64 run of the model."""
    shifted = [b + 20 for b in batches]
    single = rr_profile(dense, shifted, GRID)
    double = rr_profile(copy.deepcopy(dense).double(), [b.double() for b in shifted], GRID)
    torch.testing.assert_close(single.d_raw, double.d_raw, rtol=1e-4, atol=0)
    torch.testing.assert_close(single.d_res, double.d_res, rtol=1e-4, atol=0)


def test_keep_counts_are_measured_in_the_same_pass(dense, batches):
    layers = prunable_layers(dense)
    keep = {layer.name: layer.numel - round(0.9 * layer.numel) for layer in layers}  # the 0.9 grid point
    keep["fc"] = 3
    profile = rr_profile(dense, batches, GRID, keep=keep)
    rows = profile.keep_rows()
    assert [r["name"] for r in rows] == profile.layers and [r["kept"] for r in rows] == list(keep.values())
    for i, row in enumerate(rows[:-1]):
        assert row["d_raw"] == pytest.approx(float(profile.d_raw[i, 1]), rel=1e-12)
        assert row["d_res"] == pytest.approx(float(profile.d_res[i, 1]), rel=1e-12)
        assert row["rr"] == pytest.approx(row["d_res"] / row["d_raw"], rel=1e-12)
    only = rr_profile(dense, batches, grid=(), keep=keep)  # the chosen point alone
    assert only.grid == [] and only.d_raw.shape == (len(layers), 0)
    for field in ("d_raw", "d_res", "rr"):
        assert [r[field] for r in only.keep_rows()] == pytest.approx([r[field] for r in rows], rel=1e-12)
    with pytest.raises(KeyError, match="missing prunable layers"):
        rr_profile(dense, batches, keep={"fc": 3})
    with pytest.raises(ValueError, match=r"keep count 641 of layer 'fc' is outside \[0, 640\]"):
        rr_profile(dense, batches, keep=keep | {"fc": 641})
    with pytest.raises(ValueError, match="without keep counts"):
        profile_without = rr_profile(dense, batches, (0.9,))
        profile_without.keep_rows()


def test_batch_split_does_not_change_the_profile(dense, batches):
    """Streaming sums: one batch of 32 or four of 8 give the same profile (what DDP shards rely on too)."""
    whole = rr_profile(dense, [torch.cat(batches)], GRID)
    split = rr_profile(dense, list(torch.cat(batches).split(8)), GRID)
    torch.testing.assert_close(split.d_raw, whole.d_raw, rtol=1e-6, atol=0)
    torch.testing.assert_close(split.d_res, whole.d_res, rtol=1e-6, atol=0)


def test_one_streaming_pass_costs_one_extra_layer_evaluation_per_sparsity(dense, batches):
    """Every conv and linear runs len(grid) + 1 times per batch, and the model itself once per batch."""

    class Count(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.calls = {"conv2d": 0, "linear": 0}

        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "")
            if name in self.calls:
                self.calls[name] += 1
            return func(*args, **(kwargs or {}))

    forwards = []
    handle = dense.register_forward_pre_hook(lambda m, i: forwards.append(1))
    with Count() as count:
        rr_profile(dense, batches, DEFAULT_GRID)
    handle.remove()
    layers = prunable_layers(dense)
    convs = sum(isinstance(layer.module, nn.Conv2d) for layer in layers)
    assert len(forwards) == len(batches)
    assert count.calls == {
        "conv2d": len(batches) * convs * (len(DEFAULT_GRID) + 1),
        "linear": len(batches) * (len(layers) - convs) * (len(DEFAULT_GRID) + 1),
    }


def test_hooks_are_removed_and_mode_restored(dense, batches):
    dense.train()
    rr_profile(dense, batches, GRID)
    assert dense.training
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in dense.modules())
    with pytest.raises(RuntimeError):  # a failing pass (wrong channel count) still removes its hooks
        rr_profile(dense, [torch.randn(2, 5, 16, 16)], GRID)
    assert dense.training
    assert all(not m._forward_hooks for m in dense.modules())


def test_ranks_give_magnitude_masks_with_ties():
    weight = torch.tensor([[0.5, -0.5, 0.1], [2.0, 0.0, -0.1], [0.5, 0.0, 1.0]])
    ranks = magnitude_ranks(weight)
    for k in range(weight.numel() + 1):
        assert torch.equal(ranks < k, magnitude_mask(weight, k)), k
    conv = torch.randn(4, 3, 3, 3).round(decimals=1)  # many ties
    ranks = magnitude_ranks(conv)
    assert all(torch.equal(ranks < k, magnitude_mask(conv, k)) for k in (0, 1, 27, 54, 107, 108))


def test_zero_energy_layer_and_no_damage_are_undefined_not_nan():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.Conv2d(4, 4, 1), nn.Flatten(), nn.Linear(4 * 14 * 14, 3))
    with torch.no_grad():
        model[0].weight.zero_()  # dense output 0: zero energy, RR undefined
        model[1].bias.fill_(1.0)  # its input is 0, so pruning changes nothing: D_raw = 0, RR undefined
    profile = rr_profile(model.eval(), [torch.randn(8, 3, 16, 16)], GRID)
    rows = profile.rows()
    assert rows[0]["d_raw"] == rows[0]["d_res"] == rows[0]["rr"] == [None] * len(GRID)
    assert rows[1]["d_raw"] == rows[1]["d_res"] == [0.0] * len(GRID) and rows[1]["rr"] == [None] * len(GRID)
    assert all(v is not None for v in rows[2]["rr"])
    json.dumps(rows, allow_nan=False)  # never NaN in JSON
    assert math.isnan(profile.rr_at("0", 108, 0.9)) and math.isnan(profile.rr_at("1", 16, 0.9))
    assert profile.damage_curve("0", 108)[1] == [0.0] * len(profile.damage_curve("0", 108)[1])


@pytest.mark.parametrize("repair", ["vm", "ls"])
def test_removing_only_zero_weights_is_no_damage(repair):
    """A Conv, a Linear with bias and one without, each with 60% of its weights already zero: at sparsity 0.5 the
    mask removes only zeros, so D_raw and D_res are exactly 0 and RR is undefined (None), not ~1 from rounding."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.Flatten(), nn.Linear(4 * 14 * 14, 8, bias=False),
                          nn.ReLU(), nn.Linear(8, 3))  # fmt: skip
    with torch.no_grad():
        for layer in (model[0], model[2], model[4]):
            w = layer.weight.view(-1)
            w[torch.randperm(w.numel())[: int(0.6 * w.numel())]] = 0
            w.mul_(100)  # large weights: rounding of the expanded moments would show
    profile = rr_profile(model.eval(), [torch.randn(8, 3, 16, 16) + 3], (0.5, 0.9), repair=repair)
    for row in profile.rows():
        assert row["d_raw"][0] == row["d_res"][0] == 0.0 and row["rr"][0] is None, row["name"]
        assert row["d_raw"][1] > 0 and row["rr"][1] is not None, row["name"]


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5, float("nan"), "0.5", True])
def test_grid_values_outside_the_open_interval(dense, batches, bad):
    with pytest.raises(ValueError, match=rf"sparsity {bad!r} is not a number in \(0, 1\)"):
        rr_profile(dense, batches, (0.5, bad))


def test_too_few_calibration_samples_warn_with_the_count(dense, batches):
    with pytest.warns(UserWarning, match=f"only 32 calibration images \\(fewer than {MIN_CALIBRATION_SAMPLES}\\)"):
        rr_profile(dense, batches, (0.9,))


def test_empty_calibration_and_nothing_to_measure(dense, batches):
    with pytest.raises(ValueError, match="no calibration data reached"):
        rr_profile(dense, [], GRID)
    with pytest.raises(ValueError, match="nothing to measure"):
        rr_profile(dense, batches, grid=())


# ---------------------------------------------------------------- RR-guided allocation


def synthetic_profile(model: nn.Module, d_res_rows, grid=(0.5, 0.9)) -> RRProfile:
    """A profile with given D_res rows (D_raw = 1 everywhere, so RR = D_res) and D_res = 1 with no weight left."""
    layers = prunable_layers(model)
    d_res = torch.tensor(d_res_rows, dtype=torch.float64)
    return RRProfile(list(grid), [x.name for x in layers], [x.numel for x in layers], torch.ones_like(d_res), d_res,
                     torch.ones(len(layers), dtype=torch.float64), samples=1024)  # fmt: skip


def curve_value(profile: RRProfile, name: str, numel: int, kept: int) -> float:
    return _interp(kept / numel, *profile.damage_curve(name, numel))


def _interp(x, xs, ys):
    for (x0, y0), (x1, y1) in itertools.pairwise(zip(xs, ys, strict=True)):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    raise AssertionError(x)


@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.93])
def test_rr_allocation_is_optimal_against_exhaustive_search(sparsity):
    model = nn.Sequential(nn.Linear(10, 2), nn.Linear(6, 5), nn.Linear(10, 4))  # 20, 30, 40 weights
    # convex, decreasing curves in density: the Lagrangian's optimum is the integer optimum up to rounding
    profile = synthetic_profile(model, [[0.05, 0.5], [0.2, 0.6], [0.01, 0.2]])
    layers = prunable_layers(model)
    budget = round((1 - sparsity) * 90)
    keep = allocate(model, sparsity, Allocation("rr"), profile=profile)
    assert sum(keep.values()) == budget

    def damage(counts):
        return sum(curve_value(profile, x.name, x.numel, k) for x, k in zip(layers, counts, strict=True))

    best = min(
        damage(c)
        for c in itertools.product(*(range(x.numel + 1) for x in layers))
        if sum(c) == budget
    )  # fmt: skip
    # the continuous optimum is a lower bound of the integer one; rounding costs at most one weight per layer
    curves = [profile.damage_curve(x.name, x.numel) for x in layers]
    numels = [x.numel for x in layers]
    densities = lagrangian_densities(curves, numels, numels, budget)
    assert sum(d * n for d, n in zip(densities, numels, strict=True)) == pytest.approx(budget)
    continuous = sum(_interp(d, *curve) for d, curve in zip(densities, curves, strict=True))
    assert continuous <= best + 1e-12
    steepest = sum(max((y0 - y1) / ((x1 - x0) * n) for (x0, y0), (x1, y1) in itertools.pairwise(zip(*c, strict=True)))
                   for c, n in zip(curves, numels, strict=True))  # fmt: skip
    assert damage(list(keep.values())) <= best + steepest


def test_lagrangian_uses_the_convex_hull_and_meets_the_budget():
    # layer 0 is non-convex (a plateau, then a cliff): its hull is one segment removing 1.0 per 100 weights.
    # Layer 1 is convex: 0.7 per 50 weights, then 0.3 per 50. Read segment by segment, layer 0's plateau
    # (0.05 per 50 weights) would come last and the layer would stay empty at a budget of 100.
    curves = [([0.0, 0.5, 1.0], [1.0, 0.95, 0.0]), ([0.0, 0.5, 1.0], [1.0, 0.3, 0.0])]
    assert lagrangian_densities(curves, [100, 100], [100, 100], 100) == pytest.approx([0.5, 0.5])
    assert lagrangian_densities(curves, [100, 100], [100, 100], 160) == pytest.approx([1.0, 0.6])
    assert lagrangian_densities(curves, [100, 100], [100, 100], 37) == pytest.approx([0.0, 0.37])
    # a cap cuts layer 1's curve at density 0.3 (damage 0.58) before its hull is taken
    assert lagrangian_densities(curves, [100, 100], [100, 30], 60) == pytest.approx([0.3, 0.3])


def test_rr_gives_weights_to_the_layers_the_repair_cannot_fix():
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 10), nn.Linear(10, 10))
    profile = synthetic_profile(model, [[0.1, 0.4], [0.3, 0.9], [0.01, 0.05]])
    # 90 weights: layer 2's first 10 (0.95 of damage gone), layer 0's first 10 (0.6), layer 1's hull up to
    # density 0.5 (0.7 per 50 weights), then layer 0's second segment (0.3 per 40) gets the last 20
    keep = allocate(model, 0.7, Allocation("rr"), profile=profile)
    assert keep == {"0": 30, "1": 50, "2": 10}


def test_erk_rr_reweights_erk_by_rr():
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 10), nn.Linear(10, 10))  # equal ERK scores
    nan = float("nan")
    profile = synthetic_profile(model, [[0.1, 0.2], [0.1, 0.8], [nan, nan]])
    keep = allocate(model, 0.9, Allocation("erk_rr"), profile=profile)  # RR at sparsity 0.9: 0.2, 0.8, undefined
    assert sum(keep.values()) == 30
    mean = math.sqrt(0.2 * 0.8)  # the undefined layer gets the geometric mean: its plain ERK share
    shares = [0.2 / mean, 0.8 / mean, 1.0]
    for name, share in zip("012", shares, strict=True):
        assert abs(keep[name] - 30 * share / sum(shares)) < 1
    squared = allocate(model, 0.9, Allocation("erk_rr", rr_power=2.0), profile=profile)
    assert squared["1"] > keep["1"] and squared["0"] < keep["0"]
    plain = allocate(model, 0.9, Allocation("erk_rr", rr_power=0.0), profile=profile)
    assert plain == allocate(model, 0.9, Allocation("erk"))


@pytest.fixture(scope="module")
def real_profile():
    torch.manual_seed(5)
    model = calibrated_dense()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 32 images
        return model, rr_profile(model, [torch.randn(32, 3, 16, 16)])


@pytest.mark.parametrize("method", sorted(PROFILE_METHODS))
def test_budget_caps_and_forced_layers_hold(real_profile, method):
    model, profile = real_profile
    layers = prunable_layers(model)
    total = sum(x.numel for x in layers)
    for sparsity in (0.5, 0.9, 0.95, 0.99, 0.995):  # 0.995 lies beyond the grid
        keep = allocate(model, sparsity, Allocation(method), profile=profile)
        assert sum(keep.values()) == round((1 - sparsity) * total)
        assert all(0 <= keep[x.name] <= x.numel for x in layers)
    rules = [Override(r"layer4\..*", sparsity=0.95), Override("role:classifier", max_density=0.05)]
    keep = allocate(model, 0.9, Allocation(method, keep_dense=["role:first"], overrides=rules), profile=profile)
    assert sum(keep.values()) == round(0.1 * total)
    for x in layers:
        if x.role == "first":
            assert keep[x.name] == x.numel
        elif x.name.startswith("layer4."):
            assert keep[x.name] == x.numel - round(0.95 * x.numel)
        elif x.role == "classifier":
            assert keep[x.name] <= math.floor(0.05 * x.numel)
    assert allocate(model, 0.0, Allocation(method), profile=profile) == {x.name: x.numel for x in layers}


@pytest.mark.parametrize("method", sorted(PROFILE_METHODS))
def test_budget_equal_to_the_sum_of_caps(method):
    model = nn.Sequential(nn.Linear(11, 2), nn.Linear(5, 5), nn.Linear(7, 4))  # 22, 25, 28 weights
    profile = synthetic_profile(model, [[0.1, 0.3], [0.2, 0.5], [0.05, 0.4]])
    caps = [Override("0", max_density=0.75), Override("1", max_density=0.5), Override("2", max_density=0.1)]
    keep = allocate(model, 0.6, Allocation(method, overrides=caps), profile=profile)
    assert keep == {"0": 16, "1": 12, "2": 2}


def test_profile_methods_refuse_to_run_without_a_matching_profile(real_profile):
    model, profile = real_profile
    assert PROFILE_METHODS == {"rr", "erk_rr"} and PROFILE_METHODS <= set(ALLOCATIONS)
    with pytest.raises(ValueError, match="'rr' needs an RR profile"):
        allocate(model, 0.9, Allocation("rr"))
    other = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(KeyError, match="no layer '0'"):
        allocate(other, 0.5, Allocation("rr"), profile=profile)
    wider = calibrated_dense(num_classes=12)
    with pytest.raises(ValueError, match="'fc' has 640 weights, this model's 768"):
        allocate(wider, 0.9, Allocation("erk_rr"), profile=profile)
    with pytest.raises(ValueError, match="rr_power must be finite"):
        Allocation("erk_rr", rr_power=float("inf"))
