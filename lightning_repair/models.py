"""Network specs, the built-in model zoo and dense-weight loading.

``model.network`` is a ``NetworkSpec``: any importable ``nn.Module`` given the LightningCLI way
(``{class_path: torchvision.models.MobileNetV2, init_args: {num_classes: 10}}``, which jsonargparse
turns into a callable that builds the module), or one of the five built-in architectures by name
(``{arch: resnet18, ...}``, the ``Network`` dataclass). ``build_network`` builds a fresh model from
either, or from its config form as recorded in metrics.json.

Every built-in builder keeps torchvision's parameter names (``conv1``, ``layer1.0.bn1``,
``features.0``, ``fc``/``classifier``) so torchvision checkpoints load as they
are, and takes ``num_classes``, ``in_channels``, ``stem`` ("cifar": 3x3 stride-1
stem without max-pool, for 28-32 px images; "imagenet": torchvision's stem) and a
``width`` multiplier for small CPU variants.
"""

from __future__ import annotations

import copy
import importlib
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn
from torchvision.models import densenet
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1
from torchvision.models.vgg import cfgs as vgg_cfgs
from torchvision.models.vgg import make_layers

if TYPE_CHECKING:
    from .data import DatasetInfo

Stem = Literal["cifar", "imagenet"]


class ResNet(nn.Module):
    """ResNet with torchvision's blocks and names, a stem choice and a width multiplier."""

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: list[int],
        num_classes: int,
        in_channels: int,
        stem: Stem,
        width: float,
    ):
        super().__init__()
        widths = [_scaled(c, width) for c in (64, 128, 256, 512)]
        self.inplanes = widths[0]
        if stem == "cifar":
            self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, widths[0], 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, widths[0], layers[0], stride=1)
        self.layer2 = self._make_layer(block, widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, widths[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3] * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class VGG(nn.Module):
    """VGG with batch norm; the ImageNet head is torchvision's, the CIFAR head a single Linear."""

    def __init__(self, cfg: str, num_classes: int, in_channels: int, stem: Stem, width: float):
        super().__init__()
        layer_cfg = [v if v == "M" else _scaled(v, width) for v in vgg_cfgs[cfg]]
        self.features = make_layers(layer_cfg, batch_norm=True)
        self.features[0] = nn.Conv2d(in_channels, layer_cfg[0], 3, padding=1)
        channels = layer_cfg[-2]
        if stem == "cifar":
            for m in self.features:  # 5 max-pools: ceil mode keeps 28 px inputs (28-14-7-4-2-1) from shrinking to 0
                if isinstance(m, nn.MaxPool2d):
                    m.ceil_mode = True
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Linear(channels, num_classes)
        else:
            hidden = _scaled(4096, width)
            self.avgpool = nn.AdaptiveAvgPool2d(7)
            self.classifier = nn.Sequential(
                nn.Linear(channels * 49, hidden), nn.ReLU(True), nn.Dropout(),
                nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(),
                nn.Linear(hidden, num_classes),
            )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def _densenet121(num_classes: int, in_channels: int, stem: Stem, width: float) -> nn.Module:
    init = _scaled(64, width)
    model = densenet.DenseNet(
        growth_rate=_scaled(32, width), block_config=(6, 12, 24, 16),
        num_init_features=init, num_classes=num_classes,
    )  # fmt: skip
    if stem == "cifar":
        model.features.conv0 = nn.Conv2d(in_channels, init, 3, stride=1, padding=1, bias=False)
        model.features.pool0 = nn.Identity()
    else:
        model.features.conv0 = nn.Conv2d(in_channels, init, 7, stride=2, padding=3, bias=False)
    return model


def _scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "resnet18": lambda **kw: ResNet(BasicBlock, [2, 2, 2, 2], **kw),
    "resnet34": lambda **kw: ResNet(BasicBlock, [3, 4, 6, 3], **kw),
    "resnet50": lambda **kw: ResNet(Bottleneck, [3, 4, 6, 3], **kw),
    "vgg16_bn": lambda **kw: VGG("D", **kw),
    "densenet121": _densenet121,
}


