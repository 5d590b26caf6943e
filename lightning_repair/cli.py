"""The ``lightning-repair`` console script: ``fit`` (one LightningCLI, model chosen by class_path) and ``evaluate``.

Results go to stdout; progress bars and logging to stderr. A failure is one line,
``lightning-repair: error: <message>``, with exit status 2 for a configuration error (a bad value, an unknown
key or name, a config file that is not valid YAML) and 1 for an error while running (a missing, unreadable or
unfitting checkpoint, too little calibration data, ...). ``LIGHTNING_REPAIR_TRACEBACK=1`` shows the traceback
instead, ``LIGHTNING_REPAIR_VERBOSE=1`` the framework messages hidden as ``ANY_RUN`` and ``PRUNE_REPAIR_RUN``.
"""

from __future__ import annotations

# isort: off
from . import interrupts  # first: a Ctrl-C or SIGTERM while the libraries below load ends the process quietly
# isort: on

import argparse
import inspect
import logging
import os
import pickle
import re
import signal
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import lightning.pytorch as pl
import yaml
from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.loggers.logger import DummyLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.model_helpers import is_overridden
from tqdm.auto import tqdm

from .allocation import methods
from .datamodule import ImageDataModule
from .evaluation import evaluate, evaluation_precision
from .export import atomic_write_json, load_exported, read_metadata, unpickling_reason
from .launch import limited_test_size, on_every_process
from .models import check_recorded_network, configure_parsing, load_weights
from .module import PruneRepairModule
from .operators import PRESETS
from .records import init_args, plain, state_digest

configure_parsing()  # before any parser reads a NetworkSpec

TRACEBACK_ENV = "LIGHTNING_REPAIR_TRACEBACK"
VERBOSE_ENV = "LIGHTNING_REPAIR_VERBOSE"

# Lightning messages hidden in every run: none is about the user's run or config.
ANY_RUN = (
    "💡 Tip:",  # advertisements for Lightning's logging and model-registry services
    "`isinstance(treespec, LeafSpec)` is deprecated",  # Lightning's own code calling torch's pytree API
    "Seed set to",  # the config's seed_everything, saved in the run's config.yaml
    "\nDetected KeyboardInterrupt",  # Ctrl-C or SIGTERM: reported_errors says what was saved instead
    "Received SIGTERM",
    "Bypassing SIGTERM",
)
# Hidden in prune-and-repair runs (PruneRepairModule), where ``fit`` trains nothing: the pipeline runs in
# on_fit_start and then sets max_epochs to 0, so there is no epoch limit, optimizer, validation step or
# per-step logging for these to be about.
PRUNE_REPAIR_RUN = (
    "`max_epochs` was not set",
    "You passed in a `val_dataloader` but have no `validation_step`",
    "`LightningModule.configure_optimizers` returned `None`",
    "The number of training batches",  # ... is smaller than the logging interval log_every_n_steps
    "`Trainer.fit` stopped: `max_epochs=0` reached",
)


class ConfigError(Exception):
    """The configuration is wrong: nothing has run yet (exit status 2)."""


class HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's help, with the description's and epilog's lines kept as written, and a type's list of known
    subclasses cut short (for ``model.network``, jsonargparse would list every nn.Module in the environment)."""

    KNOWN = ", known subclasses: "
    SHOWN = 6

    def _get_help_string(self, action) -> str:
        text = super()._get_help_string(action)
        if self.KNOWN not in text:
            return text
        head, tail = text.split(self.KNOWN, 1)
        names, rest = (tail[:-1], ")") if tail.endswith(")") else (tail, "")
        names = names.split(", ")
        if len(names) <= self.SHOWN:
            return text
        own = [n for n in names if n in ("lightning_repair.Network", "torch.nn.Module")]
        shown = own or names[: self.SHOWN]
        return (f"{head}{self.KNOWN}{', '.join(shown)} and {len(names) - len(shown)} more: any importable class "
                f"or builder function, e.g. torchvision.models.resnet18 or mymodule.MyNet{rest}")


class RepairArgumentParser(LightningArgumentParser):
    """LightningCLI's parser with ``HelpFormatter`` by default, also for the parsers that jsonargparse builds on the
    fly (``--model.help CLASS``)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def _cwd_importable() -> None:
    """Resolve class_path against the working directory, as ``python -m`` does (a console script does not)."""
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


