"""Lightning DDP on CPU (gloo, 2 processes) gives the single-process answer.

Lightning's ``ddp`` strategy starts rank 1 by re-running the command line, so the 2-process runs
drive the real console script in a subprocess; the 1-process reference runs in this process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lightning_repair import sweep
from lightning_repair.cli import main
from lightning_repair.data import build_datasets
from lightning_repair.diagnostics import rr_profile
from lightning_repair.evaluation import evaluate
from lightning_repair.models import Network, load_weights
from lightning_repair.operators import PRESETS
from lightning_repair.records import replica_digest, state_digest
from lightning_repair.stats import Moments
from lightning_repair.sweep import read_results

from helpers import (
    TINY_NETWORK,
    pipeline_config,
    read_metrics,
    run_dir,
    run_fit,
    save_dense_checkpoint,
    write_config,
)

CLI = Path(sys.executable).with_name("lightning-repair")
DDP_FLAGS = ("--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp")
# Variables of an outer SLURM or torchrun job: Lightning would join that job instead of starting its own processes.
LAUNCHER_VARIABLES = re.compile(r"SLURM_.*|TORCHELASTIC_.*|(LOCAL_|GROUP_|NODE_)?RANK|(LOCAL_)?WORLD_SIZE|MASTER_.*")
# ASR (residual-sum folding, BNs recalibrated on the fly), then the layer-wise reconstructions (Gram reductions;
# the second keeps the dense BN statistics and folds intercepts into them; the third re-selects every mask from the
# reduced statistics, so every process must choose the same weights).
RECIPE = PRESETS["asr"] + PRESETS["reconstruct"] + PRESETS["reconstruct_dense_bn"] + PRESETS["reconstruct_ols"]
# 101 calibration images in batches of 16: uneven shards (51 + 50), each ending in a short batch.
CALIBRATION_SIZE, BATCH_SIZE = 101, 16


def run_cli(config: Path, *flags: str, timeout: float = 900) -> None:
    """``lightning-repair fit --config CONFIG FLAGS...`` in a subprocess, in the config's folder."""
    run_command([str(CLI), "fit", "--config", str(config), *flags], config.parent, timeout)


def run_command(command: list[str], cwd: Path, timeout: float = 900) -> str:
    """A command in a subprocess without the variables of an outer launcher; its stdout (stderr shown on failure)."""
    env = {k: v for k, v in os.environ.items() if not LAUNCHER_VARIABLES.fullmatch(k)} | {"OMP_NUM_THREADS": "1"}
    # a session of its own, so that a hung rank 1 (a child of rank 0) is killed with it
    proc = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        output, errors = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, errors = proc.communicate()
        pytest.fail(f"{' '.join(command)} did not finish in {timeout} s (a rank waiting in a collective?)\n{errors}")
    assert proc.returncode == 0, f"{' '.join(command)} failed:\n{output}\n{errors}"
    return output


def written_files(root: Path) -> list[str]:
    """Files under ``root``; TensorBoard event files (named after host and pid) by their common prefix."""
    return sorted(re.sub(r"events\.out\.tfevents\..*", "events", str(p.relative_to(root))) for p in root.rglob("*"))


def train_dense(path: Path) -> Path:
    """A width-0.125 ResNet-18 trained for two epochs on the synthetic training set (well above chance)."""
    torch.manual_seed(0)
    train, _, _ = build_datasets("synthetic")
    model = Network(**TINY_NETWORK).build().train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(2):
        for images, labels in DataLoader(train, batch_size=64, shuffle=True):
            optimizer.zero_grad()
            F.cross_entropy(model(images), labels).backward()
            optimizer.step()
    torch.save(model.state_dict(), path)
    return path


def listed(row: dict, key: str) -> list:
    """A diagnostics value as a list: one per profile sparsity, or the single one at the allocated sparsity."""
    return row[key] if isinstance(row[key], list) else [row[key]]


def assert_same_damage(one: dict, two: dict) -> None:
    """D_raw and D_res agree up to float64 summation order; RR = D_res / D_raw where D_raw is not rounding noise."""
    assert listed(two, "d_raw") == pytest.approx(listed(one, "d_raw"), abs=1e-6), one["name"]
    assert listed(two, "d_res") == pytest.approx(listed(one, "d_res"), abs=1e-6), one["name"]
    for d_raw, rr_one, rr_two in zip(listed(one, "d_raw"), listed(one, "rr"), listed(two, "rr"), strict=True):
        if d_raw > 1e-4:
            assert rr_two == pytest.approx(rr_one, rel=1e-5), one["name"]


