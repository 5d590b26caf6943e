"""PruneRepairModule: ``lightning-repair fit`` prunes, repairs and evaluates in ``on_fit_start``.

No training step runs: after the pipeline the fit loop is told it has nothing to do.
Only rank 0 writes files; every statistic and every accuracy is reduced across processes.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import lightning.pytorch as pl
import torch
from jsonargparse.typing import restricted_number_type
from lightning.pytorch.loggers.logger import DummyLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from tqdm.auto import tqdm

from .allocation import PROFILE_METHODS, Allocation, as_allocation, format_table
from .cache import DigestCache, batches_digest, dense_accuracy_key, model_digest, profile_codec
from .callbacks import DiscardFailedRun, RepairLogger, tensorboard_loggers
from .datamodule import data_config, pipeline_data
from .diagnostics import DEFAULT_GRID, RR_REPAIRS, RRProfile, check_grid, rr_profile
from .evaluation import calibration_forward_time, evaluate, evaluation_precision
from .export import atomic_write_json, export
from .layers import prunable_layers
from .models import (
    Network,
    NetworkSpec,
    build_network,
    checkpoint_metadata,
    load_dense,
    network_config,
    output_classes,
    resolve_network,
)
from .operators import parse_recipe
from .pipeline import check_operators_fit, choose_keep, prune_and_repair
from .records import init_args, plain, run_hparams, run_record
from .stats import count_over_processes
from .stores import STORES, Activations
from .utils import timed

if TYPE_CHECKING:
    from .search import SearchRecord

Sparsity = restricted_number_type("Sparsity", float, [(">=", 0.0), ("<", 1.0)])


class PruneRepairModule(pl.LightningModule):
    """Prune a dense checkpoint one-shot and repair it from unlabeled calibration images.

    Args:
        network: the checkpoint's architecture: a built-in one by name (``{arch: resnet18, ...}``) or any nn.Module
            by class_path and init_args (``{class_path: torchvision.models.MobileNetV2, init_args: {...}}``), a class
            or a builder function (``torchvision.models.resnet18``). Optional for a checkpoint that records its
            network (every checkpoint this tool writes); given, it must agree with the recorded one.
        checkpoint: dense weights (a checkpoint this tool wrote, a Lightning checkpoint, a state_dict or torchvision's
            layout).
        sparsity: target global sparsity over prunable weights, in [0, 1).
        allocation: a method name (uniform, global, erk, lamp, rr, erk_rr, search) or a dict with options
            (``{method: search, search: {max_candidates: 7}}``; search scores candidate allocations by repairing
            them with this run's repair: about the repair's cost plus one dense calibration pass each).
        repair: a preset (``lightning-repair fit --help`` lists them with their operators) or a
            list of operators, e.g. ``[{op: bn_recalibration}, {op: variance_matching, ...}]``.
        save_model: write the repaired model (dense-shaped and compact sparse) to the log dir.
        rr_grid: sparsities of the per-layer RR profile (docs/methods.md), which also adds D_raw, D_res
            and RR at each layer's allocated sparsity to metrics.json; null or [] turns it off unless the
            allocation (rr, erk_rr) needs it. Costs about len(rr_grid) + 2 dense calibration passes.
        rr_repair: the channel-wise repair behind D_res and RR: ``vm`` (variance matching, the RR paper's),
            ``ls`` (least-squares affine fit), ``asr`` (the asr preset's shrunk gain) or ``reconstruct`` (the
            layer's own least-squares reconstruction; adds about the Gram cost of reconstruct to the profile).
        activations: where the repair keeps the calibration set's activations as it walks the network: ``device``
            (fastest), ``host`` (CPU memory, each chunk moved to the device only while a layer runs on it: device
            memory no longer grows with data.calibration_size) or ``disk`` (a temporary directory under $TMPDIR,
            deleted at the end: host memory no longer grows with it either). The repaired model is the same.
        rr_cache: where the dense model's RR profile and test accuracy are cached, keyed by digests of the
            checkpoint's content, the calibration set, the grid and rr_repair (the accuracy: of the checkpoint and
            the test set), so that another run with another sparsity, allocation or repair reuses them: ``auto``
            (``cache/`` under the run's root, the logger's folder that holds its versions), a folder, or null (off).
    """

    def __init__(
        self,
        network: NetworkSpec | None = None,
        checkpoint: str = "",
        sparsity: Sparsity = 0.95,
        allocation: str | Allocation = "lamp",
        repair: str | list[dict[str, Any]] = "default",
        save_model: bool = True,
        rr_grid: tuple[float, ...] | None = DEFAULT_GRID,
        rr_repair: Literal["vm", "ls", "asr", "reconstruct"] = "vm",
        activations: Activations = "device",
        rr_cache: str | None = "auto",
    ):
        super().__init__()
        # the CLI's types check these too; repeated for the Python API
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
            raise ValueError(f"model.sparsity must be a number in [0, 1), got {sparsity!r}")
        self.save_hyperparameters()
        self.allocation = as_allocation(allocation)
        self.recipe = parse_recipe(repair)  # validate before any work starts
        self.rr_grid = check_grid(rr_grid or [])
        if rr_repair not in RR_REPAIRS:
            raise ValueError(f"model.rr_repair: {rr_repair!r} is not one of {RR_REPAIRS}")
        if activations not in STORES:
            raise ValueError(f"model.activations: {activations!r} is not one of {tuple(STORES)}")
        if not self.rr_grid and self.allocation.method in PROFILE_METHODS:
            raise ValueError(f"allocation {self.allocation.method!r} needs an RR profile: set model.rr_grid")
        if not checkpoint:
            raise ValueError("model.checkpoint: the dense weights to prune are required")
        if network is None:  # the checkpoint says what it is
            network = resolve_network(None, checkpoint)
            self.hparams.network = network
        # a given spec that disagrees with the one the checkpoint records is refused when the run loads it (load_dense)
        self.network = network
        self.model = build_network(network)
        check_operators_fit(self.model, self.recipe)  # before any data is read
        self.results: dict[str, Any] = {}
        self.reports_rr_location = False  # set by _write: no TensorBoard logger, the run says where RR went
        self.output_dir: Path | None = None  # where a run without a logger writes (default: runs/<run name>/)
        self.report = None  # the RepairReport of the last run
        self.profile: RRProfile | None = None  # the dense model's RR profile, when rr_grid asks for one

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):  # pragma: no cover - the fit loop is skipped
        raise RuntimeError("PruneRepairModule does not train")

    def configure_optimizers(self):
        return None

    def configure_callbacks(self) -> list[pl.Callback]:
        # results are written at the end: a failed run has nothing to show; the RR views in TensorBoard without a
        # config naming the callback (one the config lists is kept as it is)
        trainer = self._trainer
        listed = trainer is not None and any(isinstance(cb, RepairLogger) for cb in trainer.callbacks)
        return [DiscardFailedRun()] + ([] if listed else [RepairLogger()])

    @property
    def run_name(self) -> str:
        """What the run is, as a path: ``<network>/<allocation>-<sparsity>/<repair>`` (``resnet18/lamp-0.95/default``),
        the TensorBoard run name the CLI gives it and the folder ``runs/<run name>/`` of a run without a logger."""
        hp = self.hparams
        repair = hp.repair if isinstance(hp.repair, str) else "+".join(str(op.get("op", "?")) for op in hp.repair)
        return f"{network_label(hp.network)}/{self.allocation.method}-{hp.sparsity:g}/{repair}"

    # ------------------------------------------------------------------ the pipeline

    def on_fit_start(self) -> None:
        trainer, hp = self.trainer, self.hparams
        dm = pipeline_data(trainer.datamodule)  # the built-in ImageDataModule, or the user's, checked
        rank, world = trainer.global_rank, trainer.world_size
        show = trainer.is_global_zero and trainer.progress_bar_callback is not None
        bar = lambda it, desc: tqdm(it, desc=desc, leave=False, disable=not show)  # noqa: E731

        dm.setup("fit")
        dense = load_dense(hp.network, hp.checkpoint, self.device, dm.hparams.dataset, dm.info)
        calibration = dm.calibration_batches(self.device, rank, world, bar)
        # images outside the calibration set, when the allocation scores on them (search)
        held_out = dm.held_out_batches(self.allocation.held_out_images, self.device, rank, world) \
            if self.allocation.held_out_images else None  # fmt: skip
        timings = {"calibration_forward": calibration_forward_time(dense, calibration)}

        precision = evaluation_precision(trainer.precision, self.device)  # evaluation only, never the repair

        def test(model, desc):
            return evaluate(model, bar(dm.evaluation_dataloader(rank, world), desc), self.device, precision=precision)

        self.cache = DigestCache(self._cache_dir(), log=rank_zero_info)
        self._digests = {"model": model_digest(dense), "network": network_config(hp.network)}
        with timed(timings, "evaluation"):
            if dm.info is None:  # a datamodule of the user's: no identity of its test set to key a cache by
                acc_dense, self.dense_cached = test(dense, "evaluate dense"), False
            else:
                acc_dense, self.dense_cached = self.cache.get_or_compute(
                    "dense_accuracy", dense_accuracy_key(self._digests, dm, precision),
                    lambda: test(dense, "evaluate dense"), "the dense accuracy",
                )  # fmt: skip
        keep, search, self.profile, at_allocation = self._allocate(dense, calibration, held_out, timings, bar)
        result = prune_and_repair(dense, calibration, hp.sparsity, self.allocation, self.recipe, test, bar, keep=keep,
                                  activations=hp.activations, search=search)  # fmt: skip
        for key, seconds in result.timings.items():
            timings[key] = timings.get(key, 0.0) + seconds

        self.model.load_state_dict(result.model.state_dict())
        record = run_record(result, acc_dense, hp.sparsity, self.allocation.method, self.recipe, timings,
                            count_over_processes(sum(map(len, calibration)), self.device),
                            top5=output_classes(dense) > 5)  # fmt: skip
        record["layers"] = [row | at_allocation.get(row["name"], {}) for row in record["layers"]]
        self.results = record | {
            "world_size": world,
            "config": plain(init_args(self) | {"network": network_config(hp.network)}),  # rebuildable
            "data_config": plain(data_config(dm)),
            "data_location": dm.info.location if dm.info is not None else None,
            "evaluation_precision": precision,  # the repair's statistics are always float32/float64
            "cached": {"dense_accuracy": self.dense_cached, "rr_profile": self.profile_cached},
        }
        if self.profile is not None:
            self.results["rr_profile"] = {"grid": self.profile.grid, "samples": self.profile.samples,
                                          "layers": self.profile.rows()}  # fmt: skip
        self.report = result.report
        self._write(result.masks)
        trainer.fit_loop.max_epochs = 0  # nothing to train: the fit loop ends at once
        trainer.enable_autolog_hparams = False  # _write logged the hparams with the accuracies (no hp_metric=-1)

    def _allocate(
        self, dense: nn.Module, calibration: list[torch.Tensor], held_out: list[torch.Tensor] | None,
        timings: dict[str, float], bar,
    ) -> tuple[dict[str, int], SearchRecord | None, RRProfile | None, dict[str, dict]]:
        """The keep counts, the search's record (allocation ``search``), the RR profile (when rr_grid asks for one)
        and per layer name D_raw, D_res and RR at the allocated keep count (and the density the search started
        from): measured in the profile's own pass when the allocation does not depend on the profile, else in a
        second pass at one sparsity."""
        sparsity, needs_profile = self.hparams.sparsity, self.allocation.method in PROFILE_METHODS
        profile = None
        self.profile_cached = False
        choose = lambda profile: choose_keep(dense, calibration, sparsity, self.allocation, self.recipe,  # noqa: E731
                                             profile, timings["calibration_forward"], bar, held_out)  # fmt: skip
        if not self.rr_grid:
            with timed(timings, "allocation"):
                keep, search = choose(None)
            return keep, search, None, _search_start(dense, search)
        key = self._digests | {"calibration": batches_digest(calibration), "grid": self.rr_grid,
                               "rr_repair": self.hparams.rr_repair}  # fmt: skip
        with timed(timings, "rr"):
            if needs_profile:
                profile, self.profile_cached = self.cache.get_or_compute(
                    "rr_profile", key, lambda: rr_profile(dense, calibration, self.rr_grid,
                                                          repair=self.hparams.rr_repair),
                    "the RR profile", *profile_codec(),
                )  # fmt: skip
            else:  # the grid and this run's keep counts in one pass, unless the grid's profile is cached
                profile = self.cache.get("rr_profile", key, "the RR profile", profile_codec()[1])
                self.profile_cached = profile is not None
        with timed(timings, "allocation"):
            keep, search = choose(profile)
        with timed(timings, "rr"):
            grid = () if profile is not None else self.rr_grid
            measured = rr_profile(dense, calibration, grid, keep=keep, repair=self.hparams.rr_repair)
            if profile is None:
                profile = measured
                self.cache.put("rr_profile", key, measured, profile_codec()[0])
        at_allocation = _search_start(dense, search)
        for row in measured.keep_rows():
            at_allocation.setdefault(row["name"], {}).update({k: row[k] for k in ("rr", "d_raw", "d_res")})
        return keep, search, profile, at_allocation

    def _cache_dir(self) -> Path | None:
        """``rr_cache``'s folder: ``auto`` is ``cache/`` in the folder that holds the runs of every sparsity and
        repair: the first logger's root above its run names (``lightning_logs/quickstart/cache``); without a logger
        ``runs/cache``; else the trainer's default_root_dir."""
        setting = self.hparams.rr_cache
        if setting is None or setting in ("none", "off", "false"):
            return None
        if setting != "auto":
            return Path(setting)
        name = Path(self.run_name).parts
        root = next((Path(lg.root_dir) for lg in self.trainer.loggers if getattr(lg, "root_dir", None)), None)
        if root is None and self.output_dir is not None:
            root = self.output_dir
        if root is None:
            return Path(self.trainer.default_root_dir) / "cache"
        return (root.parents[len(name) - 1] if root.parts[-len(name):] == name else root) / "cache"

    def _write(self, masks) -> None:
        res = self.results
        metrics = {f"test/acc_{k}": v for k, v in res["accuracy"].items()}
        metrics |= {f"test/top5_{k}": v for k, v in res.get("accuracy_top5", {}).items()}
        metrics |= {f"time/{k}": v for k, v in res["timings_s"].items()}
        metrics["sparsity/achieved"] = res["sparsity"]["achieved"]
        if "search" in res:
            metrics["search/cost_f"] = res["search"]["cost_f"]
        # Trainer.log_dir broadcasts from rank 0: every process must read it, or rank 0 waits forever
        log_dir = self.trainer.log_dir
        if log_dir is None or not [lg for lg in self.trainer.loggers if not isinstance(lg, DummyLogger)]:
            # no logger (logger: false) or fast_dev_run's stand-in: never the current directory
            log_dir = self.output_dir or Path(self.trainer.default_root_dir) / "runs" / self.run_name
        log_dir = Path(log_dir)
        if not self.trainer.is_global_zero:
            return
        for logger in self.trainer.loggers:
            logger.log_metrics(metrics, step=0)
            for row in res["layers"]:
                logger.log_metrics({f"density/{row['name']}": row["density"]}, step=0)
            hparams = run_hparams(res)
            logger.log_hyperparams(hparams, {f"hp/acc_{k}": v for k, v in res["accuracy"].items()})
        if self.hparams.save_model:  # files that say what they hold: the network and its input normalisation
            dm = pipeline_data(self.trainer.datamodule)
            metadata = checkpoint_metadata(self.hparams.network, dm.info, dm.hparams.dataset)
            res["export"] = export(self.model, masks, log_dir, metadata=metadata)
        atomic_write_json(log_dir / "metrics.json", res)
        acc = res["accuracy"]
        has_rr = any("rr" in row for row in res["layers"])
        self.reports_rr_location = has_rr and not tensorboard_loggers(self.trainer)
        print(  # the results, on stdout (logging and progress bars are on stderr)
            results_table(res["layers"])
            + f"\n\naccuracy  dense {acc['dense']:.4f}  pruned {acc['pruned']:.4f}  repaired {acc['repaired']:.4f}"
            + f"  ({res['test_samples']} test images)\nrepair {res['timings_s']['repair']:.2f}s = "
            + f"{res['timings_s']['repair'] / res['timings_s']['calibration_forward']:.2f}x one dense calibration pass"
            + (" (in the search, not run again)" if res.get("search", {}).get("repair_reused") else "")
            + (f"\nallocation search: {res['search']['candidates']} candidates scored, started from "
               f"{res['search']['start']}, chose {res['search']['chosen']}, {res['search']['cost_f']:.1f}x one dense "
               "calibration pass" if "search" in res else "")
            + ("\nper-layer RR, D_raw and D_res: in metrics.json (no TensorBoard logger for the RR views)"
               if self.reports_rr_location else "")
            + f"\nwrote {log_dir / 'metrics.json'}"
            + "".join(f", {Path(res['export'][k]).name}" for k in ("state_dict", "sparse") if "export" in res)
        )


def _search_start(dense: nn.Module, search: SearchRecord | None) -> dict[str, dict]:
    """Per layer name, the density of the allocation the search started from (none when it did not run)."""
    if search is None:
        return {}
    start = search.summary()["start_kept"]
    return {layer.name: {"search_start_density": start[layer.name] / layer.numel} for layer in prunable_layers(dense)}


def results_table(rows: list[dict]) -> str:
    """The allocation table, with the density the ``search`` allocation started from, and D_raw, D_res and RR at
    each layer's allocated sparsity, when the run has them (``-``: undefined, the layer has no damage)."""
    lines = format_table(rows).splitlines()
    titles = {"search_start_density": "start", "d_raw": "D_raw", "d_res": "D_res", "rr": "RR"}
    columns = [(key, title) for key, title in titles.items() if any(key in r for r in rows)]
    if not columns:
        return "\n".join(lines)
    cell = lambda v: f"{'-':>8}" if v is None else f"{v:>8.4f}"  # noqa: E731
    head = lines[0] + "".join(f" {title:>8}" for _, title in columns)
    body = [line + "".join(f" {cell(r.get(key))}" for key, _ in columns)
            for line, r in zip(lines[2:-1], rows, strict=True)]  # fmt: skip
    return "\n".join([head, "-" * len(head), *body, lines[-1]])


def network_label(spec) -> str:
    """A short name of a network spec: the arch of a shortcut, else the class or builder name, lowercased."""
    if isinstance(spec, Network):
        return spec.arch
    if isinstance(spec, dict):
        if "arch" in spec:
            return str(spec["arch"])
        if spec.get("class_path") is not None:
            name = str(spec["class_path"]).rpartition(".")[2]
            return (spec.get("init_args") or {}).get("arch", name).lower() if name == "Network" else name.lower()
    target = getattr(spec, "func", spec)  # functools.partial: jsonargparse's form of a class_path
    name = getattr(target, "__name__", type(target).__name__)
    return name.lower() if name != "<lambda>" else "network"
