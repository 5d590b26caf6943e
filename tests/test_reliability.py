"""Reliability (issue 8): untrusted and broken files, numerical faults, interruption, determinism, a config fuzz.

Every refused input must fail with a specific error naming the field or file and leave nothing
partial behind; no number written may be NaN; a killed run leaves no partial result.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from lightning_repair import PruneRepairModule
from lightning_repair.allocation import ALLOCATIONS, Allocation, Override, allocate
from lightning_repair.data import build_datasets
from lightning_repair.datamodule import ImageDataModule
from lightning_repair.masks import mask_violations
from lightning_repair.models import ARCHITECTURES, CheckpointMismatchError, Network, load_weights
from lightning_repair.operators import PRESETS
from lightning_repair.records import state_digest
from lightning_repair.repair import repair

from helpers import (
    TINY_NETWORK,
    calibrated_dense,
    leftover_temp_files,
    pipeline_config,
    plain_accuracy,
    pruned_copy,
    read_metrics,
    run_dir,
    run_fit,
    write_config,
)

pytestmark = pytest.mark.usefixtures("raise_errors")  # errors as exceptions (conftest.py)


def nothing_written(root) -> bool:
    """No result file, and no temporary file of an interrupted atomic write."""
    results = [run_dir(root) / name for name in ("metrics.json", "repaired.pt", "repaired.sparse.pt")]
    return not any(path.exists() for path in results) and not leftover_temp_files(root)


def fit_with_checkpoint(root, checkpoint, **model_args):
    run_fit(write_config(root / "config.yaml", pipeline_config(root, checkpoint, **model_args)))


# ----------------------------------------------------------------------------- untrusted and broken checkpoints


class RunsCodeWhenUnpickled:
    """Unpickling calls ``open(marker, "w")``: the file appears if and only if the pickle's code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_checkpoint_with_pickled_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"
    checkpoint = tmp_path / "evil.pt"
    state = calibrated_dense().state_dict()
    state["fc.bias"] = RunsCodeWhenUnpickled(marker)
    torch.save(state, checkpoint)

    with pytest.raises(CheckpointMismatchError, match=r"evil\.pt.*weights_only=True"):
        fit_with_checkpoint(tmp_path, checkpoint)
    assert not marker.exists()
    assert nothing_written(tmp_path)

    # the payload is live: a plain unpickler would have run it
    torch.load(checkpoint, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("damage", ["empty", "truncated", "not-a-checkpoint", "tensor-not-a-dict"])
def test_broken_checkpoint_is_refused_naming_the_file(tmp_path, dense_checkpoint, damage):
    broken = tmp_path / "broken.pt"
    if damage == "empty":
        broken.write_bytes(b"")
    elif damage == "truncated":
        broken.write_bytes(dense_checkpoint.read_bytes()[: dense_checkpoint.stat().st_size // 2])
    elif damage == "not-a-checkpoint":
        broken.write_text("model:\n  weights: none\n")
    else:
        torch.save(torch.zeros(3), broken)
    with pytest.raises(CheckpointMismatchError, match=r"broken\.pt"):
        fit_with_checkpoint(tmp_path, broken)
    assert nothing_written(tmp_path)


def test_missing_checkpoint_is_refused_naming_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.pt"):
        fit_with_checkpoint(tmp_path, tmp_path / "nowhere.pt")
    assert nothing_written(tmp_path)


def test_nan_weights_are_refused_before_any_accuracy_is_written(tmp_path):
    model = calibrated_dense()
    with torch.no_grad():
        model.layer2[0].conv1.weight[0, 0, 0, 0] = float("nan")
        model.layer3[1].bn2.running_var[3] = float("inf")
    torch.save(model.state_dict(), tmp_path / "nan.pt")
    with pytest.raises(
        ValueError, match=r"nan\.pt holds NaN/Inf .*layer2\.0\.conv1\.weight.*layer3\.1\.bn2\.running_var"
    ):
        fit_with_checkpoint(tmp_path, tmp_path / "nan.pt")
    assert nothing_written(tmp_path)


def test_activations_overflowing_to_inf_are_an_error_not_a_number(tmp_path):
    model = calibrated_dense()
    with torch.no_grad():
        model.conv1.weight.mul_(1e30)  # finite weights whose activations overflow float32
    torch.save(model.state_dict(), tmp_path / "overflow.pt")
    with pytest.raises(FloatingPointError, match="non-finite"):
        fit_with_checkpoint(tmp_path, tmp_path / "overflow.pt")
    assert nothing_written(tmp_path)


# ----------------------------------------------------------------------------- data folders


def image_tree(root, classes=("cat", "dog"), per_class=3, splits=("train", "val")):
    for split in splits:
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (8, 8), color=(40 * i, 80, 120)).save(folder / f"{i}.png")
    return root


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_image_is_named(tmp_path, damage):
    image_tree(tmp_path)
    bad = tmp_path / "train" / "dog" / "1.png"
    bad.write_bytes(b"not an image" if damage == "garbage" else bad.read_bytes()[:40])
    dm = ImageDataModule("imagefolder", str(tmp_path), calibration_size=6, batch_size=2, augment=False)
    dm.setup()
    with pytest.raises(OSError, match=re.escape(f"cannot read image {bad}")):
        list(dm.calibration_dataloader())


@pytest.mark.parametrize(
    "layout", ["missing", "no-val-split", "no-class-folders", "empty-class-folders", "classes-differ"]
)
def test_bad_imagefolder_is_refused_naming_the_folder(tmp_path, layout):
    if layout == "no-val-split":
        image_tree(tmp_path, splits=("train",))
    elif layout == "no-class-folders":
        (tmp_path / "train").mkdir()
        (tmp_path / "val").mkdir()
    elif layout == "empty-class-folders":
        for split in ("train", "val"):
            (tmp_path / split / "cat").mkdir(parents=True)
    elif layout == "classes-differ":  # same number of classes, different names: labels would silently disagree
        image_tree(tmp_path, splits=("train",))
        image_tree(tmp_path, classes=("cat", "emu"), splits=("val",))
    data_dir = tmp_path / "nowhere" if layout == "missing" else tmp_path
    dm = ImageDataModule("imagefolder", str(data_dir), calibration_size=2, batch_size=2)
    with pytest.raises((FileNotFoundError, ValueError), match=re.escape(str(data_dir))):
        dm.setup()


# ----------------------------------------------------------------------------- numerical faults


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_repair_is_finite_and_keeps_masks(dtype):
    dense = calibrated_dense().to(dtype)
    pruned, masks = pruned_copy(dense, sparsity=0.9)
    batches = [torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(i)).to(dtype) for i in range(2)]
    repair(pruned, dense, batches, "default")
    assert all(torch.isfinite(t).all() for t in pruned.state_dict().values() if t.is_floating_point())
    assert mask_violations(pruned, masks) == {}
    with torch.no_grad():
        assert torch.isfinite(pruned(batches[0])).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_batches_in_another_dtype_than_the_model_are_refused_clearly(dtype):
    dense = calibrated_dense()
    pruned, _ = pruned_copy(dense)
    with pytest.raises((TypeError, ValueError), match="dtype"):
        repair(pruned, dense, [torch.randn(8, 3, 16, 16).to(dtype)], "default")


def test_fully_pruned_and_all_zero_layers_give_finite_results(tmp_path):
    model = calibrated_dense()
    with torch.no_grad():
        model.layer3[0].conv2.weight.zero_()  # an all-zero layer in the dense checkpoint
    torch.save(model.state_dict(), tmp_path / "dense.pt")
    emptied = ["layer1.0.conv1", "layer2.0.downsample.0", "layer4.1.conv2"]
    allocation = {
        "method": "lamp",
        "overrides": [{"select": name.replace(".", "\\."), "sparsity": 1.0} for name in emptied],
    }
    fit_with_checkpoint(tmp_path, tmp_path / "dense.pt", sparsity=0.95, allocation=allocation)

    metrics = read_metrics(tmp_path)
    assert all(math.isfinite(a) and 0 <= a <= 1 for a in metrics["accuracy"].values())
    kept = {row["name"]: row["kept"] for row in metrics["layers"]}
    assert [kept[name] for name in emptied] == [0, 0, 0]
    state = torch.load(run_dir(tmp_path) / "repaired.pt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())
    assert all(not state[f"{name}.weight"].any() for name in emptied)


# ----------------------------------------------------------------------------- interruption

# Runs the CLI with the repair stalled at its first BN site (after creating a marker file), so the
# test can kill it at a known point of the repair without relying on timing.
STALLED_REPAIR = """
import pathlib, sys, time
from lightning_repair.cli import main
import lightning_repair.repair as engine

def stall(*args):
    pathlib.Path(sys.argv[1]).touch()
    time.sleep(600)

engine.recalibrate = stall  # the walk's BN recalibration
main(sys.argv[2:])
"""


def test_run_killed_during_repair_leaves_nothing_partial_and_reruns(tmp_path, dense_checkpoint):
    config = write_config(tmp_path / "config.yaml", pipeline_config(tmp_path, dense_checkpoint))
    marker, log = tmp_path / "repair-started", tmp_path / "killed-run.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", STALLED_REPAIR, str(marker), "fit", "--config", str(config)],
            stdout=out, stderr=subprocess.STDOUT, env=os.environ | {"OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 300  # generous: imports alone take minutes on a loaded machine
            while not marker.exists():
                assert process.poll() is None, f"the run ended before the repair started:\n{log.read_text()}"
                assert time.monotonic() < deadline, f"the repair never started:\n{log.read_text()}"
                time.sleep(0.1)
        finally:
            process.kill()  # SIGKILL: no handler, no cleanup
            process.wait()
    assert process.returncode == -9
    assert nothing_written(tmp_path)

    run_fit(config)
    metrics = read_metrics(tmp_path)  # the rerun's results are complete and describe the model it wrote
    repaired = load_weights(Network(**TINY_NETWORK).build(), run_dir(tmp_path) / "repaired.pt")
    assert metrics["state_sha256"] == state_digest(repaired.state_dict())
    assert metrics["accuracy"]["repaired"] == pytest.approx(plain_accuracy(repaired, build_datasets("synthetic")[1])[0])
    assert leftover_temp_files(tmp_path) == []


# ----------------------------------------------------------------------------- determinism


def test_same_config_twice_gives_identical_masks_parameters_and_accuracies(tmp_path, dense_checkpoint):
    roots = [tmp_path / "first", tmp_path / "second"]
    for root in roots:
        root.mkdir()
        fit_with_checkpoint(root, dense_checkpoint, allocation="lamp", repair="clipped_asr")
    first, second = (torch.load(run_dir(r) / "repaired.pt", weights_only=True)["state_dict"] for r in roots)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    masks = [
        {k: v for k, v in torch.load(run_dir(r) / "repaired.sparse.pt", weights_only=True)["state_dict"].items()
         if "::mask" in k}
        for r in roots
    ]
    assert masks[0] and masks[0].keys() == masks[1].keys()
    assert all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])
    metrics = [read_metrics(r) for r in roots]
    assert metrics[0]["accuracy"] == metrics[1]["accuracy"] and metrics[0]["layers"] == metrics[1]["layers"]


