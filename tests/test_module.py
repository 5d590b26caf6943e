"""PruneRepairModule's ``fit``: metrics.json, the saved model, TensorBoard scalars and refused inputs."""

from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from lightning_repair.allocation import Allocation, allocate
from lightning_repair.cli import build_cli
from lightning_repair.data import build_datasets
from lightning_repair.datamodule import ImageDataModule
from lightning_repair.export import load_sparse
from lightning_repair.layers import prunable_layers
from lightning_repair.masks import apply_masks, compute_masks
from lightning_repair.models import CheckpointMismatchError, Network, check_running_stats, load_weights
from lightning_repair.operators import describe, parse_recipe

from helpers import (
    TINY_NETWORK,
    calibrated_dense,
    pipeline_config,
    plain_accuracy,
    read_metrics,
    run_dir,
    run_fit,
    save_dense_checkpoint,
    write_config,
)

pytestmark = pytest.mark.usefixtures("raise_errors")  # errors as exceptions (conftest.py)


LAYER_FIELDS = {"name", "role", "shape", "numel", "kept", "density", "rr", "d_raw", "d_res"}
PHASES = {"calibration_forward", "allocation", "masking", "repair", "evaluation"}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One pipeline run (erk at 90%, the default repair) shared by the read-only tests below."""
    root = tmp_path_factory.mktemp("pipeline")
    checkpoint = save_dense_checkpoint(root / "dense.pt")
    config = write_config(root / "config.yaml", pipeline_config(root, checkpoint))
    cli = build_cli(["--config", str(config)], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return SimpleNamespace(root=root, checkpoint=checkpoint, trainer=cli.trainer, metrics=read_metrics(root))


def test_metrics_json_schema(finished):
    metrics = finished.metrics
    fields = {"accuracy", "sparsity", "allocation", "repair", "layers", "timings_s", "config", "data_config"}
    assert fields <= set(metrics)
    assert set(metrics["accuracy"]) == {"dense", "pruned", "repaired"}
    assert set(metrics["sparsity"]) == {"target", "achieved"}
    assert metrics["sparsity"]["target"] == 0.9
    assert metrics["sparsity"]["achieved"] == pytest.approx(0.9, abs=1e-4)
    assert metrics["allocation"] == "erk"
    assert metrics["repair"] == json.loads(json.dumps(describe(parse_recipe("default"))))

    model = Network(**TINY_NETWORK).build()
    assert [row["name"] for row in metrics["layers"]] == [layer.name for layer in prunable_layers(model)]
    for row, layer in zip(metrics["layers"], prunable_layers(model), strict=True):
        assert set(row) == LAYER_FIELDS
        assert row["role"] == layer.role and tuple(row["shape"]) == layer.shape and row["numel"] == layer.numel
        assert 0 <= row["kept"] <= row["numel"] and row["density"] == row["kept"] / row["numel"]
    kept, total = sum(r["kept"] for r in metrics["layers"]), sum(r["numel"] for r in metrics["layers"])
    assert metrics["sparsity"]["achieved"] == pytest.approx(1 - kept / total)

    assert PHASES <= set(metrics["timings_s"])
    assert all(math.isfinite(t) and t >= 0 for t in metrics["timings_s"].values())
    assert metrics["timings_s"]["calibration_forward"] > 0

    config = metrics["config"]
    assert config["sparsity"] == 0.9 and config["checkpoint"] == str(finished.checkpoint)
    assert config["network"] == TINY_NETWORK | {"stem": "cifar"}
    assert metrics["data_config"]["dataset"] == "synthetic" and metrics["data_config"]["calibration_size"] == 64


def test_no_training_step_runs(finished):
    assert finished.trainer.global_step == 0
    assert finished.trainer.fit_loop.epoch_loop.batch_progress.total.ready == 0


def test_accuracies_equal_a_plain_count_over_the_test_set(finished):
    """Dense, pruned and repaired top-1/top-5 as metrics.json reports them, recounted image by image."""
    metrics = finished.metrics
    dense = calibrated_dense()
    keep = {row["name"]: row["kept"] for row in metrics["layers"]}
    models = {
        "dense": dense,
        "pruned": apply_masks(copy.deepcopy(dense), compute_masks(dense, keep)),
        "repaired": load_weights(Network(**TINY_NETWORK).build(), run_dir(finished.root) / "repaired.pt"),
    }
    test_set = build_datasets("synthetic")[1]
    for name, model in models.items():
        top1, top5 = plain_accuracy(model, test_set)
        assert metrics["accuracy"][name] == pytest.approx(top1, abs=1e-12), name
        assert metrics["accuracy_top5"][name] == pytest.approx(top5, abs=1e-12), name
    assert metrics["test_samples"] == len(test_set)


def test_saved_model_is_plain_masked_and_loads_with_weights_only(finished):
    folder = run_dir(finished.root)
    state = torch.load(folder / "repaired.pt", map_location="cpu", weights_only=True)["state_dict"]
    assert not any("weight_orig" in key or "weight_mask" in key for key in state)
    model = load_weights(Network(**TINY_NETWORK).build(), folder / "repaired.pt")  # strict: every key fits

    # the masks are exactly the magnitude masks of the dense weights at the reported keep counts
    keep = {row["name"]: row["kept"] for row in finished.metrics["layers"]}
    assert keep == allocate(calibrated_dense(), 0.9, Allocation("erk"))
    for name, mask in compute_masks(calibrated_dense(), keep).items():
        weight = model.get_submodule(name).weight
        assert torch.all(weight[~mask] == 0), name
        assert int(mask.sum()) == keep[name]

    assert all(torch.equal(tensor, state[key]) for key, tensor in load_sparse(folder / "repaired.sparse.pt").items())


def test_accuracies_logged_to_tensorboard(finished):
    events = EventAccumulator(str(run_dir(finished.root)))
    events.Reload()
    for name, accuracy in finished.metrics["accuracy"].items():
        (scalar,) = events.Scalars(f"test/acc_{name}")
        assert scalar.value == pytest.approx(accuracy, abs=1e-6)
    for name in finished.metrics["accuracy_top5"]:
        assert f"test/top5_{name}" in events.Tags()["scalars"]


def test_no_top5_with_five_classes_or_fewer(tmp_path):
    checkpoint = save_dense_checkpoint(tmp_path / "dense.pt", num_classes=4)
    config = pipeline_config(tmp_path, checkpoint)
    config["model"]["init_args"]["network"]["num_classes"] = 4
    config["data"]["synthetic_shape"] = [4, 3, 16]
    run_fit(write_config(tmp_path / "config.yaml", config))
    metrics = read_metrics(tmp_path)
    assert "accuracy_top5" not in metrics
    assert all(0 <= acc <= 1 for acc in metrics["accuracy"].values())


def test_allocation_runs_once(tmp_path, dense_checkpoint, monkeypatch):
    """The pipeline's keep counts (also used for the RR diagnostics) are the ones pruned: no second allocation."""
    from lightning_repair import pipeline

    calls = []

    def counted(*args, **kwargs):
        calls.append(args[1])
        return allocate(*args, **kwargs)

    monkeypatch.setattr(pipeline, "allocate", counted)  # the one place every run allocates: pipeline.choose_keep
    run_fit(write_config(tmp_path / "config.yaml", pipeline_config(tmp_path, dense_checkpoint)))
    assert calls == [0.9]
    assert read_metrics(tmp_path)["timings_s"]["allocation"] > 0


