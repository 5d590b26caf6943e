"""lightning-repair-sweep: the grid's rows, equality with single fit runs, resuming, bad grids."""

from __future__ import annotations

import copy
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lightning_repair import ImageDataModule, sweep
from lightning_repair.allocation import Allocation
from lightning_repair.models import Network
from lightning_repair.sweep import COLUMNS, RESULTS, Grid, read_results, row_key

from helpers import pipeline_config, read_metrics, run_fit, save_dense_checkpoint, write_config

GRID = {"allocations": ["erk", "lamp"], "sparsities": [0.9, 0.95], "repairs": ["asr"]}


def sweep_config(root: Path, checkpoint: Path, grid: dict, **model_args) -> Path:
    """A tiny fit config on synthetic data with ``grid`` and ``output: root/sweep`` added."""
    config = pipeline_config(root, checkpoint, **model_args) | {"grid": grid, "output": str(root / "sweep")}
    return write_config(root / "sweep.yaml", config)


def results(root: Path) -> list[dict]:
    return read_results(root / "sweep" / RESULTS)


@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory) -> tuple[Path, Path, list[dict]]:
    """The 2x2 GRID run once: (root, checkpoint, rows)."""
    root = tmp_path_factory.mktemp("grid")
    checkpoint = save_dense_checkpoint(root / "dense.pt")
    sweep.main(["--config", str(sweep_config(root, checkpoint, GRID))])
    return root, checkpoint, results(root)


def test_grid_sweep_writes_one_row_per_cell_and_the_figures(grid_sweep, capsys):
    root, checkpoint, rows = grid_sweep
    keys = [row_key(r) for r in rows]
    assert keys == [
        (str(checkpoint), allocation, sparsity, "asr", 0) for allocation in ("erk", "lamp") for sparsity in (0.9, 0.95)
    ]
    assert len({r["acc_dense"] for r in rows}) == 1  # the dense model is evaluated once and shared
    for r in rows:
        assert abs(r["achieved_sparsity"] - r["sparsity"]) < 1e-3
        assert 0.0 <= r["acc_pruned"] <= 1.0 and 0.0 <= r["acc_repaired"] <= 1.0
        assert r["test_samples"] == 257 and r["calibration_samples"] == 64
        assert r["time_repair"] > 0 and r["time_calibration_forward"] > 0
    # ERK and LAMP prune differently, so their pruned accuracies at 0.95 are separate measurements
    assert len({(r["acc_pruned"], r["acc_repaired"]) for r in rows}) > 1
    out = root / "sweep"
    assert (out / "accuracy_vs_sparsity.png").stat().st_size > 10_000
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert "grid:" in (out / "config.yaml").read_text()


def test_summary_table_lists_every_allocation_and_repair(grid_sweep):
    _, _, rows = grid_sweep
    table = sweep.summary_table(rows).splitlines()
    assert table[1].split() == ["allocation", "+", "repair", "0.9", "0.95"]
    erk = next(line for line in table if line.startswith("erk + asr")).split()
    expected = [f"{r['acc_repaired']:.4f}" for r in rows if r["allocation"] == "erk"]
    assert erk[3:] == expected


def test_markdown_table_has_a_line_per_allocation_and_sparsity(grid_sweep):
    root, _, rows = grid_sweep
    text = (root / "sweep" / "results.md").read_text()
    assert text == sweep.markdown_table(rows)
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert lines[0] == "| allocation | sparsity | pruned | `asr` |"
    assert lines[1:] == [
        f"| {r['allocation']} | {r['sparsity']:.2f} | {100 * r['acc_pruned']:.1f} | {100 * r['acc_repaired']:.1f} |"
        for r in rows
    ]


