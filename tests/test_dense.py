"""DenseClassifier through ``lightning-repair fit``: logged loss terms and a checkpoint the pipeline can load."""

from __future__ import annotations

import csv

import pytest
import torch

from lightning_repair.models import Network, load_weights

from helpers import TINY_NETWORK, run_fit, write_config


def dense_training_config(root, var_lambda: float, wcr_lambda: float) -> dict:
    """Three training steps and two validation batches on synthetic data, a CSV log and one checkpoint."""
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": 1,
            "limit_train_batches": 3,
            "limit_val_batches": 2,
            "num_sanity_val_steps": 0,
            "log_every_n_steps": 1,
            "enable_model_summary": False,
            "enable_progress_bar": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(root), "name": "", "version": "run"},
            },
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(root / "checkpoints"), "filename": "dense"},
                }
            ],
        },
        "model": {
            "class_path": "lightning_repair.DenseClassifier",
            "init_args": {"network": TINY_NETWORK, "lr": 0.05, "var_lambda": var_lambda, "wcr_lambda": wcr_lambda},
        },
        "data": {"dataset": "synthetic", "batch_size": 32, "augment": True},
    }


def logged_rows(root) -> list[dict[str, float]]:
    with open(root / "run" / "metrics.csv") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


@pytest.mark.parametrize(("var_lambda", "wcr_lambda"), [(0.0, 0.0), (0.1, 0.2)], ids=["plain", "var+wcr"])
def test_fit_logs_each_loss_term(tmp_path, var_lambda, wcr_lambda):
    run_fit(write_config(tmp_path / "config.yaml", dense_training_config(tmp_path, var_lambda, wcr_lambda)))
    rows = logged_rows(tmp_path)
    steps = [row for row in rows if "train/loss_ce" in row]
    assert len(steps) == 3
    assert any("val/acc" in row for row in rows)
    for row in steps:
        assert all(torch.isfinite(torch.tensor(v)) for v in row.values())
        assert ("train/loss_var" in row) == (var_lambda > 0)
        assert ("train/loss_wcr" in row) == (wcr_lambda > 0)
        regularizers = var_lambda * row.get("train/loss_var", 0) + wcr_lambda * row.get("train/loss_wcr", 0)
        assert row["train/loss"] == pytest.approx(row["train/loss_ce"] + regularizers, rel=1e-5)
        if var_lambda > 0:
            assert row["train/loss_var"] > 0 and row["train/loss_wcr"] > 0


def test_checkpoint_loads_into_the_plain_architecture(tmp_path):
    run_fit(write_config(tmp_path / "config.yaml", dense_training_config(tmp_path, 0.0, 0.0)))
    path = tmp_path / "checkpoints" / "dense.ckpt"
    trained = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    assert all(key.startswith("model.") for key in trained)
    model = load_weights(Network(**TINY_NETWORK).build(), path)
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, trained[f"model.{key}"]), key
