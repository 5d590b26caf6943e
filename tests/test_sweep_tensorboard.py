"""A sweep's TensorBoard folder: one run per cell with its hparams and metrics, read back from the event files."""

from __future__ import annotations

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from lightning_repair.sweep import COLUMNS, report


def row(allocation: str, sparsity: float, repair: str, seed: int, repaired: float) -> dict:
    values = {k: (0.0 if t is float else 0 if t is int else "") for k, t in COLUMNS.items()}
    return values | {"checkpoint": "checkpoints/net.pt", "allocation": allocation, "sparsity": sparsity,
                     "repair": repair, "seed": seed, "acc_dense": 0.93, "acc_pruned": 0.1, "acc_repaired": repaired,
                     "achieved_sparsity": sparsity, "time_repair": 2.5, "test_samples": 100}  # fmt: skip


def test_each_cell_is_a_run_with_hparams_and_metrics(tmp_path):
    rows = [row("lamp", 0.9, "default", 0, 0.91), row("erk", 0.95, "default", 0, 0.85),
            row("lamp", 0.95, '[{"op":"reconstruct"}]', 1, 0.88)]  # fmt: skip
    report(rows, tmp_path)
    report(rows, tmp_path)  # a resumed sweep reports again: still one record per cell
    cells = tmp_path / "tensorboard" / "cells"
    runs = sorted(str(p.parent.relative_to(cells)) for p in cells.rglob("events.out.tfevents.*"))
    assert runs == ["net/erk-0.95/default/seed0", "net/lamp-0.9/default/seed0",
                    "net/lamp-0.95/op_reconstruct/seed1"]  # fmt: skip
    for r in rows:
        folder = next(cells.glob(f"net/{r['allocation']}-{r['sparsity']:g}/*/seed{r['seed']}"))
        events = EventAccumulator(str(folder))
        events.Reload()
        (repaired,) = events.Scalars("hp/acc_repaired")
        assert repaired.value == pytest.approx(r["acc_repaired"])
        assert events.Scalars("hp/time_repair")[0].value == pytest.approx(2.5)
        content = events.PluginTagToContent("hparams")
        start = HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info.hparams
        assert start["allocation"].string_value == r["allocation"] and start["seed"].number_value == r["seed"]
        assert start["sparsity"].number_value == pytest.approx(r["sparsity"]) and start["repair"].string_value
