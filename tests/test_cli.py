"""The ``lightning-repair`` CLI, driven in-process with tiny YAML configs on synthetic data (TorchGeo style),
and once as the console script: what the user reads, and where."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
import yaml
from torch.optim.swa_utils import update_bn
from torch.utils.data import Subset

import lightning_repair
from lightning_repair.allocation import methods
from lightning_repair.cli import ANY_RUN, PRUNE_REPAIR_RUN, main
from lightning_repair.datamodule import ImageDataModule
from lightning_repair.masks import apply_masks, compute_masks
from lightning_repair.models import Network, load_weights
from lightning_repair.operators import PRESETS

from helpers import (
    TINY_NETWORK,
    calibrated_dense,
    pipeline_config,
    plain_accuracy,
    read_metrics,
    run_dir,
    run_fit,
    write_config,
)


@pytest.fixture
def config_path(tmp_path, dense_checkpoint):
    return write_config(tmp_path / "config.yaml", pipeline_config(tmp_path, dense_checkpoint))


def test_fit_runs_the_pipeline_from_yaml(tmp_path, config_path):
    run_fit(config_path)
    metrics = read_metrics(tmp_path)
    assert metrics["sparsity"]["target"] == 0.9
    assert metrics["sparsity"]["achieved"] == pytest.approx(0.9, abs=1e-4)
    assert metrics["allocation"] == "erk"
    assert set(metrics["accuracy"]) == {"dense", "pruned", "repaired"}
    for name in ("repaired.pt", "repaired.sparse.pt", "config.yaml"):
        assert (run_dir(tmp_path) / name).is_file(), name


def test_flags_override_the_yaml(tmp_path, config_path):
    run_fit(config_path, "--model.sparsity", "0.8", "--model.allocation", "lamp", "--model.repair", "bn_recalibration")
    metrics = read_metrics(tmp_path)
    assert metrics["sparsity"]["target"] == 0.8
    assert metrics["sparsity"]["achieved"] == pytest.approx(0.8, abs=1e-4)
    assert metrics["allocation"] == "lamp"
    assert metrics["repair"] == [{"op": "bn_recalibration"}]


def test_allocation_dict_with_options_in_yaml(tmp_path, dense_checkpoint):
    allocation = {
        "method": "erk",
        "power": 0.5,
        "keep_dense": ["role:first"],
        "overrides": [
            {"select": "role:classifier", "max_density": 0.5},
            {"select": "layer1\\.0\\..*", "sparsity": 0.5},
        ],
    }
    config = pipeline_config(tmp_path, dense_checkpoint, allocation=allocation)
    run_fit(write_config(tmp_path / "config.yaml", config))
    metrics = read_metrics(tmp_path)
    density = {row["name"]: row["density"] for row in metrics["layers"]}
    assert density["conv1"] == 1.0
    assert density["fc"] <= 0.5
    assert density["layer1.0.conv1"] == density["layer1.0.conv2"] == 0.5
    assert metrics["sparsity"]["achieved"] == pytest.approx(0.9, abs=1e-4)
    assert metrics["allocation"] == "erk"
    # jsonargparse built the Allocation dataclass (every option kept, defaults filled in)
    built = metrics["config"]["allocation"]
    assert built["power"] == 0.5 and built["keep_dense"] == ["role:first"]
    assert built["overrides"][0] == {"select": "role:classifier", "sparsity": None, "max_density": 0.5}


def test_allocation_search_from_yaml_records_its_choice_start_and_cost(tmp_path, dense_checkpoint, capfd):
    allocation = {"method": "search", "search": {"max_candidates": 4, "held_out_images": 48}}
    config = pipeline_config(tmp_path, dense_checkpoint, allocation=allocation, repair="reconstruct_dense_bn")
    run_fit(write_config(tmp_path / "config.yaml", config))
    metrics = read_metrics(tmp_path)
    search = metrics["search"]
    assert metrics["allocation"] == "search" and metrics["config"]["allocation"]["search"]["max_candidates"] == 4
    assert 3 <= search["candidates"] <= 4 and search["start"] in ("global", "erk", "lamp")
    assert search["chosen"] in search["objectives"] and search["cost_f"] > 0
    assert search["objectives"][search["chosen"]] == min(search["objectives"].values())
    assert search["repair_reused"] is True and metrics["timings_s"]["repair"] > 0  # fitted on every image
    numel = {row["name"]: row["numel"] for row in metrics["layers"]}
    start = {row["name"]: row["search_start_density"] for row in metrics["layers"]}
    assert start == {name: kept / numel[name] for name, kept in search["start_kept"].items()}
    assert sum(search["start_kept"].values()) == sum(row["kept"] for row in metrics["layers"])
    assert metrics["sparsity"]["achieved"] == pytest.approx(0.9, abs=1e-4)
    out = capfd.readouterr().out
    assert "start" in out.splitlines()[0] and f"chose {search['chosen']}" in out
    assert "one dense calibration pass (in the search, not run again)" in out


FRAGMENTS = sorted((Path(__file__).parents[1] / "configs" / "allocation").glob("*.yaml"))


@pytest.mark.parametrize("fragment", FRAGMENTS, ids=lambda p: p.stem)
def test_allocation_fragments_layer_over_a_run_config(config_path, fragment, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config_path), "--config", str(fragment), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["allocation"]
    assert printed["method"] == yaml.safe_load(fragment.read_text())["model"]["init_args"]["allocation"]["method"]


def test_repair_list_in_yaml_acts_on_the_pruned_model(tmp_path, dense_checkpoint):
    """BN recalibration then classifier refit, spelled out: the repaired model is the pruned one with every BN's
    running statistics those of the pruned network on the calibration images (computed here with torch's
    update_bn), the classifier changed, and nothing else touched."""
    recipe = [{"op": "bn_recalibration"}, {"op": "classifier_refit"}]
    run_fit(write_config(tmp_path / "config.yaml", pipeline_config(tmp_path, dense_checkpoint, repair=recipe)))
    metrics = read_metrics(tmp_path)
    repaired = load_weights(Network(**TINY_NETWORK).build(), run_dir(tmp_path) / "repaired.pt").state_dict()

    dense = calibrated_dense()
    pruned = apply_masks(copy.deepcopy(dense), compute_masks(dense, {r["name"]: r["kept"] for r in metrics["layers"]}))
    calibration = ImageDataModule(dataset="synthetic", calibration_size=64, augment=False).calibration_set
    recalibrated = copy.deepcopy(pruned)
    update_bn([torch.stack([calibration[i] for i in range(len(calibration))])], recalibrated)  # one batch: exact
    expected = recalibrated.state_dict()

    running = [k for k in expected if k.endswith(("running_mean", "running_var"))]
    assert len(running) == 2 * 20  # ResNet-18: 20 BatchNorms
    for key in running:  # the engine stores the unbiased variance as update_bn does; 1% covers float32 sums
        torch.testing.assert_close(repaired[key], expected[key], rtol=1e-2, atol=1e-4, msg=key)
    changed = [k for k in running if not torch.allclose(repaired[k], pruned.state_dict()[k], rtol=1e-2, atol=1e-4)]
    assert len(changed) > len(running) // 2
    assert not torch.equal(repaired["fc.weight"], pruned.state_dict()["fc.weight"])
    for key, tensor in pruned.state_dict().items():
        if key not in running and not key.startswith("fc.") and "num_batches_tracked" not in key:
            assert torch.equal(repaired[key], tensor), key  # convs (masked) and BN gamma/beta as pruned


# ----------------------------------------------------------------------------- help and subcommands


def test_fit_help_shows_the_prune_repair_options_and_what_each_preset_expands_to(capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--data.calibration_size", "--model.sparsity", "--model.allocation", "--model.repair"):
        assert option in out
    assert all(method in out for method in methods())
    section = out.split("repair presets")[1].split("\n\n")[0].splitlines()[1:]
    assert len(section) == len(PRESETS)
    for name, ops in PRESETS.items():  # one line per preset, naming its operators in order
        (line,) = [line for line in section if line.split()[0] == name]
        positions = [line.index(op["op"], len(name) + 2) for op in ops]
        assert positions == sorted(positions), line
    with pytest.raises(SystemExit) as info:
        main(["fit", "--model.help", "lightning_repair.PruneRepairModule"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--model.sparsity", "--model.allocation", "--model.repair", "--model.network", "erk_rr"):
        assert option in out


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_only_working_subcommands_are_offered(capsys, config_path, subcommand):
    code, err = cli_failure(capsys, config_path, subcommand=subcommand)
    assert code == 2 and "invalid choice" in err and "'fit'" in err


def test_evaluate_an_exported_model(tmp_path, config_path, capsys):
    run_fit(config_path)
    accuracy = read_metrics(tmp_path)["accuracy"]["repaired"]
    assert "metrics.json, repaired.pt, repaired.sparse.pt" in capsys.readouterr().out  # where the results went
    for name in ("repaired.pt", "repaired.sparse.pt"):
        main(["evaluate", "--config", str(config_path), "--weights", str(run_dir(tmp_path) / name)])
        assert f"top-1 {accuracy:.4f}" in capsys.readouterr().out


def test_evaluate_takes_the_runs_saved_config_and_writes_one_result_file(tmp_path, config_path, capsys):
    run_fit(config_path)
    metrics = read_metrics(tmp_path)
    saved = run_dir(tmp_path) / "config.yaml"  # as Lightning wrote it: with fit's ckpt_path, optimizer, ...
    assert "ckpt_path: null" in saved.read_text()
    capsys.readouterr()
    main(["evaluate", "--config", str(saved), "--weights", str(run_dir(tmp_path) / "repaired.pt")])
    (line,) = capsys.readouterr().out.splitlines()
    assert f"top-1 {metrics['accuracy']['repaired']:.4f}" in line and "(257 test images, synthetic)" in line
    result = json.loads((run_dir(tmp_path) / "repaired.evaluation.json").read_text())
    assert result["accuracy"]["top1"] == metrics["accuracy"]["repaired"]
    assert result["accuracy"]["top5"] == metrics["accuracy_top5"]["repaired"]
    assert (result["test_samples"], result["test_set_size"], result["partial"]) == (257, 257, False)
    assert result["state_sha256"] == metrics["state_sha256"] and result["world_size"] == 1
    assert result["evaluation_precision"] == "32-true"  # a mixed precision applies on a GPU only


@pytest.mark.parametrize(("limit", "images"), [("2", 64), ("0.5", 128)])
def test_evaluate_with_limit_test_batches_says_it_is_partial(tmp_path, config_path, capsys, limit, images):
    """An integer is a number of batches of data.batch_size (32), a fraction a share of the test set; the images
    are the first ones of the test set, whatever the number of processes."""
    run_fit(config_path, "--model.rr_grid", "null")
    weights = run_dir(tmp_path) / "repaired.pt"
    output = tmp_path / "partial.json"
    capsys.readouterr()
    main(["evaluate", "--config", str(config_path), "--weights", str(weights), "--output", str(output),
          "--trainer.limit_test_batches", limit])  # fmt: skip
    (line,) = capsys.readouterr().out.splitlines()
    assert f"({images} of 257 test images: partial, trainer.limit_test_batches={limit}" in line
    result = json.loads(output.read_text())
    assert (result["test_samples"], result["partial"]) == (images, True)
    model = load_weights(Network(**TINY_NETWORK).build(), weights)
    test_set = ImageDataModule(dataset="synthetic", augment=False)
    test_set.setup()
    top1, top5 = plain_accuracy(model, Subset(test_set.test_set, range(images)))
    assert result["accuracy"]["top1"] == pytest.approx(top1) and result["accuracy"]["top5"] == pytest.approx(top5)
    assert top1 != pytest.approx(read_metrics(tmp_path)["accuracy"]["repaired"])  # not the whole test set's


def test_evaluate_refuses_a_limit_that_selects_no_image(tmp_path, config_path, capsys):
    torch.save(calibrated_dense().state_dict(), tmp_path / "weights.pt")
    code, err = cli_failure(capsys, config_path, "--weights", str(tmp_path / "weights.pt"),
                            "--trainer.limit_test_batches", "0", subcommand="evaluate")  # fmt: skip
    assert code == 2
    assert_one_error_line(err, "trainer.limit_test_batches=0", "selects no test image")


def test_fit_refuses_limit_test_batches(tmp_path, capsys, config_path):
    code, err = cli_failure(capsys, config_path, "--trainer.limit_test_batches", "2")
    assert code == 2
    assert_one_error_line(err, "trainer.limit_test_batches=2", "whole test set", "lightning-repair evaluate")
    assert not run_dir(tmp_path).exists()


# ----------------------------------------------------------------------------- errors


def cli_failure(capsys, config_path, *flags, subcommand="fit") -> tuple[int, str]:
    """Run the CLI, expect it to fail, and return its exit status and what it wrote to stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main([subcommand, "--config", str(config_path), *flags])
    return info.value.code, capsys.readouterr().err


