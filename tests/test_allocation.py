"""Allocation methods against independent references (torch.nn.utils.prune, rigl's ERK loop, the LAMP paper)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torch.nn.utils import prune
from torchvision.models.resnet import Bottleneck

from lightning_repair.allocation import (
    ALLOCATIONS,
    PROFILE_METHODS,
    Allocation,
    Override,
    allocate,
    allocation_table,
    format_table,
)
from lightning_repair.layers import prunable_layers
from lightning_repair.masks import compute_masks
from lightning_repair.models import Network

METHODS = ["uniform", "global", "erk", "lamp"]


def tie_free(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every prunable weight a distinct magnitude (a random permutation of 1..N, random signs).

    Magnitudes span layers, so no two weights anywhere tie; integers up to 2^24 are exact in float32.
    """
    g = torch.Generator().manual_seed(seed)
    layers = prunable_layers(model)
    total = sum(layer.numel for layer in layers)
    values = (torch.randperm(total, generator=g) + 1).float() / total
    values *= torch.where(torch.rand(total, generator=g) < 0.5, -1.0, 1.0)
    start = 0
    with torch.no_grad():
        for layer in layers:
            w = layer.module.weight
            w.copy_(values[start : start + w.numel()].view_as(w))
            start += w.numel()
    return model


def resnet18(width: float = 0.125, seed: int = 0) -> nn.Module:
    return tie_free(Network(arch="resnet18", width=width).build(), seed)


# ---------------------------------------------------------------- global: torch.nn.utils.prune


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.97])
def test_global_equals_prune_global_unstructured(sparsity):
    model = resnet18()
    keep = allocate(model, sparsity, Allocation("global"))
    ours = compute_masks(model, keep)

    ref = copy.deepcopy(model)
    params = [(layer.module, "weight") for layer in prunable_layers(ref)]
    total = sum(m.weight.numel() for m, _ in params)
    assert sum(keep.values()) == round((1 - sparsity) * total)
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=total - sum(keep.values()))
    for layer in prunable_layers(ref):
        expected = layer.module.weight_mask.bool()
        assert keep[layer.name] == int(expected.sum()), layer.name
        assert torch.equal(ours[layer.name], expected), layer.name


def test_global_float_amount_matches_prune_on_even_total():
    model = resnet18(seed=3)
    ref = copy.deepcopy(model)
    params = [(layer.module, "weight") for layer in prunable_layers(ref)]
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=0.9)
    keep = allocate(model, 0.9, Allocation("global"))
    assert keep == {layer.name: int(layer.module.weight_mask.sum()) for layer in prunable_layers(ref)}


# ---------------------------------------------------------------- ERK: rigl's get_sparsities_erdos_renyi


class ThreeLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 2, 3)  # weight (2, 1, 3, 3): 18 weights, raw score (2+1+3+3)/18 = 1/2
        self.b = nn.Conv2d(2, 16, 3)  # weight (16, 2, 3, 3): 288 weights, raw score 24/288 = 1/12
        self.fc = nn.Linear(64, 10)  # weight (10, 64): 640 weights, raw score 74/640


def test_erk_hand_computed_with_a_dense_layer():
    # total 946, sparsity 0.5 -> budget round(473.0) = 473 kept
    # first solve: eps = 473 / (1/2*18 + 24 + 74) = 473/107 -> density of a = 473/214 = 2.21 > 1
    # a becomes dense (18 kept), re-solve on the rest: eps = (473 - 18) / (24 + 74) = 455/98
    #   b: 455/98 * 24 = 111.43 kept (density 0.387), fc: 455/98 * 74 = 343.57 kept (density 0.537)
    # largest remainder rounding: fc's 0.57 beats b's 0.43 for the one weight left -> 111 and 344
    keep = allocate(ThreeLayers(), 0.5, Allocation("erk"))
    assert keep == {"a": 18, "b": 111, "fc": 344}
    eps = 455 / 98
    assert abs(keep["b"] - eps * 24) < 1 and abs(keep["fc"] - eps * 74) < 1
    assert eps * (1 / 12) < 1 and eps * (74 / 640) < 1  # no second re-solve was due


