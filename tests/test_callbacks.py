"""RepairLogger and the RR wiring of the pipeline: a tiny run on synthetic data, read back from its event files."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from lightning_repair import PruneRepairModule
from lightning_repair.callbacks import RepairLogger, heatmap_figure, rr_heatmap
from lightning_repair.diagnostics import DEFAULT_GRID
from lightning_repair.layers import prunable_layers
from lightning_repair.models import Network

from helpers import TINY_NETWORK, pipeline_config, read_metrics, run_dir, run_fit, save_dense_checkpoint, write_config

LOGGER = {"class_path": "lightning_repair.callbacks.RepairLogger"}
CONFIGS = Path(__file__).parents[1] / "configs" / "rr"


def run(root, config) -> SimpleNamespace:
    """Fit ``config`` (which logs into ``run_dir(root)``) and read back its metrics.json and event files."""
    with pytest.warns(UserWarning, match="RR profile from only 64 calibration images"):
        run_fit(write_config(root / "config.yaml", config))
    events = EventAccumulator(str(run_dir(root)), size_guidance={"images": 0, "histograms": 0, "scalars": 0})
    events.Reload()
    return SimpleNamespace(metrics=read_metrics(root), events=events)


def shipped_on_synthetic(name: str, root, checkpoint) -> dict:
    """configs/rr/<name>.yaml as shipped, but on the synthetic dataset and the tiny network, logging to root."""
    config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    tiny = pipeline_config(root, checkpoint)
    assert config["trainer"]["callbacks"] == [LOGGER]
    config["trainer"] |= {key: tiny["trainer"][key] for key in ("accelerator", "logger", "enable_progress_bar")}
    config["model"]["init_args"] |= {"network": dict(TINY_NETWORK), "checkpoint": str(checkpoint)}
    config["data"] = tiny["data"]
    return config


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The shipped rr config: the profile is needed for the allocation, then the allocated point is measured."""
    root = tmp_path_factory.mktemp("rr_run")
    return run(root, shipped_on_synthetic("fashion_mnist_resnet18_rr", root, save_dense_checkpoint(root / "dense.pt")))


def test_metrics_json_has_the_profile_and_the_allocated_point(finished):
    metrics = finished.metrics
    names = [layer.name for layer in prunable_layers(Network(**TINY_NETWORK).build())]
    profile = metrics["rr_profile"]
    assert profile["grid"] == list(DEFAULT_GRID) and profile["samples"] == 64
    assert [row["name"] for row in profile["layers"]] == names
    for row in profile["layers"]:
        assert len(row["d_raw"]) == len(row["d_res"]) == len(row["rr"]) == len(DEFAULT_GRID)
        assert all(r is None or r >= 0 for r in row["rr"])  # above 1 possible: the default rr_repair vm can add damage
    dense = [row for row in metrics["layers"] if row["kept"] == row["numel"]]
    assert dense  # rr keeps some small early layers dense here
    for row in dense:  # no damage, RR undefined
        assert row["d_raw"] == row["d_res"] == 0 and row["rr"] is None
    for row in metrics["layers"]:
        if row not in dense:
            assert row["rr"] == pytest.approx(row["d_res"] / row["d_raw"])
            assert row["d_res"] >= 0 and row["d_raw"] > 0
    assert metrics["allocation"] == "rr" and metrics["sparsity"]["achieved"] == pytest.approx(0.95, abs=1e-4)
    assert metrics["timings_s"]["rr"] > 0


def test_per_layer_scalars_match_metrics_json(finished):
    events, rows = finished.events, finished.metrics["layers"]
    for row in rows:
        for metric in ("rr", "d_raw", "d_res"):
            if row[metric] is not None:
                (scalar,) = events.Scalars(f"{metric}/{row['name']}")
                assert scalar.value == pytest.approx(row[metric], rel=1e-6, abs=1e-12)
        assert events.Scalars(f"density/{row['name']}")[0].value == pytest.approx(row["density"])
    depth = events.Scalars("by_depth/density")
    assert [s.step for s in depth] == list(range(len(rows)))
    assert [s.value for s in depth] == pytest.approx([row["density"] for row in rows])
    assert [s.step for s in events.Scalars("by_depth/rr")] == [i for i, r in enumerate(rows) if r["rr"] is not None]
    (text,) = events.Tensors("by_depth/layers/text_summary")
    assert f"| {len(rows) - 1} | fc |" in text.tensor_proto.string_val[0].decode()