@dataclass
class Network:
    """Which network to build.

    Args:
        arch: one of resnet18, resnet34, resnet50, vgg16_bn, densenet121.
        num_classes: size of the classifier output.
        in_channels: image channels (1 for Fashion-MNIST, 3 for RGB).
        stem: "cifar" (3x3 stride-1, no max-pool: CIFAR-style ResNet) or "imagenet" (torchvision).
        width: channel multiplier (0.25 gives base width 16 for ResNets).
    """

    arch: str = "resnet18"
    num_classes: int = 10
    in_channels: int = 3
    stem: Stem = "cifar"
    width: float = 1.0

    def __post_init__(self):
        if not isinstance(self.arch, str) or self.arch not in ARCHITECTURES:
            raise ValueError(f"network.arch: unknown architecture {self.arch!r}; choose from {sorted(ARCHITECTURES)}")
        for field in ("num_classes", "in_channels"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"network.{field} must be an integer >= 1, got {value!r}")
        if self.stem not in ("cifar", "imagenet"):
            raise ValueError(f"network.stem must be 'cifar' or 'imagenet', got {self.stem!r}")
        if isinstance(self.width, bool) or not isinstance(self.width, (int, float)) or not 0 < self.width < math.inf:
            raise ValueError(f"network.width must be a finite number > 0, got {self.width!r}")

    def build(self) -> nn.Module:
        return ARCHITECTURES[self.arch](
            num_classes=self.num_classes, in_channels=self.in_channels, stem=self.stem, width=self.width
        )


NetworkSpec = Network | Callable[[], nn.Module]


def configure_parsing() -> None:
    """jsonargparse parses a pure dataclass in a Union with a class type wrongly (a class_path dict loses its
    class_path); as a subclass-enabled type, ``{arch: ...}`` is Network's implicit class_path and a
    ``{class_path: ...}`` of an nn.Module goes to the callable. Called by the CLI and by ``build_network`` (the
    core itself never imports jsonargparse)."""
    from jsonargparse import set_parsing_settings

    set_parsing_settings(subclasses_enabled=[Network])


def build_network(spec: NetworkSpec | Mapping[str, Any]) -> nn.Module:
    """A freshly built model from a network spec or its config form (``network_config``)."""
    if isinstance(spec, Mapping):
        from jsonargparse import ArgumentParser

        configure_parsing()
        parser = ArgumentParser(exit_on_error=False)
        parser.add_argument("--network", type=NetworkSpec)
        spec = parser.instantiate(parser.parse_object({"network": dict(spec)})).network
    if isinstance(spec, Network):
        return spec.build()
    if isinstance(spec, nn.Module):  # a builder given by class_path (torchvision.models.resnet18): jsonargparse
        return copy.deepcopy(spec)  # called it with its init_args, so the spec is the built module: a fresh copy
    if not callable(spec):
        raise TypeError(f"model.network must be a Network or a callable that builds an nn.Module, got {spec!r}")
    model = spec()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model.network built a {type(model).__name__}, not an nn.Module")
    return model


def network_config(spec: NetworkSpec | Mapping[str, Any]) -> dict[str, Any] | str:
    """The spec as config data that ``build_network`` rebuilds: a shortcut's fields, a class_path spec as given.
    A callable given in Python has no config form; it is named instead."""
    if isinstance(spec, Network):
        return asdict(spec)
    if isinstance(spec, Mapping):
        if _imported(spec.get("class_path")) is Network:  # the CLI's form of a shortcut
            return asdict(Network(**spec.get("init_args", {})))
        if "class_path" not in spec and "arch" in spec:  # a shortcut's fields: all of them, defaults filled in
            return asdict(Network(**spec))
        return dict(spec)
    return f"{getattr(spec, '__module__', '?')}.{getattr(spec, '__qualname__', type(spec).__qualname__)}"


def _imported(class_path: str | None):
    module, _, name = (class_path or "").rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def input_channels(model: nn.Module) -> int | None:
    """Channels the model's first Conv2d takes (None without one)."""
    return next((m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d)), None)


