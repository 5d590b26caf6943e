"""benchmarks/repair_cost.py at a tiny size: the timed table with the repeated `default`, and the profile."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--images", "8", "--batch-size", "4", "--width", "0.125", "--image-size", "16", "--in-channels", "3"]


def run(tmp_path: Path, *args: str) -> str:
    out = tmp_path / "cost.md"
    env = os.environ | {"OMP_NUM_THREADS": "1",
                        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    script = ROOT / "benchmarks" / "repair_cost.py"
    done = subprocess.run([sys.executable, str(script), *TINY, *args, "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return out.read_text()


def test_the_table_times_default_cold_and_repeated(tmp_path):
    text = run(tmp_path, "--repeats", "1", "--presets", "bn_recalibration", "default")
    assert "best of 1 alternating repeats" in text
    assert "| `bn_recalibration` |" in text and "| `default` |" in text
    assert "`default` repeated against the same dense network and batches" in text
    assert "walks in channels_last" in text and "(on channels-last copies: a forward pass" in text


def test_the_walk_format_can_be_forced(tmp_path):
    text = run(tmp_path, "--repeats", "1", "--presets", "default", "--walk-format", "contiguous_format")
    assert "walks in contiguous_format" in text and "| `default` |" in text


def test_the_profile_lists_a_repairs_operators_in_f(tmp_path):
    text = run(tmp_path, "--profile", "reconstruct")
    assert "one profiled repair after a warm-up" in text and "`reconstruct` under torch.profiler" in text
    rows = [line for line in text.splitlines() if line.startswith("| `aten::")]
    assert len(rows) == 12 and any("convolution" in row for row in rows)
    shares = [float(row.split("|")[4].strip().removesuffix("%")) for row in rows]
    assert all(s >= 0 for s in shares) and shares == sorted(shares, reverse=True) and sum(shares) <= 100.05