def test_figure_has_a_panel_per_allocation_and_a_line_per_repair(grid_sweep):
    _, _, rows = grid_sweep
    other = [r | {"repair": "default", "acc_repaired": 0.5} for r in rows]
    fig = sweep.plot(rows + other)
    assert [ax.get_title().split(": ")[1] for ax in fig.axes] == ["erk", "lamp"]
    for ax in fig.axes:
        assert [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")] == ["dense"]
        assert [c.get_label() for c in ax.containers] == ["asr", "default"]  # errorbar containers


def test_sweep_cell_equals_a_fit_run(grid_sweep, tmp_path):
    root, checkpoint, rows = grid_sweep
    run_fit(
        write_config(
            tmp_path / "fit.yaml", pipeline_config(tmp_path, checkpoint, sparsity=0.95, allocation="lamp", repair="asr")
        )
    )
    metrics = read_metrics(tmp_path)
    row = next(r for r in rows if (r["allocation"], r["sparsity"]) == ("lamp", 0.95))
    assert metrics["accuracy"] == {k: row[f"acc_{k}"] for k in ("dense", "pruned", "repaired")}
    assert metrics["sparsity"]["achieved"] == row["achieved_sparsity"]


def test_search_cell_equals_a_fit_run_and_is_labelled_by_its_changed_options(tmp_path):
    search = {"method": "search", "search": {"max_candidates": 4, "held_out_images": 48}}
    checkpoint = save_dense_checkpoint(tmp_path / "dense.pt")
    grid = {"allocations": [search], "sparsities": [0.9], "repairs": ["default"]}
    sweep.main(["--config", str(sweep_config(tmp_path, checkpoint, grid))])
    (row,) = results(tmp_path)
    assert row["allocation"] == 'search{"search":{"held_out_images":48,"max_candidates":4}}'
    assert row["time_allocation"] > 0 and row["search_cost_f"] > 0
    run_fit(write_config(tmp_path / "fit.yaml", pipeline_config(tmp_path, checkpoint, sparsity=0.9,
                                                                 allocation=search, repair="default")))  # fmt: skip
    metrics = read_metrics(tmp_path)
    assert metrics["accuracy"] == {k: row[f"acc_{k}"] for k in ("dense", "pruned", "repaired")}
    assert metrics["state_sha256"] == row["state_sha256"]
    assert metrics["search"]["chosen"] == row["search_chosen"] != ""


def test_results_of_an_older_version_are_read_with_the_newer_columns_empty(grid_sweep, tmp_path):
    """A results.csv written before the optional columns existed (the last ones) resumes: read with them empty."""
    _, _, complete = grid_sweep
    assert all(r["search_chosen"] == "" and r["search_cost_f"] == "" for r in complete)  # no search cell
    for dropped in (("search_chosen", "search_cost_f"), ("state_sha256", "search_chosen", "search_cost_f")):
        path = tmp_path / f"results_{len(dropped)}.csv"
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[k for k in COLUMNS if k not in dropped], extrasaction="ignore")
            writer.writeheader()
            writer.writerows(complete)
        assert read_results(path) == [r | dict.fromkeys(dropped, "") for r in complete]
    path.write_text(path.read_text().replace("calibration_samples", "calibration_images", 1))
    with pytest.raises(ValueError, match="has columns"):
        read_results(path)


def test_checkpoints_and_seeds_axes(tmp_path):
    a = save_dense_checkpoint(tmp_path / "a.pt", seed=0)
    b = save_dense_checkpoint(tmp_path / "b.pt", seed=1)
    # a plain fit config reused as it is, with the grid in a file of its own
    fit = write_config(
        tmp_path / "fit.yaml", pipeline_config(tmp_path, a, sparsity=0.9, allocation="lamp", repair="asr")
    )
    grid = write_config(tmp_path / "grid.yaml", {"checkpoints": [str(a), str(b)], "seeds": [0, 3]})
    sweep.main(["--config", str(fit), "--grid", str(grid), "--output", str(tmp_path / "sweep")])
    rows = results(tmp_path)
    assert [(r["checkpoint"], r["seed"]) for r in rows] == [(str(c), s) for c in (a, b) for s in (0, 3)]
    assert rows[0]["acc_dense"] == rows[1]["acc_dense"] != rows[2]["acc_dense"] == rows[3]["acc_dense"]
    assert "+-" in sweep.summary_table(rows)  # two seeds: mean +- std


def test_each_seed_draws_another_calibration_subset():
    dm = ImageDataModule(dataset="synthetic", calibration_size=64, calibration_seed=0, augment=False)
    assert sweep.with_calibration_seed(dm, 0) is dm
    other = sweep.with_calibration_seed(dm, 3)
    assert other.hparams.calibration_seed == 3 and other.hparams.calibration_size == 64
    assert other.calibration_set.indices != dm.calibration_set.indices


def test_identical_models_are_evaluated_once(monkeypatch, dense):
    calls = []
    monkeypatch.setattr(sweep, "evaluate", lambda model, loader, device: calls.append(model) or {"top1": len(calls)})
    dm = ImageDataModule(dataset="synthetic", augment=False)
    dm.setup()
    test = sweep.CachedEvaluation(dm, "cpu")
    assert test(dense) == test(copy.deepcopy(dense)) == {"top1": 1}
    changed = copy.deepcopy(dense)
    with torch.no_grad():
        changed.fc.bias[0] += 1e-6
    assert test(changed) == {"top1": 2}
    assert len(calls) == 2