def assert_one_error_line(err: str, *parts: str) -> None:
    lines = [line for line in err.splitlines() if line.startswith("lightning-repair")]
    assert len(lines) == 1 and lines[0].startswith("lightning-repair: error: "), err
    assert "Traceback" not in err and "usage:" not in err and "Namespace(" not in err, err
    for part in parts:
        assert part in lines[0], lines[0]


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--model.sparsity", "1.5"], ["sparsity", "1.5"]),
        (["--model.sparsity", "-0.1"], ["sparsity", "-0.1"]),
        (["--model.sparsity", "many"], ["sparsity", "many"]),
        (["--model.allocation", "bogus"], ["allocation.method", "'bogus'"]),
        (["--model.allocation", "{method: erk, keep_dense: [role:bogus]}"], ["unknown role 'bogus'"]),
        (["--model.allocation", "{method: erk, overrides: [{select: fc}]}"], ["override 'fc'", "max_density"]),
        (["--model.allocation", "{method: search, search: {max_candidates: 2}}"], ["search.max_candidates", ">= 3"]),
        (["--model.allocation", "{method: search, search: {objective: l1}}"], ["search.objective", "'l1'"]),
        (["--model.allocation", "{method: lamp, search: {max_candidates: 9}}"], ["allocation.search", "'lamp'"]),
        (["--model.repair", "bogus"], ["repair", "unknown preset 'bogus'"]),
        (["--model.repair", "[{op: bogus}]"], ["repair[0]", "unknown operator 'bogus'"]),
        (["--model.network.arch", "resnet9"], ["network.arch", "'resnet9'"]),
        (["--model.bogus", "1"], ["bogus"]),
        (["--trainer.max_epochz", "1"], ["max_epochz"]),
        (["--data.calibration_size", "-3"], ["data.calibration_size", "-3"]),
        (["--data.batch_size", "0"], ["data.batch_size"]),
        (["--data.dataset", "bogus"], ["data.dataset", "'bogus'"]),
    ],
)
def test_configuration_errors_are_one_line_with_exit_status_2(tmp_path, capsys, config_path, flags, expected):
    code, err = cli_failure(capsys, config_path, *flags)
    assert code == 2
    assert_one_error_line(err, *expected)
    assert not run_dir(tmp_path).exists()


