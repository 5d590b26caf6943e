"""Repair operators and the progressive engine, against plain references."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import update_bn
from torchvision.ops import StochasticDepth

import lightning_repair.repair as repair_module
from lightning_repair.masks import mask_violations
from lightning_repair.operators import PRESETS, BNRecalibration, ClassifierRefit, VarianceMatching, parse_recipe
from lightning_repair.records import state_digest
from lightning_repair.repair import repair
from lightning_repair.stats import accumulate

from helpers import calibrated_dense, pruned_copy


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}


def _stream_reference(pruned: nn.Module, dense: nn.Module, batches, vm: VarianceMatching) -> nn.Module:
    """The block correction applied with hooks instead of folded, one block at a time with full forward passes:
    the slow, obviously progressive reference. Each block's sum r + s becomes g * (r + s) + b, with (g, b) from
    hand-written moments of the (already corrected) pruned sum and the dense sum."""

    def sums(model) -> list[torch.Tensor]:
        return [torch.cat(parts) for parts in zip(*[_block_sums(model, b) for b in batches], strict=True)]

    blocks = [m for m in pruned.modules() if hasattr(m, "bn2") and hasattr(m, "conv2")]
    dense_sums = sums(dense)
    for i, block in enumerate(blocks):
        z_p, z_d = sums(pruned)[i].double(), dense_sums[i].double()
        flat_p, flat_d = z_p.transpose(0, 1).flatten(1), z_d.transpose(0, 1).flatten(1)
        mean_p, mean_d = flat_p.mean(1), flat_d.mean(1)
        var_p, var_d = flat_p.var(1, unbiased=False), flat_d.var(1, unbiased=False)
        cov = ((flat_p - mean_p[:, None]) * (flat_d - mean_d[:, None])).mean(1)
        g, b = vm.correction(var_p, var_d, cov, mean_p, mean_d)
        _correct_block_sum(block, g.float(), b.float())
    return pruned


def _block_sums(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Every BasicBlock's pre-activation sum r + s (after any correction hook), in forward order."""
    store, handles = [], []
    for m in model.modules():
        if hasattr(m, "bn2") and hasattr(m, "conv2"):
            handles += _shortcut_hooks(m, lambda r, s: store.append(r + s))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return store


def _shortcut_hooks(block: nn.Module, at_sum) -> list:
    """Hooks that call ``at_sum(r, s)`` with bn2's output r and the shortcut s once the block has run; its result,
    if any, replaces the block's output relu(r + s)."""
    entry = {}
    handles = [block.register_forward_pre_hook(lambda mod, inp: entry.__setitem__("s", inp[0].clone()))]
    if block.downsample is not None:
        handles.append(
            block.downsample.register_forward_hook(lambda mod, inp, out: entry.__setitem__("s", out.clone()))
        )
    handles.append(block.bn2.register_forward_hook(lambda mod, inp, out: entry.__setitem__("r", out.clone())))
    handles.append(block.register_forward_hook(lambda mod, inp, out: at_sum(entry["r"], entry["s"])))
    return handles


def _correct_block_sum(block: nn.Module, g: torch.Tensor, b: torch.Tensor) -> None:
    """Hooks making the block's output relu(g * (r + s) + b)."""
    g, b = g.view(1, -1, 1, 1), b.view(1, -1, 1, 1)
    _shortcut_hooks(block, lambda r, s: torch.relu(g * (r + s) + b))


@pytest.mark.parametrize("shrinkage", ["none", "adaptive"])
def test_folded_block_correction_equals_hooked_reference(dense, batches, shrinkage):
    """The engine folds each residual-sum correction into BN parameters and, through the identity stream, into
    the next layers' input channels; the reference applies the same corrections with hooks."""
    vm = VarianceMatching(site="block", shrinkage=shrinkage)
    folded, _ = pruned_copy(dense, 0.9)
    hooked = _stream_reference(copy.deepcopy(folded), dense, batches, vm)
    report = repair(folded, dense, batches, [vm])
    assert len(report.block_sites) == 8 and report.walks == [["variance_matching"]]
    x = torch.cat(batches)
    with torch.no_grad():
        ours, ref = folded(x), hooked(x)
    assert (ours - ref).abs().max() / ref.abs().max() < 1e-4
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in folded.modules())
    assert any(not torch.allclose(g, torch.ones_like(g), atol=1e-2) for g in report.gains.values())  # it bites