def test_erk_power_zero_is_uniform():
    keep = allocate(ThreeLayers(), 0.5, Allocation("erk", power=0.0))
    assert keep == allocate(ThreeLayers(), 0.5, Allocation("uniform"))
    for name, n in (("a", 18), ("b", 288), ("fc", 640)):
        assert abs(keep[name] - 0.5 * n) <= 1


def rigl_erk_densities(shapes: dict[str, tuple[int, ...]], density: float) -> tuple[dict[str, float], set[str]]:
    """google-research/rigl sparse_utils.get_sparsities_erdos_renyi (erk_power_scale=1), as densities."""
    dense_layers: set[str] = set()
    while True:
        divisor, rhs, raw = 0.0, 0.0, {}
        for name, shape in shapes.items():
            n_param = math.prod(shape)
            if name in dense_layers:
                rhs -= n_param * (1 - density)
            else:
                rhs += n_param * density
                raw[name] = sum(shape) / math.prod(shape)
                divisor += raw[name] * n_param
        eps = rhs / divisor
        max_prob = max(raw.values())
        if max_prob * eps > 1:
            dense_layers |= {name for name, p in raw.items() if p == max_prob}
        else:
            break
    return {name: 1.0 if name in dense_layers else eps * raw[name] for name in shapes}, dense_layers


@pytest.mark.parametrize("arch", ["resnet18", "densenet121"])
def test_erk_equals_rigl_reference(arch):
    model = Network(arch=arch, width=0.25).build()
    layers = prunable_layers(model)
    shapes = {layer.name: layer.shape for layer in layers}
    total = sum(layer.numel for layer in layers)
    resolved = False
    for sparsity in (0.5, 0.9, 0.99):
        keep = allocate(model, sparsity, Allocation("erk"))
        budget = round((1 - sparsity) * total)
        assert sum(keep.values()) == budget
        densities, dense = rigl_erk_densities(shapes, budget / total)
        resolved |= bool(dense)
        for layer in layers:
            assert abs(keep[layer.name] - densities[layer.name] * layer.numel) < 1, (sparsity, layer.name)
            if layer.name in dense:
                assert keep[layer.name] == layer.numel
    assert resolved  # the re-solve path was exercised


