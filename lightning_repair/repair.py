"""Label-free repair: operators, recipes, and the progressive engine that runs them (docs/methods.md).

A recipe is a list of operators that run **in the order written**: operator k sees the model as operators
< k left it. Each operator acts at its *sites*, in forward order, progressively: a site is corrected from
activations produced by the already-corrected layers before it. Sites:

- ``bn``: every BatchNorm, from the moments of its input in the pruned and the dense network.
- ``block``: every residual sum ``r + s`` with a BatchNorm operand (``out += identity``, either order). The whole
  sum is corrected per channel (gain g > 0, shift b) before the activation that follows it.
- ``layer``: every prunable Conv2d / Linear (reconstruction), ``classifier``: the last Linear or its input.

The engine walks the traced graph over the whole calibration set, dense and pruned in lockstep, holding live
activations only: a walk costs about one dense plus one pruned forward pass, whatever the depth. Consecutive
operators share a walk when that is exact, i.e. when the later one acts only at the classifier, the last site
(``default``: BN recalibration + classifier refit, one walk); otherwise each starts a walk of its own.

Every correction is folded into the model's own parameters, so the repaired model is a plain model of the same
architecture. A ``block`` correction folds into the BN operands of the sum; where the other operand is the
identity stream, the sum's gain cannot be applied to it without changing its other consumers, so it is carried
as a pending per-channel scale D (stored activation = true / D) through positively homogeneous nodes (ReLU,
pooling, flatten, dropout) and folded exactly into the input channels of every Conv2d / Linear that consumes it
and into the BN operand of the next sum. Operators with ``recalibrate_bn`` also recalibrate every BatchNorm as
the walk reaches it, before correcting anything after it: the correction is computed on a recalibrated network
and no later recalibration undoes or repeats it.
"""

from __future__ import annotations

import math
import operator
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torchvision.ops import StochasticDepth, stochastic_depth

from .layers import prunable_layers
from .mask_selection import RULES as MASK_RULES
from .mask_selection import select_mask
from .reconstruction import layer_statistics, reconstruct_layer
from .stats import Moments, accumulate

_EPS_VAR = 1e-12  # variances below this count as zero
_DEAD_RELATIVE = 1e-5  # variance / second moment below this: a constant ("dead") channel
_MIN_STREAM_GAIN = 1e-6  # a gain carried through the identity stream must stay positive

# ----------------------------------------------------------------------------- operators


class SiteHooks:
    """What an operator does at each kind of site; the defaults do nothing."""

    recalibrate_bn: bool = False

    @property
    def sites(self) -> frozenset[str]:
        return frozenset()

    def at_bn(self, bn: nn.Module, bn_dense: nn.Module, m: Moments) -> None:
        return None

    def block_correction(self, m: Moments) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-channel (g, b) for a residual sum, from the moments of (pruned sum, dense sum)."""
        return None

    def classifier_input_correction(self, m: Moments) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-feature (g, b) for the classifier's input, from the moments of (pruned, dense) features."""
        return None

    def damping_for(self, is_classifier: bool) -> float | None:
        """Relative ridge damping if this operator reconstructs the layer (a classifier or not), else None."""
        return None


@dataclass
class BNRecalibration(SiteHooks):
    """Reset each BN's running statistics to the pruned network's exact population statistics.

    Equivalent to ``torch.optim.swa_utils.update_bn`` (momentum=None) on data given as one
    batch, but progressive and reduced as sums across processes, so it does not depend on
    how the calibration set is batched or sharded. Dropout stays off.
    """

    op: Literal["bn_recalibration"] = "bn_recalibration"

    @property
    def sites(self) -> frozenset[str]:
        return frozenset({"bn"})

    def at_bn(self, bn: nn.Module, bn_dense: nn.Module, m: Moments) -> None:
        recalibrate(bn, m)


def recalibrate(bn: nn.Module, m: Moments) -> None:
    """Set bn's running statistics to the population statistics of its input (moments of (pruned, dense))."""
    n = m.count
    var = m.cov[0, 0] * (n / (n - 1)) if n > 1 else m.cov[0, 0]  # BN keeps the unbiased variance
    bn.running_mean.copy_(m.mean[0])
    bn.running_var.copy_(var.clamp_min(0))


VM_SITES = ("bn", "block", "classifier_input")