def output_classes(model: nn.Module) -> int:
    """Classes the model predicts: the outputs of its last Linear, or of its last Conv2d when it has no Linear
    (a fully convolutional classifier), in registration order."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)] or [
        m for m in model.modules() if isinstance(m, nn.Conv2d)
    ]
    if not last:
        raise ValueError(f"{type(model).__name__} has no Linear or Conv2d layer to read the number of classes from")
    return last[-1].out_features if isinstance(last[-1], nn.Linear) else last[-1].out_channels


class CheckpointMismatchError(RuntimeError):
    """A checkpoint does not fit the configured architecture."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read model weights from a Lightning checkpoint, a plain state_dict or torchvision's layout.

    Loading never unpickles code (``weights_only=True``). Lightning checkpoints store the
    network under the LightningModule attribute ``model.``; that prefix is stripped.
    """
    return read_checkpoint(path)[0]


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """``read_state_dict``'s weights and the file's ``METADATA_KEY`` entry (None in a bare state_dict)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, empty, not a torch file, or pickled code
        raise CheckpointMismatchError(f"cannot read checkpoint {path} safely (weights_only=True): {err}") from err
    metadata = obj.get(METADATA_KEY) if isinstance(obj, Mapping) else None
    if metadata is not None and not isinstance(metadata, Mapping):
        raise CheckpointMismatchError(f"{path}: its {METADATA_KEY!r} entry is not a dict")
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointMismatchError(f"{path} holds no state_dict of tensors")
    if obj and all(k.startswith("model.") for k in obj):
        obj = {k.removeprefix("model."): v for k, v in obj.items()}
    return dict(obj), (dict(metadata) if metadata is not None else None)


# ----------------------------------------------------------------------------- checkpoints that describe themselves

METADATA_KEY = "lightning_repair"  # beside "state_dict" in every checkpoint the tool writes
METADATA_FORMAT = 1


def checkpoint_metadata(network: NetworkSpec | Mapping[str, Any], info: DatasetInfo | None = None,
                        dataset: str | None = None) -> dict[str, Any]:  # fmt: skip
    """What a checkpoint records about itself, as plain data (``torch.load(weights_only=True)`` reads it): the
    network spec as config data (``network_config``) and, with the data's ``info``, the input the network expects:
    ``{"format": 1, "network": {...}, "input": {"dataset", "channels", "image_size", "mean", "std"}}``. Pixels scaled
    to [0, 1], then (x - mean) / std per channel."""
    metadata: dict[str, Any] = {"format": METADATA_FORMAT, "network": network_config(network)}
    if info is not None:
        metadata["input"] = {"dataset": dataset, "channels": info.in_channels, "image_size": info.image_size,
                             "mean": [float(m) for m in info.mean], "std": [float(s) for s in info.std]}  # fmt: skip
    return metadata


def recorded_network(path: str | Path) -> dict[str, Any] | str | None:
    """The network spec a checkpoint records (None for a bare state_dict)."""
    metadata = read_checkpoint(path)[1]
    return None if metadata is None else metadata.get("network")


def canonical_network(spec: NetworkSpec | Mapping[str, Any] | str) -> dict[str, Any] | str:
    """A spec's config form with every default filled in, as jsonargparse resolves it: two specs that build the same
    network compare equal. A callable given in Python (no config form) is its name."""
    config = network_config(spec) if not isinstance(spec, str) else spec
    if isinstance(config, str):
        return config
    import yaml
    from jsonargparse import ArgumentParser

    configure_parsing()
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--network", type=NetworkSpec)
    return yaml.safe_load(parser.dump(parser.parse_object({"network": dict(config)})))["network"]


def check_recorded_network(given: NetworkSpec | Mapping[str, Any], recorded: Any, checkpoint: str | Path,
                           what: str = "model.network") -> None:  # fmt: skip
    """Refuse a network spec that differs from the one the checkpoint records, naming both."""
    if recorded is None:
        return
    mine, theirs = canonical_network(given), canonical_network(recorded)
    if isinstance(mine, str) and not isinstance(theirs, str):
        return  # a callable given in Python has no config form to compare: the strict weight loading still checks
    if mine != theirs:
        raise CheckpointMismatchError(
            f"{what} {_spec_text(mine)} differs from the network {checkpoint} was written for, "
            f"{_spec_text(theirs)}: drop {what} to use the recorded one, or give a matching checkpoint"
        )


def _spec_text(spec) -> str:
    import json

    return spec if isinstance(spec, str) else json.dumps(spec, separators=(",", ":"))