def test_rr_heatmap_image(finished):
    (image,) = finished.events.Images("rr/heatmap")
    layers = len(finished.metrics["layers"])
    assert image.height > 20 * layers and image.width > 300  # one readable row per layer
    expected = rr_heatmap(finished.metrics["rr_profile"], finished.metrics["layers"])
    assert (image.height, image.width) == expected.shape[:2]


def test_repair_histograms_one_step_per_site(finished):
    tags = finished.events.Tags()["histograms"]
    assert "repair/variance_ratio_before" in tags
    histograms = finished.events.Histograms("repair/variance_ratio_before")
    bn_sites = 20  # ResNet-18: 17 BNs in blocks and stem + 3 downsample BNs
    assert [h.step for h in histograms] == list(range(bn_sites))
    channels = sum(h.histogram_value.num for h in histograms)
    assert channels == 8 + 4 * (8 + 16 + 32 + 64) + 16 + 32 + 64  # width 0.125: 8, 16, 32, 64 channels
    assert all(h.histogram_value.min >= 0 for h in histograms)  # variance ratios
    after = finished.events.Histograms("repair/variance_ratio_after")
    assert [h.step for h in after] == list(range(bn_sites)) and sum(h.histogram_value.num for h in after) == channels


def test_hparams_view_has_the_run_and_its_accuracies(finished):
    content = finished.events.PluginTagToContent("hparams")
    start = HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info.hparams
    assert start["allocation"].string_value == "rr" and start["sparsity"].number_value == pytest.approx(0.95)
    assert start["network.arch"].string_value == "resnet18" and start["data.calibration_size"].number_value == 64
    assert start["rr_grid"].string_value == str(list(DEFAULT_GRID))
    experiment = HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in experiment.metric_infos} == {"hp/acc_dense", "hp/acc_pruned", "hp/acc_repaired"}
    for name, accuracy in finished.metrics["accuracy"].items():
        assert finished.events.Scalars(f"hp/acc_{name}")[0].value == pytest.approx(accuracy)


def test_rr_diagnostics_measured_in_the_profile_pass_for_other_allocations(tmp_path, dense_checkpoint):
    """uniform does not need the profile: the allocated keep counts are measured in the profile's own pass."""
    config = pipeline_config(tmp_path, dense_checkpoint, allocation="uniform", rr_grid=[0.9, 0.5])
    config["trainer"]["callbacks"] = [LOGGER]
    result = run(tmp_path, config)
    assert result.metrics["rr_profile"]["grid"] == [0.5, 0.9]
    at_grid_point = 0
    for row, profile_row in zip(result.metrics["layers"], result.metrics["rr_profile"]["layers"], strict=True):
        if row["kept"] == row["numel"] - round(0.9 * row["numel"]):  # uniform at 90%: the 0.9 grid point
            at_grid_point += 1
            for metric in ("d_raw", "d_res", "rr"):
                assert row[metric] == pytest.approx(profile_row[metric][1], rel=1e-12)
    assert at_grid_point >= len(result.metrics["layers"]) // 2  # the others are rounded one weight off
    json.dumps(result.metrics, allow_nan=False)


def test_rr_grid_off(tmp_path, dense_checkpoint):
    config = pipeline_config(tmp_path, dense_checkpoint, rr_grid=None)
    config["trainer"]["callbacks"] = [LOGGER]
    run_fit(write_config(tmp_path / "config.yaml", config))
    metrics = read_metrics(tmp_path)
    assert "rr_profile" not in metrics and "rr" not in metrics["timings_s"]
    assert all("rr" not in row for row in metrics["layers"])
    events = EventAccumulator(str(run_dir(tmp_path)))
    events.Reload()
    assert not events.Tags()["images"] and "by_depth/density" in events.Tags()["scalars"]


def test_profile_methods_need_a_grid_and_grids_are_checked(dense_checkpoint):
    network = Network(**TINY_NETWORK)
    with pytest.raises(ValueError, match="allocation 'erk_rr' needs an RR profile: set model.rr_grid"):
        PruneRepairModule(network, str(dense_checkpoint), allocation="erk_rr", rr_grid=[])
    with pytest.raises(ValueError, match=r"sparsity 1.0 is not a number in \(0, 1\)"):
        PruneRepairModule(network, str(dense_checkpoint), rr_grid=[0.5, 1.0])


