"""Which layers are prunable, and the role of each (used by allocation rules and regularizers)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

ROLES = ("first", "classifier", "projection", "depthwise", "conv", "linear")
_PROJECTION_NAME = re.compile(r"(downsample|shortcut|projection)")


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
    (1x1 convs on a shortcut/downsample path), ``depthwise`` (groups == in_channels > 1),
    else ``conv`` or ``linear``.
    """
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
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
