"""Where the repair keeps activations (``activations: device | host | disk``): the same repaired model from every
store, a disk store that cleans up after itself, and the option checked in Python and in YAML."""

from __future__ import annotations

import copy
import tempfile

import pytest
import torch
from torch import nn

from lightning_repair.cli import main
from lightning_repair.module import PruneRepairModule
from lightning_repair.repair import repair

from helpers import TINY_NETWORK, calibrated_dense, pipeline_config, pruned_copy, read_metrics, write_config

STORES = ("device", "host", "disk")
CHUNKS = 3


@pytest.fixture
def spill_dir(tmp_path, monkeypatch):
    """The disk store's temporary directories go here."""
    directory = tmp_path / "spill"
    directory.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(directory))
    return directory


def _batches(image: int = 16) -> list[torch.Tensor]:
    torch.manual_seed(1)
    return list(torch.randn(CHUNKS * 8, 3, image, image).split(8))


def _repaired(dense, pruned, masks, recipe, activations, **kwargs):
    model = copy.deepcopy(pruned)
    report = repair(model, dense, _batches(), recipe, masks=masks, activations=activations, **kwargs)
    return model, report


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize(
    "preset", ["bn_recalibration", "asr", "default", "reconstruct", "reconstruct_dense_bn", "asr_refit"]
)
def test_every_store_gives_the_same_repaired_model(arch, preset, spill_dir):
    dense = calibrated_dense(arch)
    pruned, masks = pruned_copy(dense)
    results = {store: _repaired(dense, pruned, masks, preset, store) for store in STORES}
    reference, report = results["device"]
    changed = [k for k, v in reference.state_dict().items() if not torch.equal(v, pruned.state_dict()[k])]
    assert changed  # the repair did something, so equal models below mean equal repairs
    for store in ("host", "disk"):
        model, other = results[store]
        for key, value in reference.state_dict().items():
            assert torch.equal(model.state_dict()[key], value), (store, key)  # bit for bit
        assert other.walks == report.walks and other.bn_sites == report.bn_sites
        assert other.gains.keys() == report.gains.keys()
        assert all(torch.equal(other.gains[k], g) for k, g in report.gains.items())
    assert not any(spill_dir.iterdir())


class ChangesInPlaceWhatIsReadLater(nn.Module):
    """An in-place ReLU on a BN output that a later node reads (as in eager mode, it reads the changed value)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.bn3 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        a = self.bn1(self.conv1(x))
        b = self.bn2(self.conv2(a))  # reads a before the change
        a.relu_()
        return self.fc(self.bn3(a + b).mean((2, 3)))


def test_in_place_changes_reach_the_stored_copies(spill_dir):
    """bn3 is recalibrated on its input as the eager repaired network computes it: from the changed ``a``."""
    torch.manual_seed(0)
    dense = ChangesInPlaceWhatIsReadLater().train()
    with torch.no_grad():
        dense(torch.randn(64, 3, 16, 16))
    dense.eval()
    pruned, masks = pruned_copy(dense, 0.8, "uniform")
    for store in STORES:
        model, _ = _repaired(dense, pruned, masks, "bn_recalibration", store)
        x = _input_of(model.bn3, model).double().transpose(0, 1).flatten(1)
        torch.testing.assert_close(model.bn3.running_mean.double(), x.mean(1), rtol=1e-5, atol=1e-6, msg=store)
        torch.testing.assert_close(model.bn3.running_var.double(), x.var(1), rtol=1e-5, atol=1e-6, msg=store)


@torch.no_grad()
def _input_of(module: nn.Module, model: nn.Module) -> torch.Tensor:
    inputs = []
    handle = module.register_forward_pre_hook(lambda _, args: inputs.append(args[0].clone()))
    for b in _batches():
        model(b)
    handle.remove()
    return torch.cat(inputs)


def test_disk_store_frees_files_as_it_goes_and_leaves_none(spill_dir):
    dense = calibrated_dense()
    pruned, masks = pruned_copy(dense)
    live_files = []

    def watch(nodes):
        for node in nodes:
            live_files.append(len(list(spill_dir.rglob("*.pt"))))
            yield node

    _repaired(dense, pruned, masks, "bn_recalibration", "disk", progress=watch)
    nodes = len(live_files)
    assert max(live_files) > 0  # it did spill
    # freed after the last reader: a residual network has a few live activations at a time, not every node's
    assert max(live_files) <= 2 * CHUNKS * 4 < 2 * CHUNKS * nodes
    assert not any(spill_dir.iterdir())


def test_disk_store_leaves_no_file_when_the_repair_fails(spill_dir):
    dense = calibrated_dense()
    pruned, masks = pruned_copy(dense)
    spilled = []

    def fail_midway(nodes):
        for i, node in enumerate(nodes):
            if i == 20:
                spilled.append(len(list(spill_dir.rglob("*.pt"))))
                raise RuntimeError("interrupted")
            yield node

    with pytest.raises(RuntimeError, match="interrupted"):
        _repaired(dense, pruned, masks, "reconstruct", "disk", progress=fail_midway)
    assert spilled[0] > 0
    assert not any(spill_dir.iterdir())


def test_an_unknown_store_is_refused():
    dense = calibrated_dense()
    pruned, masks = pruned_copy(dense)
    with pytest.raises(ValueError, match=r"activations 'gpu' is not one of \('device', 'host', 'disk'\)"):
        repair(pruned, dense, _batches(), "default", activations="gpu")
    with pytest.raises(ValueError, match="model.activations: 'gpu' is not one of"):
        PruneRepairModule(dict(TINY_NETWORK), "unused.pt", activations="gpu")


def test_yaml_option_reaches_the_repair(tmp_path, capsys, dense_checkpoint, spill_dir):
    digests = {}
    for store in ("device", "disk"):
        root = tmp_path / store
        config = write_config(tmp_path / f"{store}.yaml", pipeline_config(root, dense_checkpoint, activations=store))
        main(["fit", "--config", str(config)])
        metrics = read_metrics(root)
        assert metrics["config"]["activations"] == store
        digests[store] = metrics["state_sha256"]
    assert digests["disk"] == digests["device"]
    assert not any(spill_dir.iterdir())
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(tmp_path / "device.yaml"), "--model.activations", "bogus"])
    assert info.value.code == 2
    assert "activations" in capsys.readouterr().err