# ----------------------------------------------------------------------------- config fuzz
#
# Every example starts from valid constructor arguments and corrupts up to two of them. A call with
# a corrupted field must fail with a clear error type whose message names one of the corrupted
# fields; a call with none must succeed.

CLEAR_ERRORS = (ValueError, TypeError, FileNotFoundError, CheckpointMismatchError)
junk = st.one_of(st.none(), st.text(max_size=4), st.lists(st.integers(), max_size=2))


@dataclass(frozen=True)
class Field:
    valid: st.SearchStrategy
    invalid: st.SearchStrategy  # draws (value, a word the error message must contain)


def naming(values: st.SearchStrategy, word: str) -> st.SearchStrategy:
    return values.map(lambda v: (v, word))


def integer(word: str, low: int, high: int) -> Field:
    bad = st.one_of(st.integers(max_value=low - 1), st.floats(allow_nan=True), st.booleans(), junk)
    return Field(st.integers(low, high), naming(bad, word))


@st.composite
def arguments(draw, fields: dict[str, Field], min_broken: int = 0, max_broken: int = 2):
    """Values for every field, ``min_broken`` to ``max_broken`` of them invalid; and the words naming those."""
    broken = draw(st.sets(st.sampled_from(sorted(fields)), min_size=min_broken, max_size=max_broken))
    values, words = {}, []
    for name, field in fields.items():
        if name in broken:
            values[name], word = draw(field.invalid)
            words.append(word)
        else:
            values[name] = draw(field.valid)
    return values, words