class RepairCLI(LightningCLI):
    """LightningCLI with only the subcommand that works (``fit``: prune and repair, or train a dense model),
    parse and instantiation errors raised as ``ConfigError``, and the framework's messages that do not apply
    to the run hidden (``noise``)."""

    HIDDEN = ANY_RUN

    def __init__(self, *args, **kwargs):
        _cwd_importable()
        self.noise = FrameworkNoise()
        kwargs.setdefault("parser_class", RepairArgumentParser)
        with self.noise.hidden(self.HIDDEN):
            super().__init__(*args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # validate/test/predict have nothing to run for PruneRepairModule (its work is done in fit), a dense
        # model's validation runs every training epoch, and `lightning-repair evaluate` tests an exported model
        return {"fit": LightningCLI.subcommands()["fit"]}

    def init_parser(self, **kwargs):
        return super().init_parser(exit_on_error=False, formatter_class=HelpFormatter, **kwargs)

    def add_core_arguments_to_parser(self, parser) -> None:
        """The tool's own groups first in the help (model, data), Lightning's trainer after them."""
        parser.add_lightning_class_args(self._model_class, "model", subclass_mode=self.subclass_mode_model)
        parser.add_lightning_class_args(self._datamodule_class, "data", subclass_mode=self.subclass_mode_data)
        if self.subclass_mode_data:  # data: {dataset: ...} without a class_path is the built-in ImageDataModule
            parser.set_defaults({"data": {"class_path": "lightning_repair.ImageDataModule"}})
        parser.add_lightning_class_args(self.trainer_class, "trainer")
        parser.set_defaults({"trainer." + k: v for k, v in self.trainer_defaults.items() if k != "callbacks"})

    def parse_arguments(self, parser, args) -> None:
        check_config_files(sys.argv[1:] if args is None else args)
        try:
            super().parse_arguments(parser, args)
        except argparse.ArgumentError as err:
            raise ConfigError(condense_parser_message(str(err))) from err

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as err:  # a constructor refused a value: the config is wrong, nothing has run
            raise ConfigError(condense_parser_message(str(err))) from err

    def before_fit(self) -> None:
        if isinstance(self.model, PruneRepairModule):
            self.noise.hide(PRUNE_REPAIR_RUN)
            check_full_test_set(self.trainer, "prune-and-repair runs")
            interrupts.set_note(
                "nothing was saved (a prune-and-repair run writes its results when it finishes); "
                "run the same command again to start over"
            )
            name_runs(self.trainer, self.model.run_name)
            dm = self.datamodule
            if dm is not None and not is_overridden("train_dataloader", dm, pl.LightningDataModule):
                # Lightning's fit insists on a training loader; a prune-and-repair run trains nothing, so a datamodule
                # of your own needs none (datamodule.CONTRACT)
                dm.train_dataloader = lambda: []
            if not [lg for lg in self.trainer.loggers if not isinstance(lg, DummyLogger)]:
                # logger: false or fast_dev_run: results and config.yaml in runs/<run name>/, never in the current
                # directory (Trainer.log_dir is the default root dir without a logger)
                folder = Path(self.trainer.default_root_dir) / "runs" / self.model.run_name
                self.trainer.loggers = []
                self.trainer._default_root_dir = str(folder)
                self.model.output_dir = folder
        else:
            interrupts.set_note(self._training_note)

    def _training_note(self) -> str:
        folder = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "checkpoints"
        saved = sorted(folder.glob("*.ckpt")) if folder.is_dir() else []
        if not saved:
            return "no checkpoint was saved yet; run the same command again to start over"
        return f"checkpoints are in {folder}; resume with the same command and --ckpt_path {saved[-1]}"


def check_full_test_set(trainer: pl.Trainer, runs: str) -> None:
    """ConfigError if ``--trainer.limit_test_batches`` asks for part of the test set: ``runs`` report exact
    accuracies on all of it. ``fast_dev_run`` runs the whole pipeline once, as it is (results under runs/)."""
    limit = trainer.limit_test_batches
    if trainer.fast_dev_run:  # it sets the limit to its own batch count; a prune-and-repair run has no loop to cut
        return
    if limit is not None and not (isinstance(limit, float) and limit >= 1.0):
        raise ConfigError(
            f"trainer.limit_test_batches={limit}: {runs} evaluate on the whole test set; for a quick look at part "
            "of it, run lightning-repair evaluate --trainer.limit_test_batches N on an exported model"
        )


def name_runs(trainer: pl.Trainer, run_name: str) -> None:
    """Put each TensorBoard logger's runs under ``<its name>/<run name>/version_N`` (``quickstart/resnet18/lamp-0.95/
    default/version_0``), so that TensorBoard's run list and HParams table say what each run was. A logger given an
    explicit version keeps its folder."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger) and logger._version is None and logger._experiment is None:
            logger._name = f"{logger._name}/{run_name}" if logger._name else run_name


def build_cli(args: list[str] | None = None, run: bool = True) -> RepairCLI:
    """Parse ``args`` (default: the command line) and run the subcommand; with ``run=False`` there
    is no subcommand and the returned CLI holds the configured ``trainer``, ``model`` and ``datamodule``."""
    return RepairCLI(
        pl.LightningModule,
        pl.LightningDataModule,  # ImageDataModule unless data names a class_path (datamodule.CONTRACT)
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={
            "description": "Prune a trained CNN and repair it label-free (fit; or train a dense model), or test "
            "a model it exported (lightning-repair evaluate --help).",
            "fit": {"usage": FIT_USAGE, "description": fit_epilog()},
        },
        args=args,
        run=run,
    )


class EvaluateCLI(RepairCLI):
    """A run config (its data, device and architecture) plus ``--weights``: the file to evaluate."""

    # main hands LightningCLI the command line without the word "evaluate", which Lightning warns about
    HIDDEN = (*ANY_RUN, "LightningCLI's args parameter is intended to run from within Python")

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--weights", type=str, required=True, help="a run's repaired.pt or repaired.sparse.pt, or any state_dict"
        )
        parser.add_argument(
            "--output", type=str | None, default=None,
            help="where process 0 writes the result as JSON (default: beside the weights, <name>.evaluation.json)",
        )  # fmt: skip
        # options of `fit` that a run's saved config.yaml holds; evaluate reads no checkpoint but --weights
        parser.add_argument("--ckpt_path", type=str | None, default=None, help="ignored (a fit option)")
        parser.add_argument("--weights_only", type=bool | None, default=None, help="ignored (a fit option)")


def evaluation_path(weights: str) -> Path:
    """``run/repaired.pt`` -> ``run/repaired.evaluation.json``."""
    path = Path(weights)
    return path.with_name(path.name.removesuffix(".pt") + ".evaluation.json")


def evaluate_exported(args: list[str]) -> None:
    """``lightning-repair evaluate --config RUN.yaml --weights FILE``: top-1/top-5 test accuracy of FILE, on every
    process of the config's trainer (each its own shard of the test set, the counts summed), printed and written
    as JSON by process 0."""
    cli = EvaluateCLI(
        # data in subclass mode, as fit saves it (data: {class_path: ..., init_args: ...}); evaluate reads the
        # built-in ImageDataModule's test split
        pl.LightningModule, ImageDataModule, subclass_mode_model=True, subclass_mode_data=True, run=False, args=args,
        parser_kwargs={"prog": "lightning-repair evaluate",
                       "description": "Test accuracy of an exported model, on the data of a run config. "
                                      "--trainer.limit_test_batches N evaluates the first N batches only."},
    )  # fmt: skip
    trainer, dm, weights = cli.trainer, cli.datamodule, cli.config.weights
    metadata = read_metadata(weights) or {}  # a file that records its network: it must be the config's
    check_recorded_network(cli.model.hparams.network, metadata.get("network"), weights)
    model = load_weights(cli.model.model, load_exported(weights))  # the config's architecture, strictly
    dm.setup("test")
    total = len(dm.test_set)
    try:
        samples = limited_test_size(trainer, total, dm.hparams.batch_size)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    output = Path(cli.config.output) if cli.config.output else evaluation_path(weights)
    interrupts.set_note("nothing was saved; run the same command again")

    def run() -> None:
        rank, world, device = trainer.global_rank, trainer.world_size, trainer.strategy.root_device
        loader = dm.evaluation_dataloader(rank, world, samples)
        batches = tqdm(loader, desc="evaluate", leave=False, disable=not trainer.is_global_zero)
        precision = evaluation_precision(trainer.precision, device)  # a mixed precision on a GPU only
        accuracy = evaluate(model.to(device), batches, device, precision=precision)
        if not trainer.is_global_zero:
            return
        partial = accuracy["samples"] < total
        record = {
            "weights": str(weights),
            "state_sha256": state_digest(model.state_dict()),
            "accuracy": {"top1": accuracy["top1"], "top5": accuracy["top5"]},
            "test_samples": accuracy["samples"],
            "test_set_size": total,
            "partial": partial,
            "limit_test_batches": trainer.limit_test_batches,
            "evaluation_precision": precision,
            "world_size": world,
            "data_config": plain(init_args(dm)),
            "data_location": dm.info.location,
        }
        atomic_write_json(output, record)
        images = (f"{accuracy['samples']} of {total} test images: partial, trainer.limit_test_batches="
                  f"{trainer.limit_test_batches}" if partial else f"{accuracy['samples']} test images")  # fmt: skip
        processes = f", {world} processes" if world > 1 else ""
        print(f"{weights}: top-1 {accuracy['top1']:.4f}  top-5 {accuracy['top5']:.4f}  "
              f"({images}, {dm.hparams.dataset}{processes}); wrote {output}", flush=True)  # fmt: skip

    on_every_process(trainer, run)


def main(args: list[str] | None = None) -> None:
    """The console script. Returns None: a console script's return value becomes its exit status."""
    with reported_errors("lightning-repair"):
        command = sys.argv[1:] if args is None else args
        if command[:1] == ["evaluate"]:
            evaluate_exported(command[1:])
        else:
            build_cli(args)


# ----------------------------------------------------------------------------- framework messages


class FrameworkNoise(logging.Filter):
    """Hides the Python warnings and Lightning log lines that start with one of the hidden prefixes, while
    ``hidden`` is active and ``LIGHTNING_REPAIR_VERBOSE`` is unset."""

    LOGGERS = (
        "lightning.pytorch.trainer.connectors.signal_connector",
        "lightning.pytorch.utilities.rank_zero",
        "lightning.fabric.utilities.rank_zero",
        "lightning.fabric.utilities.seed",
    )

    def __init__(self):
        super().__init__()
        self.prefixes: tuple[str, ...] = ()

    @contextmanager
    def hidden(self, prefixes: Sequence[str]) -> Iterator[None]:
        if os.environ.get(VERBOSE_ENV, "") not in ("", "0"):
            yield
            return
        loggers = [logging.getLogger(name) for name in self.LOGGERS]
        with warnings.catch_warnings():  # the filters added by hide() end with the block
            self.hide(prefixes)
            for logger in loggers:
                logger.addFilter(self)
            try:
                yield
            finally:
                for logger in loggers:
                    logger.removeFilter(self)
                self.prefixes = ()

    def hide(self, prefixes: Sequence[str]) -> None:
        """Add prefixes to hide; only inside ``hidden`` (warning filters added outside would stay)."""
        if os.environ.get(VERBOSE_ENV, "") not in ("", "0"):
            return
        self.prefixes += tuple(prefixes)
        for prefix in prefixes:
            warnings.filterwarnings("ignore", message=re.escape(prefix))

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


# ----------------------------------------------------------------------------- errors


@contextmanager
def reported_errors(prog: str) -> Iterator[None]:
    """Turn an exception into one line on stderr and exit status 2 (``ConfigError``) or 1 (anything else); Ctrl-C and
    SIGTERM into one line saying what was saved and how to resume (``interrupts.note``), exit status 130 or 143."""
    with interrupts.handled():
        try:
            yield
        except KeyboardInterrupt as err:
            stopped_by = signal.SIGTERM if isinstance(err, interrupts.Terminated) else signal.SIGINT
            signum = interrupts.received() or stopped_by
            _stopped(prog, signum)
        except SystemExit:
            signum = interrupts.received()  # Lightning's trainer ends an interrupted run with sys.exit(1)
            if signum is None:
                raise
            _stopped(prog, signum)
        except Exception as err:
            if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
                raise
            print(f"{prog}: error: {error_message(err)}", file=sys.stderr)
            raise SystemExit(2 if isinstance(err, ConfigError) else 1) from None


def _stopped(prog: str, signum: int) -> None:
    for bar in list(getattr(tqdm, "_instances", ())):  # the line goes below the progress bars, not onto them
        bar.close()
    try:
        note = interrupts.note()
    except Exception as err:  # what was saved could not be read: say so rather than hide the interruption
        note = f"could not tell what was saved ({error_message(err)})"
    if getattr(rank_zero_only, "rank", 0) == 0:  # under srun or torchrun every process got the signal
        print(f"{prog}: {interrupts.describe(signum)}: {note}", file=sys.stderr, flush=True)
    raise SystemExit(interrupts.exit_status(signum)) from None


def error_message(err: BaseException) -> str:
    """The exception's message on one line; torch's explanation of a refused pickle, which advises loading the
    file with ``weights_only=False`` (running whatever code it holds), is replaced by the reason alone."""
    message = str(err) or type(err).__name__
    cause = err.__cause__ or err.__context__
    while cause is not None:
        if isinstance(cause, pickle.UnpicklingError):
            message = message.replace(str(cause), unpickling_reason(cause))
        cause = cause.__cause__ or cause.__context__
    if isinstance(err, KeyError):  # str(KeyError) is the repr of the key alone
        message = f"{type(err).__name__}: {message}"
    return " ".join(message.split())


# jsonargparse's lines that explain its own type matching rather than the value that was refused
_PARSER_NOISE = re.compile(
    r"^(Does not validate against any of the Union subtypes|Subtypes: |Errors:|Expected a <class 'NoneType'>"
    r"|Given value type: |Given value: |Problem with given class_path )"
)


def condense_parser_message(message: str) -> str:
    """jsonargparse's nested report as ``key.path: reason``: the ``Parser key "..."`` lines become the key path,
    the lines about Union subtypes and the dump of the given value are dropped."""
    keys, reasons = [], []
    for line in message.splitlines():
        line = line.strip().removeprefix("- ")
        key = re.fullmatch(r'Parser key "([^"]+)":', line)
        if key:
            keys.append(key.group(1))
        elif line and not _PARSER_NOISE.match(line):
            reasons.append(line)
    reason = "; ".join(reasons) or message
    return f"{'.'.join(keys)}: {reason}" if keys else reason


def check_config_files(args: Sequence[str]) -> None:
    """Read every ``--config`` file first, so that a missing file or a YAML syntax error is reported with the
    file's name (jsonargparse reports the line in ``<unicode string>``)."""
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            path = Path(args[i + 1])
        elif arg.startswith("--config="):
            path = Path(arg.removeprefix("--config="))
        else:
            continue
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            with path.open() as f:
                yaml.safe_load(f)
        except yaml.YAMLError as err:  # its marks name the file: we opened it ourselves
            raise ConfigError(f"{path} is not valid YAML: {err}") from err


# ----------------------------------------------------------------------------- help


FIT_USAGE = (
    "lightning-repair fit --config CONFIG.yaml [--model.OPTION VALUE] [--data.OPTION VALUE] [--trainer.OPTION VALUE]"
)


def fit_epilog() -> str:
    """The prune-and-repair options and what each repair preset expands to, from the code itself."""
    defaults = {k: p.default for k, p in inspect.signature(PruneRepairModule).parameters.items()}
    width = max(map(len, PRESETS)) + 2
    presets = "\n".join(f"  {name:<{width}}{_recipe_text(ops)}" for name, ops in PRESETS.items())
    return (
        "prune and repair (model.class_path: lightning_repair.PruneRepairModule, as in configs/quickstart.yaml):\n"
        f"  --model.sparsity S     target global sparsity over prunable weights, in [0, 1) "
        f"(default {defaults['sparsity']})\n"
        f"  --model.allocation M   {', '.join(methods())}, or a dict with options "
        f"(default {defaults['allocation']}; see configs/allocation/)\n"
        f"  --model.repair R       a preset below, or a list of operators [{{op: ...}}, ...] "
        f"(default {defaults['repair']})\n"
        "  every option:          lightning-repair fit --model.help lightning_repair.PruneRepairModule\n"
        "  dense training:        lightning-repair fit --model.help lightning_repair.DenseClassifier\n"
        "  a model it exported:   lightning-repair evaluate --config RUN.yaml --weights repaired.pt\n"
        f"\ndata (lightning_repair.ImageDataModule unless data.class_path names a LightningDataModule of your own):\n"
        f"{_data_options()}\n"
        "  your own data:         data: {class_path: mymodule.MyData, init_args: {...}}, a LightningDataModule with\n"
        "                         calibration_dataloader() (image tensors, no labels) and test_dataloader()\n"
        "                         ((images, labels)); class_path resolves against the working directory too\n"
        f"\nrepair presets (operators in order):\n{presets}\n"
        "\nmethods: docs/methods.md. LIGHTNING_REPAIR_TRACEBACK=1 shows the traceback of an error,\n"
        "LIGHTNING_REPAIR_VERBOSE=1 the framework messages the tool hides."
    )


def _data_options() -> str:
    """One line per ImageDataModule option: name, default and the first line of its docstring entry."""
    doc = inspect.getdoc(ImageDataModule) or ""
    described = dict(re.findall(r"^\s{4}(\w+): (.+)$", doc, flags=re.M))
    lines = []
    for name, parameter in inspect.signature(ImageDataModule).parameters.items():
        option = f"--data.{name}"
        text = described.get(name, "").split(". ")[0].rstrip(".")
        lines.append(f"  {option:<22} {text} (default {parameter.default})")
    return "\n".join(lines)


def _recipe_text(ops: list[dict]) -> str:
    if not ops:
        return "(no operator: the pruned model as it is)"
    steps = []
    for op in ops:
        options = ", ".join(f"{k}={v}" for k, v in op.items() if k != "op")
        steps.append(op["op"] + (f"({options})" if options else ""))
    return " -> ".join(steps)


if __name__ == "__main__":
    main()
