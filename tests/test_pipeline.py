"""The pure pipeline from Python: the core imports without the Lightning shell, names are accepted where a user
writes them, evaluation is optional, and the README's "From Python" example runs as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from test_data import _write_fashion_mnist

import lightning_repair as lr
from lightning_repair.allocation import Allocation, allocate
from lightning_repair.layers import prunable_layers
from lightning_repair.models import Network, load_weights
from lightning_repair.operators import parse_recipe
from lightning_repair.repair import repair

from helpers import pruned_copy

ROOT = Path(__file__).resolve().parents[1]
CORE = ("allocation", "masks", "mask_selection", "operators", "stores", "graph", "repair", "reconstruction",
        "diagnostics", "evaluation", "pipeline", "records", "models", "export", "data")  # fmt: skip
SHELL_ONLY = ("lightning", "jsonargparse", "matplotlib")


def test_the_core_imports_without_the_lightning_shell():
    code = (
        f"import sys, importlib\nfor m in {CORE!r}: importlib.import_module('lightning_repair.' + m)\n"
        f"print(sorted(p for p in {SHELL_ONLY!r} if p in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_lazy_top_level_names_resolve_to_their_modules():
    assert set(lr.__all__) == set(lr._EXPORTS)
    assert lr.prune_and_repair.__module__ == "lightning_repair.pipeline"
    assert lr.PruneRepairModule.__module__ == "lightning_repair.module"
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        lr.nothing  # noqa: B018


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_names_are_accepted_where_a_user_writes_them(dense, batches):
    assert allocate(dense, 0.95, "lamp") == allocate(dense, 0.95, Allocation(method="lamp"))
    assert allocate(dense, 0.9, {"method": "erk", "power": 0.5}) == allocate(dense, 0.9, Allocation("erk", 0.5))
    with pytest.raises(ValueError, match="unknown method 'lampp'"):
        allocate(dense, 0.9, "lampp")
    pruned, masks = pruned_copy(dense)
    by_object = pruned_copy(dense)[0]
    report = repair(pruned, dense, batches, "reconstruct", masks=masks)
    repair(by_object, dense, batches, parse_recipe("reconstruct"), masks=masks)
    assert report.walks == [["reconstruct"]]
    assert same_state(pruned, by_object)


def test_prune_and_repair_without_evaluation(dense, batches):
    result = lr.prune_and_repair(dense, batches, sparsity=0.9, allocation="lamp", repair="default")
    assert result.pruned is None and result.repaired is None
    assert result.achieved_sparsity == pytest.approx(0.9, abs=1e-4)
    assert result.report.walks == [["bn_recalibration", "classifier_refit"]]
    labeled = [(b, torch.zeros(len(b), dtype=torch.long)) for b in batches]
    evaluated = lr.prune_and_repair(dense, batches, 0.9, "lamp", "default", evaluate=labeled)
    assert evaluated.repaired["samples"] == sum(map(len, batches))
    assert same_state(result.model, evaluated.model)


def readme_example() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## From Python\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_from_python_example_runs_as_written(tmp_path):
    """The README's example, verbatim, on the shipped checkpoint and a generated stand-in for Fashion-MNIST
    (data/ in the working directory comes first), in a fresh process."""
    (tmp_path / "data").mkdir()
    _write_fashion_mnist(tmp_path / "data", n_train=1024, n_test=20)
    (tmp_path / "checkpoints").symlink_to(ROOT / "checkpoints")
    example = tmp_path / "example.py"
    example.write_text(readme_example())
    run = subprocess.run([sys.executable, str(example)], cwd=tmp_path, capture_output=True, text=True,
                         env=os.environ | {"OMP_NUM_THREADS": "1"})  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert re.fullmatch(r"pruned 0\.\d{4}, repaired 0\.\d{4}\n", run.stdout), run.stdout
    model = Network(arch="resnet18", num_classes=10, in_channels=1, width=0.25).build()
    state = torch.load(tmp_path / "repaired.pt", weights_only=True)
    load_weights(model, state)
    kept = sum(int((layer.module.weight != 0).sum()) for layer in prunable_layers(model))
    total = sum(layer.numel for layer in prunable_layers(model))
    assert kept / total == pytest.approx(0.05, abs=1e-4)


def counted_repairs(monkeypatch) -> dict[str, int]:
    """Count the repairs the pipeline runs itself and those the search runs (its candidates)."""
    from lightning_repair import pipeline, search

    calls = {"pipeline": 0, "search": 0}
    for module, key, original in ((pipeline, "pipeline", pipeline.run_repair), (search, "search", search.repair)):

        def counting(*args, _key=key, _original=original, **kwargs):
            calls[_key] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, "run_repair" if key == "pipeline" else "repair", counting)
    return calls


@pytest.mark.parametrize(("fit_images", "reused"), [(1024, True), (16, False)])
def test_search_hands_its_repaired_choice_over_when_it_fitted_every_calibration_image(
    dense, batches, monkeypatch, fit_images, reused
):
    """With every calibration image fitted (the default), the chosen candidate is repaired once, in the search;
    with fewer, the pipeline repairs it. Either way the model is a fresh repair of the chosen counts, bit for bit."""
    calls = counted_repairs(monkeypatch)
    search = {"method": "search", "search": {"held_out_images": 0, "score_images": 16, "fit_images": fit_images,
                                             "max_candidates": 4, "min_z": 0}}  # fmt: skip
    labeled = [(b, torch.zeros(len(b), dtype=torch.long)) for b in batches]
    with warnings.catch_warnings(record=True) as given:
        warnings.simplefilter("always")
        result = lr.prune_and_repair(dense, batches, 0.9, search, "reconstruct_dense_bn", evaluate=labeled)
    assert calls == {"pipeline": 0 if reused else 1, "search": result.search["candidates"]}
    assert result.search["repair_reused"] is reused
    assert result.timings["repair"] > 0 and "reconstruction_solve" in result.timings
    keep = {row["name"]: row["kept"] for row in result.layers}
    with warnings.catch_warnings(record=True) as fresh_given:
        warnings.simplefilter("always")
        fresh = lr.prune_and_repair(dense, batches, 0.9, "lamp", "reconstruct_dense_bn", evaluate=labeled, keep=keep)
    as_given = lambda caught: [(str(w.message), w.category, w.filename, w.lineno) for w in caught]  # noqa: E731
    assert as_given(given) == as_given(fresh_given) != []  # the fewer-rows warning, as the fresh repair gives it
    assert calls["pipeline"] == (1 if reused else 2) and fresh.search is None
    assert same_state(result.model, fresh.model)
    assert result.masks.keys() == fresh.masks.keys()
    assert all(torch.equal(result.masks[n], fresh.masks[n]) for n in fresh.masks)
    assert (result.pruned, result.repaired) == (fresh.pruned, fresh.repaired)


def test_a_search_record_passed_with_its_keep_counts_is_reused(dense, batches, monkeypatch):
    """As ``lightning-repair fit`` calls it: choose_keep first, then prune_and_repair with the counts and record."""
    from lightning_repair.pipeline import choose_keep

    calls = counted_repairs(monkeypatch)
    recipe = parse_recipe("default")
    search = {"method": "search", "search": {"held_out_images": 0, "score_images": 16, "max_candidates": 3}}
    keep, record = choose_keep(dense, batches, 0.9, search, recipe)
    result = lr.prune_and_repair(dense, batches, 0.9, search, recipe, keep=keep, search=record)
    assert calls == {"pipeline": 0, "search": 3} and result.search["repair_reused"]
    assert result.model is record.best.repaired.model
    other = allocate(dense, 0.9, "global") if keep != allocate(dense, 0.9, "global") else allocate(dense, 0.9, "erk")
    elsewhere = lr.prune_and_repair(dense, batches, 0.9, search, recipe, keep=other, search=record)
    assert calls["pipeline"] == 1 and not elsewhere.search["repair_reused"]  # not the counts the search chose
