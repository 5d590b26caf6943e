"""VAR and WCR against hand-computed values, and the direction of one SGD step."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_repair.regularizers import var_penalty, wcr_penalty


def _var_reference(values: list[float]) -> float:
    """1 / (Var(sqrt(w^2 + 1e-8)) + 1e-8) in plain Python, population variance."""
    mags = [math.sqrt(v * v + 1e-8) for v in values]
    mean = sum(mags) / len(mags)
    var = sum(m * m for m in mags) / len(mags) - mean * mean
    return 1.0 / (var + 1e-8)


def test_var_hand_computed():
    # |w| = 1, 1, 3, 3: mean 2, mean of squares 5, variance 1 -> term 1
    # |w| = 0.5, 1.5, 1, 2: mean 1.25, mean of squares 1.875, variance 0.3125 -> term 3.2
    a = [1.0, -1.0, 3.0, -3.0]
    b = [0.5, -1.5, 1.0, 2.0]
    value = var_penalty([torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64).view(2, 2)])
    assert value.item() == pytest.approx(1.0 + 3.2, abs=1e-6)
    assert value.item() == pytest.approx(_var_reference(a) + _var_reference(b), rel=1e-12)
    # float32 and conv-shaped weights
    w = torch.tensor(b).view(1, 1, 2, 2)
    assert var_penalty([w]).item() == pytest.approx(3.2, rel=1e-5)


def test_var_smoothing_handles_zeros():
    # |w|~ of 0 is 1e-4: magnitudes 1e-4, 2 -> variance ~ 1 (exact value from the formula)
    value = var_penalty([torch.tensor([0.0, 2.0], dtype=torch.float64)])
    assert value.item() == pytest.approx(_var_reference([0.0, 2.0]), rel=1e-12)
    assert value.item() == pytest.approx(1.0, rel=1e-3)
    w = torch.zeros(5, requires_grad=True)
    var_penalty([w]).backward()
    assert torch.isfinite(w.grad).all()


def test_var_sgd_step_increases_magnitude_variance():
    torch.manual_seed(0)
    w = torch.randn(64, dtype=torch.float64, requires_grad=True)
    before = w.detach().abs().clone()
    var_penalty([w]).backward()
    with torch.no_grad():
        w -= 1e-3 * w.grad
    after = w.detach().abs()
    assert after.var(unbiased=False) > before.var(unbiased=False)
    # small magnitudes shrink, large ones grow
    below, above = before < before.mean(), before > before.mean()
    assert (after[below] < before[below]).all()
    assert (after[above] > before[above]).all()
    assert var_penalty([w]).item() < _var_reference(before.tolist())


def test_wcr_hand_computed():
    # density 0.25 of 4 weights: k = 1, top-1 mass 3 of total 5 -> 1 - 3/5
    w = torch.tensor([3.0, -1.0, 0.5, 0.5])
    assert wcr_penalty([w], 0.25).item() == pytest.approx(1 - 3 / 5)
    # conv-shaped, k = ceil(0.5 * 8) = 4: top-4 mass 4 + 3 + 2 + 1 = 10 of 13.5
    conv = torch.tensor([4.0, -3.0, 2.0, 1.0, 1.0, 1.0, -1.0, 0.5]).view(2, 1, 2, 2)
    assert wcr_penalty([conv], 0.5).item() == pytest.approx(1 - 10 / 13.5)
    # k = ceil(0.3 * 5) = 2: top-2 mass 9 of 15
    assert wcr_penalty([torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])], 0.3).item() == pytest.approx(1 - 9 / 15)
    # summed over layers (conv at density 0.25: k = 2, top-2 mass 4 + 3)
    assert wcr_penalty([w, conv], 0.25).item() == pytest.approx((1 - 3 / 5) + (1 - 7 / 13.5))  # conv: k = 2


def test_wcr_k_is_not_inflated_by_float_error():
    # 0.07 * 100 is 7.000000000000001 in floating point; k must be 7, so 8 equal non-zeros leave 1/8 outside
    w = torch.zeros(100)
    w[:8] = 1.0
    assert wcr_penalty([w], 0.07).item() == pytest.approx(1 / 8)
    w[7] = 0.0
    assert wcr_penalty([w], 0.07).item() == 0.0


def test_wcr_zero_when_at_most_k_nonzeros():
    w = torch.tensor([0.0, 2.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0])  # 2 non-zeros, k = 2
    assert wcr_penalty([w], 0.25).item() == 0.0
    assert wcr_penalty([w], 1.0).item() == 0.0
    assert wcr_penalty([torch.zeros(3, 3)], 0.1).item() == 0.0  # an all-zero layer has nothing to concentrate
    torch.manual_seed(0)
    for _ in range(20):  # exactly k random non-zeros: exactly 0, not a rounding residue
        w = torch.zeros(1000)
        w[torch.randperm(1000)[:50]] = torch.randn(50)
        assert wcr_penalty([w], 0.05).item() == 0.0
        w[torch.nonzero(w == 0)[0]] = 1e-3  # one more non-zero: positive
        assert wcr_penalty([w], 0.05).item() > 0.0


def test_wcr_is_scale_invariant_and_bounded():
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3)
    base = wcr_penalty([w], 0.1).item()
    assert 0.0 < base < 1.0
    for scale in (1e-3, 0.5, 7.0, 1e3):
        assert wcr_penalty([w * scale], 0.1).item() == pytest.approx(base, rel=1e-5)
    assert wcr_penalty([-w], 0.1).item() == pytest.approx(base, rel=1e-6)


def test_wcr_sgd_step_concentrates_mass():
    torch.manual_seed(0)
    signs = torch.where(torch.rand(100) < 0.5, -1.0, 1.0)
    w = (signs * (0.2 + torch.rand(100))).double().requires_grad_(True)  # no weight near zero
    k = 10
    before = w.detach().abs().clone()
    top = torch.zeros(100, dtype=torch.bool)
    top[before.topk(k).indices] = True
    loss = wcr_penalty([w], 0.1)
    loss.backward()
    with torch.no_grad():
        w -= 1.0 * w.grad
    after = w.detach().abs()
    assert (after[~top] < before[~top]).all()
    assert (after[top] > before[top]).all()
    assert wcr_penalty([w], 0.1).item() < loss.item()


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan")])
def test_wcr_invalid_density(density):
    with pytest.raises(ValueError, match="density"):
        wcr_penalty([torch.ones(4)], density)


def test_empty_weight_list_is_an_error():
    with pytest.raises(ValueError):
        var_penalty([])
    with pytest.raises(ValueError):
        wcr_penalty(iter([]), 0.1)
