"""RepairLogger and the RR wiring of the pipeline: a tiny run on synthetic data, read back from its event files."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
from test_data import _write_fashion_mnist
from test_models import README_MOBILENET_YAML

from lightning_repair import PruneRepairModule
from lightning_repair.callbacks import RepairLogger, heatmap_figure, layers_figure, render, rr_heatmap, stage_of
from lightning_repair.diagnostics import DEFAULT_GRID
from lightning_repair.layers import prunable_layers
from lightning_repair.models import Network, build_network

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


def test_per_layer_profile_curves_match_metrics_json(finished):
    """rr/<layer>, d_raw/<layer>, d_res/<layer>: one curve per layer over the profile, step = sparsity in per mille."""
    events, profile = finished.events, finished.metrics["rr_profile"]
    steps = [round(s * 1000) for s in profile["grid"]]
    for row in profile["layers"]:
        for metric in ("rr", "d_raw", "d_res"):
            expected = {step: v for step, v in zip(steps, row[metric], strict=True) if v is not None}
            scalars = events.Scalars(f"{metric}/{row['name']}")
            assert {s.step: s.value for s in scalars} == pytest.approx(expected, rel=1e-6, abs=1e-12)
    for row in finished.metrics["layers"]:
        assert events.Scalars(f"density/{row['name']}")[0].value == pytest.approx(row["density"])
    assert not [tag for tag in events.Tags()["scalars"] if tag.startswith("by_depth/")]


def test_text_table_holds_the_allocated_point(finished):
    (text,) = finished.events.Tensors("rr/table/text_summary")
    table = text.tensor_proto.string_val[0].decode()
    for row in finished.metrics["layers"]:
        rr = "-" if row["rr"] is None else f"{row['rr']:.4g}"
        assert f"| {row['name']} | " in table and table.split(f"| {row['name']} | ")[1].split("\n")[0].endswith(
            f"{row['d_res']:.4g} | {rr} |")


def test_per_layer_figure_in_the_event_file(finished):
    """rr/layers: one image, a row per layer; the figure it was drawn from has the layer names on the axis, bars of
    the allocated D_raw, D_res, RR and density, and the stages named."""
    (image,) = finished.events.Images("rr/layers")
    rows = finished.metrics["layers"]
    assert image.height > 20 * len(rows) and image.width >= 1000
    fig = layers_figure(rows)
    ax_d, ax_rr, ax_den = fig.axes
    assert [t.get_text() for t in ax_d.get_yticklabels()] == [r["name"] for r in rows]
    bars = lambda ax: [bar.get_width() for container in ax.containers for bar in container]  # noqa: E731
    widths = bars(ax_d)
    value = lambda r, k: r[k] or 0.0  # noqa: E731
    assert widths == pytest.approx([value(r, "d_raw") for r in rows] + [value(r, "d_res") for r in rows])
    assert bars(ax_rr) == pytest.approx([value(r, "rr") for r in rows])
    assert bars(ax_den) == pytest.approx([r["density"] for r in rows])
    stages = [t.get_text() for t in ax_den.texts if not t.get_text()[0].isdigit()]
    assert stages == ["conv1", "layer1", "layer2", "layer3", "layer4", "fc"]
    assert (image.height, image.width) == render(layers_figure(rows)).shape[:2]


def test_custom_scalar_layout_puts_each_stage_on_one_chart(finished):
    (event,) = finished.events.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    rr_tags = [t for t in finished.events.Tags()["scalars"] if t.startswith("rr/")]
    categories = {c.title: c for c in layout.category}
    assert len(categories) == 3 and all("per stage" in title for title in categories)
    (rr,) = [c for title, c in categories.items() if title.startswith("RR ")]
    charts = {chart.title: chart.multiline.tag[0] for chart in rr.chart}
    assert list(charts) == [f"RR {s}" for s in ("conv1", "layer1", "layer2", "layer3", "layer4", "fc")]
    matched = {title: [t for t in rr_tags if re.search(pattern, t)] for title, pattern in charts.items()}
    assert sorted(t for tags in matched.values() for t in tags) == sorted(rr_tags)  # every curve on exactly one
    assert matched["RR layer2"] == [t for t in rr_tags if t.startswith("rr/layer2.")] and len(matched["RR layer2"]) == 5


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
    assert not events.Tags()["images"] and "density/conv1" in events.Tags()["scalars"]


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
                                               "overrides": [], "search": None}  # fmt: skip
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


# ----------------------------------------------------------------------------- RR views without naming a callback


def test_rr_views_by_default_once_and_the_table_shows_them(tmp_path, dense_checkpoint, capsys):
    """A config without trainer.callbacks still gets every RR view; a config that lists RepairLogger gets them once;
    the terminal table has the D_raw, D_res and RR columns of metrics.json."""
    config = pipeline_config(tmp_path, dense_checkpoint)
    assert "callbacks" not in config["trainer"]
    result = run(tmp_path, config)
    for tag in ("rr/layers", "rr/heatmap"):
        assert len(result.events.Images(tag)) == 1, tag
    assert "rr/layer1.0.conv1" in result.events.Tags()["scalars"]
    out = capsys.readouterr().out
    head, *lines = out.splitlines()[: len(result.metrics["layers"]) + 2]
    assert head.split()[-3:] == ["D_raw", "D_res", "RR"]
    for line, row in zip(lines[1:], result.metrics["layers"], strict=True):
        cells = line.split()
        assert cells[0] == row["name"]
        assert [None if c == "-" else float(c) for c in cells[-3:]] == pytest.approx(
            [None if row[k] is None else round(row[k], 4) for k in ("d_raw", "d_res", "rr")], abs=1e-4)

    listed = tmp_path / "listed"
    listed.mkdir()
    config = pipeline_config(listed, dense_checkpoint)
    config["trainer"]["callbacks"] = [LOGGER]
    assert len(run(listed, config).events.Images("rr/layers")) == 1


def test_run_names_say_what_the_run_was(tmp_path, dense_checkpoint):
    config = pipeline_config(tmp_path, dense_checkpoint, repair=[{"op": "bn_recalibration"}])
    config["trainer"]["logger"]["init_args"] = {"save_dir": str(tmp_path / "logs"), "name": "study"}
    with pytest.warns(UserWarning, match="RR profile from only"):
        run_fit(write_config(tmp_path / "config.yaml", config))
    with pytest.warns(UserWarning, match="RR profile from only"):
        run_fit(write_config(tmp_path / "config.yaml", config), "--model.sparsity", "0.8")
    runs = sorted(str(p.parent.relative_to(tmp_path / "logs")) for p in (tmp_path / "logs").rglob("metrics.json"))
    assert runs == ["study/resnet18/erk-0.8/bn_recalibration/version_0",
                    "study/resnet18/erk-0.9/bn_recalibration/version_0"]  # fmt: skip


@pytest.mark.parametrize("flag", [["--trainer.logger", "false"], ["--trainer.fast_dev_run", "true"]])
def test_no_logger_writes_under_runs_and_never_in_the_current_directory(tmp_path, dense_checkpoint, monkeypatch,
                                                                        capsys, flag):  # fmt: skip
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    config = write_config(tmp_path / "config.yaml", pipeline_config(tmp_path, dense_checkpoint))
    with pytest.warns(UserWarning, match="RR profile from only"):
        run_fit(config, *flag)
    folder = work / "runs" / "resnet18" / "erk-0.9" / "default"
    assert sorted(p.name for p in work.iterdir()) == ["runs"]
    written = {p.name for p in folder.iterdir()} - {"config.yaml"}  # LightningCLI saves none with fast_dev_run
    assert sorted(written) == ["metrics.json", "repaired.pt", "repaired.sparse.pt"]
    assert not run_dir(tmp_path).exists()
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith(f"wrote {folder / 'metrics.json'}")
    assert lines[-2].startswith("per-layer RR, D_raw and D_res: in metrics.json")


def test_heatmap_colour_scale_shows_rr_above_one():
    profile = {"grid": [0.5, 0.9], "layers": [{"name": "a", "rr": [0.2, 1.8]}, {"name": "b", "rr": [0.5, 1.0]}]}
    fig = heatmap_figure(profile, [{"name": "a", "density": 0.3}, {"name": "b", "density": 0.05}])
    colorbar = fig.axes[1]
    assert colorbar.get_ylim()[1] == pytest.approx(1.8)
    mesh = fig.axes[0].collections[0]
    above, at_one = mesh.cmap(mesh.norm(1.8)), mesh.cmap(mesh.norm(1.0))
    assert above[0] > 0.5 and above[1] < 0.2  # a dark red, not viridis' yellow at 1
    assert at_one != above and mesh.cmap(mesh.norm(1.4)) not in (at_one, above)
    capped = heatmap_figure({"grid": [0.5], "layers": [{"name": "a", "rr": [0.4]}]}, [])
    assert capped.axes[1].get_ylim()[1] == pytest.approx(1.0)


def test_stages():
    assert stage_of(["conv1", "layer1.0.conv1", "layer1.1.conv2", "layer2.0.downsample.0", "fc"]) == [
        "conv1", "layer1", "layer1", "layer2", "fc"]  # fmt: skip
    names = [f"features.{i}.conv.0" for i in range(6)] + ["features.0.x", "classifier.1"]
    assert stage_of(names) == [f"features.{i}" for i in range(6)] + ["features.0", "classifier"]


def test_readme_bring_your_own_model_yaml_as_written_leaves_the_rr_views(tmp_path, monkeypatch):
    """The README's MobileNetV2 YAML (no trainer section, no callback named), run as written in a folder holding the
    user's checkpoint and a small Fashion-MNIST under data/: the event file holds rr/* and the per-layer figure."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    _write_fashion_mnist(tmp_path / "data", n_train=1030, n_test=40)
    torch.manual_seed(0)
    spec = yaml.safe_load(README_MOBILENET_YAML)["model"]["init_args"]["network"]
    torch.save(build_network(spec).state_dict(), tmp_path / "mobilenet_v2.pt")
    (tmp_path / "byom.yaml").write_text(README_MOBILENET_YAML)
    run_fit(tmp_path / "byom.yaml")
    (run,) = [p.parent for p in (tmp_path / "lightning_logs").rglob("metrics.json")]
    assert run.relative_to(tmp_path).as_posix() == "lightning_logs/mobilenetv2/lamp-0.95/default/version_0"
    events = EventAccumulator(str(run), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert {"rr/layers", "rr/heatmap"} <= set(events.Tags()["images"])
    rr_tags = [t for t in events.Tags()["scalars"] if t.startswith("rr/")]
    layers = json.loads((run / "metrics.json").read_text())["layers"]
    assert len(rr_tags) == len(layers) == 53 and "rr/features.0.0" in rr_tags
    (image,) = events.Images("rr/layers")
    assert image.height > 20 * len(layers)
