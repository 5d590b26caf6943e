"""Magnitude masks: exact counts, the largest entries, deterministic ties, in-place application."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_repair.masks import apply_masks, compute_masks, magnitude_mask, mask_violations


@pytest.mark.parametrize("keep", [0, 1, 7, 50, 143, 144])
def test_magnitude_mask_keeps_exactly_the_k_largest(keep):
    torch.manual_seed(0)
    w = torch.randn(4, 4, 3, 3)
    mask = magnitude_mask(w, keep)
    assert mask.shape == w.shape and mask.dtype == torch.bool
    assert int(mask.sum()) == keep
    # reference: plain Python sort of |w| (random floats: no ties)
    flat = w.abs().flatten().tolist()
    largest = sorted(range(len(flat)), key=lambda i: -flat[i])[:keep]
    assert sorted(torch.nonzero(mask.flatten()).flatten().tolist()) == sorted(largest)
    if 0 < keep < w.numel():
        assert w.abs()[mask].min() > w.abs()[~mask].max()


def test_magnitude_mask_uses_magnitude_not_sign():
    w = torch.tensor([-5.0, 1.0, 4.0, -0.5, 3.0])
    assert magnitude_mask(w, 2).tolist() == [True, False, True, False, False]


def test_ties_are_broken_by_flat_position():
    w = torch.full((3, 4), 0.7)
    for keep in (0, 1, 5, 12):
        expected = torch.zeros(12, dtype=torch.bool)
        expected[:keep] = True
        assert torch.equal(magnitude_mask(w, keep), expected.view(3, 4))
    # equal magnitudes with mixed signs are ties too; the first positions win
    w = torch.tensor([1.0, -2.0, 2.0, -1.0, 2.0, 1.0])
    assert magnitude_mask(w, 2).tolist() == [False, True, True, False, False, False]
    assert magnitude_mask(w, 4).tolist() == [True, True, True, False, True, False]


def test_ties_are_deterministic_across_calls_and_layouts():
    torch.manual_seed(0)
    w = torch.randint(-3, 4, (64, 32)).float()  # many ties
    first = magnitude_mask(w, 700)
    for _ in range(3):
        assert torch.equal(magnitude_mask(w, 700), first)
    # a non-contiguous view with the same logical values gives the same mask
    w_t = w.t().contiguous().t()
    assert not w_t.is_contiguous()
    assert torch.equal(magnitude_mask(w_t, 700), first)
    assert torch.equal(magnitude_mask(w.double(), 700), first)


@pytest.mark.parametrize("keep", [-1, 13])
def test_keep_out_of_range(keep):
    with pytest.raises(ValueError, match="keep"):
        magnitude_mask(torch.ones(12), keep)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)


def test_apply_masks_zeroes_pruned_weights_only():
    torch.manual_seed(0)
    model = _Tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    masks = compute_masks(model, {"conv": 10, "fc": 5})
    out = apply_masks(model, masks)
    assert out is model
    for name, keep in (("conv", 10), ("fc", 5)):
        weight = model.get_submodule(name).weight
        assert int((weight != 0).sum()) == keep
        assert torch.equal(weight[masks[name]], before[f"{name}.weight"][masks[name]])
        assert (weight[~masks[name]] == 0).all()
    for key in ("conv.bias", "fc.bias", "bn.weight", "bn.bias"):  # never pruned
        assert torch.equal(model.state_dict()[key], before[key])
    assert set(model.state_dict()) == set(before)  # plain architecture, no weight_orig/weight_mask
    assert mask_violations(model, masks) == {}


def test_mask_violations_detect_regrowth():
    torch.manual_seed(0)
    model = _Tiny()
    masks = compute_masks(model, {"conv": 10, "fc": 5})
    apply_masks(model, masks)
    with torch.no_grad():
        pruned = torch.nonzero(~masks["conv"].flatten()).flatten()[:3]
        model.conv.weight.view(-1)[pruned] = 1e-6
        model.fc.weight.view(-1)[torch.nonzero(~masks["fc"].flatten()).flatten()[0]] = -2.0
    assert mask_violations(model, masks) == {"conv": 3, "fc": 1}
    apply_masks(model, masks)
    assert mask_violations(model, masks) == {}


def test_compute_masks_rejects_unknown_layers():
    with pytest.raises(KeyError, match="nope"):
        compute_masks(_Tiny(), {"nope": 1})