@dataclass
class VarianceMatching(SiteHooks):
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
    site: str | tuple[str, ...] = "bn"
    granularity: Literal["layer", "channel"] = "channel"
    estimator: Literal["vm", "ls"] = "vm"
    shrinkage: Literal["none", "adaptive"] = "none"
    clip: tuple[float, float] | None = None
    match_mean: bool = True
    recalibrate_bn: bool = False

    def __post_init__(self):
        self.site = (self.site,) if isinstance(self.site, str) else tuple(self.site)
        if not self.site or any(s not in VM_SITES for s in self.site):
            raise ValueError(f"variance_matching.site: {list(self.site)!r} must be one or more of {VM_SITES}")
        for name, allowed in (("granularity", ("layer", "channel")), ("estimator", ("vm", "ls")),
                              ("shrinkage", ("none", "adaptive"))):  # fmt: skip
            if getattr(self, name) not in allowed:
                raise ValueError(f"variance_matching.{name}: {getattr(self, name)!r} is not one of {allowed}")
        if self.clip is not None:
            lo, hi = self.clip = tuple(float(v) for v in self.clip)
            if not 0 <= lo <= 1 <= hi or not math.isfinite(hi):
                raise ValueError(f"variance_matching.clip must satisfy 0 <= lo <= 1 <= hi < inf, got {self.clip}")
        if self.shrinkage == "adaptive" and self.granularity == "layer":
            raise ValueError("variance_matching: adaptive shrinkage needs granularity 'channel'")
        if not isinstance(self.recalibrate_bn, bool):
            raise ValueError(f"variance_matching.recalibrate_bn must be true or false, got {self.recalibrate_bn!r}")

    @property
    def sites(self) -> frozenset[str]:
        named = {"bn": "bn", "block": "block", "classifier_input": "classifier"}
        return frozenset({named[s] for s in self.site} | ({"bn"} if self.recalibrate_bn else set()))

    def at_bn(self, bn: nn.Module, bn_dense: nn.Module, m: Moments) -> None:
        if "bn" not in self.site:
            return
        a_p, c_p = _bn_affine(bn)
        a_d, c_d = _bn_affine(bn_dense)
        cov = m.cov
        g, b = self.correction(a_p.square() * cov[0, 0], a_d.square() * cov[1, 1], a_p * a_d * cov[0, 1],
                               a_p * m.mean[0] + c_p, a_d * m.mean[1] + c_d)  # fmt: skip
        fold_affine(bn, g, b)

    def block_correction(self, m: Moments) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self._of_moments(m) if "block" in self.site else None

    def classifier_input_correction(self, m: Moments) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self._of_moments(m) if "classifier_input" in self.site else None

    def _of_moments(self, m: Moments) -> tuple[torch.Tensor, torch.Tensor]:
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
        alive = var_p > _DEAD_RELATIVE * (var_p + mean_p.square()) + _EPS_VAR
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
class Reconstruct(SiteHooks):
    """Re-solve every prunable layer's kept weights (and bias) by masked ridge least squares, so that the layer,
    fed the pruned, already-repaired network's input, reproduces the dense layer's output (reconstruction.py).

    Args:
        layers: ``all`` prunable layers in forward order, or only the ``classifier``.
        damping: ridge strength relative to the mean diagonal of the layer's input Gram (0.001 = 0.1%, as the
            classifier refit's ridge; README: 0.01 loses 0.4-0.6 points at LAMP 97-98%).
        recalibrate_bn: recalibrate every BN as the walk reaches it (after the layer before it is reconstructed).
            ``false`` keeps the dense network's BN statistics instead, and fits a bias-free layer that only a BN reads
            with an intercept, folded into that BN's running mean: the pair is reconstructed as one affine layer
            (the ``reconstruct_dense_bn`` preset; README: better at 97-98%, slightly worse at 95%).
        mask: ``magnitude`` keeps the masks as given; ``wanda`` (|w| * ||x_j||) and ``obs_oneshot`` (w^2 / [H^-1]_jj)
            re-select each layer's mask from the dense weights and the Gram of its repaired input, keeping the
            allocation's count per layer.
        mask_scope: where a re-selected mask's weights compete: across the whole ``layer`` (top-k of the layer), or
            within each output ``row`` (the same count in every row, as Wanda compares them; the remainder goes to
            the rows whose next weight scores highest).
    """

    op: Literal["reconstruct"] = "reconstruct"
    layers: Literal["all", "classifier"] = "all"
    damping: float = 0.001
    recalibrate_bn: bool = True
    mask: Literal["magnitude", "wanda", "obs_oneshot"] = "magnitude"
    mask_scope: Literal["layer", "row"] = "layer"

    def __post_init__(self):
        _check_damping("reconstruct.damping", self.damping)
        if self.layers not in ("all", "classifier"):
            raise ValueError(f"reconstruct.layers: {self.layers!r} is not one of ('all', 'classifier')")
        if self.mask not in ("magnitude", *MASK_RULES):
            raise ValueError(f"reconstruct.mask: {self.mask!r} is not one of {('magnitude', *MASK_RULES)}")
        if self.mask_scope not in ("layer", "row"):
            raise ValueError(f"reconstruct.mask_scope: {self.mask_scope!r} is not one of ('layer', 'row')")
        if self.mask_scope == "row" and self.mask == "magnitude":
            raise ValueError("reconstruct.mask_scope: 'row' re-selects masks, so it needs a mask rule other than 'magnitude'")
        if not isinstance(self.recalibrate_bn, bool):
            raise ValueError(f"reconstruct.recalibrate_bn must be true or false, got {self.recalibrate_bn!r}")

    @property
    def sites(self) -> frozenset[str]:
        return frozenset({"classifier"} | ({"layer"} if self.layers == "all" else set())
                         | ({"bn"} if self.recalibrate_bn else set()))  # fmt: skip

    def damping_for(self, is_classifier: bool) -> float | None:
        return self.damping if self.layers == "all" or is_classifier else None


