"""Model zoo and checkpoint loading, against torchvision's reference models and torch.load."""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torchvision
import yaml
from test_data import _write_fashion_mnist

import lightning_repair
from lightning_repair import data as data_module
from lightning_repair.cli import main
from lightning_repair.data import _read_idx
from lightning_repair.datamodule import ImageDataModule
from lightning_repair.models import (
    ARCHITECTURES,
    METADATA_KEY,
    VGG,
    CheckpointMismatchError,
    Network,
    ResNet,
    build_network,
    checkpoint_metadata,
    input_channels,
    load_dense,
    load_weights,
    network_config,
    output_classes,
    read_state_dict,
)

from helpers import TINY_NETWORK, calibrated_dense, pipeline_config, read_metrics, run_fit, write_config


def small(arch: str = "resnet18", **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return Network(arch=arch, width=kw.pop("width", 0.125), **kw).build()


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_every_arch_and_stem_gives_logits(arch, stem, in_channels):
    model = small(arch, stem=stem, in_channels=in_channels, num_classes=7).eval()
    # the cifar stem is for 28 px (Fashion-MNIST, 1 channel) and 32 px (CIFAR) images; 32 px is the smallest
    # size the imagenet stem (4x downsampling before the body) handles
    size = 28 if stem == "cifar" and in_channels == 1 else 32
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, size, size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    # the first conv really takes in_channels
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert first.in_channels == in_channels
    assert first.kernel_size == ((3, 3) if stem == "cifar" else (7, 7) if arch != "vgg16_bn" else (3, 3))


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50", "vgg16_bn", "densenet121"])
def test_width_one_imagenet_layout_matches_torchvision(arch):
    """Keys and shapes equal torchvision's (built on the meta device: no memory, no init cost)."""
    with torch.device("meta"):
        ours = Network(arch=arch, width=1.0, stem="imagenet", num_classes=1000).build().state_dict()
        ref = getattr(torchvision.models, arch)().state_dict()
    assert list(ours) == list(ref)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref.items()}


def test_torchvision_resnet18_weights_load_and_compute_the_same(tmp_path):
    torch.manual_seed(0)
    ref = torchvision.models.resnet18(num_classes=10).eval()
    model = Network(arch="resnet18", width=1.0, stem="imagenet", num_classes=10).build()
    assert set(model.state_dict()) == set(ref.state_dict())
    x = torch.randn(2, 3, 32, 32)

    load_weights(model, ref.state_dict())
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x))

    path = tmp_path / "tv.pth"
    torch.save(ref.state_dict(), path)
    fresh = load_weights(Network(arch="resnet18", width=1.0, stem="imagenet", num_classes=10).build(), path).eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), ref(x))


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_load_lightning_checkpoint_strips_model_prefix(tmp_path):
    src = small(in_channels=1)
    ckpt = {
        "epoch": 3,
        "global_step": 10,
        "state_dict": {f"model.{k}": v for k, v in src.state_dict().items()},
        "hyper_parameters": {"network": {"arch": "resnet18"}, "lr": 0.1},
    }
    path = tmp_path / "last.ckpt"
    torch.save(ckpt, path)
    assert set(read_state_dict(path)) == set(src.state_dict())
    dst = Network(arch="resnet18", width=0.125, in_channels=1).build()
    _same_weights(load_weights(dst, path), src)
    _same_weights(load_weights(Network(arch="resnet18", width=0.125, in_channels=1).build(), str(path)), src)


def test_load_plain_state_dict_file(tmp_path):
    src = small("vgg16_bn")
    path = tmp_path / "plain.pt"
    torch.save(src.state_dict(), path)
    _same_weights(load_weights(Network(arch="vgg16_bn", width=0.125).build(), path), src)


def test_mismatched_num_classes_lists_the_keys(tmp_path):
    path = tmp_path / "c100.ckpt"
    state = small(num_classes=100).state_dict()
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}}, path)
    model = small(num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as err:
        load_weights(model, path)
    msg = str(err.value)
    assert "fc.weight" in msg and "fc.bias" in msg
    assert "(100, 64)" in msg and "(10, 64)" in msg  # width 0.125: 64 features; 100 vs 10 rows
    assert "conv1.weight" not in msg  # only the mismatching keys are listed
    for k, v in model.state_dict().items():  # nothing was half-loaded
        assert torch.equal(v, before[k])


def test_missing_and_unexpected_keys_are_listed():
    model = small()
    state = model.state_dict()
    state.pop("layer1.0.bn1.running_mean")
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError) as err:
        load_weights(small(), state)
    msg = str(err.value)
    assert "missing (1): layer1.0.bn1.running_mean" in msg
    assert "unexpected (1): extra.weight" in msg


def test_wrong_architecture_is_refused(tmp_path):
    path = tmp_path / "r34.pt"
    torch.save(small("resnet34").state_dict(), path)
    with pytest.raises(CheckpointMismatchError, match="unexpected"):
        load_weights(small("resnet18"), path)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


