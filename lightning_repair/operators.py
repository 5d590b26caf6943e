"""Repair operators, presets and recipes: what each correction computes, not how the network is walked (repair.py).

A recipe is a list of operators that run in the order written. Each operator is an ``Operator`` subclass, a
dataclass whose fields are its options (jsonargparse and ``parse_recipe`` validate them), registered in
``OPERATORS`` under its ``op`` name. It declares where it acts, by ``sites``:

- ``bn``: every BatchNorm, from the moments of its input in the pruned and the dense network (``correct_bn``).
- ``block``: every residual sum ``r + s`` with a BatchNorm operand; the engine folds the per-channel ``(g, b)`` that
  ``affine_correction`` returns into the sum's BN operand(s).
- ``classifier_input``: the features entering the classifier (the last Linear), as ``(g, b)`` folded into it.
- ``layers``: every prunable Conv2d / Linear, re-solved by reconstruction with ``solve_damping()``.
- ``classifier``: only the classifier, re-solved the same way.

and by flags: ``recalibrate_bn`` (the walk resets every BN to the pruned network's population statistics as it
reaches it, before any correction downstream), ``needs_dense`` (the operator reads the dense network's activations)
and ``reselects_masks`` (reconstruction re-selects the masks, keeping each layer's count).

Adding an operator: subclass ``Operator`` here, implement the hooks of its sites, add it to ``OPERATORS`` (and, if it
is a common recipe, to ``PRESETS``). The engine needs no change; tests/test_operators.py shows the recipe.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Literal, get_args, get_type_hints

import torch
from torch import nn

from .mask_selection import MaskRule, MaskScope
from .stats import Moments

Site = Literal["bn", "block", "classifier_input", "layers", "classifier"]
CLASSIFIER_SITES = frozenset({"classifier_input", "classifier"})  # both act at the last Linear, the walk's last site
BN_SITES = frozenset({"bn", "block"})  # BatchNorm layers, and residual sums (corrected through their BN operand)

EPS_VAR = 1e-12  # variances below this count as zero
_DEAD_RELATIVE = 1e-5  # variance / second moment below this: a constant ("dead") channel


class Operator:
    """A repair operator: the options are dataclass fields of the subclass; the hooks of its declared sites are
    called by the engine, in forward order, each from statistics of the already-repaired network upstream."""

    op: str
    recalibrate_bn: bool = False
    needs_dense: bool = True
    sites: frozenset[str] = frozenset()

    @property
    def reselects_masks(self) -> bool:
        return False

    @property
    def needs_batchnorm(self) -> bool:
        """It acts only at BatchNorm layers, so on a network without one it would silently do nothing."""
        return bool(self.sites or self.recalibrate_bn) and self.sites <= BN_SITES

    def correct_bn(self, bn: nn.Module, bn_dense: nn.Module, m: Moments) -> None:
        """Site ``bn``: correct ``bn`` in place from the moments of its input (pruned, dense)."""
        raise NotImplementedError(f"{self.op} declares no bn site")

    def affine_correction(self, m: Moments) -> tuple[torch.Tensor, torch.Tensor]:
        """Sites ``block`` and ``classifier_input``: per-channel (g, b) with g * pruned + b estimating the dense
        activation, from the moments of (pruned, dense) at the site."""
        raise NotImplementedError(f"{self.op} declares no block or classifier_input site")

    def solve_damping(self) -> float:
        """Sites ``layers`` and ``classifier``: the relative ridge of the layer's least-squares re-solve."""
        raise NotImplementedError(f"{self.op} declares no layers or classifier site")


def check_choices(op: Operator, *names: str) -> None:
    """Refuse an option whose value is not one of its ``Literal`` annotation's values, naming the option."""
    hints = get_type_hints(type(op))
    for name in names:
        allowed, value = get_args(hints[name]), getattr(op, name)
        if value not in allowed:
            raise ValueError(f"{op.op}.{name}: {value!r} is not one of {allowed}")


