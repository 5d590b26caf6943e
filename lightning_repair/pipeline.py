"""PruneRepairModule: ``lightning-repair fit`` prunes, repairs and evaluates in ``on_fit_start``.

No training step runs: after the pipeline the fit loop is told it has nothing to do.
Only rank 0 writes files; every statistic and every accuracy is reduced across processes.
"""

from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from jsonargparse.typing import restricted_number_type
from lightning.pytorch.utilities import rank_zero_info
from tqdm.auto import tqdm

from .allocation import Allocation, allocate, allocation_table, format_table
from .evaluation import evaluate
from .export import atomic_write_json, export
from .masks import apply_masks, compute_masks, mask_violations
from .models import Network, load_weights
from .repair import describe, parse_recipe, repair

Sparsity = restricted_number_type("Sparsity", float, [(">=", 0.0), ("<", 1.0)])


class PruneRepairModule(pl.LightningModule):
    """Prune a dense checkpoint one-shot and repair it from unlabeled calibration images.

    Args:
        network: the checkpoint's architecture.
        checkpoint: dense weights (Lightning checkpoint, state_dict or torchvision layout).
        sparsity: target global sparsity over prunable weights, in [0, 1).
        allocation: a method name (uniform, global, erk, lamp) or a dict with options.
        repair: a preset (none, bn_recalibration, layer_vm, asr, clipped_asr, default) or a
            list of operators, e.g. ``[{op: bn_recalibration}, {op: variance_matching, ...}]``.
        save_model: write the repaired model (dense-shaped and compact sparse) to the log dir.
    """

    def __init__(
        self,
        network: Network,
        checkpoint: str,
        sparsity: Sparsity = 0.95,
        allocation: str | Allocation = "lamp",
        repair: str | list[dict[str, Any]] = "default",
        save_model: bool = True,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.allocation = allocation if isinstance(allocation, Allocation) else Allocation(method=allocation)
        self.recipe = parse_recipe(repair)  # validate before any work starts
        self.network = network
        self.model = network.build()
        self.results: dict[str, Any] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):  # pragma: no cover - the fit loop is skipped
        raise RuntimeError("PruneRepairModule does not train")

    def configure_optimizers(self):
        return None

    # ------------------------------------------------------------------ the pipeline

    def on_fit_start(self) -> None:
        trainer, hp = self.trainer, self.hparams
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "calibration_dataloader"):
            raise TypeError("PruneRepairModule needs an ImageDataModule (data: in the config)")
        dm.setup("fit")
        net = self.network
        if (dm.info.num_classes, dm.info.in_channels) != (net.num_classes, net.in_channels):
            raise ValueError(
                f"model.network has num_classes={net.num_classes}, in_channels={net.in_channels} but dataset "
                f"{dm.hparams.dataset!r} has num_classes={dm.info.num_classes}, in_channels={dm.info.in_channels}"
            )
        n_cal, batch = len(dm.calibration_set), dm.hparams.batch_size
        if n_cal < batch:
            raise ValueError(f"data.calibration_size={n_cal} is smaller than one batch (data.batch_size={batch})")
        if n_cal < trainer.world_size:
            raise ValueError(f"data.calibration_size={n_cal} is smaller than the number of processes")
        rank, world = trainer.global_rank, trainer.world_size
        show = trainer.is_global_zero and trainer.progress_bar_callback is not None
        bar = lambda it, desc: tqdm(it, desc=desc, leave=False, disable=not show)  # noqa: E731
        timings: dict[str, float] = {}

        dense = load_weights(net.build(), hp.checkpoint).to(self.device).eval()
        calibration = [b.to(self.device) for b in bar(dm.calibration_dataloader(rank, world), "calibration data")]
        with torch.no_grad():
            dense(calibration[0])  # warm-up, so the timed pass is representative
        with _timed(timings, "calibration_forward"), torch.no_grad():
            for b in calibration:
                dense(b)

        with _timed(timings, "allocation"):
            keep = allocate(dense, hp.sparsity, self.allocation)
        with _timed(timings, "masking"):
            masks = compute_masks(dense, keep)
            pruned = apply_masks(copy.deepcopy(dense), masks)

        test = lambda model, desc: evaluate(model, bar(dm.evaluation_dataloader(rank, world), desc), self.device)  # noqa: E731
        with _timed(timings, "evaluation"):
            acc_dense = test(dense, "evaluate dense")
            acc_pruned = test(pruned, "evaluate pruned")
        with _timed(timings, "repair"):
            report = repair(pruned, dense, calibration, self.recipe, progress=lambda it: bar(it, "repair"))
        violations = mask_violations(pruned, masks)
        if violations:
            raise RuntimeError(f"repair broke the masks (non-zero pruned weights): {violations}")
        with _timed(timings, "evaluation"):
            acc_repaired = test(pruned, "evaluate repaired")

        self.model.load_state_dict(pruned.state_dict())
        rows = allocation_table(dense, keep)
        kept, total = sum(r["kept"] for r in rows), sum(r["numel"] for r in rows)
        accuracy = {"dense": acc_dense["top1"], "pruned": acc_pruned["top1"], "repaired": acc_repaired["top1"]}
        self.results = {
            "accuracy": accuracy,
            "sparsity": {"target": hp.sparsity, "achieved": 1 - kept / total},
            "allocation": self.allocation.method,
            "repair": describe(self.recipe),
            "layers": rows,
            "timings_s": timings,
            "test_samples": acc_repaired["samples"],
            "world_size": world,
            "config": _plain(dict(hp)),
        }
        if dm.info.num_classes > 5:
            self.results["accuracy_top5"] = {"dense": acc_dense["top5"], "pruned": acc_pruned["top5"],
                                             "repaired": acc_repaired["top5"]}  # fmt: skip
        self._write(report, masks)
        trainer.fit_loop.max_epochs = 0  # nothing to train: the fit loop ends at once

    def _write(self, report, masks) -> None:
        res = self.results
        metrics = {f"test/acc_{k}": v for k, v in res["accuracy"].items()}
        metrics |= {f"test/top5_{k}": v for k, v in res.get("accuracy_top5", {}).items()}
        metrics |= {f"time/{k}": v for k, v in res["timings_s"].items()}
        metrics["sparsity/achieved"] = res["sparsity"]["achieved"]
        if not self.trainer.is_global_zero:
            return
        log_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        for logger in self.trainer.loggers:
            logger.log_metrics(metrics, step=0)
            for row in res["layers"]:
                logger.log_metrics({f"density/{row['name']}": row["density"]}, step=0)
            logger.log_hyperparams(
                {"sparsity": self.hparams.sparsity, "allocation": res["allocation"], "repair": str(self.hparams.repair)},
                {f"hp/acc_{k}": v for k, v in res["accuracy"].items()},
            )
        if self.hparams.save_model:
            res["export"] = export(self.model, masks, log_dir)
        atomic_write_json(log_dir / "metrics.json", res)
        acc = res["accuracy"]
        rank_zero_info(
            format_table(res["layers"])
            + f"\n\naccuracy  dense {acc['dense']:.4f}  pruned {acc['pruned']:.4f}  repaired {acc['repaired']:.4f}"
            + f"  ({res['test_samples']} test images)\nrepair {res['timings_s']['repair']:.2f}s = "
            + f"{res['timings_s']['repair'] / res['timings_s']['calibration_forward']:.2f}x one dense calibration pass"
            + f"\nwrote {log_dir / 'metrics.json'}"
        )


@contextmanager
def _timed(timings: dict[str, float], key: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - start


def _plain(obj):
    """Hyperparameters as JSON-serialisable data."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if hasattr(obj, "__dataclass_fields__"):
        return _plain({k: getattr(obj, k) for k in obj.__dataclass_fields__})
    return obj if isinstance(obj, (str, int, float, bool, type(None))) else str(obj)