def test_interrupted_sweep_resumes_without_losing_or_repeating_a_row(grid_sweep, tmp_path, monkeypatch, capsys):
    _, checkpoint, complete = grid_sweep
    config = sweep_config(tmp_path, checkpoint, GRID)
    calls = []
    real = sweep.prune_and_repair

    def failing_after_two(*args, **kwargs):
        calls.append(args[2:4])
        if len(calls) > 2:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C during the third cell
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep, "prune_and_repair", failing_after_two)
    with pytest.raises(SystemExit) as interrupted:
        sweep.main(["--config", str(config)])
    assert interrupted.value.code == 130 and "lightning-repair-sweep: interrupted" in capsys.readouterr().err
    first = results(tmp_path)
    assert [row_key(r) for r in first] == [row_key(r) for r in complete[:2]]

    calls.clear()
    monkeypatch.setattr(sweep, "prune_and_repair", lambda *a, **k: calls.append(a[2:4]) or real(*a, **k))
    sweep.main(["--config", str(config)])
    assert "resuming the sweep" in (err := capsys.readouterr().err) and "2 of 4 cells are already in results.csv" in err
    resumed = results(tmp_path)
    assert calls == [(0.9, Allocation("lamp")), (0.95, Allocation("lamp"))]  # only the missing cells
    assert resumed[:2] == first  # finished rows are kept as they were, timings included
    assert [row_key(r) for r in resumed] == [row_key(r) for r in complete]
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith("time_")}  # noqa: E731
    assert [strip(r) for r in resumed] == [strip(r) for r in complete]

    sweep.main(["--config", str(config)])  # a finished sweep runs nothing and changes nothing
    assert results(tmp_path) == resumed


def test_sigkilled_sweep_resumes(grid_sweep, tmp_path):
    _, checkpoint, complete = grid_sweep
    config = sweep_config(tmp_path, checkpoint, GRID)
    csv_path = tmp_path / "sweep" / RESULTS
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lightning_repair.sweep", "--config", str(config)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not csv_path.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the sweep finished or failed before it could be killed"
    with csv_path.open(newline="") as f:
        lines = list(csv.reader(f))
    assert lines[0] == list(COLUMNS) and all(len(line) == len(COLUMNS) for line in lines)
    assert 1 <= len(lines) - 1 < len(complete)

    sweep.main(["--config", str(config)])
    assert [row_key(r) for r in results(tmp_path)] == [row_key(r) for r in complete]


def test_resuming_into_another_architectures_results_is_refused(grid_sweep, tmp_path, capsys):
    root, _, _ = grid_sweep
    network = Network(arch="resnet18", num_classes=10, in_channels=3, width=0.25)
    torch.save(network.build().state_dict(), tmp_path / "wide.pt")
    config = pipeline_config(root, tmp_path / "wide.pt", network=vars(network)) | {"output": str(root / "sweep")}
    with pytest.raises(SystemExit) as info:
        sweep.main(["--config", str(write_config(tmp_path / "wide.yaml", config))])
    assert info.value.code == 1 and "different network.width" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        (
            {"allocations": ["erk", "magnitude"]},
            r"grid.allocations\[1\]: allocation.method: unknown method 'magnitude'",
        ),
        ({"repairs": ["asr", "bn_recal"]}, r"grid.repairs\[1\]: repair: unknown preset 'bn_recal'"),
        (
            {"repairs": [[{"op": "variance_matching", "gain": 2}]]},
            r"grid.repairs\[0\]: repair\[0\] \(variance_matching\)",
        ),
        ({"sparsities": []}, r"grid.sparsities is empty"),
        ({"sparsities": [0.9, 0.9]}, r"grid.sparsities lists 0.9 more than once"),
        ({"allocations": ["lamp", {"method": "lamp"}]}, r"grid.allocations lists lamp more than once"),
        (
            {"allocations": [{"method": "erk", "keep_dense": ["role:head"]}]},
            r"grid.allocations\[0\]: unknown role 'head'",
        ),
    ],
)
def test_bad_grid_values_are_rejected(grid, message):
    with pytest.raises(ValueError, match=message):
        Grid(**grid)


def test_bad_grid_values_give_a_command_line_error(tmp_path, capsys):
    config = sweep_config(tmp_path, tmp_path / "never_loaded.pt", {"allocations": ["erk", "magnitude"]})
    for flags, message in [
        ([], "grid.allocations[1]: allocation.method: unknown method 'magnitude'"),
        (["--grid.allocations", "[erk]", "--grid.sparsities", "[0.9, 1.0]"], "1.0 does not conform to restriction"),
    ]:
        with pytest.raises(SystemExit) as info:
            sweep.main(["--config", str(config), *flags])
        err = capsys.readouterr().err
        (line,) = [line for line in err.splitlines() if line.startswith("lightning-repair-sweep")]
        assert info.value.code == 2 and line.startswith("lightning-repair-sweep: error: ") and message in line
        assert "Traceback" not in err and "usage:" not in err
    assert not (tmp_path / "sweep").exists()  # nothing ran


def test_figure_draws_error_bars_only_for_a_spread_over_seeds(grid_sweep):
    _, _, rows = grid_sweep
    one_sparsity = [r for r in rows if r["sparsity"] == 0.9]
    bars = lambda fig: [c.has_yerr for ax in fig.axes for c in ax.containers]  # noqa: E731
    assert bars(sweep.plot(one_sparsity)) == [False, False]  # one seed: no empty error-bar glyphs
    second_seed = [r | {"seed": 1, "acc_repaired": r["acc_repaired"] + 0.1} for r in one_sparsity]
    assert bars(sweep.plot(one_sparsity + second_seed)) == [True, True]