@dataclass
class ClassifierRefit(SiteHooks):
    """Refit the classifier's kept weights and bias by ridge least squares to the dense logits: the label-free,
    closed-form analogue of re-training the last layer (the classifier case of ``reconstruct``).

    Args:
        ridge: ridge strength relative to the mean feature energy (0 = plain least squares, made well posed
            by a 1e-9 floor).
    """

    op: Literal["classifier_refit"] = "classifier_refit"
    ridge: float = 1e-3

    def __post_init__(self):
        _check_damping("classifier_refit.ridge", self.ridge)

    @property
    def sites(self) -> frozenset[str]:
        return frozenset({"classifier"})

    def damping_for(self, is_classifier: bool) -> float | None:
        return self.ridge if is_classifier else None


def _check_damping(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, 0 where the denominator vanishes, never negative (a gain flips no sign)."""
    return torch.where(den > _EPS_VAR, num / den.clamp_min(_EPS_VAR), torch.zeros_like(num)).clamp_min(0)


def _ratio_sqrt(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return _ratio(num.clamp_min(0), den).sqrt()


def _rho2(cov: torch.Tensor, var_a: torch.Tensor, var_b: torch.Tensor) -> torch.Tensor:
    """Squared correlation, 0 where either variance vanishes."""
    den = var_a * var_b
    return torch.where(den > _EPS_VAR**2, cov.square() / den.clamp_min(_EPS_VAR**2), torch.zeros_like(cov)).clamp(0, 1)


def _bn_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
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


# ----------------------------------------------------------------------------- recipes

Operator = BNRecalibration | VarianceMatching | Reconstruct | ClassifierRefit
OPERATORS: dict[str, type] = {
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
        if isinstance(step, SiteHooks):
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
    """The walks that run ``ops`` in the order written: an operator acting only at the classifier (the last site)
    joins the walk before it, which is exact; any other operator starts a walk."""
    walks: list[list[Operator]] = []
    for op in ops:
        if walks and op.sites <= {"classifier"}:
            walks[-1].append(op)
        else:
            walks.append([op])
    return walks


# ----------------------------------------------------------------------------- engine


@dataclass
class RepairReport:
    """What the engine did: the walks (operator names), the sites, the gains of block/classifier-input corrections,
    and at each BN site the per-channel variance ratio pruned/dense of the BN output, with every upstream site
    already repaired, before and after this site's operators (before = the ratio of the BN inputs, as the pruned
    BN still holds the dense parameters there); ``masks`` when an operator re-selected them."""

    walks: list[list[str]] = field(default_factory=list)
    bn_sites: list[str] = field(default_factory=list)
    block_sites: list[str] = field(default_factory=list)
    layer_sites: list[str] = field(default_factory=list)
    gains: dict[str, torch.Tensor] = field(default_factory=dict)
    variance_ratio: dict[str, torch.Tensor] = field(default_factory=dict)
    variance_ratio_after: dict[str, torch.Tensor] = field(default_factory=dict)
    masks: dict[str, torch.Tensor] | None = None
    timings: dict[str, float] = field(default_factory=dict)  # seconds in reconstruction's statistics and solves


class UntraceableModelError(TypeError):
    """The model cannot be traced by torch.fx, so the repair engine cannot walk it."""


class UnfoldableCorrectionError(ValueError):
    """A correction cannot be folded into the model's parameters at this node."""


