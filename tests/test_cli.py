"""The ``lightning-repair`` CLI, driven in-process with tiny YAML configs on synthetic data (TorchGeo style)."""

from __future__ import annotations

import json

import pytest

from lightning_repair.cli import main
from lightning_repair.repair import describe, parse_recipe

from helpers import pipeline_config, read_metrics, run_dir, run_fit, write_config


@pytest.fixture
def config_path(tmp_path, dense_checkpoint):
    return write_config(tmp_path / "config.yaml", pipeline_config(tmp_path, dense_checkpoint))


def test_fit_runs_the_pipeline_from_yaml(tmp_path, config_path):
    run_fit(config_path)
    metrics = read_metrics(tmp_path)
    assert metrics["sparsity"]["target"] == 0.9
    assert metrics["sparsity"]["achieved"] == pytest.approx(0.9, abs=1e-4)
    assert metrics["allocation"] == "erk"
    assert metrics["repair"] == describe(parse_recipe("default"))
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


def test_full_repair_list_in_yaml(tmp_path, dense_checkpoint):
    recipe = [
        {"op": "bn_recalibration"},
        {"op": "variance_matching", "granularity": "channel", "shrinkage": "adaptive", "clip": [0.5, 2.0]},
        {"op": "variance_matching", "site": "block", "granularity": "layer", "match_mean": False},
    ]
    config = pipeline_config(tmp_path, dense_checkpoint, repair=recipe)
    run_fit(write_config(tmp_path / "config.yaml", config))
    assert read_metrics(tmp_path)["repair"] == json.loads(json.dumps(describe(parse_recipe(recipe))))  # tuples as lists


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--data.calibration_size" in out and "--model" in out
    with pytest.raises(SystemExit) as info:
        main(["fit", "--model.help", "lightning_repair.PruneRepairModule"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--model.sparsity", "--model.allocation", "--model.repair", "--model.network.arch"):
        assert option in out


def cli_failure(capsys, config_path, *flags) -> str:
    """Run ``fit``, expect it to fail, and return what the user reads: the parser's message or the error."""
    with pytest.raises((SystemExit, ValueError)) as info:
        run_fit(config_path, *flags)
    if isinstance(info.value, SystemExit):
        assert info.value.code not in (0, None)
        return capsys.readouterr().err
    return str(info.value)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--model.sparsity", "1.5"], ["sparsity", "1.5"]),
        (["--model.sparsity", "-0.1"], ["sparsity", "-0.1"]),
        (["--model.sparsity", "many"], ["sparsity", "many"]),
        (["--model.allocation", "bogus"], ["allocation.method", "'bogus'"]),
        (["--model.allocation", "{method: erk, keep_dense: [role:bogus]}"], ["unknown role 'bogus'"]),
        (["--model.allocation", "{method: erk, overrides: [{select: fc}]}"], ["override 'fc'", "max_density"]),
        (["--model.repair", "bogus"], ["repair", "unknown preset 'bogus'"]),
        (["--model.repair", "[{op: bogus}]"], ["repair[0]", "unknown operator 'bogus'"]),
        (["--model.repair", "[{op: variance_matching, site: nowhere}]"], ["variance_matching.site", "'nowhere'"]),
        (["--model.network.arch", "resnet9"], ["network.arch", "'resnet9'"]),
        (["--data.calibration_size", "-3"], ["data.calibration_size", "-3"]),
        (["--data.batch_size", "0"], ["data.batch_size"]),
        (["--data.dataset", "bogus"], ["data.dataset", "'bogus'"]),
    ],
)
def test_bad_config_values_are_rejected_naming_the_field(tmp_path, capsys, config_path, flags, expected):
    message = cli_failure(capsys, config_path, *flags)
    for part in expected:
        assert part in message
    assert not (run_dir(tmp_path) / "metrics.json").exists()
