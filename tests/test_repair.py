"""Repair operators and the progressive engine, against plain references."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from lightning_repair.masks import mask_violations
from lightning_repair.repair import PRESETS, BNRecalibration, ClassifierRefit, VarianceMatching, parse_recipe, repair
from lightning_repair.stats import accumulate

from helpers import calibrated_dense, pruned_copy


def sequential_reference(pruned: nn.Module, dense: nn.Module, batches, recipe) -> None:
    """One full forward pass per site, with hooks: the slow, obviously progressive reference.

    Written for torchvision-style ResNets (BasicBlock): BN sites in execution order, and a
    block site after each block's bn2 + shortcut.
    """
    ops = parse_recipe(recipe)
    order = [("bn", n) for n, m in pruned.named_modules() if isinstance(m, nn.BatchNorm2d)]
    for name, m in pruned.named_modules():
        if hasattr(m, "conv2") and hasattr(m, "bn2"):  # the add runs after the block's last BN
            last = max(i for i, (_, n) in enumerate(order) if n.startswith(name + "."))
            order.insert(last + 1, ("block", name))
    order.append(("classifier", "fc"))

    def capture(model, kind, name):
        store, handles = [], []
        if kind == "bn":
            bn = model.get_submodule(name)
            handles.append(bn.register_forward_pre_hook(lambda mod, inp: store.append(inp[0].clone())))
        elif kind == "classifier":  # (input, output) of the classifier
            hook = lambda mod, inp, out: store.append((inp[0].clone(), out.clone()))  # noqa: E731
            handles.append(model.get_submodule(name).register_forward_hook(hook))
        else:
            block = model.get_submodule(name)
            entry = {}
            handles.append(block.register_forward_pre_hook(lambda mod, inp: entry.__setitem__("x", inp[0].clone())))
            handles.append(block.bn2.register_forward_hook(lambda mod, inp, out: entry.__setitem__("r", out.clone())))
            if block.downsample is not None:
                hook = lambda mod, inp, out: entry.__setitem__("x", out.clone())  # noqa: E731
                handles.append(block.downsample.register_forward_hook(hook))
            handles.append(block.register_forward_hook(lambda mod, inp, out: store.append(dict(entry))))
        with torch.no_grad():
            for b in batches:
                model(b)
        for h in handles:
            h.remove()
        return store

    with torch.no_grad():
        for kind, name in order:
            p, d = capture(pruned, kind, name), capture(dense, kind, name)
            if kind == "classifier":
                for op in ops:
                    op.at_classifier(pruned.fc, [x for x, _ in p], [z for _, z in d])
            elif kind == "bn":
                m = accumulate(list(zip(p, d, strict=True)))
                for op in ops:
                    op.at_bn(pruned.get_submodule(name), dense.get_submodule(name), m)
            elif any(getattr(op, "site", None) == "block" for op in ops):
                m = accumulate([(ep["r"], ep["x"], ed["r"] + ed["x"]) for ep, ed in zip(p, d, strict=True)])
                for op in ops:
                    op.at_block(pruned.get_submodule(name).bn2, m)


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}


@pytest.mark.parametrize("preset", [p for p in PRESETS if p != "none"])
def test_progressive_engine_equals_sequential_reference(dense, batches, preset):
    fast, _ = pruned_copy(dense)
    slow = copy.deepcopy(fast)
    repair(fast, dense, batches, preset)
    sequential_reference(slow, dense, batches, preset)
    a, b = _params(fast), _params(slow)
    changed = 0
    for k in a:
        scale = b[k].abs().max().clamp_min(1e-6)
        assert (a[k] - b[k]).abs().max() / scale < 1e-4, k
        changed += not torch.equal(a[k], _params(pruned_copy(dense)[0])[k])
    assert changed > 0  # the preset did something


def test_bn_recalibration_matches_update_bn(dense, batches):
    data = torch.cat(batches)  # one batch: update_bn's cumulative average is then exact
    ours, _ = pruned_copy(dense)
    ref = copy.deepcopy(ours)
    repair(ours, dense, [data], "bn_recalibration")
    update_bn([data], ref)
    for (name, m), m_ref in zip(ours.named_modules(), ref.modules(), strict=True):
        if isinstance(m, nn.BatchNorm2d):
            # the first BN sees identical inputs; later ones differ only by update_bn normalising
            # upstream layers with the biased batch variance instead of the unbiased running one
            tol = 1e-5 if name == "bn1" else 2e-3
            assert torch.allclose(m.running_mean, m_ref.running_mean, rtol=tol, atol=tol), name
            assert torch.allclose(m.running_var, m_ref.running_var, rtol=tol, atol=tol), name


def _bn_output_variances(model: nn.Module, batches) -> dict[str, torch.Tensor]:
    """Per-channel variance of every BN output (cloned in the hook: an in-place ReLU overwrites it next)."""
    outputs: dict[str, list[torch.Tensor]] = {}

    def record(name: str):
        return lambda _module, _inputs, y: outputs.setdefault(name, []).append(y.transpose(0, 1).clone())

    bns = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    hooks = [m.register_forward_hook(record(name)) for name, m in bns]
    with torch.no_grad():
        model.eval()
        for b in batches:
            model(b)
    for h in hooks:
        h.remove()
    return {name: torch.cat(ys, 1).flatten(1).double().var(1) for name, ys in outputs.items()}


@pytest.mark.parametrize("preset", ["bn_recalibration", "default"])
def test_reported_variance_ratios_are_the_bn_output_ratios(dense, batches, preset):
    """After: the repaired model's BN output variances over the dense model's, per channel (these presets change
    no BN after its own site, so a forward pass of the result measures them). Before: the same ratio ahead of
    the site's own operators, i.e. with the upstream sites repaired; at the first BN, the plain pruned model."""
    pruned, _ = pruned_copy(dense, 0.9)
    first = _bn_output_variances(pruned, batches)["bn1"]
    report = repair(pruned, dense, batches, preset)
    reference, after = _bn_output_variances(dense, batches), _bn_output_variances(pruned, batches)
    assert list(report.variance_ratio) == list(report.variance_ratio_after) == list(reference)
    pairs = [(report.variance_ratio["bn1"], first, "bn1")]
    pairs += [(report.variance_ratio_after[name], after[name], name) for name in reference]
    for reported, measured, name in pairs:
        live = reference[name] > 1e-6
        expected = (measured / reference[name])[live].float()
        assert torch.allclose(reported[live], expected, rtol=1e-4, atol=1e-6), name


