"""The digest-keyed cache of the dense accuracy and the RR profile: reuse across runs, refusal of bad files."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_repair import cache as cache_module
from lightning_repair import module as module_module
from lightning_repair.cache import DigestCache, batches_digest, files_fingerprint, model_digest

from helpers import calibrated_dense, leftover_temp_files, pipeline_config, read_metrics, run_fit, write_config

pytestmark = pytest.mark.usefixtures("raise_errors")  # errors as exceptions (conftest.py)


KEY = {"model": "abc", "grid": [0.5, 0.9]}


def test_a_value_reads_back_and_says_so_once(tmp_path):
    lines = []
    cache = DigestCache(tmp_path, log=lines.append)
    value = {"top1": 0.25, "t": torch.arange(3.0)}
    assert cache.get_or_compute("x", KEY, lambda: value, "it") == (value, False)
    assert lines == []
    again, reused = cache.get_or_compute("x", KEY, lambda: pytest.fail("recomputed"), "it")
    assert reused and again["top1"] == 0.25 and torch.equal(again["t"], value["t"])
    assert len(lines) == 1 and "reusing it from" in lines[0]
    assert cache.get("x", KEY | {"grid": [0.5]}, "it") is None  # another key: another file
    assert cache.get("y", KEY, "it") is None  # another kind
    assert leftover_temp_files(tmp_path) == []


def test_no_directory_means_no_cache(tmp_path):
    calls = []
    cache = DigestCache(None)
    for _ in range(2):
        assert cache.get_or_compute("x", KEY, lambda: calls.append(1) or 1, "it") == (1, False)
    assert len(calls) == 2


@pytest.mark.parametrize("damage", ["garbage", "other_key", "other_format", "invalid_value"])
def test_a_corrupt_or_mismatching_file_is_ignored_with_a_warning_and_replaced(tmp_path, damage):
    cache = DigestCache(tmp_path)
    decode = lambda v: v if v["top1"] <= 1 else (_ for _ in ()).throw(ValueError("top1 above 1"))  # noqa: E731
    cache.put("x", KEY, {"top1": 0.5})
    path = cache.path("x", KEY)
    if damage == "garbage":
        path.write_bytes(b"not a torch file")
    elif damage == "other_key":  # e.g. a truncated digest colliding: the stored key is compared
        torch.save({"format": cache_module.CACHE_FORMAT, "kind": "x", "key": {"model": "other"}, "value": {}}, path)
    elif damage == "other_format":
        torch.save({"format": 0, "kind": "x", "key": cache_module._plain_key(KEY), "value": {"top1": 0.5}}, path)
    else:
        torch.save({"format": cache_module.CACHE_FORMAT, "kind": "x", "key": cache_module._plain_key(KEY),
                    "value": {"top1": 7.0}}, path)  # fmt: skip
    with pytest.warns(UserWarning, match="ignoring cache file"):
        value, reused = cache.get_or_compute("x", KEY, lambda: {"top1": 0.75}, "it", decode=decode)
    assert (value, reused) == ({"top1": 0.75}, False)
    assert cache.get("x", KEY, "it", decode) == {"top1": 0.75}  # rewritten whole


def test_digests_follow_content_not_batching():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(10, 3, 4, 4, generator=g)
    assert batches_digest(images.split(3)) == batches_digest([images])
    changed = images.clone()
    changed[7, 1, 2, 3] += 1e-6
    assert batches_digest([changed]) != batches_digest([images])
    dense = calibrated_dense()
    other = copy.deepcopy(dense)
    assert model_digest(other) == model_digest(dense)
    other.bn1.running_var[0] += 1e-3  # a buffer changes the accuracy as much as a weight
    assert model_digest(other) != model_digest(dense)


def test_files_fingerprint_sees_a_changed_file(tmp_path):
    (tmp_path / "a").write_bytes(b"123")
    before = files_fingerprint(str(tmp_path))
    (tmp_path / "b").write_bytes(b"4")
    assert files_fingerprint(str(tmp_path)) != before
    assert files_fingerprint(None) is None


def test_second_fit_with_another_sparsity_reuses_the_dense_accuracy_and_the_rr_profile(
    tmp_path, dense_checkpoint, monkeypatch, caplog
):
    """The second run evaluates only the pruned and repaired models and measures only its own allocation's RR
    (grid empty); its dense accuracy and profile equal the first run's and a run without the cache."""
    from lightning_repair import evaluation, pipeline

    calls = {"grid": [], "evaluate": 0}
    real_profile, real_evaluate = module_module.rr_profile, evaluation.evaluate

    def profile(model, batches, grid=(), **kwargs):
        calls["grid"].append(list(grid))
        return real_profile(model, batches, grid, **kwargs)

    def evaluate(*args, **kwargs):
        calls["evaluate"] += 1
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(module_module, "rr_profile", profile)
    monkeypatch.setattr(module_module, "evaluate", evaluate)
    monkeypatch.setattr(pipeline, "evaluate_on", evaluate)
    grid = [0.5, 0.8, 0.9]
    config = pipeline_config(tmp_path, dense_checkpoint, rr_grid=grid)
    run_fit(write_config(tmp_path / "a.yaml", config))
    first = read_metrics(tmp_path)
    assert calls == {"grid": [grid], "evaluate": 3}
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir()) == ["dense_accuracy", "rr_profile"]

    calls.update(grid=[], evaluate=0)
    caplog.set_level("INFO")
    config["model"]["init_args"]["sparsity"] = 0.8
    run_fit(write_config(tmp_path / "b.yaml", config))
    second = read_metrics(tmp_path)
    assert calls == {"grid": [[]], "evaluate": 2}  # no profile over the grid, no dense evaluation
    assert sum("reusing the RR profile" in r.getMessage() for r in caplog.records) == 1
    assert sum("reusing the dense accuracy" in r.getMessage() for r in caplog.records) == 1
    assert second["sparsity"]["target"] == 0.8
    assert second["rr_profile"] == first["rr_profile"]
    assert second["accuracy"]["dense"] == first["accuracy"]["dense"]

    calls.update(grid=[], evaluate=0)
    run_fit(write_config(tmp_path / "c.yaml", config), "--model.rr_cache", "null")
    fresh = read_metrics(tmp_path)
    assert calls == {"grid": [grid], "evaluate": 3}
    assert fresh["rr_profile"] == second["rr_profile"]
    assert fresh["accuracy"] == second["accuracy"]
    assert [row["rr"] for row in fresh["layers"]] == [row["rr"] for row in second["layers"]]