def test_moments_do_not_depend_on_the_split():
    """Float32 activations whose mean dwarfs their spread: one chunk, or uneven chunks of 7 samples as DDP
    shards and batches give them, yield the float64 covariance to float32 accuracy."""
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1000, 2, 4, 5, 5, generator=g, dtype=torch.float64)
    x, y = 100 + noise[:, 0], 50 + 0.1 * noise[:, 0] + noise[:, 1]  # corr(x, y) ~ 0.1
    reference = Moments.of([x, y]).cov
    x, y = x.float(), y.float()
    whole = Moments.of([x, y])
    chunks = [Moments.of([x[i : i + 7], y[i : i + 7]]) for i in range(0, len(x), 7)]
    split = chunks[0]
    for m in chunks[1:]:
        split = split + m
    for m in (whole, split):
        torch.testing.assert_close(m.count, torch.tensor(1000.0 * 25, dtype=torch.float64))
        torch.testing.assert_close(m.cov, reference, rtol=1e-5, atol=0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    """The same prune + repair run on 1 process (in this process) and on 2 DDP processes."""
    checkpoint = train_dense(tmp_path_factory.mktemp("dense") / "dense.pt")
    results = {}
    for name in ("one", "two"):
        root = tmp_path_factory.mktemp(name)
        config = pipeline_config(root, checkpoint, allocation="rr", repair=RECIPE)
        config["data"] |= {"calibration_size": CALIBRATION_SIZE, "batch_size": BATCH_SIZE}
        config_path = write_config(root / "config.yaml", config)
        if name == "one":
            run_fit(config_path)
        else:
            run_cli(config_path, *DDP_FLAGS)
        results[name] = {
            "root": root,
            "metrics": read_metrics(root),
            "state": torch.load(run_dir(root) / "repaired.pt", weights_only=True)["state_dict"],
        }
    results["dense"] = torch.load(checkpoint, weights_only=True)
    return results


@pytest.mark.ddp
def test_repaired_model_matches_one_process(runs):
    one, two, dense = runs["one"]["state"], runs["two"]["state"], runs["dense"]
    # equal up to float32 summation order, which ~20 chained least-squares solves amplify to ~1e-4 relative
    torch.testing.assert_close(two, one, rtol=1e-3, atol=1e-4)
    # the recipe really changed the model: recalibrated BN statistics, residual-sum corrections folded into BN
    # affine parameters (a downsample block's gain into both BNs, an identity block's shift), re-solved weights
    for key in ("layer1.0.bn1.running_var", "layer4.0.bn2.weight", "layer4.1.bn2.bias", "layer4.1.conv2.weight"):
        assert (one[key] - dense[key]).abs().max() > 1e-3, key


@pytest.mark.ddp
def test_accuracies_allocation_and_rr_profile_match_one_process(runs):
    one, two = runs["one"]["metrics"], runs["two"]["metrics"]
    for key in ("accuracy", "accuracy_top5", "sparsity", "allocation", "repair"):
        assert two[key] == one[key], key
    assert one["allocation"] == "rr"  # the RR-guided allocation: kept counts follow the reduced RR statistics
    for row_one, row_two in zip(one["layers"], two["layers"], strict=True):
        assert (row_two["name"], row_two["kept"]) == (row_one["name"], row_one["kept"])
        assert_same_damage(row_one, row_two)
    profile_one, profile_two = one["rr_profile"], two["rr_profile"]
    assert (profile_two["grid"], profile_two["samples"]) == (profile_one["grid"], profile_one["samples"])
    assert profile_one["samples"] == CALIBRATION_SIZE
    for row_one, row_two in zip(profile_one["layers"], profile_two["layers"], strict=True):
        assert_same_damage(row_one, row_two)
    assert one["accuracy"]["dense"] > 0.25  # a trained model (chance is 0.1), so equal accuracies mean something


@pytest.mark.ddp
def test_every_test_sample_is_counted_once(runs):
    test_size = len(build_datasets("synthetic")[1])
    assert test_size % 2 == 1  # uneven shards: one rank has one sample more
    assert runs["one"]["metrics"]["test_samples"] == runs["two"]["metrics"]["test_samples"] == test_size
    assert (runs["one"]["metrics"]["world_size"], runs["two"]["metrics"]["world_size"]) == (1, 2)


@pytest.mark.ddp
def test_only_rank_zero_writes(runs):
    files = written_files(runs["two"]["root"])
    assert files == written_files(runs["one"]["root"])
    assert files.count("run/metrics.json") == 1
    assert files.count("run/events") == 1  # one logger wrote: rank 0's


@pytest.mark.ddp
def test_every_rank_holds_the_exported_model(runs):
    # replica_digest compared the repaired model's digest across the 2 processes before rank 0 exported it
    for run in (runs["one"], runs["two"]):
        assert run["metrics"]["state_sha256"] == state_digest(run["state"])


def _digest_on_rank(rank: int, init_file: str, perturb: bool) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model = torch.nn.Linear(3, 2)
        with torch.no_grad():
            model.weight.copy_(torch.arange(6.0).view(2, 3))
            model.bias.zero_()
            if perturb and rank == 1:
                model.weight[1, 2] += 1e-6
        replica_digest(model)
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_replica_digest_fails_when_ranks_differ(tmp_path):
    # forked, not spawned: a spawned child would spend seconds importing Lightning
    mp.start_processes(_digest_on_rank, (str(tmp_path / "same"), False), nprocs=2, start_method="fork")
    with pytest.raises(mp.ProcessRaisedException, match=r"processes \[1\] hold a different repaired model"):
        mp.start_processes(_digest_on_rank, (str(tmp_path / "differ"), True), nprocs=2, start_method="fork")


def _errors_on_ranks(folder: Path, work) -> list[str]:
    """Run ``work(rank)`` on 2 gloo processes, rank 1 with a NaN in its data; each rank's FloatingPointError."""
    mp.start_processes(_record_error, (str(folder), work), nprocs=2, start_method="fork")
    return [(folder / f"rank{rank}.txt").read_text() for rank in range(2)]


def _record_error(rank: int, folder: str, work) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=2)
    try:
        work(rank)
    except FloatingPointError as err:
        Path(folder, f"rank{rank}.txt").write_text(str(err))
    finally:
        dist.destroy_process_group()