@pytest.mark.parametrize(
    ("checkpoint_kwargs", "listed"),
    [
        ({"arch": "vgg16_bn"}, ["missing", "conv1.weight", "unexpected", "features.0.weight"]),
        ({"num_classes": 7}, ["shape mismatch", "fc.weight: checkpoint (7, 64) vs model (10, 64)"]),
    ],
    ids=["architecture", "class-count"],
)
def test_checkpoint_that_does_not_fit_is_refused_listing_keys(tmp_path, checkpoint_kwargs, listed):
    checkpoint = save_dense_checkpoint(tmp_path / "other.pt", **checkpoint_kwargs)
    config = write_config(tmp_path / "config.yaml", pipeline_config(tmp_path, checkpoint))
    with pytest.raises(CheckpointMismatchError, match="other.pt does not fit ResNet") as info:
        run_fit(config)
    for part in listed:
        assert part in str(info.value)
    assert not (run_dir(tmp_path) / "metrics.json").exists()


def test_calibration_set_smaller_than_a_batch_is_one_batch():
    dm = ImageDataModule(dataset="synthetic", calibration_size=16, batch_size=32, augment=False)
    (batch,) = dm.calibration_batches("cpu")
    assert batch.shape == (16, 3, 16, 16)
    assert torch.equal(batch, torch.stack([dm.calibration_set[i] for i in range(16)]))


def test_batchnorm_without_running_statistics_is_refused_naming_it():
    model = calibrated_dense()
    model.layer2[1].bn1 = torch.nn.BatchNorm2d(16, track_running_stats=False)
    with pytest.raises(ValueError, match=r"BatchNorm 'layer2\.1\.bn1' has no running statistics"):
        check_running_stats(model)
    check_running_stats(calibrated_dense())  # the plain model passes


def test_hparams_view_without_framework_keys_or_hp_metric(finished):
    events = EventAccumulator(str(run_dir(finished.root)))
    events.Reload()
    assert "hp_metric" not in events.Tags()["scalars"]
    content = events.PluginTagToContent("hparams")
    hparams = HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info.hparams
    assert "sparsity" in hparams and "data.calibration_size" in hparams
    assert not [key for key in hparams if key.startswith("_") or "._" in key]
    assert not [key for key in (*finished.metrics["config"], *finished.metrics["data_config"]) if key.startswith("_")]