@pytest.mark.parametrize("wrap", ["bare", "in_state_dict"])
def test_pickled_code_is_refused_and_never_runs(tmp_path, wrap):
    marker = tmp_path / "pwned"
    payload = _Payload(marker)
    obj = payload if wrap == "bare" else {"state_dict": {"model.fc.weight": torch.zeros(2, 2), "model.x": payload}}
    path = tmp_path / "evil.ckpt"
    torch.save(obj, path)
    assert not marker.exists()
    with pytest.raises(CheckpointMismatchError, match="weights_only"):
        read_state_dict(path)
    with pytest.raises(CheckpointMismatchError):
        load_weights(small(), path)
    assert not marker.exists()
    # the payload is real: an unsafe load would have run it
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_truncated_empty_and_non_checkpoint_files(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(small().state_dict(), good)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    for path in (truncated, empty, text):
        with pytest.raises(CheckpointMismatchError):
            load_weights(small(), path)
    not_tensors = tmp_path / "numbers.pt"
    torch.save({"a": 1, "b": [2, 3]}, not_tensors)
    with pytest.raises(CheckpointMismatchError, match="no state_dict of tensors"):
        read_state_dict(not_tensors)
    with pytest.raises(FileNotFoundError):
        read_state_dict(tmp_path / "absent.ckpt")


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"arch": "resnet999"}, "resnet999"),
        ({"width": 0.0}, "width"),
        ({"width": -0.5}, "width"),
        ({"num_classes": 0}, "num_classes"),
        ({"in_channels": 0}, "in_channels"),
        ({"stem": "CIFAR"}, "stem"),
    ],
)
def test_network_validation(kwargs, words):
    with pytest.raises(ValueError, match=words):
        Network(**kwargs)


def test_width_scales_channels():
    narrow, wide = small(width=0.25), small(width=0.5)
    assert narrow.conv1.out_channels == 16 and wide.conv1.out_channels == 32
    assert narrow.fc.in_features == 128 and wide.fc.in_features == 256
    assert Network(arch="resnet50", width=0.25).build().fc.in_features == 512  # Bottleneck expansion 4


# ---------------------------------------------------------------- any nn.Module: network specs

MOBILENET = {"class_path": "torchvision.models.MobileNetV2", "init_args": {"num_classes": 7, "width_mult": 0.25}}


def test_build_network_from_every_form_of_spec():
    shortcut = build_network(Network(arch="resnet18", width=0.125, num_classes=7))
    assert isinstance(shortcut, ResNet) and shortcut.fc.out_features == 7
    assert isinstance(build_network({"arch": "vgg16_bn", "width": 0.125}), VGG)  # metrics.json's form of a shortcut
    model = build_network(MOBILENET)
    assert isinstance(model, torchvision.models.MobileNetV2)
    assert (input_channels(model), output_classes(model)) == (3, 7)
    assert isinstance(build_network(lambda: torch.nn.Linear(2, 3)), torch.nn.Linear)  # a callable, from Python
    with pytest.raises(TypeError, match="not an nn.Module"):
        build_network(lambda: "resnet")
    with pytest.raises(TypeError, match="must be a Network or a callable"):
        build_network(42)


def test_network_config_rebuilds_the_same_architecture():
    for spec in (Network(arch="resnet18", width=0.125), MOBILENET):
        config = network_config(spec)
        assert json.loads(json.dumps(config)) == config  # plain data
        a, b = build_network(spec).state_dict(), build_network(config).state_dict()
        assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    # the CLI's form of a shortcut is recorded as the shortcut's fields
    cli_form = {"class_path": "lightning_repair.Network", "init_args": {"arch": "resnet34"}}
    assert network_config(cli_form) == asdict(Network(arch="resnet34"))


def test_output_classes_of_a_fully_convolutional_classifier():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Conv2d(4, 5, 1), torch.nn.AdaptiveAvgPool2d(1))
    assert (input_channels(model), output_classes(model)) == (1, 5)
    with pytest.raises(ValueError, match="number of classes"):
        output_classes(torch.nn.ReLU())