def test_erk_scores_grouped_and_depthwise_weights_by_their_actual_shape():
    """MobileNetV2's depthwise convs hold (C, 1, 3, 3) weights and ResNeXt's grouped ones (C, C/groups, 3, 3): ERK's
    densities on those shapes equal rigl's, whose masks have the weights' shapes too."""
    torch.manual_seed(0)
    for model in (
        torchvision.models.MobileNetV2(width_mult=0.25),
        torchvision.models.ResNet(Bottleneck, [1, 1, 1, 1], groups=32, width_per_group=4),
    ):
        layers = prunable_layers(model)
        grouped = [layer for layer in layers if isinstance(layer.module, nn.Conv2d) and layer.module.groups > 1]
        assert grouped and all(layer.shape[1] == layer.module.in_channels // layer.module.groups for layer in grouped)
        total = sum(layer.numel for layer in layers)
        keep = allocate(model, 0.9, Allocation("erk"))
        densities, _ = rigl_erk_densities({layer.name: layer.shape for layer in layers}, round(0.1 * total) / total)
        for layer in layers:
            assert abs(keep[layer.name] - densities[layer.name] * layer.numel) < 1, layer.name


# ---------------------------------------------------------------- LAMP: Lee et al. 2021


def lamp_reference(model: nn.Module, budget: int) -> dict[str, int]:
    """Per layer: sort w^2 ascending, score_u = w_u^2 / sum_{v>=u} w_v^2; one global top-k over all scores."""
    names, scores = [], []
    for layer in prunable_layers(model):
        sq = np.sort(layer.module.weight.detach().double().numpy().ravel() ** 2)
        suffix = np.cumsum(sq[::-1])[::-1]
        scores.append(sq / suffix)
        names.append(np.full(len(sq), len(names)))
    pooled, owner = np.concatenate(scores), np.concatenate(names)
    top = np.argsort(-pooled, kind="stable")[:budget]
    counts = np.bincount(owner[top], minlength=len(scores))
    return {layer.name: int(c) for layer, c in zip(prunable_layers(model), counts, strict=True)}


@pytest.mark.parametrize("sparsity", [0.8, 0.95, 0.99])
def test_lamp_equals_reference(sparsity):
    model = resnet18(seed=1)
    keep = allocate(model, sparsity, Allocation("lamp"))
    total = sum(layer.numel for layer in prunable_layers(model))
    assert keep == lamp_reference(model, round((1 - sparsity) * total))
    assert min(keep.values()) >= 1


def test_lamp_never_empties_a_layer():
    model = resnet18(seed=2)
    layers = prunable_layers(model)
    total = sum(layer.numel for layer in layers)
    # a tiny layer with tiny weights would lose everything under global magnitude pruning
    with torch.no_grad():
        model.conv1.weight.mul_(1e-6)
    assert allocate(model, 0.99, Allocation("global"))["conv1"] == 0
    assert allocate(model, 0.99, Allocation("lamp"))["conv1"] >= 1
    # at a budget of exactly one weight per layer, each layer keeps its largest weight
    keep = allocate(model, 1 - len(layers) / total, Allocation("lamp"))
    assert set(keep.values()) == {1}


# ---------------------------------------------------------------- the global budget


@pytest.fixture(scope="module")
def zoo() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        arch: Network(arch=arch, width=0.25).build() for arch in ("resnet18", "resnet50", "vgg16_bn", "densenet121")
    }


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "vgg16_bn", "densenet121"])
@pytest.mark.parametrize("method", METHODS)
def test_budget_is_exact(zoo, arch, method):
    model = zoo[arch]
    layers = prunable_layers(model)
    total = sum(layer.numel for layer in layers)
    for sparsity in (0.9, 0.95, 0.99):
        keep = allocate(model, sparsity, Allocation(method))
        assert list(keep) == [layer.name for layer in layers]
        kept = sum(keep.values())
        assert abs(kept - round((1 - sparsity) * total)) <= len(layers)  # the design's tolerance
        assert kept == round((1 - sparsity) * total)  # what the solver actually achieves
        for layer in layers:
            assert 0 <= keep[layer.name] <= layer.numel
        if method == "uniform":
            assert all(abs(keep[layer.name] - (1 - sparsity) * layer.numel) < 1 for layer in layers)


def test_all_registered_methods_are_tested():
    # the RR-guided methods need a profile: tests/test_diagnostics.py covers them
    assert set(ALLOCATIONS) == set(METHODS) | PROFILE_METHODS


def test_sparsity_zero_keeps_everything():
    model = resnet18()
    for method in METHODS:
        keep = allocate(model, 0.0, Allocation(method))
        assert keep == {layer.name: layer.numel for layer in prunable_layers(model)}


# ---------------------------------------------------------------- overrides, caps, forced sparsity


def test_capped_erk_with_dense_first_conv():
    model = resnet18(width=0.25)
    layers = {layer.name: layer for layer in prunable_layers(model)}
    total = sum(layer.numel for layer in layers.values())
    plain = allocate(model, 0.9, Allocation("erk"))
    assert plain["fc"] / layers["fc"].numel > 0.1  # the cap below really binds
    alloc = Allocation("erk", keep_dense=["role:first"], overrides=[Override("role:classifier", max_density=0.1)])
    keep = allocate(model, 0.9, alloc)
    assert keep["conv1"] == layers["conv1"].numel
    assert keep["fc"] <= 0.1 * layers["fc"].numel
    assert keep["fc"] == math.floor(0.1 * layers["fc"].numel)  # ERK wants more, so it sits at the cap
    assert sum(keep.values()) == round(0.1 * total)
    # the weights the cap took away went to the other layers
    others = [n for n in layers if n not in ("conv1", "fc")]
    assert sum(keep[n] for n in others) > sum(plain[n] for n in others)