def test_batching_does_not_change_the_result(dense, batches):
    one, _ = pruned_copy(dense)
    many = copy.deepcopy(one)
    repair(one, dense, [torch.cat(batches)], "default")
    repair(many, dense, batches, "default")
    a, b = _params(one), _params(many)
    for k in a:  # float32 sums in another order, compounded over ~30 progressive sites
        assert (a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-6) < 1e-3, k


@pytest.mark.parametrize("preset", list(PRESETS))
def test_masks_stay_exact_and_no_hooks_remain(dense, batches, preset):
    pruned, masks = pruned_copy(dense, 0.95)
    repair(pruned, dense, batches, preset)
    assert mask_violations(pruned, masks) == {}
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in pruned.modules())
    assert type(pruned) is type(dense) and pruned.state_dict().keys() == dense.state_dict().keys()


def test_each_layer_runs_once_per_batch_whatever_the_depth(batches):
    """The cost claim: repair = one dense + one pruned pass, not one pass per layer."""
    for arch in ("resnet18", "resnet50"):
        dense = calibrated_dense(arch)
        pruned, _ = pruned_copy(dense)
        calls = {}
        for tag, model in (("p", pruned), ("d", dense)):
            for name, m in model.named_modules():
                if isinstance(m, nn.Conv2d):
                    m.register_forward_hook(lambda *a, key=(tag, name), c=calls: c.__setitem__(key, c.get(key, 0) + 1))
        repair(pruned, dense, batches, "default")
        assert set(calls.values()) == {len(batches)}, arch


def test_correction_survives_a_later_bn_recalibration(dense, batches):
    """BN is invariant to a per-channel input scale: a correction placed before a BN vanishes after a
    recalibration, one folded into BN's affine parameters does not."""
    x = torch.cat(batches)
    pruned, _ = pruned_copy(dense, 0.95)

    recal_only = copy.deepcopy(pruned)
    repair(recal_only, dense, batches, "bn_recalibration")

    wrong_site = copy.deepcopy(pruned)  # per-channel gains on a conv's output, i.e. BN's input
    with torch.no_grad():
        conv = wrong_site.layer2[0].conv1
        conv.weight.mul_(torch.linspace(0.5, 2.0, conv.out_channels)[:, None, None, None])
    repair(wrong_site, dense, batches, "bn_recalibration")

    right_site = copy.deepcopy(pruned)
    repair(right_site, dense, batches, "asr")
    repair(right_site, dense, batches, "bn_recalibration")

    with torch.no_grad():
        ref = recal_only(x)
        assert torch.allclose(wrong_site(x), ref, rtol=1e-3, atol=1e-4)
        assert (right_site(x) - ref).abs().max() > 1e-2