def test_variance_matching_gain_by_hand_on_a_two_layer_net():
    """conv -> BN -> ReLU -> linear: the BN-site gain is sqrt(var_d / var_p) of the BN outputs, and the shift moves
    the pruned mean onto the dense mean."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 2))
    with torch.no_grad():
        dense[1].running_mean.uniform_(-0.5, 0.5), dense[1].running_var.uniform_(0.5, 2.0)
        dense[1].weight.uniform_(0.5, 1.5), dense[1].bias.uniform_(-0.2, 0.2)
    dense.eval()
    pruned = copy.deepcopy(dense)
    with torch.no_grad():
        pruned[0].weight[:, 0] = 0
    x = torch.randn(64, 2, 4, 4)
    with torch.no_grad():
        y_p = pruned[1](pruned[0](x)).transpose(0, 1).flatten(1).double()
        y_d = dense[1](dense[0](x)).transpose(0, 1).flatten(1).double()
    gain = (y_d.var(1) / y_p.var(1)).sqrt()
    gamma, beta = pruned[1].weight.detach().double(), pruned[1].bias.detach().double()
    repair(pruned, dense, [x[:32], x[32:]], [{"op": "variance_matching", "site": "bn"}])
    torch.testing.assert_close(pruned[1].weight.double(), gamma * gain, rtol=1e-4, atol=1e-6)
    expected_beta = gain * beta + y_d.mean(1) - gain * y_p.mean(1)
    torch.testing.assert_close(pruned[1].bias.double(), expected_beta, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("preset", ["layer_repair", "asr", "clipped_asr", "reconstruct"])
def test_presets_with_recalibration_leave_every_bn_recalibrated(dense, batches, preset):
    """Corrections come before the recalibration of everything downstream of them: the repaired model's BN
    statistics are its own, so a further BN recalibration changes (almost) nothing, and the correction stays."""
    model, _ = pruned_copy(dense, 0.95)
    repair(model, dense, batches, preset)
    again = copy.deepcopy(model)
    repair(again, dense, batches, "bn_recalibration")
    recal_only, _ = pruned_copy(dense, 0.95)
    repair(recal_only, dense, batches, "bn_recalibration")
    x = torch.cat(batches)
    with torch.no_grad():
        ours, after, ref = model(x), again(x), recal_only(x)
    assert (after - ours).abs().max() / ours.abs().max() < 1e-3
    assert (ours - ref).abs().max() / ref.abs().max() > 1e-2


def test_recipes_run_in_the_order_written(dense, batches):
    """[classifier_refit, bn_recalibration] refits on un-recalibrated features, then recalibrates: two walks, the
    same as two separate repairs, and not the default (recalibrate, then refit: one walk, exactly)."""
    pruned, _ = pruned_copy(dense, 0.95)
    written, in_two_calls, default, default_in_two = (copy.deepcopy(pruned) for _ in range(4))
    report = repair(written, dense, batches, [{"op": "classifier_refit"}, {"op": "bn_recalibration"}])
    assert report.walks == [["classifier_refit"], ["bn_recalibration"]]
    repair(in_two_calls, dense, batches, [{"op": "classifier_refit"}])
    repair(in_two_calls, dense, batches, [{"op": "bn_recalibration"}])
    assert repair(default, dense, batches, "default").walks == [["bn_recalibration", "classifier_refit"]]
    repair(default_in_two, dense, batches, [{"op": "bn_recalibration"}])
    repair(default_in_two, dense, batches, [{"op": "classifier_refit"}])
    for k, v in _params(written).items():
        torch.testing.assert_close(v, _params(in_two_calls)[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(_params(default)[k], _params(default_in_two)[k], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(written.fc.weight, default.fc.weight, atol=1e-3)


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
def test_reported_variance_ratios_are_the_bn_output_ratios(dense, batches, preset, monkeypatch):
    """After: the repaired model's BN output variances over the dense model's, per channel (these presets change
    no BN after its own site, so a forward pass of the result measures them). Before: the same ratio ahead of
    the site's own operators, i.e. with the upstream sites repaired; at the first BN, the plain pruned model.
    With the dense network walked beside the pruned one (these presets alone do not walk it)."""
    monkeypatch.setattr(repair_module, "_FORCE_DENSE_MODE", "lockstep")
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


@pytest.mark.parametrize("preset", ["bn_recalibration", "default"])
def test_without_the_dense_walk_the_ratios_are_against_the_dense_running_variance(dense, batches, preset):
    """bn_recalibration and default do not walk the dense network: each BN's ratio is the pruned BN input's
    population variance (upstream repaired) over the dense BN's running variance, and the report says so."""
    pruned, _ = pruned_copy(dense, 0.9)
    first = torch.cat(batches)
    with torch.no_grad():
        conv1 = pruned.conv1(first).transpose(0, 1).flatten(1).double().var(1, unbiased=False)
    report = repair(pruned, dense, batches, preset)
    assert set(report.variance_reference.values()) == {"running"}
    expected = conv1 / dense.bn1.running_var.double()
    assert torch.allclose(report.variance_ratio["bn1"], expected.float(), rtol=1e-4, atol=1e-7)
    for name in report.variance_ratio:  # after the recalibration: the recalibrated over the dense running variance
        bn_p, bn_d = dict(pruned.named_modules())[name], dict(dense.named_modules())[name]
        a_p = bn_p.weight.double() ** 2 / (bn_p.running_var.double() + bn_p.eps)
        a_d = bn_d.weight.double() ** 2 / (bn_d.running_var.double() + bn_d.eps)
        assert torch.allclose(report.variance_ratio_after[name], (report.variance_ratio[name] * a_p / a_d).float(),
                              rtol=1e-4, atol=1e-7), name  # fmt: skip