def nested(fields: dict[str, Field]) -> Field:
    """A dict-valued field: valid when all its entries are, invalid when exactly one is not."""
    return Field(
        arguments(fields, max_broken=0).map(lambda a: a[0]),
        arguments(fields, min_broken=1, max_broken=1).map(lambda a: (a[0], a[1][0])),
    )


NETWORK = {
    "arch": Field(st.sampled_from(sorted(ARCHITECTURES)), naming(junk, "network.arch")),
    "num_classes": integer("network.num_classes", 1, 20),
    "in_channels": integer("network.in_channels", 1, 4),
    "stem": Field(st.sampled_from(["cifar", "imagenet"]), naming(junk, "network.stem")),
    "width": Field(
        st.floats(0.01, 0.1),
        naming(st.one_of(st.floats(max_value=0.0), st.sampled_from([math.inf, math.nan]), junk), "network.width"),
    ),
}
SELECTOR = Field(
    st.sampled_from(["role:first", "role:classifier", "role:projection", "layer1\\..*", "fc"]),
    st.one_of(
        naming(st.sampled_from(["role:head", "role:"]), "role"),
        naming(st.sampled_from(["layer[", "(fc"]), "regular expression"),
        naming(st.integers(), "select"),
    ),
)
OVERRIDE = Field(
    st.one_of(
        st.fixed_dictionaries({"select": SELECTOR.valid, "sparsity": st.floats(0.0, 1.0)}),
        st.fixed_dictionaries({"select": SELECTOR.valid, "max_density": st.floats(0.01, 1.0)}),
    ),
    st.one_of(
        SELECTOR.invalid.map(lambda s: ({"select": s[0], "sparsity": 0.5}, s[1])),
        naming(st.fixed_dictionaries({"select": SELECTOR.valid, "sparsity": st.floats(1.01, 9) | junk}), "sparsity"),
        naming(
            st.fixed_dictionaries({"select": SELECTOR.valid, "max_density": st.floats(max_value=0.0)}), "max_density"
        ),
        naming(st.fixed_dictionaries({"select": SELECTOR.valid}), "exactly one of sparsity or max_density"),
        naming(junk, "allocation.overrides"),
    ),
)
ALLOCATION_OPTIONS = {
    "method": Field(
        st.sampled_from(sorted(ALLOCATIONS)),
        naming(st.text(max_size=5).filter(lambda m: m not in ALLOCATIONS), "allocation.method"),
    ),
    "power": Field(st.floats(0.0, 3.0), naming(st.just(math.nan) | junk, "allocation.power")),
    "keep_dense": Field(st.lists(SELECTOR.valid, max_size=2), SELECTOR.invalid.map(lambda s: ([s[0]], s[1]))),
    "overrides": Field(st.lists(OVERRIDE.valid, max_size=2), OVERRIDE.invalid.map(lambda o: ([o[0]], o[1]))),
}
MODULE = {
    "network": nested(NETWORK),
    "sparsity": Field(
        st.floats(0.0, 1.0, exclude_max=True),
        naming(
            st.floats(min_value=1.0) | st.floats(max_value=0.0, exclude_max=True) | st.just(math.nan) | junk, "sparsity"
        ),
    ),  # fmt: skip
    "allocation": Field(  # a method name, or Allocation's options as written in YAML
        st.sampled_from(sorted(ALLOCATIONS)) | nested(ALLOCATION_OPTIONS).valid,
        ALLOCATION_OPTIONS["method"].invalid | nested(ALLOCATION_OPTIONS).invalid,
    ),
}
# Recipes are validated by repair.parse_recipe; the fuzz demands a clear error when one is refused
# without predicting which option combinations are valid.
REPAIR_OPTION = st.sampled_from(
    [
        ("site", "block"), ("site", "nowhere"), ("granularity", "layer"), ("granularity", "channel"),
        ("granularity", 3), ("estimator", "ls"), ("estimator", "median"), ("shrinkage", "adaptive"),
        ("shrinkage", "heavy"), ("clip", [0.5, 2.0]), ("clip", [2.0, 0.5]), ("clip", [-1.0, 1.0]),
        ("match_mean", False), ("momentum", 0.1),
    ]
)  # fmt: skip
RECIPE = st.sampled_from([*PRESETS, "asr_v2", ""]) | st.lists(
    st.builds(
        lambda op, options: {"op": op, **dict(options)},
        st.sampled_from(["bn_recalibration", "variance_matching", "magic"]),
        st.lists(REPAIR_OPTION, max_size=3),
    ),
    max_size=3,
)
MISSING = "no-dataset-here"  # an empty data_dir: every dataset but synthetic is missing
DATA = {
    "dataset": Field(
        st.just("synthetic"),
        naming(st.sampled_from(["cifar10", "imagefolder"]), MISSING)
        | naming(st.text(max_size=6).filter(lambda d: d not in ("synthetic", "cifar10")), "data.dataset"),
    ),
    "calibration_size": Field(  # synthetic data has 512 training images
        st.integers(1, 512), integer("calibration_size", 1, 512).invalid | naming(st.integers(513), "calibration_size")
    ),
    "batch_size": integer("data.batch_size", 1, 64),
    "num_workers": Field(st.just(0), naming(st.integers(max_value=-1) | junk, "data.num_workers")),
    "calibration_seed": Field(st.integers(-(2**31), 2**31), naming(junk, "data.calibration_seed")),
}
FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,  # the same examples on every run: CI stays reproducible
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def assert_refused_clearly_or_accepted(build, words: list[str], maybe: tuple[str, ...] = ()):
    """``build`` must fail with a clear error naming one of ``words`` (or ``maybe``), and succeed without them."""
    try:
        build()
    except CLEAR_ERRORS as err:
        named = [*words, *maybe]
        assert named, f"valid arguments were refused: {type(err).__name__}: {err}"
        assert any(w in str(err) for w in named), f"{type(err).__name__}: {err!s} names none of {named}"
    else:
        assert not words, f"invalid arguments accepted: {words}"