def test_rr_cache_moves_the_cache(tmp_path, dense_checkpoint):
    elsewhere = tmp_path / "elsewhere"
    config = pipeline_config(tmp_path / "run_root", dense_checkpoint, rr_grid=[0.9], rr_cache=str(elsewhere))
    run_fit(write_config(tmp_path / "a.yaml", config))
    assert len(list(elsewhere.glob("rr_profile-*.pt"))) == 1
    assert not (tmp_path / "run_root" / "cache").exists()
    assert read_metrics(tmp_path / "run_root")["accuracy"]["dense"] > 0


def test_a_second_sweep_into_the_same_folder_reuses_the_dense_accuracy_and_the_rr_profile(
    tmp_path, dense_checkpoint, monkeypatch
):
    """A sweep extended with a new sparsity evaluates no dense model and measures no RR profile again; its new cell
    equals the same cell swept without the cache."""
    from lightning_repair import sweep

    calls = {"profile": 0, "dense": 0}
    real_profile, real_evaluate = sweep.rr_profile, sweep.evaluate

    def profile(*args, **kwargs):
        calls["profile"] += 1
        return real_profile(*args, **kwargs)

    def evaluate(model, *args, **kwargs):
        calls["dense"] += model_digest(model) == dense_digest
        return real_evaluate(model, *args, **kwargs)

    monkeypatch.setattr(sweep, "rr_profile", profile)
    monkeypatch.setattr(sweep, "evaluate", evaluate)
    state = torch.load(dense_checkpoint, weights_only=True)
    model = calibrated_dense()
    model.load_state_dict(state)
    dense_digest = model_digest(model)

    def run(output, sparsities):
        grid = {"allocations": ["rr"], "sparsities": sparsities, "repairs": ["bn_recalibration"]}
        config = pipeline_config(tmp_path, dense_checkpoint) | {"grid": grid, "output": str(output)}
        sweep.main(["--config", str(write_config(tmp_path / "sweep.yaml", config))])
        return {(r["sparsity"]): r for r in sweep.read_results(output / sweep.RESULTS)}

    run(tmp_path / "sweep", [0.9])
    assert calls == {"profile": 1, "dense": 1}
    calls.update(profile=0, dense=0)
    extended = run(tmp_path / "sweep", [0.9, 0.8])
    assert calls == {"profile": 0, "dense": 0}
    fresh = run(tmp_path / "fresh", [0.8])
    assert calls == {"profile": 1, "dense": 1}
    for column in ("acc_dense", "acc_pruned", "acc_repaired", "top5_repaired", "achieved_sparsity"):
        assert extended[0.8][column] == fresh[0.8][column], column
