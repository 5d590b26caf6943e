"""Shared setup of the search benchmarks: a sweep config's dense model, calibration batches and test loader."""

from __future__ import annotations

import csv
from pathlib import Path

import torch
import yaml

from lightning_repair.datamodule import ImageDataModule
from lightning_repair.evaluation import evaluate
from lightning_repair.models import load_dense

NETWORKS = {
    "resnet18": "configs/sweep/fashion_mnist_transition.yaml",
    "vgg16_bn": "configs/sweep/fashion_mnist_vgg16_bn_claims.yaml",
    "mobilenetv2": "configs/sweep/fashion_mnist_mobilenetv2_transition.yaml",
}


def load(network: str, device: str = "cpu"):
    """(dense model, datamodule, calibration batches, test function) of a sweep config's network and data."""
    config = yaml.safe_load(Path(NETWORKS[network]).read_text())
    args = config["model"]["init_args"]
    dm = ImageDataModule(**config["data"])
    dm.setup("fit")
    dense = load_dense(args["network"], args["checkpoint"], device, dm.hparams.dataset, dm.info)
    calibration = dm.calibration_batches(device)
    test = lambda model: evaluate(model, dm.evaluation_dataloader(), device)["top1"]  # noqa: E731
    return dense, dm, calibration, test


def held_out_batches(dm: ImageDataModule, size: int, seed: int = 1) -> list[torch.Tensor]:
    """``size`` training images outside the calibration subset (a seeded draw), as batches of the data's size."""
    taken = set(dm.calibration_set.indices)
    order = torch.randperm(len(dm.train_set), generator=torch.Generator().manual_seed(seed)).tolist()
    indices = [i for i in order if i not in taken][:size]
    plain = dm.calibration_set._dataset
    images = torch.stack([plain[i][0] for i in indices])
    return list(images.split(dm.hparams.batch_size))


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""

    def ranks(values):
        order = sorted(range(len(values)), key=lambda i: values[i])
        r = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=False))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return cov / (vx * vy) ** 0.5 if vx and vy else float("nan")