def test_config_file_errors_name_the_file(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  init_args: {sparsity: 0.9\n  repair: [\n")
    code, err = cli_failure(capsys, broken)
    assert code == 2
    assert_one_error_line(err, "broken.yaml", "line 2")
    code, err = cli_failure(capsys, tmp_path / "absent.yaml")
    assert code == 2
    assert_one_error_line(err, "absent.yaml", "not found")


def checkpoint_variant(tmp_path, kind: str):
    """A checkpoint the run cannot use, and the words its error must name."""
    path = tmp_path / f"{kind}.pt"
    if kind == "missing":
        return path, ["missing.pt", "not found"]
    if kind == "truncated":
        data = (tmp_path / "dense.pt").read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return path, ["truncated.pt"]
    if kind == "malicious":
        state = calibrated_dense().state_dict()
        state["fc.bias"] = RunsCode(tmp_path / "code-ran")
        torch.save(state, path)
        return path, ["malicious.pt", "GLOBAL"]
    torch.save(calibrated_dense(arch="vgg16_bn").state_dict(), path)  # another architecture
    return path, ["mismatch.pt", "does not fit", "missing"]


class RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("kind", ["missing", "truncated", "malicious", "mismatch"])
def test_runtime_errors_are_one_line_with_exit_status_1(tmp_path, capsys, config_path, kind):
    checkpoint, expected = checkpoint_variant(tmp_path, kind)
    code, err = cli_failure(capsys, config_path, "--model.checkpoint", str(checkpoint))
    assert code == 1
    assert_one_error_line(err, *expected)
    assert "will likely succeed" not in err and "weights_only=False" not in err  # torch's advice never shown
    assert not (tmp_path / "code-ran").exists()
    assert not run_dir(tmp_path).exists()  # the failed run left no empty TensorBoard run behind


def test_too_little_calibration_data_is_a_runtime_error(tmp_path, capsys, config_path):
    code, err = cli_failure(capsys, config_path, "--data.calibration_size", "100000")
    assert code == 1
    assert_one_error_line(err, "calibration_size=100000", "512")


def test_traceback_on_request(config_path, tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_REPAIR_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        run_fit(config_path, "--model.checkpoint", str(tmp_path / "nowhere.pt"))


# ----------------------------------------------------------------------------- what a run prints


def test_console_run_prints_results_on_stdout_and_no_framework_noise(tmp_path, config_path):
    """The console script as a user runs it: results on stdout; on stderr none of the hidden framework
    messages, which LIGHTNING_REPAIR_VERBOSE=1 brings back."""
    command = [os.path.join(os.path.dirname(sys.executable), "lightning-repair"), "fit", "--config", str(config_path),
               "--model.rr_grid", "null", "--model.save_model", "false"]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    quiet = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert quiet.returncode == 0, quiet.stderr
    assert "accuracy  dense" in quiet.stdout and "global: kept" in quiet.stdout and "metrics.json" in quiet.stdout
    assert "accuracy  dense" not in quiet.stderr
    for message in (*ANY_RUN, *PRUNE_REPAIR_RUN):
        assert message not in quiet.stderr, message
    verbose = subprocess.run(command, capture_output=True, text=True, env=env | {"LIGHTNING_REPAIR_VERBOSE": "1"},
                             timeout=600)  # fmt: skip
    assert verbose.returncode == 0, verbose.stderr
    shown = [m for m in PRUNE_REPAIR_RUN if m in verbose.stderr]
    assert len(shown) >= 4, verbose.stderr  # the per-step logging warning depends on the batch count


# ----------------------------------------------------------------------------- help order, your own model


def test_fit_help_starts_with_the_tool_and_model_help_lists_no_module_zoo(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    lines = capsys.readouterr().out.splitlines()
    first = lambda text: next(i for i, line in enumerate(lines) if text in line)  # noqa: E731
    assert first("--model.repair") < 80 and first("--model.sparsity") < 80 and first("--model.allocation") < 80
    assert first("repair presets") < 80
    # the data group before Lightning's trainer options
    assert first("--data.calibration_size") < first("--trainer.accelerator") < first("--trainer.max_epochs")
    assert first("--model.repair") < first("--trainer.accelerator")
    with pytest.raises(SystemExit):
        main(["fit", "--model.help", "lightning_repair.PruneRepairModule"])
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert len(lines) < 150 and first("--model.checkpoint") < 60, len(lines)
    assert "torch.nn.Identity" not in out and "torch.nn.ReLU," not in out
    assert re.search(r"and\s+\d+\s+more:\s+any\s+importable\s+class\s+or\s+builder\s+function", out)


MY_MODULE = '''
import torch
from torch import nn


class MyNet(nn.Module):
    """A user's CNN in a file of the working directory."""

    def __init__(self, width: int = 8, num_classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))
'''


def test_class_path_from_the_working_directory_with_the_console_script(tmp_path):
    """`class_path: mymodule.MyNet` for mymodule.py in the working directory, run by the console script (which,
    unlike `python -m`, does not put the working directory on sys.path by itself)."""
    (tmp_path / "mymodule.py").write_text(MY_MODULE)
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    make = "import torch, mymodule; torch.manual_seed(0); torch.save(mymodule.MyNet().state_dict(), 'mynet.pt')"
    subprocess.run([sys.executable, "-c", make], cwd=tmp_path, check=True, env=env)
    config = pipeline_config(tmp_path, tmp_path / "mynet.pt", rr_grid=[0.5, 0.9])
    config["model"]["init_args"]["network"] = {"class_path": "mymodule.MyNet", "init_args": {"width": 8}}
    write_config(tmp_path / "config.yaml", config)
    command = [os.path.join(os.path.dirname(sys.executable), "lightning-repair"), "fit", "--config", "config.yaml"]
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr
    metrics = read_metrics(tmp_path)
    assert metrics["config"]["network"]["class_path"] == "mymodule.MyNet"
    assert [row["name"] for row in metrics["layers"]] == ["conv", "conv2", "fc"]
    assert metrics["sparsity"]["achieved"] == pytest.approx(0.9, abs=1e-2)


def test_a_builder_function_by_class_path(tmp_path):
    """`class_path: torchvision.models.resnet18` (a function returning the module), end to end."""
    torch.manual_seed(0)
    checkpoint = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), checkpoint)
    network = {"class_path": "torchvision.models.resnet18", "init_args": {"num_classes": 10}}
    config = pipeline_config(tmp_path, checkpoint, rr_grid=[0.9], repair="bn_recalibration")
    config["model"]["init_args"]["network"] = network
    config["trainer"]["logger"]["init_args"] = {"save_dir": str(tmp_path / "logs"), "name": ""}
    with pytest.warns(UserWarning, match="RR profile from only"):
        run_fit(write_config(tmp_path / "config.yaml", config))
    (metrics_path,) = (tmp_path / "logs").rglob("metrics.json")
    run_name = metrics_path.parent.relative_to(tmp_path / "logs").as_posix()
    assert run_name == "resnet18/erk-0.9/bn_recalibration/version_0"
    metrics = json.loads(metrics_path.read_text())
    assert metrics["config"]["network"]["class_path"] == "torchvision.models.resnet18"
    assert metrics["sparsity"]["achieved"] == pytest.approx(0.9, abs=1e-4)
    assert len(metrics["layers"]) == 21  # 20 convs and the classifier
    model, _ = lightning_repair.load(metrics_path.parent / "repaired.pt")  # the recorded builder, rebuilt
    assert isinstance(model, torchvision.models.ResNet) and model.fc.out_features == 10