@pytest.mark.parametrize("preset", ["bn_recalibration", "default", "asr_refit", "reconstruct"])
def test_the_dense_network_runs_only_where_an_operator_reads_it(dense, batches, preset, monkeypatch):
    """The repaired model is the same bit for bit as with the dense network walked beside the pruned one, and the
    dense network runs: not at all for bn_recalibration, as one plain forward pass for default (its classifier
    refit reads only the dense logits), node by node beside the pruned one for asr_refit and reconstruct."""
    pruned, masks = pruned_copy(dense, 0.9)
    lockstep = copy.deepcopy(pruned)
    monkeypatch.setattr(repair_module, "_FORCE_DENSE_MODE", "lockstep")
    repair(lockstep, dense, batches, preset, masks=masks)
    monkeypatch.setattr(repair_module, "_FORCE_DENSE_MODE", None)
    calls = {"root": 0, "modules": 0}

    def count(key):
        def hook(*_):
            calls[key] += 1

        return hook

    handles = [dense.register_forward_hook(count("root"))]
    handles += [m.register_forward_hook(count("modules")) for m in dense.modules() if m is not dense]
    try:
        report = repair(pruned, dense, batches, preset, masks=masks)
    finally:
        for h in handles:
            h.remove()
    assert state_digest(pruned.state_dict()) == state_digest(lockstep.state_dict())
    expected_root = {"bn_recalibration": 0, "default": len(batches)}.get(preset, 0)
    assert calls["root"] == expected_root
    assert (calls["modules"] == 0) == (preset == "bn_recalibration")
    reference = "calibration" if preset in ("asr_refit", "reconstruct") else "running"
    assert set(report.variance_reference.values()) == {reference}


def test_a_repeated_repair_reuses_the_dense_logits_only_while_nothing_changed(dense, batches):
    """default reads only the dense logits: a second repair against the same dense network and batches does not run
    the dense network again and gives the same model bit for bit; other batch tensors (even equal ones) or an
    in-place change of a dense weight run it again, and the result is a cold repair's."""
    pruned, masks = pruned_copy(dense, 0.9)
    runs = []
    handle = dense.register_forward_hook(lambda *_: runs.append(1))

    def repaired(dense_, batches_) -> str:
        model = copy.deepcopy(pruned)
        repair(model, dense_, batches_, "default", masks=masks)
        return state_digest(model.state_dict())

    try:
        first = repaired(dense, batches)
        assert len(runs) == len(batches)
        assert repaired(dense, batches) == first and len(runs) == len(batches)
        assert repaired(dense, [b.clone() for b in batches]) == first and len(runs) == 2 * len(batches)
        with torch.no_grad():
            [m for m in dense.modules() if isinstance(m, nn.Linear)][-1].weight.mul_(2)
        changed = repaired(dense, batches)
        assert len(runs) == 3 * len(batches) and changed != first
    finally:
        handle.remove()
    assert changed == repaired(copy.deepcopy(dense), batches)


