"""Export: dense-shaped and compact sparse files, packed masks, the size report and atomic writes."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from lightning_repair import export as export_module
from lightning_repair.data import DATASETS
from lightning_repair.export import (
    atomic_torch_save,
    atomic_write_json,
    export,
    load,
    load_exported,
    load_sparse,
    pack_mask,
    sparse_state,
    unpack_mask,
)
from lightning_repair.models import (
    METADATA_KEY,
    CheckpointMismatchError,
    Network,
    checkpoint_metadata,
    load_weights,
    read_checkpoint,
)

from helpers import TINY_NETWORK, leftover_temp_files, pruned_copy


@pytest.fixture
def pruned(dense):
    """A 90%-sparse model with perturbed BN buffers, so every tensor kind is non-trivial."""
    model, masks = pruned_copy(dense, sparsity=0.9)
    with torch.no_grad():
        model.bn1.running_mean.add_(0.25)
    return model, masks


def test_dense_and_sparse_files_round_trip_bit_exactly(tmp_path, pruned):
    model, masks = pruned
    written = export(model, masks, tmp_path)
    expected = model.state_dict()
    dense_file = torch.load(written["state_dict"], map_location="cpu", weights_only=True)
    from_sparse = load_sparse(written["sparse"])
    for state in (dense_file, from_sparse):
        assert state.keys() == expected.keys()
        for key, tensor in expected.items():
            assert state[key].dtype == tensor.dtype and torch.equal(state[key], tensor), key
    assert leftover_temp_files(tmp_path) == []


@pytest.mark.parametrize("shape", [(1,), (7,), (9,), (3, 5), (2, 3, 3, 3), (8, 2)])
@pytest.mark.parametrize("fill", ["random", "all", "none"])
def test_mask_pack_unpack_round_trip(shape, fill):
    n = math.prod(shape)
    mask = {
        "random": torch.rand(shape, generator=torch.Generator().manual_seed(n)) < 0.3,
        "all": torch.ones(shape, dtype=torch.bool),
        "none": torch.zeros(shape, dtype=torch.bool),
    }[fill]
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n / 8)
    unpacked = unpack_mask(packed, shape)
    assert unpacked.dtype == torch.bool and unpacked.shape == shape and torch.equal(unpacked, mask)


def test_reported_sizes_are_the_files_on_disk(tmp_path, pruned):
    model, masks = pruned
    written = export(model, masks, tmp_path)
    assert written["dense_bytes"] == os.path.getsize(written["state_dict"])
    assert written["sparse_bytes"] == os.path.getsize(written["sparse"])
    tensor_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert written["dense_bytes"] > tensor_bytes  # the file also holds names, shapes and the zip layout
    assert written["sparse_bytes"] < written["dense_bytes"] / 3  # 10% of the values plus one bit per weight
    assert written["ratio"] == pytest.approx(written["sparse_bytes"] / written["dense_bytes"])


def test_either_exported_file_loads_as_the_same_state_dict(tmp_path, pruned):
    model, masks = pruned
    written = export(model, masks, tmp_path)
    dense, sparse = load_exported(written["state_dict"]), load_exported(written["sparse"])
    assert dense.keys() == sparse.keys() == model.state_dict().keys()
    assert all(torch.equal(dense[k], sparse[k]) for k in dense)


def test_refused_pickle_is_explained_without_torchs_advice(tmp_path):
    class RunsCode:
        def __reduce__(self):
            return print, ("the file's code ran",)

    torch.save({"fc.weight": RunsCode()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointMismatchError) as info:
        load_exported(tmp_path / "evil.pt")
    message = str(info.value)
    assert "evil.pt" in message and "print" in message  # the global torch refused
    assert "weights_only" not in message and "likely succeed" not in message and "allowlist" not in message


def test_exported_state_dict_loads_into_the_plain_architecture(tmp_path, pruned):
    model, masks = pruned
    written = export(model, masks, tmp_path)
    state = torch.load(written["state_dict"], map_location="cpu", weights_only=True)
    assert not any(key.endswith(("_orig", "_mask")) for key in state)
    plain = load_weights(Network(**TINY_NETWORK).build(), written["state_dict"])
    for name, mask in masks.items():
        assert torch.all(plain.get_submodule(name).weight[~mask] == 0), name


def tamper(state: dict[str, torch.Tensor], how: str) -> None:
    key = "layer1.0.conv1.weight"
    if how == "values":
        state[f"{key}::values"] = state[f"{key}::values"][:-1]
    elif how == "mask":
        del state[f"{key}::mask"]
    else:  # the shape claims more weights than the packed mask holds
        state[f"{key}::shape"] = state[f"{key}::shape"] * 2


@pytest.mark.parametrize("how", ["values", "mask", "shape"])
def test_tampered_sparse_file_is_refused(tmp_path, pruned, how):
    model, masks = pruned
    state = sparse_state(model, masks)
    tamper(state, how)
    torch.save(state, tmp_path / "tampered.sparse.pt")
    with pytest.raises(CheckpointMismatchError, match=r"layer1\.0\.conv1\.weight"):
        load_sparse(tmp_path / "tampered.sparse.pt")


@pytest.mark.parametrize("failing", ["fsync", "replace"])
@pytest.mark.parametrize("write", ["json", "torch"])
def test_failed_atomic_write_keeps_the_old_file(tmp_path, monkeypatch, failing, write):
    path = tmp_path / "result"
    save = {"json": atomic_write_json, "torch": atomic_torch_save}[write]
    save(path, {"version": 1})
    before = path.read_bytes()

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_module.os, failing, disk_full)
    with pytest.raises(OSError, match="No space left"):
        save(path, {"version": 2})
    assert path.read_bytes() == before
    assert leftover_temp_files(tmp_path) == []


def test_json_with_nan_is_never_written(tmp_path):
    path = tmp_path / "metrics.json"
    atomic_write_json(path, {"accuracy": 0.5})
    with pytest.raises(ValueError, match="JSON compliant"):
        atomic_write_json(path, {"accuracy": float("nan")})
    assert json.loads(path.read_text()) == {"accuracy": 0.5}
    assert leftover_temp_files(tmp_path) == []


# ----------------------------------------------------------------------------- checkpoints that describe themselves

SHIPPED = sorted((Path(__file__).parents[1] / "checkpoints").glob("*.pt"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_checkpoints_describe_themselves_in_plain_data(path):
    obj = torch.load(path, map_location="cpu", weights_only=True)
    metadata = obj[METADATA_KEY]
    assert json.loads(json.dumps(metadata)) == metadata  # strings, numbers, lists and dicts only
    assert metadata["format"] == 1 and metadata["input"]["dataset"] == "fashion_mnist"
    model, normalize = load(path)  # builds the recorded network and loads the weights strictly
    assert not model.training and normalize.channels == metadata["input"]["channels"]
    assert model(normalize(torch.rand(2, 1, 28, 28))).shape == (2, 10)


def test_repaired_files_record_the_network_and_load_in_one_call(tmp_path, pruned):
    model, masks = pruned
    metadata = checkpoint_metadata(Network(**TINY_NETWORK), DATASETS["cifar10"], "cifar10")
    written = export(model, masks, tmp_path, metadata=metadata)
    x = torch.rand(3, 3, 16, 16)
    for name in ("state_dict", "sparse"):
        obj = torch.load(written[name], map_location="cpu", weights_only=True)
        assert obj[METADATA_KEY] == metadata
        loaded, normalize = load(written[name])
        assert not loaded.training
        expected = (x - torch.tensor(DATASETS["cifar10"].mean).view(3, 1, 1)) / torch.tensor(
            DATASETS["cifar10"].std).view(3, 1, 1)  # fmt: skip
        torch.testing.assert_close(normalize(x), expected)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model.eval()(x))
    # the plain route: torch.load, then load_state_dict
    plain = Network(**TINY_NETWORK).build()
    plain.load_state_dict(torch.load(written["state_dict"], weights_only=True)["state_dict"])


def test_load_refuses_a_bare_state_dict_without_a_network_and_a_disagreeing_one(tmp_path, pruned):
    model, masks = pruned
    written = export(model, masks, tmp_path)  # no metadata: bare state_dicts, as before
    assert set(torch.load(written["state_dict"], weights_only=True)) == set(model.state_dict())
    with pytest.raises(CheckpointMismatchError, match="records no network"):
        load(written["state_dict"])
    assert isinstance(load(written["sparse"], network=dict(TINY_NETWORK))[0], torch.nn.Module)
    described = export(model, masks, tmp_path / "d", metadata=checkpoint_metadata(Network(**TINY_NETWORK)))
    with pytest.raises(CheckpointMismatchError, match=r'"width":0\.25.*"width":0\.125'):
        load(described["state_dict"], network=dict(TINY_NETWORK, width=0.25))


def test_code_in_the_metadata_is_refused(tmp_path):
    class RunsCode:
        def __reduce__(self):
            return print, ("the file's code ran",)

    state = Network(**TINY_NETWORK).build().state_dict()
    torch.save({"state_dict": state, METADATA_KEY: {"format": 1, "network": RunsCode()}}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointMismatchError, match="evil.pt"):
        load(tmp_path / "evil.pt")
    with pytest.raises(CheckpointMismatchError, match="weights_only"):
        read_checkpoint(tmp_path / "evil.pt")
