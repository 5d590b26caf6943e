"""The traced graph as the repair engine reads it: tracing, node kinds, and running one node chunk by chunk."""

from __future__ import annotations

import operator
import sys
from collections.abc import Iterator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

BATCHNORM = nn.modules.batchnorm._BatchNorm
_ADD = (operator.add, operator.iadd, torch.add)
# nodes that commute with a positive per-channel scale (channel dim 1 kept, or flattened channel-major)
_HOMOGENEOUS_MODULES = (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
                        nn.Flatten, nn.Dropout, nn.Identity)  # fmt: skip
_HOMOGENEOUS_FUNCTIONS = (F.relu, torch.relu, torch.flatten, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
                          F.adaptive_max_pool2d, F.dropout)  # fmt: skip
_HOMOGENEOUS_METHODS = ("relu", "relu_", "flatten")
_EVAL_IDENTITY = (nn.Identity, nn.Dropout, nn.Dropout2d)  # modules that are x -> x in eval mode

Modules = dict[str, nn.Module]  # named_modules() of the traced model: "" is the root


class UntraceableModelError(TypeError):
    """The model cannot be traced by torch.fx, so the repair engine cannot walk it."""


def trace(model: nn.Module) -> fx.Graph:
    """The model's graph; refused unless forward takes exactly one input, the batch of images the engine feeds."""
    try:  # the graph alone: symbolic_trace would also build a GraphModule and generate its code, unused here
        graph = fx.Tracer().trace(model)
    except Exception as err:
        raise UntraceableModelError(
            f"{type(model).__name__} is not traceable by torch.fx ({err}); the repair engine needs a "
            "static graph (no data-dependent control flow in forward)"
        ) from err
    inputs = [n.target for n in graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise UntraceableModelError(
            f"{type(model).__name__}.forward takes {len(inputs)} inputs ({', '.join(inputs) or 'none'}), but the "
            "repair feeds it one batch of images: wrap it in a module whose forward(x) calls it with the others fixed"
        )
    return graph


def module_of(node: fx.Node, modules: Modules) -> nn.Module | None:
    return modules.get(node.target) if node.op == "call_module" else None


def classifier_of(nodes: list[fx.Node], modules: Modules) -> str | None:
    """The last Linear called, as in layers.prunable_layers."""
    linears = [n.target for n in nodes if isinstance(module_of(n, modules), nn.Linear)]
    return linears[-1] if linears else None


def is_homogeneous(node: fx.Node, module: nn.Module | None) -> bool:
    """Whether ``node`` commutes with a positive per-channel scale of its input."""
    if node.op == "call_module":
        return isinstance(module, _HOMOGENEOUS_MODULES)
    if node.op == "call_function":
        return node.target in _HOMOGENEOUS_FUNCTIONS
    return node.op == "call_method" and node.target in _HOMOGENEOUS_METHODS


def is_residual_sum(node: fx.Node, modules: Modules) -> bool:
    """A residual sum: two tensor operands, at least one a BN output used nowhere else."""
    if node.op != "call_function" or node.target not in _ADD or len(node.args) != 2:
        return False
    return all(isinstance(a, fx.Node) for a in node.args) and any(bn_source(a, modules) for a in node.args)


def bn_source(node: fx.Node, modules: Modules) -> fx.Node | None:
    """The BN whose output ``node`` is, directly or through modules that are the identity in eval mode (dropout,
    stochastic depth), each used only on that path; else None."""
    while len(node.users) == 1 and _is_eval_identity(node, modules):
        node = node.args[0]
    if isinstance(module_of(node, modules), BATCHNORM) and len(node.users) == 1:
        return node
    return None


def _is_eval_identity(node: fx.Node, modules: Modules) -> bool:
    # torchvision's stochastic depth, when torchvision is loaded (a model can only hold it then): the module, or the
    # function it traces to, stochastic_depth(x, p, mode, training), is the identity when not training
    ops = sys.modules.get("torchvision.ops")
    if node.op == "call_module":
        return isinstance(modules[node.target], _EVAL_IDENTITY + ((ops.StochasticDepth,) if ops else ()))
    return (
        ops is not None
        and node.op == "call_function"
        and node.target is ops.stochastic_depth
        and (node.args[3:4] == (False,))
    )


def bn_reader(node: fx.Node, modules: Modules) -> nn.Module | None:
    """The BatchNorm (with running statistics) that is the only reader of ``node``, else None."""
    if len(node.users) != 1:
        return None
    module = module_of(next(iter(node.users)), modules)
    return module if isinstance(module, BATCHNORM) and module.running_mean is not None else None


def run_node(node: fx.Node, env, modules: Modules, n_chunks: int, read_later: set[fx.Node]) -> Iterator:
    """Evaluate one graph node chunk by chunk, yielding each chunk's output as soon as it is computed.

    An input that the node changed in place (``out += identity``, an in-place ReLU) and that a later node reads is
    written back to ``env`` (a stores.ActivationStore): a stored copy (host, disk) would otherwise keep the value
    from before the change. ``Tensor._version`` counts in-place changes, so a changed input is one whose version
    moved while the node ran.
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
