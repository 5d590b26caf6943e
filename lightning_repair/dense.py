"""DenseClassifier: trains the dense models that the pipeline prunes and repairs."""

from __future__ import annotations

from typing import Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from jsonargparse.typing import NonNegativeFloat, PositiveFloat
from torchmetrics.classification import MulticlassAccuracy

from .layers import prunable_layers
from .models import METADATA_KEY, Network, NetworkSpec, build_network, checkpoint_metadata, output_classes
from .regularizers import var_penalty, wcr_penalty


class DenseClassifier(pl.LightningModule):
    """Supervised training with SGD + momentum and optional VAR/WCR regularizers.

    Args:
        network: the architecture to train: a built-in one by name (``{arch: resnet18, ...}``) or any nn.Module by
            class_path and init_args (``{class_path: torchvision.models.MobileNetV2, init_args: {num_classes: 10}}``).
        lr: peak learning rate.
        momentum: SGD momentum (Nesterov).
        weight_decay: L2 weight decay.
        schedule: "onecycle" or "cosine" over the whole run.
        var_lambda: weight of the VAR regularizer (0 disables it).
        wcr_lambda: weight of the WCR regularizer (0 disables it).
        wcr_density: target density whose top-k mass WCR concentrates on.
    """

    def __init__(
        self,
        network: NetworkSpec = Network(),  # noqa: B008 (read-only default)
        lr: PositiveFloat = 0.1,
        momentum: NonNegativeFloat = 0.9,
        weight_decay: NonNegativeFloat = 5e-4,
        schedule: Literal["onecycle", "cosine"] = "onecycle",
        var_lambda: NonNegativeFloat = 0.0,
        wcr_lambda: NonNegativeFloat = 0.0,
        wcr_density: PositiveFloat = 0.05,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.model = build_network(network)
        self.weights = [layer.module.weight for layer in prunable_layers(self.model)]
        classes = output_classes(self.model)
        self.train_acc = MulticlassAccuracy(classes, average="micro")
        self.val_acc = MulticlassAccuracy(classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.model(x)
        ce = F.cross_entropy(logits, y)
        loss = ce
        hp = self.hparams
        if hp.var_lambda > 0:
            var = var_penalty(self.weights)
            loss = loss + hp.var_lambda * var
            self.log("train/loss_var", var)
        if hp.wcr_lambda > 0:
            wcr = wcr_penalty(self.weights, hp.wcr_density)
            loss = loss + hp.wcr_lambda * wcr
            self.log("train/loss_wcr", wcr)
        self.train_acc(logits, y)
        self.log("train/loss_ce", ce, prog_bar=True)
        self.log("train/loss", loss)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.model(x)
        self.val_acc(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("val/acc", self.val_acc, prog_bar=True)

    test_step = validation_step

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """The checkpoint records the network and the input normalisation as plain data, so that ``lightning-repair
        fit --model.checkpoint`` and ``lightning_repair.load`` build the right model from the file alone."""
        dm = self.trainer.datamodule if self._trainer is not None else None
        info = getattr(dm, "info", None)
        dataset = getattr(getattr(dm, "hparams", None), "dataset", None)
        checkpoint[METADATA_KEY] = checkpoint_metadata(self.hparams.network, info, dataset)

    def configure_optimizers(self):
        hp = self.hparams
        opt = torch.optim.SGD(
            self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay, nesterov=hp.momentum > 0
        )
        steps = self.trainer.estimated_stepping_batches
        if hp.schedule == "onecycle":
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=hp.lr, total_steps=steps, pct_start=0.25)
        else:
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
