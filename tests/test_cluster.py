"""Cluster use on one process per job: sweep shards into one folder (SLURM job arrays), the report rebuilt from
results.csv, and SIGTERM / Ctrl-C of fit and of a sweep (exit status, one line, what is kept)."""

from __future__ import annotations

import csv
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightning_repair import sweep
from lightning_repair.cli import ConfigError
from lightning_repair.sweep import COLUMNS, RESULTS, Results, parse_shard, read_results, row_key, shard_cells

from helpers import pipeline_config, run_dir, save_dense_checkpoint, write_config

GRID = {"allocations": ["erk", "lamp"], "sparsities": [0.9, 0.95], "repairs": ["asr"]}
ENV = os.environ | {"OMP_NUM_THREADS": "1"}
TIMEOUT = 600  # a subprocess on a loaded 2-core machine: imports alone can take a minute


def sweep_config(root: Path, checkpoint: Path, **model_args) -> Path:
    config = pipeline_config(root, checkpoint, **model_args) | {"grid": GRID, "output": str(root / "sweep")}
    return write_config(root / "sweep.yaml", config)


def without_times(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rows]


def as_from_a_terminal() -> None:
    """A child's SIGINT at its default, as a command typed at a terminal has it: a test run started in the background
    (``make test &``) has SIGINT ignored, which every child would inherit and keep (Python leaves an ignored SIGINT
    ignored), so that Ctrl-C could not reach it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_sweep(config: Path, *flags: str, log: Path | None = None) -> subprocess.Popen:
    """The sweep in a subprocess, its stderr into ``log`` (a file, not a pipe: the progress bar would fill a pipe
    that nobody reads while the test waits for a row, and block the sweep)."""
    with open(log or os.devnull, "w") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "lightning_repair.sweep", "--config", str(config), *flags],
            env=ENV, stdout=subprocess.DEVNULL, stderr=stderr, text=True, preexec_fn=as_from_a_terminal,
        )  # fmt: skip


def start(command: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as output:
        return subprocess.Popen(command, env=ENV, stdout=output, stderr=subprocess.STDOUT, text=True,
                                preexec_fn=as_from_a_terminal)  # fmt: skip


def wait_for(path: Path, proc: subprocess.Popen, rows: int = 1) -> None:
    """Until results.csv at ``path`` holds ``rows`` rows, while ``proc`` runs."""
    deadline = time.monotonic() + TIMEOUT
    while not (path.exists() and len(read_results(path)) >= rows):
        assert proc.poll() is None, "the sweep ended before it could be stopped"
        assert time.monotonic() < deadline, "no row was written in time"
        time.sleep(0.05)


def wait_until(ready, proc: subprocess.Popen, log: Path) -> None:
    """Until ``ready()``, while ``proc`` runs (its output in ``log`` if it stops or the time runs out)."""
    deadline = time.monotonic() + TIMEOUT
    while not ready():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)


@pytest.fixture(scope="module")
def complete(tmp_path_factory) -> tuple[Path, list[dict]]:
    """The grid run by one process: (checkpoint, rows)."""
    root = tmp_path_factory.mktemp("complete")
    checkpoint = save_dense_checkpoint(root / "dense.pt")
    sweep.main(["--config", str(sweep_config(root, checkpoint))])
    return checkpoint, read_results(root / "sweep" / RESULTS)


# ----------------------------------------------------------------------------- shards


def test_shard_spec_and_slurm_job_arrays():
    assert parse_shard("0/1", {}) == (0, 1) and parse_shard(" 2 / 3 ", {}) == (2, 3)
    assert parse_shard(None, {}) is None
    array = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "3"}
    assert parse_shard(None, array) == (2, 4)  # --array=3-6: tasks 3, 4, 5, 6 are shards 0..3
    assert parse_shard("1/2", array) == (1, 2)  # --shard wins
    stepped = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "3",
               "SLURM_ARRAY_TASK_STEP": "2"}  # fmt: skip
    assert parse_shard(None, stepped) == (2, 3)  # --array=3-7:2
    with pytest.raises(ConfigError, match=r"SLURM array task 4 is not one of 3 evenly spaced indices from 3"):
        parse_shard(None, stepped | {"SLURM_ARRAY_TASK_ID": "4"})
    with pytest.raises(ConfigError, match=r"unreadable"):
        parse_shard(None, {"SLURM_ARRAY_TASK_ID": "1"})


@pytest.mark.parametrize(
    ("spec", "message"),
    [("3/2", r"I must be in 0..N-1 \(0..1\)"), ("2/2", r"0..1"), ("0/0", r"I must be in 0..N-1"),
     ("-1/2", r"expected I/N"), ("a/b", r"expected I/N"), ("1/2/3", r"expected I/N"), ("1", r"expected I/N")],
)  # fmt: skip
def test_bad_shard_specs_are_refused(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_shard(spec, {})


def test_bad_shard_is_a_one_line_error_before_anything_runs(tmp_path, capsys):
    config = sweep_config(tmp_path, tmp_path / "never_loaded.pt")
    with pytest.raises(SystemExit) as info:
        sweep.main(["--config", str(config), "--shard", "3/2"])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert err.strip() == "lightning-repair-sweep: error: --shard 3/2: I must be in 0..N-1 (0..1)"
    assert not (tmp_path / "sweep").exists()


def test_shards_partition_the_grid():
    cells = list(range(7))
    for n in (1, 2, 3, 7, 9):
        shards = [shard_cells(cells, (i, n)) for i in range(n)]
        assert sorted(c for shard in shards for c in shard) == cells  # every cell once
    assert shard_cells(cells, (1, 3)) == [1, 4]
    assert shard_cells(cells, None) == cells


def test_a_shard_without_cells_runs_nothing(tmp_path, capsys):
    config = sweep_config(tmp_path, tmp_path / "never_loaded.pt")  # 4 cells: shard 5 of 6 has none
    sweep.main(["--config", str(config), "--shard", "5/6"])
    assert "shard 5/6 done: no cell of the grid" in capsys.readouterr().out
    assert read_results(tmp_path / "sweep" / RESULTS) == []


def _add_rows(output: str, worker: int, count: int) -> None:
    results = Results(Path(output), [])
    for i in range(count):
        row = {k: t() for k, t in COLUMNS.items()} | {"allocation": f"w{worker}", "sparsity": i / 100}
        assert results.add(row)


def test_concurrent_writers_lose_and_repeat_no_row(tmp_path):
    """4 processes adding 15 rows each to one results.csv as fast as they can: read-merge-rewrite under the lock
    keeps all 60 (without it, two writers reading the same table would drop each other's rows)."""
    workers = [multiprocessing.get_context("fork").Process(target=_add_rows, args=(str(tmp_path), w, 15))
               for w in range(4)]  # fmt: skip
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
        assert w.exitcode == 0
    rows = read_results(tmp_path / RESULTS)  # raises on a repeated cell
    assert sorted(row_key(r)[1:3] for r in rows) == sorted((f"w{w}", i / 100) for w in range(4) for i in range(15))
    assert Results(tmp_path, []).add(rows[0]) is False  # a cell already there is not added again


def test_two_shards_started_together_give_the_full_grid(complete, tmp_path):
    checkpoint, rows = complete
    config = sweep_config(tmp_path, checkpoint)
    logs = [tmp_path / f"shard{i}.log" for i in range(2)]
    procs = [start_sweep(config, "--shard", f"{i}/2", log=logs[i]) for i in range(2)]
    for p in procs:
        p.wait(timeout=TIMEOUT)
    assert [p.returncode for p in procs] == [0, 0], [log.read_text() for log in logs]
    out = tmp_path / "sweep"
    with (out / RESULTS).open(newline="") as f:
        assert len(list(csv.reader(f))) == 1 + len(rows)  # the header and one line per cell
    shards = read_results(out / RESULTS)
    assert without_times(shards) == without_times(rows)  # grid order, same accuracies and state_sha256
    assert all(r["state_sha256"] for r in shards)
    saved = (out / "config.yaml").read_text()
    assert "grid:" in saved and not re.search(r"^shard: *\d", saved, re.M)  # config.yaml reruns the whole grid

    # the report from results.csv alone: nothing runs (the checkpoint is gone), every file is rebuilt
    for name in ("results.md", "accuracy_vs_sparsity.png"):
        (out / name).unlink()
    checkpoint.rename(checkpoint.with_suffix(".moved"))
    try:
        sweep.main(["--config", str(config), "--report"])
    finally:
        checkpoint.with_suffix(".moved").rename(checkpoint)
    assert (out / "results.md").read_text() == sweep.markdown_table(shards)
    assert (out / "accuracy_vs_sparsity.png").stat().st_size > 10_000
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 3  # 2 shards, then the report


def test_report_of_an_empty_folder_is_an_error(tmp_path, capsys):
    config = sweep_config(tmp_path, tmp_path / "never_loaded.pt")
    with pytest.raises(SystemExit) as info:
        sweep.main(["--config", str(config), "--report"])
    assert info.value.code == 1 and "holds no row: nothing to report" in capsys.readouterr().err


def test_killed_shard_resumes_and_completes_the_grid(complete, tmp_path, capsys):
    checkpoint, rows = complete
    config = sweep_config(tmp_path, checkpoint)
    csv_path = tmp_path / "sweep" / RESULTS
    proc = start_sweep(config, "--shard", "1/2")
    try:
        wait_for(csv_path, proc)  # its first cell is saved, its second under way
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert [row_key(r) for r in read_results(csv_path)] == [row_key(rows[1])]

    capsys.readouterr()
    sweep.main(["--config", str(config), "--shard", "1/2"])
    err = capsys.readouterr().err
    assert "1 of 2 cells of shard 1/2 are already in results.csv, 1 to run" in err
    assert [row_key(r) for r in read_results(csv_path)] == [row_key(rows[1]), row_key(rows[3])]
    sweep.main(["--config", str(config), "--shard", "0/2"])
    assert without_times(read_results(csv_path)) == without_times(rows)


# ----------------------------------------------------------------------------- signals


def one_line(stderr: str, prog: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith(f"{prog}:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.mark.parametrize(("signum", "status", "what"), [(signal.SIGTERM, 143, "terminated (SIGTERM)"),
                                                        (signal.SIGINT, 130, "interrupted (Ctrl-C)")])  # fmt: skip
def test_stopped_sweep_keeps_its_finished_cells_and_says_how_to_resume(complete, tmp_path, signum, status, what):
    checkpoint, rows = complete
    config = sweep_config(tmp_path, checkpoint)
    csv_path = tmp_path / "sweep" / RESULTS
    log = tmp_path / "sweep.log"
    proc = start_sweep(config, log=log)
    try:
        wait_for(csv_path, proc)
        proc.send_signal(signum)
        proc.wait(timeout=TIMEOUT)
    finally:
        proc.kill()
    stderr = log.read_text()
    assert proc.returncode == status, stderr
    kept = read_results(csv_path)
    assert 1 <= len(kept) < len(rows) and without_times(kept) == without_times(rows[: len(kept)])
    line = one_line(stderr, "lightning-repair-sweep")
    assert line == (f"lightning-repair-sweep: {what}: {len(kept)} of 4 cells are saved in {csv_path}; run the same "
                    f"command again to run the other {4 - len(kept)}")  # fmt: skip


STALLED_FIT = """
import pathlib, sys, time
import lightning_repair.module as module
from lightning_repair.cli import main

def stall(*args, **kwargs):
    pathlib.Path(sys.argv[1]).touch()
    time.sleep(600)

module.prune_and_repair = stall  # the pipeline, once the run folder exists
main(sys.argv[2:])
"""


def test_sigterm_of_fit_exits_143_and_leaves_no_empty_run(tmp_path, dense_checkpoint):
    config = write_config(tmp_path / "config.yaml", pipeline_config(tmp_path, dense_checkpoint, rr_grid=None))
    marker = tmp_path / "pipeline-started"
    log = tmp_path / "fit.log"
    proc = start([sys.executable, "-c", STALLED_FIT, str(marker), "fit", "--config", str(config)], log)
    try:
        wait_until(marker.exists, proc, log)
        assert (run_dir(tmp_path) / "config.yaml").exists()  # the framework had started the run folder
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=TIMEOUT)
    finally:
        proc.kill()
    stderr = log.read_text()
    assert proc.returncode == 143, stderr
    line = one_line(stderr, "lightning-repair")
    assert line == ("lightning-repair: terminated (SIGTERM): nothing was saved (a prune-and-repair run writes its "
                    "results when it finishes); run the same command again to start over")  # fmt: skip
    assert not run_dir(tmp_path).exists()  # no empty TensorBoard run left behind


def _mapped(pid: int, library: str) -> bool:
    try:
        return library in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc to see the imports under way")
def test_ctrl_c_during_start_up_prints_no_traceback(tmp_path, dense_checkpoint):
    """SIGINT while the console script still imports its libraries (torch is loaded, the CLI not yet built)."""
    config = write_config(tmp_path / "config.yaml", pipeline_config(tmp_path, dense_checkpoint))
    log = tmp_path / "fit.log"
    proc = start([sys.executable, "-m", "lightning_repair.cli", "fit", "--config", str(config)], log)
    try:
        wait_until(lambda: _mapped(proc.pid, "libtorch"), proc, log)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=TIMEOUT)
    finally:
        proc.kill()
    stderr = log.read_text()
    assert proc.returncode == 130, stderr
    line = one_line(stderr, "lightning-repair")
    assert line.startswith("lightning-repair: interrupted (Ctrl-C)") and "nothing ran" in line
    assert not run_dir(tmp_path).exists()
