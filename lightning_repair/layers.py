"""Which layers are prunable, and the role of each (used by allocation rules and regularizers)."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

from torch import nn

ROLES = ("first", "classifier", "projection", "depthwise", "conv", "linear")
# a 1x1 conv on a residual block's shortcut: ResNet's downsample, RegNet's proj, other libraries' shortcut
_PROJECTION_NAME = re.compile(r"(^|\.)(downsample|shortcut|proj|projection)(\.|$)")


@dataclass(frozen=True)
class PrunableLayer:
    name: str
    module: nn.Conv2d | nn.Linear
    role: str

    @property
    def numel(self) -> int:
        return self.module.weight.numel()

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.module.weight.shape)


def prunable_layers(model: nn.Module) -> list[PrunableLayer]:
    """Every Conv2d and Linear weight in registration order, with its role.

    Roles: ``first`` (the first conv), ``classifier`` (the last Linear), ``projection``
    (1x1 convs on a shortcut/downsample path, by module name), ``depthwise`` (groups == in_channels > 1),
    else ``conv`` or ``linear`` (grouped convs included: their weight is (out, in/groups, kh, kw)).
    Other weighted layers (Conv1d/3d, transposed convs) are not pruned, and a warning names them.
    """
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    unpruned = [n for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd) and n not in dict(found)]
    if unpruned:
        warnings.warn(f"{type(model).__name__}: {', '.join(unpruned)} stay dense (only Conv2d and Linear are pruned)",
                      stacklevel=2)  # fmt: skip
    if not found:
        raise ValueError(f"{type(model).__name__} has no Conv2d or Linear layer to prune")
    first_conv = next((n for n, m in found if isinstance(m, nn.Conv2d)), None)
    last_linear = next((n for n, m in reversed(found) if isinstance(m, nn.Linear)), None)
    layers = []
    for name, m in found:
        if name == first_conv:
            role = "first"
        elif name == last_linear:
            role = "classifier"
        elif isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels:
            role = "depthwise"
        elif isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and _PROJECTION_NAME.search(name):
            role = "projection"
        else:
            role = "conv" if isinstance(m, nn.Conv2d) else "linear"
        layers.append(PrunableLayer(name, m, role))
    return layers