@pytest.mark.parametrize("method", METHODS)
def test_forced_sparsity_is_honoured(method):
    model = resnet18(width=0.25)
    layers = prunable_layers(model)
    total = sum(layer.numel for layer in layers)
    alloc = Allocation(
        method, overrides=[Override(r"layer4\..*", sparsity=0.95), Override("role:projection", sparsity=0.0)]
    )
    keep = allocate(model, 0.9, alloc)
    for layer in layers:
        if layer.name.startswith("layer4.") and layer.role != "projection":
            assert keep[layer.name] == layer.numel - round(0.95 * layer.numel), layer.name
        if layer.role == "projection":  # listed later: the later rule wins
            assert keep[layer.name] == layer.numel, layer.name
    assert sum(keep.values()) == round(0.1 * total)


@pytest.mark.parametrize("method", METHODS)
def test_caps_hold_for_every_method(method):
    model = resnet18(width=0.25)
    layers = prunable_layers(model)
    total = sum(layer.numel for layer in layers)
    keep = allocate(model, 0.8, Allocation(method, overrides=[Override(".*", max_density=0.3)]))
    for layer in layers:
        assert keep[layer.name] <= max(1, math.floor(0.3 * layer.numel)), layer.name
    assert sum(keep.values()) == round(0.2 * total)


@pytest.mark.parametrize("method", METHODS)
def test_budget_equal_to_the_sum_of_caps(method):
    """Every free layer must sit exactly at its cap (this once divided by zero in the ERK solver)."""
    model = nn.Sequential(nn.Linear(11, 2), nn.Linear(5, 5), nn.Linear(7, 4))  # 22, 25, 28 weights
    caps = [Override("0", max_density=0.75), Override("1", max_density=0.5), Override("2", max_density=0.1)]
    keep = allocate(model, 0.6, Allocation(method, overrides=caps))  # budget 30 = 16 + 12 + 2
    assert keep == {"0": 16, "1": 12, "2": 2}


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5, float("nan")])
def test_sparsity_out_of_range(sparsity):
    with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\)"):
        allocate(resnet18(), sparsity)


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown method 'magic'"):
        Allocation("magic")


def test_selector_matching_nothing():
    with pytest.raises(ValueError, match="matches no prunable layer") as err:
        allocate(resnet18(), 0.9, Allocation("erk", keep_dense=[r"layer9\..*"]))
    assert "layer9" in str(err.value) and "conv1" in str(err.value)  # names the selector and lists layers


def test_unknown_role():
    with pytest.raises(ValueError, match="unknown role 'stem'"):
        Allocation("erk", keep_dense=["role:stem"])
    with pytest.raises(ValueError, match="unknown role 'head'"):
        Override("role:head", max_density=0.1)


def test_bad_override_arguments():
    with pytest.raises(ValueError, match="exactly one"):
        Override("fc")
    with pytest.raises(ValueError, match="exactly one"):
        Override("fc", sparsity=0.5, max_density=0.5)
    with pytest.raises(ValueError, match="max_density"):
        Override("fc", max_density=0.0)
    with pytest.raises(ValueError, match="sparsity"):
        Override("fc", sparsity=1.5)
    with pytest.raises(ValueError, match="regular expression"):
        Override("layer[", sparsity=0.5)


def test_unreachable_target():
    model = resnet18(width=0.25)
    # everything but the classifier dense: 99% sparsity cannot be reached
    with pytest.raises(ValueError, match="unreachable"):
        allocate(model, 0.99, Allocation("erk", keep_dense=["(?!fc$).*"]))
    # a cap too tight for the budget
    with pytest.raises(ValueError, match="unreachable"):
        allocate(model, 0.5, Allocation("uniform", overrides=[Override(".*", max_density=0.1)]))


# ---------------------------------------------------------------- layers and reporting


