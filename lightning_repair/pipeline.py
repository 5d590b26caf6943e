"""PruneRepairModule: ``lightning-repair fit`` prunes, repairs and evaluates in ``on_fit_start``.

No training step runs: after the pipeline the fit loop is told it has nothing to do.
Only rank 0 writes files; every statistic and every accuracy is reduced across processes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from jsonargparse.typing import restricted_number_type
from lightning.pytorch.utilities import rank_zero_info
from tqdm.auto import tqdm

from .allocation import Allocation, format_table
from .evaluation import calibration_forward_time, evaluate
from .export import atomic_write_json, export
from .models import Network, load_weights
from .oneshot import prune_and_repair, timed
from .repair import describe, parse_recipe

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
        self.report = None  # the RepairReport of the last run

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

        dense = load_weights(net.build(), hp.checkpoint).to(self.device).eval()
        calibration = [b.to(self.device) for b in bar(dm.calibration_dataloader(rank, world), "calibration data")]
        timings = {"calibration_forward": calibration_forward_time(dense, calibration)}

        def test(model, desc):
            return evaluate(model, bar(dm.evaluation_dataloader(rank, world), desc), self.device)

        with timed(timings, "evaluation"):
            acc_dense = test(dense, "evaluate dense")
        result = prune_and_repair(dense, calibration, hp.sparsity, self.allocation, self.recipe, test, progress=bar)
        for key, seconds in result.timings.items():
            timings[key] = timings.get(key, 0.0) + seconds

        self.model.load_state_dict(result.model.state_dict())
        runs = {"dense": acc_dense, "pruned": result.pruned, "repaired": result.repaired}
        self.results = {
            "accuracy": {k: v["top1"] for k, v in runs.items()},
            "sparsity": {"target": hp.sparsity, "achieved": result.achieved_sparsity},
            "allocation": self.allocation.method,
            "repair": describe(self.recipe),
            "layers": result.layers,
            "timings_s": timings,
            "test_samples": result.repaired["samples"],
            "world_size": world,
            "config": _plain(dict(hp)),
        }
        if dm.info.num_classes > 5:
            self.results["accuracy_top5"] = {k: v["top5"] for k, v in runs.items()}
        self.report = result.report
        self._write(result.masks)
        trainer.fit_loop.max_epochs = 0  # nothing to train: the fit loop ends at once

    def _write(self, masks) -> None:
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
            hparams = {"sparsity": res["sparsity"]["target"], "allocation": res["allocation"]}
            hparams["repair"] = str(self.hparams.repair)
            logger.log_hyperparams(hparams, {f"hp/acc_{k}": v for k, v in res["accuracy"].items()})
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


def _plain(obj):
    """Hyperparameters as JSON-serialisable data."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if hasattr(obj, "__dataclass_fields__"):
        return _plain({k: getattr(obj, k) for k in obj.__dataclass_fields__})
    return obj if isinstance(obj, (str, int, float, bool, type(None))) else str(obj)