def test_dead_channels_get_finite_documented_gains(dense, batches):
    pruned, _ = pruned_copy(dense)
    with torch.no_grad():
        pruned.layer1[0].conv1.weight[:2] = 0  # two channels dead in the pruned model
        dense_dead = copy.deepcopy(dense)
        dense_dead.layer1[0].conv1.weight[2] = 0  # one channel dead in the dense model too
        pruned.layer1[0].conv1.weight[2] = 0
    for preset in PRESETS:
        model = copy.deepcopy(pruned)
        repair(model, dense_dead, batches, preset)
        assert all(torch.isfinite(v).all() for v in _params(model).values()), preset
    vm = VarianceMatching(granularity="channel", match_mean=False)
    bn = copy.deepcopy(pruned.layer1[0].bn1)
    gamma = bn.weight.clone()
    with torch.no_grad():
        feats_p = [pruned.layer1[0].conv1(pruned.relu(pruned.bn1(pruned.conv1(b)))) for b in batches]
        feats_d = [dense_dead.layer1[0].conv1(dense_dead.relu(dense_dead.bn1(dense_dead.conv1(b)))) for b in batches]
        vm.at_bn(bn, dense_dead.layer1[0].bn1, accumulate(list(zip(feats_p, feats_d, strict=True))))
    assert torch.equal(bn.weight[:3], gamma[:3])  # zero pruned variance: gain exactly 1


def test_non_finite_activations_raise(dense, batches):
    pruned, _ = pruned_copy(dense)
    bad = [b.clone() for b in batches]
    bad[1][0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        repair(pruned, dense, bad, "bn_recalibration")


def test_bad_recipes_are_rejected():
    with pytest.raises(ValueError, match="unknown preset"):
        parse_recipe("magic")
    with pytest.raises(ValueError, match="unknown operator"):
        parse_recipe([{"op": "nope"}])
    with pytest.raises(ValueError, match="unexpected keyword"):
        parse_recipe([{"op": "variance_matching", "gain": 2}])
    with pytest.raises(ValueError, match="clip"):
        VarianceMatching(clip=(2.0, 3.0))
    with pytest.raises(ValueError, match="granularity"):
        VarianceMatching(granularity="pixel")
    with pytest.raises(ValueError, match="operator dict"):
        parse_recipe(["bn_recalibration"])
    with pytest.raises(ValueError, match="preset name or a list"):
        parse_recipe(5)
    assert isinstance(parse_recipe("default")[0], BNRecalibration)


def test_empty_calibration_set_is_an_error(dense):
    pruned, _ = pruned_copy(dense)
    with pytest.raises(ValueError, match="no batch"):
        repair(pruned, dense, [], "asr")


def _classifier_io(model: nn.Module, batches) -> tuple[torch.Tensor, torch.Tensor]:
    store = []
    handle = model.fc.register_forward_hook(lambda mod, inp, out: store.append((inp[0], out)))
    with torch.no_grad():
        for b in batches:
            model(b)
    handle.remove()
    return torch.cat([x for x, _ in store]), torch.cat([z for _, z in store])


def test_classifier_refit_equals_masked_least_squares(dense, batches):
    """Reference: per output row, numpy-style least squares on the kept features plus an intercept."""
    pruned, masks = pruned_copy(dense, 0.9)
    features, _ = _classifier_io(pruned, batches)  # the op runs alone: the features do not change
    _, logits = _classifier_io(dense, batches)
    repair(pruned, dense, batches, [{"op": "classifier_refit", "ridge": 0.0}])
    kept = masks["fc"]
    for j in range(logits.shape[1]):
        design = torch.cat([features[:, kept[j]], torch.ones(len(features), 1)], 1).double()
        solution = torch.linalg.lstsq(design, logits[:, j : j + 1].double()).solution.flatten()
        assert torch.allclose(pruned.fc.weight[j, kept[j]].double(), solution[:-1], rtol=1e-4, atol=1e-5), j
        assert torch.allclose(pruned.fc.bias[j].double(), solution[-1], rtol=1e-4, atol=1e-5), j
    assert mask_violations(pruned, masks) == {}


def test_classifier_refit_brings_logits_closer_to_dense(dense, batches):
    pruned, masks = pruned_copy(dense, 0.95)
    repair(pruned, dense, batches, "bn_recalibration")
    before = copy.deepcopy(pruned)
    repair(pruned, dense, batches, [{"op": "classifier_refit"}])
    _, target = _classifier_io(dense, batches)
    error = {
        tag: (_classifier_io(m, batches)[1] - target).square().mean()
        for tag, m in (("before", before), ("after", pruned))
    }
    assert error["after"] < 0.9 * error["before"], error
    assert mask_violations(pruned, masks) == {}


@pytest.mark.parametrize("ridge", [-1.0, float("nan"), float("inf"), "big", True])
def test_classifier_refit_rejects_bad_ridge(ridge):
    with pytest.raises(ValueError, match="ridge"):
        ClassifierRefit(ridge=ridge)