def test_shipped_erk_rr_config_runs_on_synthetic_data(tmp_path, dense_checkpoint):
    result = run(tmp_path, shipped_on_synthetic("fashion_mnist_resnet18_erk_rr", tmp_path, dense_checkpoint))
    metrics = result.metrics
    assert metrics["allocation"] == "erk_rr" and metrics["sparsity"]["achieved"] == pytest.approx(0.95, abs=1e-4)
    assert metrics["config"]["allocation"] == {"method": "erk_rr", "power": 1.0, "rr_power": 1.0, "keep_dense": [],
                                               "overrides": []}  # fmt: skip
    assert all(row["d_res"] is not None for row in metrics["layers"])
    assert result.events.Images("rr/heatmap")


def test_logger_without_results_or_tensorboard_warns():
    trainer = SimpleNamespace(is_global_zero=True, loggers=[])
    with pytest.warns(UserWarning, match="left no results"):
        RepairLogger().on_fit_end(trainer, SimpleNamespace(results={}))
    with pytest.warns(UserWarning, match="no TensorBoardLogger"):
        RepairLogger().on_fit_end(trainer, SimpleNamespace(results={"layers": []}))


def test_heatmap_marks_undefined_cells_and_allocated_sparsity():
    profile = {"grid": [0.5, 0.9], "layers": [{"name": "a", "rr": [0.2, None]}, {"name": "b", "rr": [0.5, 1.0]}]}
    image = rr_heatmap(profile, [{"name": "a", "density": 0.3}, {"name": "b", "density": 0.05}])
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    grey = (image == 204).all(2)  # matplotlib's "0.8" grey for undefined cells
    red = (image[..., 0] > 200) & (image[..., 1] < 60) & (image[..., 2] < 60)  # the allocated-sparsity dots
    assert grey.sum() > 100 and red.sum() > 10


def test_heatmap_axis_is_numeric_and_every_marker_inside_it():
    profile = {"grid": [0.5, 0.7, 0.9, 0.97, 0.99], "layers": [{"name": n, "rr": [0.1] * 5} for n in "abc"]}
    rows = [{"name": "a", "density": 1.0}, {"name": "b", "density": 0.05}, {"name": "c", "density": 0.0}]
    ax = heatmap_figure(profile, rows).axes[0]
    width = lambda lo, hi: np.diff(ax.transData.transform([(lo, 0), (hi, 0)])[:, 0])[0]  # noqa: E731
    assert width(0.0, 0.9) == pytest.approx(width(0.9, 0.99))  # a decade of density each: numeric, not categories
    assert width(0.97, 0.99) != pytest.approx(width(0.5, 0.7), rel=0.1)
    markers = {c.get_label(): c.get_offsets() for c in ax.collections if c.get_label() in ("allocated sparsity",
               "pruned entirely")}  # fmt: skip
    assert markers["allocated sparsity"][:, 0].tolist() == pytest.approx([0.0, 0.95])  # a dense layer at 0
    assert markers["pruned entirely"][:, 1].tolist() == [2]
    low, high = ax.get_xlim()
    assert all(low < x < high for points in markers.values() for x in points[:, 0])  # drawn, not clipped


def test_failed_run_leaves_no_empty_run_folder(tmp_path, dense_checkpoint, monkeypatch):
    monkeypatch.setenv("LIGHTNING_REPAIR_TRACEBACK", "1")
    config = write_config(tmp_path / "config.yaml", pipeline_config(tmp_path, dense_checkpoint))
    with pytest.raises(FileNotFoundError):
        run_fit(config, "--model.checkpoint", str(tmp_path / "nowhere.pt"))
    assert not run_dir(tmp_path).exists()

    run_fit(config)  # a folder holding a finished run's results is kept when a later run in it fails
    with pytest.raises(FileNotFoundError):
        run_fit(config, "--model.checkpoint", str(tmp_path / "nowhere.pt"))
    assert (run_dir(tmp_path) / "metrics.json").is_file() and (run_dir(tmp_path) / "repaired.pt").is_file()