def test_rgb_stem_on_grayscale_data(tmp_path, monkeypatch):
    """data.rgb gives a grayscale image as 3 equal channels; without it the channel mismatch is named."""
    monkeypatch.setattr(data_module, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "absent")
    _write_fashion_mnist(tmp_path)
    network = {"class_path": "torchvision.models.MobileNetV2", "init_args": {"num_classes": 10, "width_mult": 0.25}}
    checkpoint = tmp_path / "mobilenet.pt"
    torch.save(build_network(network).state_dict(), checkpoint)
    gray = ImageDataModule("fashion_mnist", data_dir=str(tmp_path), augment=False, calibration_size=2)
    with pytest.raises(ValueError, match=r"in_channels=3 but dataset 'fashion_mnist' has .*in_channels=1.*data.rgb"):
        gray.setup()
        load_dense(network, str(checkpoint), "cpu", "fashion_mnist", gray.info)
    rgb = ImageDataModule("fashion_mnist", data_dir=str(tmp_path), augment=False, calibration_size=2, rgb=True)
    rgb.setup()
    model = load_dense(network, str(checkpoint), "cpu", "fashion_mnist", rgb.info)
    image, _ = rgb.test_set[0]
    assert image.shape[0] == 3 and torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])
    assert torch.equal(image[:1], gray.test_set[0][0])  # the same normalised channel, repeated
    assert model(image[None]).shape == (1, 10)


# ---------------------------------------------------------------- checkpoints that describe themselves

REPO = Path(__file__).parents[1]
SHIPPED_MOBILENET = REPO / "checkpoints" / "fashion_mnist_mobilenetv2.pt"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
# the README's "Bring your own model" YAML, as written there (only the checkpoint's path differs)
README_MOBILENET_YAML = """
model:
  class_path: lightning_repair.PruneRepairModule
  init_args:
    network:
      class_path: torchvision.models.MobileNetV2     # or my_package.models.MyNet
      init_args: {num_classes: 10, width_mult: 0.5}
    checkpoint: mobilenet_v2.pt                      # a state_dict, a Lightning checkpoint or torchvision's layout
data:
  dataset: fashion_mnist
  rgb: true                                          # torchvision's stems take RGB: the gray channel, repeated
"""


def test_readme_mobilenet_yaml_with_the_shipped_checkpoint_is_refused_naming_both(tmp_path, monkeypatch, capsys):
    """The README's spec lacks the checkpoint's inverted_residual_setting: the shapes still match (it used to run and
    report 44% dense top-1), the recorded spec does not."""
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "mobilenet.yaml"
    config.write_text(README_MOBILENET_YAML.replace("mobilenet_v2.pt", str(SHIPPED_MOBILENET)))
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(config)])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 1 and len(err) == 1, err
    assert "model.network" in err[0] and "differs from the network" in err[0]
    given, recorded = err[0].split("differs from the network")
    assert "inverted_residual_setting" not in given and "inverted_residual_setting" in recorded
    assert "[6,160,3,1]" in recorded and not list(tmp_path.rglob("metrics.json"))


@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="Debian's Fashion-MNIST is not installed")
def test_shipped_mobilenet_loads_its_own_network_and_reaches_its_accuracy():
    """lightning_repair.load builds the recorded network (the 88% model); the README's spec, which fits the same
    weights shape for shape, gives another network."""
    model, normalize = lightning_repair.load(SHIPPED_MOBILENET)
    dm = ImageDataModule("fashion_mnist", data_dir=str(FASHION_MNIST), augment=False, rgb=True)
    dm.setup()
    images = torch.stack([dm.test_set[i][0] for i in range(1000)])
    labels = torch.tensor([dm.test_set[i][1] for i in range(1000)])
    raw = torch.from_numpy(_read_idx(FASHION_MNIST / "t10k-images-idx3-ubyte.gz")[:1000].copy()).float() / 255
    torch.testing.assert_close(normalize(raw[:, None]), images)  # the recorded normalisation is the data's
    with torch.no_grad():
        accuracy = (model(images).argmax(1) == labels).float().mean().item()
        readme_spec = yaml.safe_load(README_MOBILENET_YAML)["model"]["init_args"]["network"]
        wrong = load_weights(build_network(readme_spec), read_state_dict(SHIPPED_MOBILENET)).eval()
        wrong_accuracy = (wrong(images).argmax(1) == labels).float().mean().item()
    assert accuracy > 0.85 and wrong_accuracy < 0.7, (accuracy, wrong_accuracy)


def test_fit_with_only_a_checkpoint_builds_the_recorded_network(tmp_path):
    """A checkpoint that records its network needs no model.network; a bare one does, and says so."""
    network = dict(TINY_NETWORK)
    state = calibrated_dense().state_dict()
    described = tmp_path / "described.pt"
    torch.save({"state_dict": state, METADATA_KEY: checkpoint_metadata(network)}, described)
    config = pipeline_config(tmp_path, described)
    del config["model"]["init_args"]["network"]
    with pytest.warns(UserWarning, match="RR profile from only"):
        run_fit(write_config(tmp_path / "config.yaml", config))
    metrics = read_metrics(tmp_path)
    assert metrics["config"]["network"] == asdict(Network(**network))
    assert metrics["accuracy"]["dense"] > 0
    bare = tmp_path / "bare.pt"
    torch.save(state, bare)
    with pytest.raises(CheckpointMismatchError, match="records no network .*give model.network"):
        lightning_repair.PruneRepairModule(checkpoint=str(bare))