def test_prunable_layer_roles_on_resnet18():
    layers = prunable_layers(Network(arch="resnet18", width=0.125).build())
    roles = {layer.name: layer.role for layer in layers}
    assert len(layers) == 21  # 1 stem + 16 block convs + 3 downsample convs + fc
    assert [n for n, r in roles.items() if r == "first"] == ["conv1"]
    assert [n for n, r in roles.items() if r == "classifier"] == ["fc"]
    assert [n for n, r in roles.items() if r == "projection"] == [
        "layer2.0.downsample.0",
        "layer3.0.downsample.0",
        "layer4.0.downsample.0",
    ]
    assert {r for n, r in roles.items() if n not in ("conv1", "fc") and "downsample" not in n} == {"conv"}
    assert all(isinstance(layer.module, (nn.Conv2d, nn.Linear)) for layer in layers)
    assert prunable_layers(Network(arch="resnet18", width=0.125, stem="imagenet").build())[0].role == "first"


def test_prunable_layer_roles_on_vgg_and_densenet():
    vgg = {
        layer.name: layer.role
        for layer in prunable_layers(Network(arch="vgg16_bn", stem="imagenet", width=0.125).build())
    }
    assert vgg["features.0"] == "first" and vgg["classifier.6"] == "classifier"
    assert vgg["classifier.0"] == vgg["classifier.3"] == "linear"
    dense = {layer.name: layer.role for layer in prunable_layers(Network(arch="densenet121", width=0.125).build())}
    assert dense["features.conv0"] == "first" and dense["classifier"] == "classifier"
    assert dense["features.transition1.conv"] == "conv"  # 1x1 but not on a shortcut
    assert "projection" not in dense.values()


def test_depthwise_role_and_no_prunable_layer():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=8), nn.Flatten(), nn.Linear(8, 2))
    assert [layer.role for layer in prunable_layers(model)] == ["first", "depthwise", "classifier"]
    with pytest.raises(ValueError, match="no Conv2d or Linear"):
        prunable_layers(nn.Sequential(nn.ReLU()))


def test_prunable_layer_roles_on_torchvision_families():
    mobilenet = {layer.name: layer.role for layer in prunable_layers(torchvision.models.MobileNetV2(width_mult=0.25))}
    assert mobilenet["features.0.0"] == "first" and mobilenet["classifier.1"] == "classifier"
    assert sum(role == "depthwise" for role in mobilenet.values()) == 17  # one per inverted-residual block
    assert "projection" not in mobilenet.values()  # its 1x1 "project" convs are not on a shortcut
    regnet = {layer.name: layer.role for layer in prunable_layers(torchvision.models.regnet_y_400mf())}
    assert regnet["trunk_output.block1.block1-0.proj.0"] == "projection"  # RegNet's shortcut conv
    assert regnet["trunk_output.block1.block1-0.f.b.0"] == "conv"  # grouped 3x3, not depthwise
    assert regnet["trunk_output.block1.block1-0.f.se.fc1"] == "conv"  # squeeze-excitation 1x1


def test_role_absent_from_the_model_is_not_an_error_but_a_regex_matching_nothing_is():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 2))
    keep = allocate(model, 0.5, Allocation("erk", overrides=[Override("role:projection", max_density=0.1)]))
    assert sum(keep.values()) == round(0.5 * (216 + 16))
    with pytest.raises(ValueError, match="matches no prunable layer"):
        allocate(model, 0.5, Allocation("erk", overrides=[Override("proj.*", max_density=0.1)]))


def test_weighted_layers_that_are_not_pruned_are_named():
    model = nn.Sequential(nn.Conv1d(3, 4, 3), nn.Conv2d(3, 4, 3), nn.ConvTranspose2d(4, 4, 3))
    with pytest.warns(UserWarning, match=r"0, 2 stay dense"):
        assert [layer.name for layer in prunable_layers(model)] == ["1"]


def test_format_table_lists_layers_and_global_sparsity():
    model = Network(arch="resnet18", width=0.125).build()
    keep = allocate(model, 0.9, Allocation("erk"))
    rows = allocation_table(model, keep)
    assert [r["name"] for r in rows] == list(keep)
    assert all(r["density"] == r["kept"] / r["numel"] for r in rows)
    text = format_table(rows)
    for layer in prunable_layers(model):
        assert layer.name in text
    total = sum(r["numel"] for r in rows)
    assert f"global: kept {sum(keep.values())} of {total} prunable weights, sparsity 0.9000" in text