def check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")


def check_nonnegative(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


@dataclass
class BNRecalibration(Operator):
    """Reset each BN's running statistics to the pruned network's exact population statistics.

    Equivalent to ``torch.optim.swa_utils.update_bn`` (momentum=None) on data given as one
    batch, but progressive and reduced as sums across processes, so it does not depend on
    how the calibration set is batched or sharded. Dropout stays off.
    """

    op: Literal["bn_recalibration"] = "bn_recalibration"
    recalibrate_bn = True  # the walk's own recalibration is the whole operator
    needs_dense = False


def recalibrate(bn: nn.Module, m: Moments) -> None:
    """Set bn's running statistics to the population statistics of its input (moments of the pruned input first)."""
    n = m.count
    var = m.cov[0, 0] * (n / (n - 1)) if n > 1 else m.cov[0, 0]  # BN keeps the unbiased variance
    bn.running_mean.copy_(m.mean[0])
    bn.running_var.copy_(var.clamp_min(0))


VMSite = Literal["bn", "block", "classifier_input"]


@dataclass
class VarianceMatching(Operator):
    """Match the pruned network's activation statistics to the dense network's, per channel or per layer.

    Args:
        site: where the correction acts, one or a list of: ``bn`` (each BN output, folded into gamma/beta: a later
            BN recalibration does not undo it, but repeats it), ``block`` (each residual sum, before its activation),
            ``classifier_input`` (the features entering the classifier, folded into its weights and bias).
        granularity: ``layer`` (one gain per site) or ``channel`` (one gain per channel).
        estimator: ``vm`` (gain sqrt(var_d / var_p): variances match) or ``ls`` (least-squares gain
            cov_pd / var_p, which shrinks channels weakly correlated with the dense ones).
        shrinkage: ``none`` or ``adaptive`` (ASR): each channel gain is pulled toward the site's layer gain in
            log space with weight rho_c**2, the share of the pruned channel's variance explained by the dense
            channel, so channels with a weak post-pruning signal get the layer's correction, not their own.
        clip: bounds [lo, hi] for every gain (clipped ASR), or None.
        match_mean: also shift each channel so its mean equals the dense mean.
        recalibrate_bn: recalibrate every BN as the walk reaches it, so that each correction is computed on the
            recalibrated network upstream and every BN downstream is recalibrated on the corrected input.

    Dead channels get finite gains: zero pruned variance gives gain 1 (nothing to scale;
    with ``match_mean`` the channel is set to the dense mean), zero dense variance gives 0.
    """

    op: Literal["variance_matching"] = "variance_matching"
    site: VMSite | tuple[VMSite, ...] = "bn"
    granularity: Literal["layer", "channel"] = "channel"
    estimator: Literal["vm", "ls"] = "vm"
    shrinkage: Literal["none", "adaptive"] = "none"
    clip: tuple[float, float] | None = None
    match_mean: bool = True
    recalibrate_bn: bool = False

    def __post_init__(self):
        self.site = (self.site,) if isinstance(self.site, str) else tuple(self.site)
        if not self.site or any(s not in get_args(VMSite) for s in self.site):
            raise ValueError(f"variance_matching.site: {list(self.site)!r} must be one or more of {get_args(VMSite)}")
        check_choices(self, "granularity", "estimator", "shrinkage")
        if self.clip is not None:
            lo, hi = self.clip = tuple(float(v) for v in self.clip)
            if not 0 <= lo <= 1 <= hi or not math.isfinite(hi):
                raise ValueError(f"variance_matching.clip must satisfy 0 <= lo <= 1 <= hi < inf, got {self.clip}")
        if self.shrinkage == "adaptive" and self.granularity == "layer":
            raise ValueError("variance_matching: adaptive shrinkage needs granularity 'channel'")
        check_flag("variance_matching.recalibrate_bn", self.recalibrate_bn)
        self.sites = frozenset(self.site)

    def correct_bn(self, bn: nn.Module, bn_dense: nn.Module, m: Moments) -> None:
        a_p, c_p = bn_affine(bn)
        a_d, c_d = bn_affine(bn_dense)
        cov = m.cov
        g, b = self.correction(a_p.square() * cov[0, 0], a_d.square() * cov[1, 1], a_p * a_d * cov[0, 1],
                               a_p * m.mean[0] + c_p, a_d * m.mean[1] + c_d)  # fmt: skip
        fold_affine(bn, g, b)

    def affine_correction(self, m: Moments) -> tuple[torch.Tensor, torch.Tensor]:
        cov = m.cov
        return self.correction(cov[0, 0], cov[1, 1], cov[0, 1], m.mean[0], m.mean[1])

    def correction(self, var_p, var_d, cov_pd, mean_p, mean_d) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (gain, shift) with ``g * y_p + b`` estimating the dense activation; dead channels get g = 1.

        A channel is dead when its variance is indistinguishable from zero at float32 precision
        relative to its second moment (a constant channel, however large its mean).
        """
        total = lambda t: t.sum(-1, keepdim=True)  # noqa: E731  (the site's layer gain: over the last dim, channels)
        if self.estimator == "vm":
            g_channel, g_layer = _ratio_sqrt(var_d, var_p), _ratio_sqrt(total(var_d), total(var_p))
        else:
            g_channel, g_layer = _ratio(cov_pd, var_p), _ratio(total(cov_pd), total(var_p))
        alive = var_p > _DEAD_RELATIVE * (var_p + mean_p.square()) + EPS_VAR
        if self.granularity == "layer":
            g = g_layer.expand_as(g_channel)
        elif self.shrinkage == "adaptive":
            rho2 = _rho2(cov_pd, var_p, var_d)
            w = torch.where(alive & (g_channel > 0), rho2, torch.zeros_like(rho2))
            g = torch.exp(w * g_channel.clamp_min(1e-12).log() + (1 - w) * g_layer.clamp_min(1e-12).log())
        else:
            g = g_channel
        g = torch.where(alive, g, torch.ones_like(g))
        if self.clip is not None:
            g = g.clamp(*self.clip)
        b = mean_d - g * mean_p if self.match_mean else torch.zeros_like(g)
        return g, b


@dataclass
class Reconstruct(Operator):
    """Re-solve every prunable layer's kept weights (and bias) by masked ridge least squares, so that the layer,
    fed the pruned, already-repaired network's input, reproduces the dense layer's output (reconstruction.py).

    Args:
        layers: ``all`` prunable layers in forward order, or only the ``classifier``.
        damping: ridge strength relative to the mean diagonal of the layer's input Gram (0.001 = 0.1%, as the
            classifier refit's ridge; 0.01 loses 0.4-0.6 points at LAMP 97-98%, benchmarks/README.md).
        recalibrate_bn: recalibrate every BN as the walk reaches it (after the layer before it is reconstructed).
            ``false`` keeps the dense network's BN statistics instead, and fits a bias-free layer that only a BN reads
            with an intercept, folded into that BN's running mean: the pair is reconstructed as one affine layer
            (the ``reconstruct_dense_bn`` preset: better at 97-98%, slightly worse at 95%).
        mask: ``magnitude`` keeps the masks as given; the other rules (mask_selection.py) re-select each layer's
            mask from the dense weights and the Gram of its input, keeping the allocation's count per layer:
            ``wanda``, ``obs_oneshot``, ``sparsegpt`` (SparseGPT's blocked OBS selection), ``exact_obs``
            (OBC's ExactOBS; O(K^3) per output row, for small layers) and ``forward_ols`` (ours: each row grows its
            kept set greedily for the re-solve's own least-squares error; O(K k^2) per row keeping k).
        mask_gram: whose input Gram the re-selection reads: the ``repaired`` network's (the one the weights are
            then solved on) or the ``dense`` network's (as OBC and SparseGPT select, layer by layer from dense
            inputs). Both come from the same walk, which holds both networks' activations at every layer; ``dense``
            forms one more Gram per layer.
        mask_scope: where a re-selected mask's weights compete: across the whole ``layer`` (top-k of the layer), or
            within each output ``row`` (the same count in every row, as Wanda compares them; the remainder goes to
            the rows whose next weight scores highest).
    """

    op: Literal["reconstruct"] = "reconstruct"
    layers: Literal["all", "classifier"] = "all"
    damping: float = 0.001
    recalibrate_bn: bool = True
    mask: MaskRule = "magnitude"
    mask_scope: MaskScope = "layer"
    mask_gram: Literal["repaired", "dense"] = "repaired"

    def __post_init__(self):
        check_nonnegative("reconstruct.damping", self.damping)
        check_choices(self, "layers", "mask", "mask_scope", "mask_gram")
        if self.mask_scope == "row" and self.mask == "magnitude":
            raise ValueError("reconstruct.mask_scope: 'row' re-selects masks, so it needs a mask rule, not magnitude")
        check_flag("reconstruct.recalibrate_bn", self.recalibrate_bn)
        self.sites = frozenset({"layers" if self.layers == "all" else "classifier"})

    @property
    def reselects_masks(self) -> bool:
        return self.mask != "magnitude"

    def solve_damping(self) -> float:
        return self.damping


@dataclass
class ClassifierRefit(Operator):
    """Refit the classifier's kept weights and bias by ridge least squares to the dense logits: the label-free,
    closed-form analogue of re-training the last layer (the classifier case of ``reconstruct``).

    Args:
        ridge: ridge strength relative to the mean feature energy (0 = plain least squares, made well posed
            by a 1e-9 floor).
    """

    op: Literal["classifier_refit"] = "classifier_refit"
    ridge: float = 1e-3
    sites = frozenset({"classifier"})

    def __post_init__(self):
        check_nonnegative("classifier_refit.ridge", self.ridge)

    def solve_damping(self) -> float:
        return self.ridge


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, 0 where the denominator vanishes, never negative (a gain flips no sign)."""
    return torch.where(den > EPS_VAR, num / den.clamp_min(EPS_VAR), torch.zeros_like(num)).clamp_min(0)


def _ratio_sqrt(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return _ratio(num.clamp_min(0), den).sqrt()


def _rho2(cov: torch.Tensor, var_a: torch.Tensor, var_b: torch.Tensor) -> torch.Tensor:
    """Squared correlation, 0 where either variance vanishes."""
    den = var_a * var_b
    return torch.where(den > EPS_VAR**2, cov.square() / den.clamp_min(EPS_VAR**2), torch.zeros_like(cov)).clamp(0, 1)


def bn_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, c) with bn(x) = a * x + c per channel in eval mode."""
    a = bn.running_var.double().add(bn.eps).rsqrt()
    if bn.weight is not None:
        a = a * bn.weight.double()
    c = -a * bn.running_mean.double()
    if bn.bias is not None:
        c = c + bn.bias.double()
    return a, c


@torch.no_grad()
def fold_affine(bn: nn.Module, g: torch.Tensor, b: torch.Tensor) -> None:
    """Make bn's output g * bn(x) + b by editing gamma and beta only."""
    if bn.weight is None or bn.bias is None:
        raise ValueError(f"cannot fold a correction into a BatchNorm without affine parameters ({bn})")
    bn.bias.copy_((g * bn.bias.double() + b).to(bn.bias.dtype))
    bn.weight.copy_((g * bn.weight.double()).to(bn.weight.dtype))


OPERATORS: dict[str, type[Operator]] = {
    "bn_recalibration": BNRecalibration,
    "variance_matching": VarianceMatching,
    "reconstruct": Reconstruct,
    "classifier_refit": ClassifierRefit,
}

_SEED_SITES = ["block", "classifier_input"]  # where no later BN renormalises: residual sums, classifier input
PRESETS: dict[str, list[dict]] = {
    "none": [],
    "bn_recalibration": [{"op": "bn_recalibration"}],
    # the seeds' backend (layer-wise repair, ASR): corrections where BN recalibration cannot undo them, with every
    # BN recalibrated on the fly (the correction comes before the recalibration of everything downstream of it)
    "layer_repair": [{"op": "variance_matching", "site": _SEED_SITES, "granularity": "layer", "recalibrate_bn": True}],
    "asr": [{"op": "variance_matching", "site": _SEED_SITES, "shrinkage": "adaptive", "recalibrate_bn": True}],
    "clipped_asr": [
        {
            "op": "variance_matching",
            "site": _SEED_SITES,
            "shrinkage": "adaptive",
            "clip": [0.5, 2.0],
            "recalibrate_bn": True,
        }
    ],  # fmt: skip
    # our own variants at BN outputs, without recalibration (the presets of earlier versions under honest names)
    "bn_output_layer_vm": [{"op": "variance_matching", "granularity": "layer", "match_mean": False}],
    "bn_output_asr": [{"op": "variance_matching", "shrinkage": "adaptive"}],
    "asr_refit": [
        {"op": "variance_matching", "site": _SEED_SITES, "shrinkage": "adaptive", "recalibrate_bn": True},
        {"op": "classifier_refit"},
    ],  # fmt: skip
    # BN recalibration, then the classifier refitted in closed form to the dense logits (one walk)
    "default": [{"op": "bn_recalibration"}, {"op": "classifier_refit"}],
    # every prunable layer re-solved to the dense outputs, BNs recalibrated on the fly (one walk)
    "reconstruct": [{"op": "reconstruct"}],
    # the same with BNs at the dense statistics, each conv + BN pair re-solved as one affine layer
    "reconstruct_dense_bn": [{"op": "reconstruct", "recalibrate_bn": False}],
    # reconstruct, each layer's mask first re-selected by forward_ols for the re-solve's own error: the most
    # accurate preset measured (docs/methods.md), at 1.2-1.5x reconstruct's cost
    "reconstruct_ols": [{"op": "reconstruct", "mask": "forward_ols"}],
}


def parse_recipe(recipe: str | Sequence[dict | Operator]) -> list[Operator]:
    """A preset name or a list of operator dicts (``{"op": NAME, **options}``) as operators."""
    if isinstance(recipe, str):
        if recipe not in PRESETS:
            raise ValueError(f"repair: unknown preset {recipe!r}; choose from {sorted(PRESETS)}")
        recipe = PRESETS[recipe]
    if not isinstance(recipe, Sequence):
        raise ValueError(f"repair: expected a preset name or a list of operators, got {recipe!r}")
    ops = []
    for i, step in enumerate(recipe):
        if isinstance(step, Operator):
            ops.append(step)
            continue
        if not isinstance(step, Mapping):
            raise ValueError(f"repair[{i}]: expected an operator dict like {{op: bn_recalibration}}, got {step!r}")
        step = dict(step)
        name = step.get("op")
        if name not in OPERATORS:
            raise ValueError(f"repair[{i}]: unknown operator {name!r}; choose from {sorted(OPERATORS)}")
        try:
            ops.append(OPERATORS[name](**step))
        except TypeError as err:
            raise ValueError(f"repair[{i}] ({name}): {err}") from err
    return ops


def describe(ops: Iterable[Operator]) -> list[dict]:
    return [{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(op).items()} for op in ops]


def plan_walks(ops: Sequence[Operator]) -> list[list[Operator]]:
    """The walks that run ``ops`` in the order written: an operator acting only at the classifier (the last site,
    without recalibrating anything) joins the walk before it, which is exact; any other operator starts a walk."""
    walks: list[list[Operator]] = []
    for op in ops:
        if walks and op.sites <= CLASSIFIER_SITES and not op.recalibrate_bn:
            walks[-1].append(op)
        else:
            walks.append([op])
    return walks
