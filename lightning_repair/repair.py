"""Label-free repair: operators and the progressive engine that applies them.

Operators (DESIGN.md section 3) act at *sites* and fold their corrections into the pruned
model's own parameters, so the result is a plain model with no hooks:

- ``bn`` sites are BatchNorm layers. The statistics are those of the BN input in the
  pruned and the dense network; the BN output moments follow analytically from them and
  the BN parameters, so several operators can act at one site without another pass.
- ``block`` sites are residual additions ``r + s`` whose first operand ``r`` is a BN output
  (torchvision's ``out += identity``). A correction there rescales the residual branch
  so that the *sum* matches the dense sum; it is folded into that BN's gamma/beta and acts
  after the add, where no BatchNorm renormalises it.

The engine traces the model with torch.fx and walks the graph node by node over the
whole calibration set, for the dense and the pruned model in lockstep, keeping only live
activations. Each site is corrected from activations produced by the already-corrected
layers before it (progressive), yet every layer runs once per model: the whole repair
costs about one dense plus one pruned forward pass, whatever the depth.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
import torch.fx as fx
from torch import nn

from .stats import Moments, accumulate, all_reduce_sum

_EPS_VAR = 1e-12  # variances below this count as zero
_DEAD_RELATIVE = 1e-5  # variance / second moment below this: a constant ("dead") channel


# ----------------------------------------------------------------------------- operators


class SiteHooks:
    """The sites an operator may act at; each hook does nothing unless the operator overrides it."""

    def at_bn(self, bn: nn.Module, bn_dense: nn.Module, m: Moments) -> None:
        return None

    def at_block(self, bn: nn.Module, m: Moments) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None

    def at_classifier(self, linear: nn.Linear, x_p: list[torch.Tensor], z_d: list[torch.Tensor]) -> None:
        return None


@dataclass
class BNRecalibration(SiteHooks):
    """Reset each BN's running statistics to the pruned network's exact population statistics.

    Equivalent to ``torch.optim.swa_utils.update_bn`` (momentum=None) on data given as one
    batch, but progressive and reduced as sums across processes, so it does not depend on
    how the calibration set is batched or sharded. Dropout stays off.
    """

    op: Literal["bn_recalibration"] = "bn_recalibration"

    def at_bn(self, bn: nn.BatchNorm2d, bn_dense: nn.Module, m: Moments) -> None:
        n = m.count
        var = m.cov[0, 0] * (n / (n - 1)) if n > 1 else m.cov[0, 0]  # BN keeps the unbiased variance
        bn.running_mean.copy_(m.mean[0])
        bn.running_var.copy_(var.clamp_min(0))


@dataclass
class VarianceMatching(SiteHooks):
    """Match the pruned network's activation statistics to the dense network's.

    Args:
        site: ``bn`` (each BN output) or ``block`` (residual sums, via the branch's BN).
        granularity: ``layer`` (one gain per layer) or ``channel`` (one gain per channel).
        estimator: ``vm`` (gain sqrt(var_d / var_p): variances match) or ``ls`` (least-squares
            gain cov_pd / var_p: the best linear estimate of the dense activation, which
            shrinks channels whose pruned activation is weakly correlated with the dense one).
        shrinkage: ``none`` or ``adaptive`` (ASR): each channel gain is pulled toward the
            layer gain in log space with weight rho_c**2, the share of the pruned channel's
            variance explained by the dense channel, so channels with a weak post-pruning
            signal get the layer's correction instead of their own noisy one.
        clip: bounds [lo, hi] for every gain (clipped ASR), or None.
        match_mean: also shift each channel so its mean equals the dense mean.

    Dead channels get finite gains: zero pruned variance gives gain 1 (nothing to scale;
    with ``match_mean`` the channel is set to the dense mean), zero dense variance gives 0.
    """

    op: Literal["variance_matching"] = "variance_matching"
    site: Literal["bn", "block"] = "bn"
    granularity: Literal["layer", "channel"] = "channel"
    estimator: Literal["vm", "ls"] = "vm"
    shrinkage: Literal["none", "adaptive"] = "none"
    clip: tuple[float, float] | None = None
    match_mean: bool = True

    def __post_init__(self):
        for name, allowed in (("site", ("bn", "block")), ("granularity", ("layer", "channel")),
                              ("estimator", ("vm", "ls")), ("shrinkage", ("none", "adaptive"))):  # fmt: skip
            if getattr(self, name) not in allowed:
                raise ValueError(f"variance_matching.{name}: {getattr(self, name)!r} is not one of {allowed}")
        if self.clip is not None:
            lo, hi = self.clip = tuple(float(v) for v in self.clip)
            if not 0 <= lo <= 1 <= hi or not math.isfinite(hi):
                raise ValueError(f"variance_matching.clip must satisfy 0 <= lo <= 1 <= hi < inf, got {self.clip}")
        if self.shrinkage == "adaptive" and self.granularity == "layer":
            raise ValueError("variance_matching: adaptive shrinkage needs granularity 'channel'")

    def at_bn(self, bn: nn.Module, bn_dense: nn.Module, m: Moments) -> None:
        if self.site != "bn":
            return
        a_p, c_p = _bn_affine(bn)
        a_d, c_d = _bn_affine(bn_dense)
        cov = m.cov
        var_p, var_d, cov_pd = a_p.square() * cov[0, 0], a_d.square() * cov[1, 1], a_p * a_d * cov[0, 1]
        if self.estimator == "vm":
            g_channel, g_layer = _ratio_sqrt(var_d, var_p), _ratio_sqrt(var_d.sum(), var_p.sum())
        else:
            g_channel, g_layer = _ratio(cov_pd, var_p), _ratio(cov_pd.sum(), var_p.sum())
        g, b = self._finish(g_channel, g_layer, _rho2(cov_pd, var_p, var_d), var_p,
                            a_p * m.mean[0] + c_p, a_d * m.mean[1] + c_d)  # fmt: skip
        fold_affine(bn, g, b)

    def at_block(self, bn: nn.Module, m: Moments) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Correct the branch r so that g*r + b + s_p estimates z_d; ``m`` holds moments of (r_p, s_p, z_d).

        The branch's target is t = z_d - s_p. ``ls``: g = cov(r, t) / var(r). ``vm``: g is the
        positive root of var(g r + s_p) = var(z_d), i.e. var_r g^2 + 2 cov_rs g + var_s - var_z = 0.
        """
        if self.site != "block":
            return None
        cov, mean = m.cov, m.mean
        var_r, cov_rs, var_s, var_z = cov[0, 0], cov[0, 1], cov[1, 1], cov[2, 2]
        cov_rt, var_t = cov[0, 2] - cov_rs, var_z - 2 * cov[1, 2] + var_s
        if self.estimator == "ls":
            g_channel, g_layer = _ratio(cov_rt, var_r), _ratio(cov_rt.sum(), var_r.sum())
        else:
            g_channel = _quadratic_root(var_r, cov_rs, var_s - var_z)
            g_layer = _quadratic_root(var_r.sum(), cov_rs.sum(), (var_s - var_z).sum())
        g, b = self._finish(g_channel, g_layer, _rho2(cov_rt, var_r, var_t), var_r, mean[0], mean[2] - mean[1])
        fold_affine(bn, g, b)
        return g, b

    def _finish(self, g_channel, g_layer, rho2, var_p, mean_p, mean_d) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (gain, shift) with ``g * y_p + b`` estimating the target; dead channels get g = 1.

        A channel is dead when its variance is indistinguishable from zero at float32 precision
        relative to its second moment (a constant channel, however large its mean).
        """
        alive = var_p > _DEAD_RELATIVE * (var_p + mean_p.square()) + _EPS_VAR
        if self.granularity == "layer":
            g = g_layer.expand_as(g_channel)
        elif self.shrinkage == "adaptive":
            w = torch.where(alive & (g_channel > 0), rho2, torch.zeros_like(rho2))
            g = torch.exp(w * g_channel.clamp_min(1e-12).log() + (1 - w) * g_layer.clamp_min(1e-12).log())
        else:
            g = g_channel
        g = torch.where(alive, g, torch.ones_like(g))
        if self.clip is not None:
            g = g.clamp(*self.clip)
        b = mean_d - g * mean_p if self.match_mean else torch.zeros_like(g)
        return g, b


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, 0 where the denominator vanishes, never negative (a gain flips no sign)."""
    return torch.where(den > _EPS_VAR, num / den.clamp_min(_EPS_VAR), torch.zeros_like(num)).clamp_min(0)


def _ratio_sqrt(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return _ratio(num.clamp_min(0), den).sqrt()


def _rho2(cov: torch.Tensor, var_a: torch.Tensor, var_b: torch.Tensor) -> torch.Tensor:
    """Squared correlation, 0 where either variance vanishes."""
    den = var_a * var_b
    return torch.where(den > _EPS_VAR**2, cov.square() / den.clamp_min(_EPS_VAR**2), torch.zeros_like(cov)).clamp(0, 1)


def _quadratic_root(a: torch.Tensor, half_b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Largest root of a g^2 + 2 half_b g + c = 0, clamped to >= 0 (0 when no real root is positive)."""
    disc = (half_b.square() - a * c).clamp_min(0)
    return _ratio(-half_b + disc.sqrt(), a)


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


@dataclass
class ClassifierRefit(SiteHooks):
    """Refit the classifier's kept weights and bias by ridge least squares, so that the pruned network's
    logits best match the dense network's logits on the calibration images.

    The label-free, closed-form analogue of re-training the last layer: the targets are the dense
    logits, never labels. Each output row is fitted on its kept inputs only, so pruned weights stay
    exactly zero. Sufficient statistics (the Gram matrix of [features, 1] and its cross-product with
    the dense logits) are summed across processes.

    Args:
        ridge: ridge strength relative to the mean feature energy; it keeps rows whose kept features
            are nearly collinear or constant well-posed (0 = plain least squares).
    """

    op: Literal["classifier_refit"] = "classifier_refit"
    ridge: float = 1e-3

    def __post_init__(self):
        if isinstance(self.ridge, bool) or not isinstance(self.ridge, (int, float)) or not 0 <= self.ridge < math.inf:
            raise ValueError(f"classifier_refit.ridge must be a finite number >= 0, got {self.ridge!r}")

    def at_classifier(self, linear: nn.Linear, x_p: list[torch.Tensor], z_d: list[torch.Tensor]) -> None:
        d, bias = linear.in_features, linear.bias is not None
        rows = [torch.cat([x.reshape(-1, d), x.new_ones(x.numel() // d, 1)], 1) if bias else x.reshape(-1, d)
                for x in x_p]  # fmt: skip
        targets = [z.reshape(len(r), -1).double() for r, z in zip(rows, z_d, strict=True)]
        gram = all_reduce_sum(sum(r.double().T @ r.double() for r in rows))
        cross = all_reduce_sum(sum(r.double().T @ z for r, z in zip(rows, targets, strict=True)))
        if not (torch.isfinite(gram).all() and torch.isfinite(cross).all()):
            raise FloatingPointError("non-finite activations at the classifier input: check the checkpoint and data")
        scale = gram.diagonal()[:d].mean().clamp_min(1e-12)
        penalty = torch.full((len(gram),), max(self.ridge, 1e-9) * float(scale), dtype=gram.dtype, device=gram.device)
        if bias:
            penalty[d] = 1e-9 * float(scale)  # the intercept is (almost) not shrunk
        kept = linear.weight != 0
        weight = torch.zeros_like(linear.weight, dtype=torch.float64)
        for j in range(linear.out_features):
            idx = kept[j].nonzero().flatten()
            if bias:
                idx = torch.cat([idx, idx.new_tensor([d])])
            a = gram[idx][:, idx] + torch.diag(penalty[idx])
            solution = torch.linalg.solve(a, cross[idx, j])
            if bias:
                linear.bias[j] = solution[-1].to(linear.bias.dtype)
                solution, idx = solution[:-1], idx[:-1]
            weight[j, idx] = solution
        linear.weight.copy_(weight.to(linear.weight.dtype))


# ----------------------------------------------------------------------------- recipes

Operator = BNRecalibration | VarianceMatching | ClassifierRefit
OPERATORS: dict[str, type] = {
    "bn_recalibration": BNRecalibration,
    "variance_matching": VarianceMatching,
    "classifier_refit": ClassifierRefit,
}

PRESETS: dict[str, list[dict]] = {
    "none": [],
    "bn_recalibration": [{"op": "bn_recalibration"}],
    "layer_vm": [{"op": "variance_matching", "granularity": "layer", "match_mean": False}],
    "asr": [{"op": "variance_matching", "granularity": "channel", "shrinkage": "adaptive"}],
    "clipped_asr": [
        {"op": "variance_matching", "granularity": "channel", "shrinkage": "adaptive", "clip": [0.5, 2.0]}
    ],  # fmt: skip
    # the best recipe on the Fashion-MNIST benchmark (README): BN recalibration, then the classifier refitted
    # in closed form to the dense logits; the variants tried are in configs/sweep/fashion_mnist_repair_variants.yaml
    "default": [{"op": "bn_recalibration"}, {"op": "classifier_refit"}],
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
    return [asdict(op) for op in ops]


# ----------------------------------------------------------------------------- engine


@dataclass
class RepairReport:
    """What the engine did, per site (for histograms): the sites, the gains of block-site operators, and at each
    BN site the per-channel variance ratio pruned/dense of the BN output, with every upstream site already
    repaired, before and after this site's operators (before = the ratio of the BN inputs, as the pruned BN
    still holds the dense parameters there)."""

    bn_sites: list[str] = field(default_factory=list)
    block_sites: list[str] = field(default_factory=list)
    gains: dict[str, torch.Tensor] = field(default_factory=dict)
    variance_ratio: dict[str, torch.Tensor] = field(default_factory=dict)
    variance_ratio_after: dict[str, torch.Tensor] = field(default_factory=dict)


class UntraceableModelError(TypeError):
    """The model cannot be traced by torch.fx, so the repair engine cannot walk it."""


def trace(model: nn.Module) -> fx.Graph:
    try:
        return fx.symbolic_trace(model).graph
    except Exception as err:
        raise UntraceableModelError(
            f"{type(model).__name__} is not traceable by torch.fx ({err}); the repair engine needs a "
            "static graph (no data-dependent control flow in forward)"
        ) from err


def _residual_bn(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node | None:
    """The BN node feeding a residual add as its first operand, if ``node`` is such an add."""
    if node.op != "call_function" or node.target not in (operator.add, operator.iadd, torch.add):
        return None
    if len(node.args) != 2 or not all(isinstance(a, fx.Node) for a in node.args):
        return None
    first = node.args[0]
    if first.op == "call_module" and isinstance(modules.get(first.target), nn.modules.batchnorm._BatchNorm):
        return first
    return None


@torch.no_grad()
def repair(
    pruned: nn.Module,
    dense: nn.Module,
    batches: Iterable[torch.Tensor],
    recipe: str | Sequence[dict | Operator],
    progress: Callable[[Iterable], Iterable] | None = None,
) -> RepairReport:
    """Repair ``pruned`` in place from unlabeled ``batches``, using ``dense`` as the target.

    ``pruned`` and ``dense`` share an architecture; ``dense`` is not modified. Both run in eval
    mode (dropout off). ``progress`` wraps the node loop (e.g. tqdm) when given.
    """
    ops = parse_recipe(recipe)
    report = RepairReport()
    if not ops:
        return report
    batches = [b for b in batches]
    if not batches:
        raise ValueError("repair needs calibration data: the calibration loader yielded no batch")
    if any(not isinstance(b, torch.Tensor) for b in batches):
        raise TypeError("calibration batches must be image tensors (labels never reach the repair)")
    dtype = next(pruned.parameters()).dtype
    others = sorted({str(b.dtype) for b in batches if b.dtype != dtype})
    if others:
        raise TypeError(f"calibration batches have dtype {', '.join(others)}, the model {dtype}: cast one to the other")
    modes = (pruned.training, dense.training)
    pruned.eval(), dense.eval()
    graph = trace(pruned)
    mods_p, mods_d = dict(pruned.named_modules()), dict(dense.named_modules())
    nodes = list(graph.nodes)
    linears = [n.target for n in nodes if n.op == "call_module" and isinstance(mods_p[n.target], nn.Linear)]
    classifier = linears[-1] if linears else None  # the last Linear, as in layers.prunable_layers
    last_use = {inp: i for i, node in enumerate(nodes) for inp in node.all_input_nodes}
    env_p: dict[fx.Node, list] = {}
    env_d: dict[fx.Node, list] = {}
    try:
        for index, node in enumerate(progress(nodes) if progress else nodes):
            if node.op == "placeholder":
                env_p[node], env_d[node] = [b.clone() for b in batches], list(batches)  # no shared storage
                continue
            if node.op == "output":
                break
            module_p = mods_p.get(node.target) if node.op == "call_module" else None
            if isinstance(module_p, nn.modules.batchnorm._BatchNorm):
                x_p, x_d = env_p[node.args[0]], env_d[node.args[0]]
                m = accumulate(list(zip(x_p, x_d, strict=True))).check_finite(f"BN input of {node.target}")
                ratio = m.cov[0, 0] / m.cov[1, 1].clamp_min(_EPS_VAR)
                for op in ops:
                    op.at_bn(module_p, mods_d[node.target], m)
                report.bn_sites.append(node.target)
                report.variance_ratio[node.target] = ratio.float().cpu()
                if module_p.running_var is not None:  # eval-mode BN is a * x + c per channel
                    a_p, a_d = (_bn_affine(bn)[0].to(ratio) for bn in (module_p, mods_d[node.target]))
                    after = ratio * a_p.square() / a_d.square().clamp_min(_EPS_VAR)
                    report.variance_ratio_after[node.target] = after.float().cpu()
            bn_node = _residual_bn(node, mods_p)
            if bn_node is not None and any(getattr(op, "site", None) == "block" for op in ops):
                r_p, s_p = env_p[node.args[0]], env_p[node.args[1]]
                z_d = [r + s for r, s in zip(env_d[node.args[0]], env_d[node.args[1]], strict=True)]
                m = accumulate(list(zip(r_p, s_p, z_d, strict=True))).check_finite(f"residual sum {node.name}")
                bn = mods_p[bn_node.target]
                for op in ops:
                    gb = op.at_block(bn, m)
                    if gb is not None:  # the branch's BN changed: update its cached output exactly
                        g, b = (t.to(r_p[0].dtype) for t in gb)
                        shape = (1, -1) + (1,) * (r_p[0].dim() - 2)
                        env_p[node.args[0]] = r_p = [r * g.view(shape) + b.view(shape) for r in r_p]
                        report.gains[f"{bn_node.target}@block"] = g.float().cpu()
                report.block_sites.append(node.name)
            env_d[node] = _run(node, env_d, mods_d, len(batches))
            if node.op == "call_module" and node.target == classifier:
                for op in ops:
                    op.at_classifier(module_p, env_p[node.args[0]], env_d[node])
            env_p[node] = _run(node, env_p, mods_p, len(batches))
            for inp in node.all_input_nodes:  # free activations nobody needs any more
                if last_use[inp] <= index:
                    env_p.pop(inp, None), env_d.pop(inp, None)
    finally:
        pruned.train(modes[0]), dense.train(modes[1])
    return report


def _run(node: fx.Node, env: dict[fx.Node, list], modules: dict[str, nn.Module], n_chunks: int) -> list:
    """Evaluate one graph node on every calibration chunk."""
    outputs = []
    for i in range(n_chunks):
        args = fx.node.map_arg(node.args, lambda a, i=i: env[a][i])
        kwargs = fx.node.map_arg(node.kwargs, lambda a, i=i: env[a][i])
        if node.op == "call_module":
            outputs.append(modules[node.target](*args, **kwargs))
        elif node.op == "call_function":
            outputs.append(node.target(*args, **kwargs))
        elif node.op == "call_method":
            self_obj, *rest = args
            outputs.append(getattr(self_obj, node.target)(*rest, **kwargs))
        elif node.op == "get_attr":
            outputs.append(_fetch_attr(modules[""], node.target))
        else:
            raise NotImplementedError(f"unsupported graph node {node.op}")
    return outputs


def _fetch_attr(root: nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