@pytest.mark.parametrize("preset", ["default", "reconstruct"])
def test_the_walk_format_changes_the_speed_not_the_result(dense, batches, preset, monkeypatch):
    """On a CPU the walks run channels-last copies of the networks: the repaired model equals a repair in the models'
    own format up to float rounding, it is written back into the caller's own tensors (same objects, storage and
    format), and the dense network is not touched."""
    pruned, masks = pruned_copy(dense, 0.9)
    assert repair_module.walk_format(torch.device("cpu")) == torch.channels_last
    own_format = copy.deepcopy(pruned)
    monkeypatch.setattr(repair_module, "WALK_FORMAT", torch.contiguous_format)
    repair(own_format, dense, batches, preset, masks=masks)
    monkeypatch.setattr(repair_module, "WALK_FORMAT", None)
    tensors = [(t, t.data_ptr()) for t in (*pruned.parameters(), *pruned.buffers())]
    dense_state = [(t.data_ptr(), t._version) for t in (*dense.parameters(), *dense.buffers())]
    dense_values = state_digest(dense.state_dict())
    repair(pruned, dense, batches, preset, masks=masks)
    assert [(t, t.data_ptr()) for t in (*pruned.parameters(), *pruned.buffers())] == tensors
    assert all(t.is_contiguous() for t in pruned.parameters())
    assert [(t.data_ptr(), t._version) for t in (*dense.parameters(), *dense.buffers())] == dense_state
    assert state_digest(dense.state_dict()) == dense_values
    a, b = _params(pruned), _params(own_format)
    assert state_digest(pruned.state_dict()) != state_digest(own_format.state_dict())  # the layout did change the walk
    for k in a:  # float32 sums in another order, compounded over the progressive sites
        assert (a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-6) < 1e-3, k


def test_a_repair_that_raises_leaves_the_pruned_model_as_it_was(dense, batches):
    """The walks repair the pruned model's weights swapped into channels-last: an error midway (here from the
    progress wrapper) drops their changes, so no half-repaired model is left, and nothing is run a second time."""
    pruned, masks = pruned_copy(dense, 0.9)
    before = state_digest(pruned.state_dict())
    walked = []

    def fail_midway(nodes):
        for i, node in enumerate(nodes):
            walked.append(node)
            if i == 40:
                raise RuntimeError("interrupted")
            yield node

    with pytest.raises(RuntimeError, match="interrupted"):
        repair(pruned, dense, batches, "reconstruct", masks=masks, progress=fail_midway)
    assert state_digest(pruned.state_dict()) == before and len(walked) == 41


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
    report = repair(pruned, dense, batches, preset, masks=masks)
    if report.masks is not None:  # a preset that re-selects masks keeps each layer's count, at its own positions
        assert {n: int(m.sum()) for n, m in report.masks.items()} == {n: int(m.sum()) for n, m in masks.items()}
        assert any(not torch.equal(report.masks[n], m) for n, m in masks.items())
        masks = report.masks
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


def test_a_gain_on_a_bn_input_vanishes_at_recalibration(dense, batches):
    """BN is invariant to a per-channel input scale: a correction placed before a BN is undone by a recalibration
    (why the seeds' presets correct residual sums and the classifier input instead; that their corrections survive
    is test_presets_with_recalibration_leave_every_bn_recalibrated)."""
    x = torch.cat(batches)
    pruned, _ = pruned_copy(dense, 0.95)
    recal_only = copy.deepcopy(pruned)
    repair(recal_only, dense, batches, "bn_recalibration")
    wrong_site = copy.deepcopy(pruned)  # per-channel gains on a conv's output, i.e. BN's input
    with torch.no_grad():
        conv = wrong_site.layer2[0].conv1
        conv.weight.mul_(torch.linspace(0.5, 2.0, conv.out_channels)[:, None, None, None])
    repair(wrong_site, dense, batches, "bn_recalibration")
    with torch.no_grad():
        assert torch.allclose(wrong_site(x), recal_only(x), rtol=1e-3, atol=1e-4)