def resolve_network(network: NetworkSpec | Mapping[str, Any] | None, checkpoint: str | Path) -> Any:
    """The network to build for ``checkpoint``: the given spec (checked against the one the checkpoint records), or,
    when none is given, the recorded one."""
    recorded = recorded_network(checkpoint)
    if network is None:
        if recorded is None:
            raise CheckpointMismatchError(
                f"model.network is not set and {checkpoint} records no network (a bare state_dict): give model.network"
            )
        return recorded
    check_recorded_network(network, recorded, checkpoint)
    return network


def check_recorded_input(metadata: Mapping[str, Any] | None, info: DatasetInfo, dataset: str | None,
                         checkpoint: str | Path) -> None:  # fmt: skip
    """Refuse data normalised otherwise than the data the checkpoint records (its mean, std or channels)."""
    recorded = (metadata or {}).get("input")
    if not recorded:
        return
    given = {"channels": info.in_channels, "mean": [float(m) for m in info.mean], "std": [float(s) for s in info.std]}
    differing = [k for k, v in given.items() if not _close(v, recorded.get(k))]
    if differing:
        theirs = {k: recorded.get(k) for k in given}
        raise CheckpointMismatchError(
            f"data {dataset!r} gives {given} but {checkpoint} was trained on {recorded.get('dataset')!r} with "
            f"{theirs}: the model would see other inputs than it learned from (data.rgb, the normalisation)"
        )


def _close(a, b) -> bool:
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(
            math.isclose(x, y, abs_tol=1e-6) for x, y in zip(a, b, strict=True)
        )
    return a == b


def load_weights(model: nn.Module, source: str | Path | Mapping[str, torch.Tensor]) -> nn.Module:
    """Load dense weights strictly; any missing, unexpected, mis-shaped or non-finite tensor is listed in the error."""
    state = read_state_dict(source) if isinstance(source, (str, Path)) else dict(source)
    name = source if isinstance(source, (str, Path)) else "state_dict"
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    )
    if missing or unexpected or shapes:
        parts = [f"{title} ({len(keys)}): {_listing(keys)}"
                 for title, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes))
                 if keys]  # fmt: skip
        raise CheckpointMismatchError(f"checkpoint {name} does not fit {type(model).__name__}: " + "; ".join(parts))
    non_finite = sorted(k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if non_finite:  # refused here, so no accuracy is ever computed from a NaN model
        raise ValueError(f"checkpoint {name} holds NaN/Inf in {len(non_finite)} tensor(s): {_listing(non_finite)}")
    model.load_state_dict(state)
    return model


def _listing(keys: list[str], limit: int = 10) -> str:
    return ", ".join(keys[:limit]) + (" ..." if len(keys) > limit else "")


def load_dense(
    network: NetworkSpec | Mapping[str, Any] | None,
    checkpoint: str | Path,
    device: torch.device | str = "cpu",
    dataset: str | None = None,
    info: DatasetInfo | None = None,
) -> nn.Module:
    """The dense model in eval mode on ``device``; with ``info`` (data.DatasetInfo of ``dataset``), checked first to
    fit that dataset's classes and channels (and normalisation, when the checkpoint records it). ``network`` None:
    the network the checkpoint records; given, it must agree with that one."""
    network = resolve_network(network, checkpoint)
    if info is not None and Path(checkpoint).is_file():
        check_recorded_input(read_checkpoint(checkpoint)[1], info, dataset, checkpoint)
    model = build_network(network)
    channels, classes = input_channels(model), output_classes(model)
    if info is not None and (info.num_classes, info.in_channels) != (classes, channels or info.in_channels):
        raise ValueError(
            f"model.network ({type(model).__name__}) has num_classes={classes}, in_channels={channels} but dataset "
            f"{dataset!r} has num_classes={info.num_classes}, in_channels={info.in_channels}"
            + (" (data.rgb: true repeats a grayscale channel for an RGB stem)" if channels == 3 else "")
        )
    check_running_stats(model)
    return load_weights(model, checkpoint).to(device).eval()


def check_running_stats(model: nn.Module) -> None:
    """Refuse a BatchNorm without running statistics (``track_running_stats=False``): it normalises every batch
    by that batch's own statistics, even in eval mode, so there are no statistics for a repair to correct."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.track_running_stats:
            raise ValueError(
                f"BatchNorm {name!r} has no running statistics (track_running_stats=False): pruning and repair "
                "need BatchNorm layers that keep them"
            )
