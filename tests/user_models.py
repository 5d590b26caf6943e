"""Modules a user would bring, importable by class_path (``user_models.X``: tests/ is on the path).

Torchvision's families at CPU-test widths, for 3x32x32 images and 10 classes: torchvision's own classes,
subclassed only where the constructor wants config objects that a YAML file cannot spell (or, for the
ResNet family, fixes the widths). The parameter names stay torchvision's. Plus two small CNNs of our own.
"""

from __future__ import annotations

import torch
import torchvision.models as tvm
from torch import nn
from torchvision.models.efficientnet import _efficientnet_conf
from torchvision.models.mobilenetv3 import _mobilenet_v3_conf
from torchvision.models.regnet import BlockParams
from torchvision.models.resnet import Bottleneck


class SmallResNet(tvm.ResNet):
    """torchvision's Bottleneck ResNet with one block per stage and 1/8 of the stage widths: ResNeXt with
    ``groups`` > 1, Wide-ResNet with ``width_per_group`` = 128 (torchvision's resnext/wide_resnet settings)."""

    def __init__(self, groups: int = 1, width_per_group: int = 64, num_classes: int = 10):
        super().__init__(Bottleneck, [1, 1, 1, 1], num_classes, groups=groups, width_per_group=width_per_group)
        self.fc = nn.Linear(self.inplanes, num_classes)

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
        return super()._make_layer(block, planes // 8, blocks, stride, dilate)


class MobileNetV3Small(tvm.MobileNetV3):
    def __init__(self, width_mult: float = 1.0, num_classes: int = 10):
        settings, last_channel = _mobilenet_v3_conf("mobilenet_v3_small", width_mult=width_mult)
        super().__init__(settings, last_channel, num_classes=num_classes)


class EfficientNetB0(tvm.EfficientNet):
    def __init__(self, width_mult: float = 1.0, depth_mult: float = 1.0, num_classes: int = 10):
        settings, last_channel = _efficientnet_conf("efficientnet_b0", width_mult=width_mult, depth_mult=depth_mult)
        super().__init__(settings, dropout=0.2, num_classes=num_classes, last_channel=last_channel)


class SmallRegNetY(tvm.RegNet):
    """RegNetY (squeeze-excitation blocks, 1x1 ``proj`` shortcuts) with 4 blocks and widths from 8."""

    def __init__(self, num_classes: int = 10):
        params = BlockParams.from_init_params(depth=4, w_0=8, w_a=8.0, w_m=2.0, group_width=8, se_ratio=0.25)
        super().__init__(params, num_classes=num_classes, stem_width=8)


class ShuffleNetV2(tvm.ShuffleNetV2):
    """torchvision's, without the ``inverted_residual`` argument: jsonargparse 4.53 fills in its default (a block
    class with required arguments) as a spec it then refuses, so torchvision.models.ShuffleNetV2 cannot be given by
    class_path as it is."""

    def __init__(self, stages_repeats: list[int], stages_out_channels: list[int], num_classes: int = 10):
        super().__init__(stages_repeats, stages_out_channels, num_classes)


class GatedCNN(nn.Module):
    """A user's own CNN: a residual add with the BN as the *second* operand, a depthwise conv, a
    squeeze-excitation style multiplication and Hardswish."""

    def __init__(self, in_channels: int = 3, width: int = 8, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width))
        self.depthwise = nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.gate = nn.Conv2d(width, width, 1)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.hardswish(self.stem(x))
        x = x + self.bn(self.depthwise(x))
        x = x * torch.sigmoid(self.gate(x.mean((2, 3), keepdim=True)))
        return self.head(x.mean((2, 3)))


class NoBatchNormCNN(nn.Module):
    """A CNN normalised by GroupNorm only: no BatchNorm for BN-based repair operators to act on."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.norm(self.conv(x))).mean((2, 3)))