def trace(model: nn.Module) -> fx.Graph:
    try:
        return fx.symbolic_trace(model).graph
    except Exception as err:
        raise UntraceableModelError(
            f"{type(model).__name__} is not traceable by torch.fx ({err}); the repair engine needs a "
            "static graph (no data-dependent control flow in forward)"
        ) from err


_BATCHNORM = nn.modules.batchnorm._BatchNorm
_ADD = (operator.add, operator.iadd, torch.add)
# nodes that commute with a positive per-channel scale (channel dim 1 kept, or flattened channel-major)
_HOMOGENEOUS_MODULES = (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
                        nn.Flatten, nn.Dropout, nn.Identity)  # fmt: skip
_HOMOGENEOUS_FUNCTIONS = (F.relu, torch.relu, torch.flatten, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
                          F.adaptive_max_pool2d, F.dropout)  # fmt: skip
_HOMOGENEOUS_METHODS = ("relu", "relu_", "flatten")
_EVAL_IDENTITY = (nn.Identity, nn.Dropout, nn.Dropout2d, StochasticDepth)  # modules that are x -> x in eval mode


# ----------------------------------------------------------------------------- activation stores

Activations = Literal["device", "host", "disk"]


class ActivationStore:
    """The per-chunk activations of graph nodes, kept on the models' device (``activations: device``).

    ``store[node] = chunks`` stores the chunks one by one as the iterable yields them; ``store[node]`` iterates
    over them (as often as asked), each brought to the device as it is reached. Subclasses keep them elsewhere.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.chunks: dict[fx.Node, list] = {}

    def __setitem__(self, node: fx.Node, chunks: Iterable) -> None:
        stored = [self._put(chunk) for chunk in chunks]
        for old in self.chunks.get(node, ()):  # only now: the new chunks may be computed from the old ones
            self._drop(old)
        self.chunks[node] = stored

    def __getitem__(self, node: fx.Node) -> Iterable:
        return _Chunks(self, node)

    def replace(self, node: fx.Node, index: int, value) -> None:
        old, self.chunks[node][index] = self.chunks[node][index], self._put(value)
        self._drop(old)

    def pop(self, node: fx.Node) -> None:
        for old in self.chunks.pop(node):
            self._drop(old)

    def _put(self, value):
        return value

    def _load(self, stored):
        return stored

    def _drop(self, stored) -> None:
        return None


@dataclass
class _Chunks:
    store: ActivationStore
    node: fx.Node

    def __iter__(self) -> Iterator:
        return map(self.store._load, self.store.chunks[self.node])


class HostStore(ActivationStore):
    """In host memory, pinned when the device is a GPU (faster copies), a chunk on the device only while read."""

    def _put(self, value):
        return _map_tensors(value, self._to_host)

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to("cpu")  # the tensor itself on a CPU device: nothing is copied
        return t.pin_memory() if self.device.type == "cuda" else t

    def _load(self, stored):
        return _map_tensors(stored, lambda t: t.to(self.device, non_blocking=True))


class DiskStore(ActivationStore):
    """In a temporary directory, one file per node and chunk, deleted as soon as no later node reads it.

    torch.save / torch.load(weights_only=True): loading runs no pickled code, and the files keep any node value
    (a tensor with its dtype, strides and memory format, tuples of tensors, sizes) exactly. A view is saved with
    its whole storage (exact, and rare in CNNs).
    """

    def __init__(self, device: torch.device, directory: str):
        super().__init__(device)
        self.directory = Path(tempfile.mkdtemp(dir=directory))  # one per store: file names restart at 0
        self.serial = 0

    def _put(self, value) -> Path:
        path, self.serial = self.directory / f"{self.serial}.pt", self.serial + 1
        torch.save(value, path)
        return path

    def _load(self, path: Path):
        return torch.load(path, map_location=self.device, weights_only=True)

    def _drop(self, path: Path) -> None:
        path.unlink()


STORES: dict[str, type[ActivationStore]] = {"device": ActivationStore, "host": HostStore, "disk": DiskStore}


@contextmanager
def _store_factory(activations: Activations, device: torch.device) -> Iterator[Callable[[], ActivationStore]]:
    """Makes the walks' stores; the disk stores' directory is deleted on exit, also on error."""
    if activations != "disk":
        yield lambda: STORES[activations](device)
        return
    with tempfile.TemporaryDirectory(prefix="lightning-repair-") as directory:
        yield lambda: DiskStore(device, directory)


def _map_tensors(value, fn: Callable[[torch.Tensor], torch.Tensor]):
    """A node's value (a tensor, tuples or lists of them, anything else) with ``fn`` applied to every tensor."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if type(value) in (tuple, list):
        return type(value)(_map_tensors(v, fn) for v in value)
    return value