def _evaluate_with_nan_on_rank_1(rank: int) -> None:
    images = torch.ones(4, 3)
    if rank == 1:
        images[2, 0] = float("nan")
    evaluate(torch.nn.Linear(3, 5), [(images, torch.zeros(4, dtype=torch.long))])


def _rr_profile_with_nan_on_rank_1(rank: int) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))
    images = torch.randn(4, 3, 8, 8)
    if rank == 1:
        images[1, 0, 0, 0] = float("nan")
    rr_profile(model.eval(), [images], (0.5, 0.9))


@pytest.mark.ddp
def test_non_finite_logits_on_one_rank_stop_every_rank(tmp_path):
    """Both processes raise, after the counts are summed (a rank raising alone would leave the other waiting in
    all_reduce forever)."""
    for message in _errors_on_ranks(tmp_path, _evaluate_with_nan_on_rank_1):
        assert "non-finite logits during evaluation for 1 of 8 test images" in message


@pytest.mark.ddp
def test_non_finite_activations_on_one_rank_stop_every_rank_in_the_rr_profile(tmp_path):
    """The RR profile reduces its sums before checking them, so both ranks raise the same error (a rank raising
    alone would leave the other in the collective: a closed connection under gloo, a hang under NCCL)."""
    messages = _errors_on_ranks(tmp_path, _rr_profile_with_nan_on_rank_1)
    assert messages[0] == messages[1] and "non-finite activations at RR profile of 0" in messages[0]