@FUZZ
@given(args=arguments(MODULE), recipe=RECIPE)
def test_fuzz_prune_repair_module_arguments(dense_checkpoint, args, recipe):
    values, words = args

    def build():
        allocation = values["allocation"]
        PruneRepairModule(
            Network(**values["network"]),
            str(dense_checkpoint),
            sparsity=values["sparsity"],
            allocation=allocation if isinstance(allocation, str) else Allocation(**allocation),
            repair=recipe,
        )

    assert_refused_clearly_or_accepted(build, words, maybe=("repair", "variance_matching"))


@FUZZ
@given(args=arguments(DATA))
def test_fuzz_image_data_module_arguments(tmp_path, args):
    values, words = args
    data_dir = tmp_path / MISSING
    data_dir.mkdir(exist_ok=True)

    def build():
        dm = ImageDataModule(data_dir=str(data_dir), augment=False, **values)
        dm.setup()
        images = next(iter(dm.calibration_dataloader()))
        assert images.shape == (min(values["batch_size"], values["calibration_size"]), 3, 16, 16)
        next(iter(dm.evaluation_dataloader()))

    assert_refused_clearly_or_accepted(build, words)


# ----------------------------------------------------------------------------- allocation edge cases


@pytest.mark.parametrize("method", ["uniform", "global", "erk", "lamp"])
def test_zero_budget_for_the_free_layers_empties_them(method):
    """Every layer but fc forced (dense or to a set sparsity) so that the target leaves fc exactly nothing:
    feasible, so fc is emptied (as a forced sparsity of 1 would), and the target is met exactly."""
    model = calibrated_dense()
    numels = {name: m.weight.numel() for name, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d,
              torch.nn.Linear))}  # fmt: skip
    total, kept_by_forced = sum(numels.values()), sum(numels.values()) - numels["fc"]
    keep = allocate(model, 1 - kept_by_forced / total, Allocation(method, keep_dense=["(?!fc$).*"]))
    assert keep["fc"] == 0
    assert sum(keep.values()) == kept_by_forced
    with pytest.raises(ValueError, match="unreachable"):  # one weight fewer than the forced layers keep
        allocate(model, 1 - (kept_by_forced - 1) / total, Allocation(method, keep_dense=["(?!fc$).*"]))
    with pytest.raises(ValueError, match="unreachable"):  # fc capped to 10%: cannot hold what the target asks
        allocate(model, 0.0, Allocation(method, overrides=[Override("fc", max_density=0.1)]))
