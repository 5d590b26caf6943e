"""The operator interface: options validated from their annotations, and the documented recipe for a new
operator (one class, one registry entry, no change to the engine)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest
import torch
from torch import nn

from lightning_repair.operators import (
    OPERATORS,
    PRESETS,
    Operator,
    Reconstruct,
    VarianceMatching,
    parse_recipe,
    plan_walks,
)
from lightning_repair.repair import repair

from helpers import pruned_copy


@dataclass
class MeanShift(Operator):
    """A new operator, written as operators.py says: shift each BN's output mean to the dense one."""

    op: Literal["mean_shift"] = "mean_shift"
    sites = frozenset({"bn"})

    def correct_bn(self, bn: nn.Module, bn_dense: nn.Module, m) -> None:
        mean_p = (m.mean[0] - bn.running_mean.double()) * bn.weight.double() / (bn.running_var.double() + bn.eps).sqrt()
        mean_d = (
            (m.mean[1] - bn_dense.running_mean.double())
            * bn_dense.weight.double()
            / (bn_dense.running_var.double() + bn_dense.eps).sqrt()
        )
        bn.bias.add_((mean_d - mean_p).to(bn.bias.dtype))


def test_a_new_operator_needs_one_class_and_one_registry_entry(dense, batches, monkeypatch):
    monkeypatch.setitem(OPERATORS, "mean_shift", MeanShift)
    (op,) = parse_recipe([{"op": "mean_shift"}])
    assert isinstance(op, MeanShift) and op.needs_batchnorm
    pruned, masks = pruned_copy(dense)
    bn = pruned.layer1[0].bn1
    captured = {}
    handles = [
        m.layer1[0].bn1.register_forward_hook(
            lambda _m, _i, out, key=key: captured.setdefault(key, []).append(out.clone())
        )
        for key, m in (("pruned", pruned), ("dense", dense))
    ]
    report = repair(pruned, dense, batches, [{"op": "mean_shift"}], masks=masks)
    captured.clear()
    with torch.no_grad():
        for b in batches:
            pruned(b), dense(b)
    for h in handles:
        h.remove()
    out_p, out_d = (torch.cat(captured[k]).double().mean((0, 2, 3)) for k in ("pruned", "dense"))
    assert report.walks == [["mean_shift"]] and "layer1.0.bn1" in report.bn_sites
    assert torch.allclose(out_p, out_d, atol=1e-4), (out_p - out_d).abs().max()
    assert bn.weight.requires_grad  # edited in place, still a parameter


def test_options_are_checked_against_their_literal_annotations():
    with pytest.raises(ValueError, match=r"variance_matching.estimator: 'median' is not one of \('vm', 'ls'\)"):
        VarianceMatching(estimator="median")
    with pytest.raises(ValueError, match=r"reconstruct.layers: 'some'"):
        Reconstruct(layers="some")
    with pytest.raises(ValueError, match="recalibrate_bn must be true or false"):
        Reconstruct(recalibrate_bn="yes")


def test_declared_sites_plan_the_walks():
    ops = parse_recipe(PRESETS["default"])
    assert [op.sites for op in ops] == [frozenset(), frozenset({"classifier"})]
    assert [op.needs_dense for op in ops] == [False, True]
    assert [[op.op for op in walk] for walk in plan_walks(ops)] == [["bn_recalibration", "classifier_refit"]]
    (vm,) = parse_recipe(PRESETS["asr"])
    assert vm.sites == {"block", "classifier_input"} and vm.recalibrate_bn and not vm.needs_batchnorm
    # a classifier-only operator that recalibrates BNs cannot join the walk before it
    two = plan_walks(parse_recipe([{"op": "bn_recalibration"}, {"op": "reconstruct", "layers": "classifier"}]))
    assert [[op.op for op in w] for w in two] == [["bn_recalibration"], ["reconstruct"]]
    assert Reconstruct(mask="wanda").reselects_masks and not Reconstruct().reselects_masks