@torch.no_grad()
def repair(
    pruned: nn.Module,
    dense: nn.Module,
    batches: Iterable[torch.Tensor],
    recipe: str | Sequence[dict | Operator],
    progress: Callable[[Iterable], Iterable] | None = None,
    masks: Mapping[str, torch.Tensor] | None = None,
    activations: Activations = "device",
) -> RepairReport:
    """Repair ``pruned`` in place from unlabeled ``batches``, using ``dense`` as the target.

    ``pruned`` and ``dense`` share an architecture; ``dense`` and ``batches`` are not modified. Both models run
    in eval mode (dropout off). ``masks`` (per prunable layer name) are the weights reconstruction may use; by
    default every non-zero weight. ``progress`` wraps each walk's node loop (e.g. tqdm) when given.
    ``activations`` is where a walk keeps the live activations of every calibration chunk: on the models'
    ``device``; in ``host`` memory, each chunk moved to the device only while a node runs on it (device memory
    then does not grow with the calibration set); or on ``disk``, in a temporary directory deleted when the repair
    ends (nor does host memory). The repaired model is the same bit for bit.
    """
    if activations not in STORES:
        raise ValueError(f"repair: activations {activations!r} is not one of {tuple(STORES)}")
    ops = parse_recipe(recipe)
    report = RepairReport()
    if not ops:
        return report
    batches = list(batches)
    if not batches:
        raise ValueError("repair needs calibration data: the calibration loader yielded no batch")
    if any(not isinstance(b, torch.Tensor) for b in batches):
        raise TypeError("calibration batches must be image tensors (labels never reach the repair)")
    dtype = next(pruned.parameters()).dtype
    others = sorted({str(b.dtype) for b in batches if b.dtype != dtype})
    if others:
        raise TypeError(f"calibration batches have dtype {', '.join(others)}, the model {dtype}: cast one to the other")
    if masks is None:
        masks = {layer.name: layer.module.weight != 0 for layer in prunable_layers(pruned)}
    masks = {name: mask.to(torch.bool) for name, mask in masks.items()}
    modes = (pruned.training, dense.training)
    pruned.eval(), dense.eval()
    try:
        with _store_factory(activations, next(pruned.parameters()).device) as new_store:
            for walk in plan_walks(ops):
                _Walk(pruned, dense, batches, walk, masks, report, new_store).run(progress)
    finally:
        pruned.train(modes[0]), dense.train(modes[1])
    if any(getattr(op, "mask", "magnitude") != "magnitude" for op in ops):
        report.masks = masks
    return report