@pytest.mark.ddp
def test_dense_training_under_ddp(tmp_path):
    """DenseClassifier trains for two steps on 2 processes; one logger and one checkpoint are written, and the
    checkpoint loads as the pipeline's dense checkpoint."""
    config = pipeline_config(tmp_path, Path("unused"))
    config["trainer"] |= {"enable_checkpointing": True, "max_epochs": 1, "limit_train_batches": 2,
                          "limit_val_batches": 2}  # fmt: skip
    config["model"] = {"class_path": "lightning_repair.DenseClassifier",
                       "init_args": {"network": dict(TINY_NETWORK), "lr": 0.05, "schedule": "cosine"}}  # fmt: skip
    run_cli(write_config(tmp_path / "config.yaml", config), *DDP_FLAGS)
    (checkpoint,) = (run_dir(tmp_path) / "checkpoints").glob("*.ckpt")
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 2
    assert written_files(tmp_path).count("run/events") == 1
    load_weights(Network(**TINY_NETWORK).build(), checkpoint)  # the pipeline reads it as a dense checkpoint


# ----------------------------------------------------------------------------- evaluate and sweeps


def result_line(stdout: str, weights: Path) -> str:
    """The one result line of ``lightning-repair evaluate``: no process but rank 0 prints one."""
    (line,) = [line for line in stdout.splitlines() if line.startswith(f"{weights}: top-1 ")]
    return line


@pytest.mark.ddp
def test_evaluate_on_two_processes_matches_one(runs, tmp_path):
    """The 2-process run's own saved config.yaml (devices 2, ddp) and --weights, nothing else: Lightning starts the
    second process; then the same under torchrun; each process evaluates half of the 257 test images."""
    run = run_dir(runs["two"]["root"])
    weights, config = run / "repaired.pt", run / "config.yaml"
    assert "strategy: ddp" in config.read_text() and "devices: '2'" in config.read_text()
    main(["evaluate", "--config", str(config), "--weights", str(weights), "--trainer.devices", "1",
          "--trainer.strategy", "auto", "--output", str(tmp_path / "one.json")])  # fmt: skip
    one = json.loads((tmp_path / "one.json").read_text())
    assert one["accuracy"]["top1"] == runs["two"]["metrics"]["accuracy"]["repaired"]
    assert (one["world_size"], one["test_samples"]) == (1, 257)

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    for name, launcher in (("lightning", [str(CLI)]), ("torchrun", [*torchrun, "-m", "lightning_repair.cli"])):
        output = tmp_path / f"{name}.json"
        stdout = run_command([*launcher, "evaluate", "--config", str(config), "--weights", str(weights),
                              "--output", str(output)], tmp_path)  # fmt: skip
        line = result_line(stdout, weights)
        assert f"top-1 {one['accuracy']['top1']:.4f}  top-5 {one['accuracy']['top5']:.4f}" in line, name
        assert "(257 test images, synthetic, 2 processes)" in line, name
        two = json.loads(output.read_text())
        assert two["accuracy"] == one["accuracy"], name  # exact counts, summed: equal to the last image
        assert (two["world_size"], two["test_samples"], two["partial"]) == (2, 257, False), name
        assert two["state_sha256"] == one["state_sha256"] == runs["two"]["metrics"]["state_sha256"]


SWEEP_GRID = {"allocations": ["erk", "rr"], "sparsities": [0.9, 0.95], "repairs": ["asr"]}


@pytest.mark.ddp
def test_sweep_on_two_processes_matches_one(tmp_path):
    """Every cell: the same accuracies, sample counts and repaired model (state_sha256) as one process. The 64
    calibration images in batches of 32 give each process whole batches of the 1-process run, so every sum adds
    the same partial sums in the same order and the models are bit-identical."""
    checkpoint = save_dense_checkpoint(tmp_path / "dense.pt")
    rows = {}
    for name in ("one", "two"):
        config = pipeline_config(tmp_path, checkpoint) | {"grid": SWEEP_GRID, "output": str(tmp_path / name)}
        path = write_config(tmp_path / f"{name}.yaml", config)
        if name == "one":
            sweep.main(["--config", str(path)])
        else:
            stdout = run_command([sys.executable, "-m", "lightning_repair.sweep", "--config", str(path), *DDP_FLAGS],
                                 tmp_path)  # fmt: skip
            assert stdout.count("4 cells in") == 1  # the summary, printed by process 0 only
        rows[name] = read_results(tmp_path / name / "results.csv")
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith("time_")}  # noqa: E731
    assert [strip(r) for r in rows["two"]] == [strip(r) for r in rows["one"]]
    assert len({r["state_sha256"] for r in rows["one"]}) == 4  # four different repaired models
    assert {r["test_samples"] for r in rows["two"]} == {257} and {r["calibration_samples"] for r in rows["two"]} == {64}
