"""Dense training checkpoints record the network and the input normalisation, so they load in one call."""

from __future__ import annotations

from dataclasses import asdict

import torch
from test_dense import dense_training_config

import lightning_repair
from lightning_repair.models import METADATA_KEY, Network

from helpers import TINY_NETWORK, run_fit, write_config


def test_dense_checkpoint_describes_itself(tmp_path):
    run_fit(write_config(tmp_path / "config.yaml", dense_training_config(tmp_path, 0.0, 0.0)))
    path = tmp_path / "checkpoints" / "dense.ckpt"
    metadata = torch.load(path, map_location="cpu", weights_only=True)[METADATA_KEY]
    assert metadata["network"] == asdict(Network(**TINY_NETWORK))
    assert metadata["input"] == {"dataset": "synthetic", "channels": 3, "image_size": 16, "mean": [0.0] * 3,
                                 "std": [1.0] * 3}  # fmt: skip
    model, normalize = lightning_repair.load(path)
    x = torch.rand(2, 3, 16, 16)
    assert not model.training and torch.equal(normalize(x), x) and model(x).shape == (2, 10)