class _Walk:
    """One progressive pass of a group of operators over the traced graph (see the module docstring)."""

    def __init__(self, pruned, dense, batches, ops, masks, report, new_store):
        self.ops, self.masks, self.report, self.batches = ops, masks, report, batches
        self.graph = trace(pruned)
        self.mods_p, self.mods_d = dict(pruned.named_modules()), dict(dense.named_modules())
        self.nodes = list(self.graph.nodes)
        linears = [
            n.target for n in self.nodes if n.op == "call_module" and isinstance(self.mods_p[n.target], nn.Linear)
        ]
        self.classifier = linears[-1] if linears else None  # the last Linear, as in layers.prunable_layers
        self.recalibrate = any(op.recalibrate_bn for op in ops)
        self.env_p, self.env_d = new_store(), new_store()  # node -> its per-chunk activations
        self.scale: dict[fx.Node, torch.Tensor] = {}  # pending per-channel scale: true activation = scale * stored
        report.walks.append([op.op for op in ops])

    def run(self, progress) -> None:
        last_use = {inp: i for i, node in enumerate(self.nodes) for inp in node.all_input_nodes}
        for index, node in enumerate(progress(self.nodes) if progress else self.nodes):
            if node.op == "placeholder":  # clones: an in-place first op must not touch the caller's batches
                self.env_p[node] = (b.clone() for b in self.batches)
                self.env_d[node] = (b.clone() for b in self.batches)
                continue
            if node.op == "output":
                pending = [a for a in node.all_input_nodes if a in self.scale]
                if pending:
                    raise UnfoldableCorrectionError(f"a stream correction reaches the model output through {pending}")
                break
            module = self.mods_p.get(node.target) if node.op == "call_module" else None
            self._fold_pending(node, module)
            if isinstance(module, _BATCHNORM):
                self._at_bn(node, module)
            if self._is_block(node) and any("block" in op.sites for op in self.ops):
                self._at_block(node)
            read_later = {inp for inp in node.all_input_nodes if last_use[inp] > index}
            self.env_d[node] = _run(node, self.env_d, self.mods_d, len(self.batches), read_later)
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                self._at_layer(node, module)
            self.env_p[node] = _run(node, self.env_p, self.mods_p, len(self.batches), read_later)
            for inp in node.all_input_nodes:  # free activations nobody needs any more
                if inp not in read_later:
                    self.env_p.pop(inp), self.env_d.pop(inp)

    # -- pending scales of the identity stream

    def _fold_pending(self, node: fx.Node, module: nn.Module | None) -> None:
        """Carry a pending scale through ``node`` or fold it into the layer it reaches."""
        pending = [a for a in node.all_input_nodes if a in self.scale]
        if not pending or self._is_block(node):
            return
        if len(pending) > 1:
            raise UnfoldableCorrectionError(f"node {node.name} combines several rescaled streams {pending}")
        (source,) = pending
        d = self.scale[source]
        if _is_homogeneous(node, module) and len(node.all_input_nodes) == 1:
            self.scale[node] = d
        elif isinstance(module, nn.Conv2d) and node.args[0] is source:
            w = module.weight
            per_group = w.shape[1]
            d = d.view(module.groups, 1, per_group).expand(module.groups, w.shape[0] // module.groups, per_group)
            w.mul_(d.reshape(w.shape[0], per_group, 1, 1).to(w.dtype))
        elif isinstance(module, nn.Linear) and node.args[0] is source and module.in_features % d.numel() == 0:
            module.weight.mul_(d.repeat_interleave(module.in_features // d.numel()).to(module.weight.dtype))
        else:
            raise UnfoldableCorrectionError(
                f"a residual-sum correction cannot be folded through node {node.name} ({node.op} {node.target}): "
                "use variance_matching site bn or classifier_input for this model"
            )

    def _is_block(self, node: fx.Node) -> bool:
        """A residual sum: two tensor operands, at least one a BN output used nowhere else."""
        if node.op != "call_function" or node.target not in _ADD or len(node.args) != 2:
            return False
        return all(isinstance(a, fx.Node) for a in node.args) and any(self._bn_operand(a) for a in node.args)

    def _bn_operand(self, a: fx.Node) -> bool:
        return self._bn_of(a) is not None

    def _bn_of(self, a: fx.Node) -> fx.Node | None:
        """The BN whose output ``a`` is, directly or through modules that are the identity in eval mode (dropout,
        stochastic depth), each used only on that path; else None."""
        while len(a.users) == 1 and self._is_eval_identity(a):
            a = a.args[0]
        if a.op == "call_module" and isinstance(self.mods_p[a.target], _BATCHNORM) and len(a.users) == 1:
            return a
        return None

    def _is_eval_identity(self, node: fx.Node) -> bool:
        if node.op == "call_module":
            return isinstance(self.mods_p[node.target], _EVAL_IDENTITY)
        # torchvision's StochasticDepth traces to stochastic_depth(x, p, mode, training), the identity untrained
        return node.op == "call_function" and node.target is stochastic_depth and node.args[3:4] == (False,)

    # -- sites

    def _at_bn(self, node: fx.Node, bn: nn.Module) -> None:
        name = node.target
        if any("bn" in op.sites for op in self.ops) and bn.running_var is None:
            raise ValueError(f"BatchNorm {name} tracks no running statistics (track_running_stats=False): "
                             f"{', '.join(op.op for op in self.ops)} cannot act on it")  # fmt: skip
        x_p, x_d = self.env_p[node.args[0]], self.env_d[node.args[0]]
        m = accumulate(zip(x_p, x_d, strict=True)).check_finite(f"BN input of {name}")
        ratio = m.cov[0, 0] / m.cov[1, 1].clamp_min(_EPS_VAR)
        if self.recalibrate:
            recalibrate(bn, m)
        for op in self.ops:
            op.at_bn(bn, self.mods_d[name], m)
        if name not in self.report.bn_sites:
            self.report.bn_sites.append(name)
        self.report.variance_ratio[name] = ratio.float().cpu()
        if bn.running_var is not None:  # eval-mode BN is a * x + c per channel
            a_p, a_d = (_bn_affine(b)[0].to(ratio) for b in (bn, self.mods_d[name]))
            self.report.variance_ratio_after[name] = (
                (ratio * a_p.square() / a_d.square().clamp_min(_EPS_VAR)).float().cpu()
            )

    def _at_block(self, node: fx.Node) -> None:
        """Correct the whole sum per channel; fold into its BN operand(s), carrying the identity's share as a scale."""
        operands = list(node.args)
        streams = [a for a in operands if not self._bn_operand(a)]
        if len(streams) > 1 or (len(operands) == 2 and operands[0] is operands[1]):
            raise UnfoldableCorrectionError(f"residual sum {node.name}: no BatchNorm operand to fold a correction into")
        channels = self.mods_p[next(self._bn_of(a) for a in operands if self._bn_operand(a)).target].num_features
        ones = torch.ones(channels, dtype=torch.float64, device=next(self.mods_p[""].parameters()).device)
        scales = {a: self.scale.get(a, ones) for a in operands}  # true operand = scale * stored
        for op in (op for op in self.ops if "block" in op.sites):  # others (a classifier refit) skip the moments
            # chunk by chunk: the pruned sum (true operands) and the dense sum are never held for all chunks
            true = (sum(t * _per_channel(scales[a], t) for a, t in zip(operands, chunk, strict=True))
                    for chunk in zip(*(self.env_p[a] for a in operands), strict=True))  # fmt: skip
            z_d = (a + b for a, b in zip(self.env_d[operands[0]], self.env_d[operands[1]], strict=True))
            m = accumulate(zip(true, z_d, strict=True)).check_finite(f"residual sum {node.name}")
            correction = op.block_correction(m)
            if correction is None:
                continue
            g, b = correction
            if streams:  # the stream cannot be rescaled: the sum keeps its scale, times g, as pending
                g = g.clamp_min(_MIN_STREAM_GAIN)
                out = g * scales[streams[0]]
            else:
                out = ones
            for i, a in enumerate(a for a in operands if a not in streams):
                factor, shift = g * scales[a] / out, (b if i == 0 else torch.zeros_like(b)) / out
                fold_affine(self.mods_p[self._bn_of(a).target], factor, shift)
                self.env_p[a] = (t * _per_channel(factor, t) + _per_channel(shift, t) for t in self.env_p[a])
            scales = {a: out for a in operands}
            self.report.gains[node.name] = g.float().cpu()
        if node.name not in self.report.block_sites:
            self.report.block_sites.append(node.name)
        out = scales[operands[0]]
        if not torch.equal(out, ones):
            self.scale[node] = out

    def _at_layer(self, node: fx.Node, module: nn.Conv2d | nn.Linear) -> None:
        name, is_classifier = node.target, node.target == self.classifier
        for op in self.ops:
            if is_classifier:
                self._correct_classifier_input(node, module, op)
            damping = op.damping_for(is_classifier)
            if damping is None or name not in self.masks:
                continue
            with timed(self.report.timings, "reconstruction_statistics"):
                stats = layer_statistics(module, self.env_p[node.args[0]], self.env_d[node])
            with timed(self.report.timings, "reconstruction_solve"):
                if getattr(op, "mask", "magnitude") != "magnitude":
                    self.masks[name] = select_mask(
                        op.mask, op.mask_scope, self.mods_d[name].weight, stats, self.masks[name], damping
                    )
                # BNs that keep the dense statistics: a bias-free layer read only by a BN gets an intercept,
                # folded into that BN's mean (BN(y + b) is BN with mean - b): the pair is one affine layer
                bn = None if self.recalibrate or module.bias is not None else self._bn_after(node)
                intercept = reconstruct_layer(
                    module, stats, self.masks[name], damping, name, intercept=True if bn is not None else None
                )
                if intercept is not None:
                    bn.running_mean.sub_(intercept.to(bn.running_mean.dtype))
            if name not in self.report.layer_sites:
                self.report.layer_sites.append(name)

    def _bn_after(self, node: fx.Node) -> nn.Module | None:
        """The BatchNorm (with running statistics) that is the only reader of ``node``, else None."""
        if len(node.users) != 1:
            return None
        (user,) = node.users
        module = self.mods_p.get(user.target) if user.op == "call_module" else None
        return module if isinstance(module, _BATCHNORM) and module.running_mean is not None else None

    def _correct_classifier_input(self, node: fx.Node, linear: nn.Linear, op: SiteHooks) -> None:
        if "classifier" not in op.sites or op.damping_for(True) is not None:  # no input correction: skip the moments
            return
        x_p, x_d = self.env_p[node.args[0]], self.env_d[node.args[0]]
        m = accumulate((p.reshape(len(p), -1), d.reshape(len(d), -1)) for p, d in zip(x_p, x_d, strict=True))
        correction = op.classifier_input_correction(m.check_finite(f"input of {node.target}"))
        if correction is None:
            return
        g, b = (t.to(linear.weight.dtype) for t in correction)
        if linear.bias is None and bool((b != 0).any()):
            raise UnfoldableCorrectionError(f"{node.target} has no bias to absorb a classifier-input shift")
        if linear.bias is not None:
            linear.bias.add_(linear.weight @ b)
        linear.weight.mul_(g)
        self.report.gains[f"{node.target}@input"] = g.float().cpu()


@contextmanager
def timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Add the wall time of the block to ``timings[key]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - start


def _per_channel(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-channel ``values`` shaped to broadcast over ``like`` (channels in dimension 1), in its dtype."""
    return values.view((1, -1) + (1,) * (like.dim() - 2)).to(like.dtype)


def _is_homogeneous(node: fx.Node, module: nn.Module | None) -> bool:
    if node.op == "call_module":
        return isinstance(module, _HOMOGENEOUS_MODULES)
    if node.op == "call_function":
        return node.target in _HOMOGENEOUS_FUNCTIONS
    return node.op == "call_method" and node.target in _HOMOGENEOUS_METHODS


def _run(
    node: fx.Node, env: ActivationStore, modules: dict[str, nn.Module], n_chunks: int, read_later: set[fx.Node]
) -> Iterator:
    """Evaluate one graph node chunk by chunk, yielding each chunk's output as soon as it is computed.

    An input that the node changed in place (``out += identity``, an in-place ReLU) and that a later node reads is
    written back to ``env``: a stored copy (host, disk) would otherwise keep the value from before the change.
    """
    chunks = {a: iter(env[a]) for a in node.all_input_nodes}
    for i in range(n_chunks):
        inputs = {a: next(it) for a, it in chunks.items()}
        versions = {a: t._version for a, t in inputs.items() if a in read_later and isinstance(t, torch.Tensor)}
        args = fx.node.map_arg(node.args, inputs.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, inputs.__getitem__)
        if node.op == "call_module":
            output = modules[node.target](*args, **kwargs)
        elif node.op == "call_function":
            output = node.target(*args, **kwargs)
        elif node.op == "call_method":
            self_obj, *rest = args
            output = getattr(self_obj, node.target)(*rest, **kwargs)
        elif node.op == "get_attr":
            output = _fetch_attr(modules[""], node.target)
        else:
            raise NotImplementedError(f"unsupported graph node {node.op}")
        for a, version in versions.items():
            if inputs[a]._version != version:
                env.replace(a, i, inputs[a])
        yield output


def _fetch_attr(root: nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