class InPlaceFirst(nn.Module):
    """A model whose forward starts in place on its input."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2)

    def forward(self, x):
        x = x.mul_(2.0)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(torch.relu(self.bn(self.conv(x))), 1), 1))


def test_repair_leaves_the_callers_batches_untouched(batches):
    dense = InPlaceFirst().eval()
    pruned = copy.deepcopy(dense)
    before = [b.clone() for b in batches]
    repair(pruned, dense, batches, "default")
    assert all(torch.equal(a, b) for a, b in zip(before, batches, strict=True))


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
        vm.correct_bn(bn, dense_dead.layer1[0].bn1, accumulate(list(zip(feats_p, feats_d, strict=True))))
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


def test_a_batch_without_images_is_an_error_naming_it(dense):
    """Not a non-finite statistic blamed on the activations: the batch is named."""
    pruned, _ = pruned_copy(dense)
    batches = [torch.randn(4, 3, 16, 16), torch.randn(0, 3, 16, 16)]
    with pytest.raises(ValueError, match=r"calibration batches \[1\] hold no images"):
        repair(pruned, dense, batches, "bn_recalibration")


def _classifier_io(model: nn.Module, batches) -> tuple[torch.Tensor, torch.Tensor]:
    store = []
    handle = model.fc.register_forward_hook(lambda mod, inp, out: store.append((inp[0], out)))
    with torch.no_grad():
        for b in batches:
            model(b)
    handle.remove()
    return torch.cat([x for x, _ in store]), torch.cat([z for _, z in store])


def test_classifier_refit_equals_masked_least_squares(dense):
    """Reference: per output row, numpy-style least squares on the kept features plus an intercept (96 images for
    at most ~30 unknowns per row: a well-posed fit, where ridge -> 0 and lstsq agree)."""
    batches = list(torch.randn(96, 3, 16, 16, generator=torch.Generator().manual_seed(5)).split(32))
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


class StochasticDepthBlock(nn.Module):
    """EfficientNet's residual: the branch's BN reaches the add through StochasticDepth (the identity in eval)."""

    def __init__(self):
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv, self.bn = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.drop = StochasticDepth(0.2, "row")
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.stem_bn(self.stem(x)))
        x = self.drop(self.bn(self.conv(x))) + x
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def test_a_bn_behind_stochastic_depth_is_a_block_site(batches):
    torch.manual_seed(0)
    dense = StochasticDepthBlock()
    dense.train()
    with torch.no_grad():
        dense(torch.cat(batches))  # BN statistics from data
    dense.eval()
    pruned = copy.deepcopy(dense)
    with torch.no_grad():
        pruned.conv.weight[:, :4] = 0
    gamma = pruned.bn.weight.detach().clone()
    report = repair(pruned, dense, batches, [{"op": "variance_matching", "site": "block"}])
    assert report.block_sites == ["add"] and not torch.equal(pruned.bn.bias, dense.bn.bias)
    assert torch.equal(pruned.bn.weight, gamma)  # the identity operand takes the gain as a pending scale
    assert not torch.equal(pruned.fc.weight, dense.fc.weight)  # ... folded into the classifier's columns


def test_channel_moments_over_chunks_of_different_image_sizes():
    """Chunks of images of different sizes: every position counts once, whatever its chunk's size."""
    g = torch.Generator().manual_seed(1)
    chunks = [torch.randn(4, 3, 6, 6, generator=g) + 5, torch.randn(3, 3, 2, 4, generator=g) - 2]
    values = torch.cat([c.double().transpose(0, 1).flatten(1) for c in chunks], 1)
    m = repair_module.channel_moments(chunks)
    assert int(m.count) == 4 * 36 + 3 * 8
    torch.testing.assert_close(m.mean[0], values.mean(1), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(m.cov[0, 0], values.var(1, unbiased=False), rtol=1e-6, atol=1e-9)


def test_channel_moments_match_float64_also_when_the_mean_dwarfs_the_spread():
    """The walk's per-channel BN statistics against float64 on the whole set: a channel with mean 1e4 and std 1
    keeps its variance to 1e-5 relative (raw float32 squares would lose it entirely), whatever the batching and the
    memory format."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, 5, 5, generator=g, dtype=torch.float64)
    x[:, 1] += 1e4
    x[:, 2] = 0.0  # a dead channel: variance exactly 0
    x = x.float().double()  # the data as the walk sees it
    reference_var = x.transpose(0, 1).flatten(1).var(1, unbiased=False)
    reference_mean = x.transpose(0, 1).flatten(1).mean(1)
    for chunks in (list(x.float().split(7)), [x.float()], [x.float().contiguous(memory_format=torch.channels_last)]):
        m = repair_module.channel_moments(chunks)
        assert int(m.count) == 40 * 25
        assert torch.allclose(m.mean[0], reference_mean, rtol=1e-9, atol=1e-6)  # std 1: 1e-6 of the spread
        assert torch.allclose(m.cov[0, 0, :2], reference_var[:2], rtol=1e-5, atol=0)
        assert m.cov[0, 0, 2] == 0
