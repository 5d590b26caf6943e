"""The shipped experiment configs parse, and run for a few batches on synthetic data of their dataset's shape.

Every config is parsed and built as written except for what makes it small: a tiny width (same
architecture and stem), synthetic images with the dataset's classes, channels and image size, CPU. One
sweep config and one training config per architecture also run: a sweep with one cell per allocation,
a training for two steps.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
import yaml

from lightning_repair import cli, datamodule, sweep
from lightning_repair.data import DATASETS, build_datasets
from lightning_repair.models import build_network, network_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SWEEPS = sorted((CONFIGS / "paper" / "sweep").glob("*.yaml")) + sorted((CONFIGS / "sweep").glob("*.yaml"))
TRAININGS = sorted((CONFIGS / "paper" / "train").glob("*.yaml")) + sorted((CONFIGS / "train").glob("*.yaml"))
# one experiment per architecture, covering both stems, 1 and 3 channels, 28/32/224 px, 10 and 100 classes,
# an image folder, a regularizer and the CPU reproduction
RUN = [
    "sweep/fashion_mnist_transition.yaml", "train/fashion_mnist_resnet18_wcr.yaml",
    "paper/sweep/cifar10_resnet34.yaml", "paper/train/cifar10_resnet34.yaml",
    "paper/sweep/imagenet100_resnet50.yaml", "paper/train/imagenet100_resnet50.yaml",
    "paper/sweep/cifar100_vgg16_bn.yaml", "paper/train/cifar100_vgg16_bn.yaml",
    "paper/sweep/cifar10_densenet121.yaml", "paper/train/cifar10_densenet121.yaml",
    "sweep/fashion_mnist_mobilenetv2_transition.yaml", "train/fashion_mnist_mobilenetv2.yaml",
]  # fmt: skip
TINY_WIDTH = 1 / 16
CPU = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto", "--trainer.precision=32-true"]


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def name(path: Path) -> str:
    return str(path.relative_to(CONFIGS))


def architecture(config: dict) -> str:
    network = config["model"]["init_args"]["network"]
    return network.get("arch") or network["class_path"]


def small(config: dict) -> list[str]:
    """Flags that keep the config's architecture and data shape but make it tiny, on CPU (a network given by
    class_path keeps its configured size)."""
    network, data = config["model"]["init_args"]["network"], config["data"]
    shortcut = "arch" in network
    classes = network["num_classes"] if shortcut else network["init_args"]["num_classes"]
    channels = network["in_channels"] if shortcut else 3 if data.get("rgb") else DATASETS[data["dataset"]].in_channels
    shape = [classes, channels, DATASETS[data["dataset"]].image_size]
    return CPU + [f"--model.init_args.network.width={TINY_WIDTH}"] * shortcut + [
        "--data.dataset=synthetic", f"--data.synthetic_shape={json.dumps(shape)}",
        "--data.batch_size=8", "--data.num_workers=0", "--data.calibration_size=16",
    ]  # fmt: skip


@pytest.fixture
def few_synthetic_images(monkeypatch):
    """64 training and 32 test images instead of 512 and 257: 224 px evaluations stay fast."""
    monkeypatch.setattr(datamodule, "build_datasets", functools.partial(build_datasets, synthetic_sizes=(64, 32)))


def test_every_paper_experiment_has_its_dense_training_config():
    sweeps = sorted((CONFIGS / "paper" / "sweep").glob("*.yaml"))
    assert len(sweeps) == 14
    assert [p.name for p in sweeps] == [p.name for p in sorted((CONFIGS / "paper" / "train").glob("*.yaml"))]
    for path in sweeps:
        trained = load(path.parents[1] / "train" / path.name)
        assert load(path)["model"]["init_args"]["network"] == trained["model"]["init_args"]["network"]
        callback = trained["trainer"]["callbacks"][0]["init_args"]
        assert load(path)["model"]["init_args"]["checkpoint"] == f"{callback['dirpath']}/{callback['filename']}.ckpt"


def test_one_run_per_architecture():
    archs = {architecture(load(p)) for p in SWEEPS + TRAININGS}
    run = {architecture(load(CONFIGS / n)) for n in RUN if n.startswith(("paper/sweep", "sweep"))}
    assert run == archs
    assert set(RUN) <= {name(p) for p in SWEEPS + TRAININGS}


@pytest.mark.parametrize("path", SWEEPS, ids=map(name, SWEEPS))
def test_sweep_config_builds(path):
    config = load(path)
    built = sweep.build_cli(["--config", str(path), *small(config)])
    cells = sweep.grid_cells(built.config_init.grid, built.model, built.datamodule)
    assert len(cells) == len({c.key for c in cells}) > 1
    assert {c.sparsity for c in cells} == set(config["grid"]["sparsities"])
    allocations = config["grid"]["allocations"]  # names, or dicts with options (labelled by the sweep)
    assert {c.allocation for c in cells} >= {a for a in allocations if isinstance(a, str)}
    assert len({c.allocation for c in cells}) == len(allocations)
    assert {c.repair for c in cells} == {sweep.repair_label(r) for r in config["grid"]["repairs"]}


@pytest.mark.parametrize("path", TRAININGS, ids=map(name, TRAININGS))
def test_training_config_builds(path):
    config = load(path)
    built = cli.build_cli(["--config", str(path), *small(config)], run=False)
    if "arch" in config["model"]["init_args"]["network"]:
        assert network_config(built.model.hparams.network)["width"] == TINY_WIDTH
    assert built.trainer.max_epochs == load(path)["trainer"]["max_epochs"]


@pytest.mark.parametrize("config_name", [n for n in RUN if "sweep/" in n])
def test_sweep_config_runs_on_synthetic_data(config_name, tmp_path, few_synthetic_images):
    path = CONFIGS / config_name
    config = load(path)
    grid = config["grid"]
    spec = config["model"]["init_args"]["network"]
    checkpoint = tmp_path / "dense.pt"
    torch.save(build_network({**spec, "width": TINY_WIDTH} if "arch" in spec else spec).state_dict(), checkpoint)
    one_cell = {"sparsities": grid["sparsities"][-1:], "repairs": grid["repairs"][-1:], "seeds": [0]}
    sweep.main(
        ["--config", str(path), *small(config), f"--model.init_args.checkpoint={checkpoint}"]
        + [f"--output={tmp_path / 'out'}", "--grid.checkpoints=null"]
        + [f"--grid.{k}={json.dumps(v)}" for k, v in one_cell.items()]
    )
    rows = sweep.read_results(tmp_path / "out" / sweep.RESULTS)
    assert [(r["allocation"], r["repair"]) for r in rows] == [(a, grid["repairs"][-1]) for a in grid["allocations"]]
    for r in rows:
        assert abs(r["achieved_sparsity"] - grid["sparsities"][-1]) < 1e-3
        assert r["calibration_samples"] == 16 and r["test_samples"] == 32


@pytest.mark.parametrize("config_name", [n for n in RUN if "train/" in n])
def test_training_config_runs_on_synthetic_data(config_name, tmp_path, monkeypatch, few_synthetic_images):
    monkeypatch.chdir(tmp_path)  # the configs' checkpoint and log folders are relative
    path = CONFIGS / config_name
    built = cli.build_cli(["fit", "--config", str(path), *small(load(path)), "--trainer.fast_dev_run=2"])
    assert built.trainer.global_step == 2
    assert 0.0 <= float(built.trainer.callback_metrics["val/acc"]) <= 1.0
