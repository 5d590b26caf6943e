"""benchmarks/gpu.sh runs every step on a CPU in its smoke mode, so that it works the first time a GPU is there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_script_smoke_mode_runs_every_step(tmp_path):
    out = tmp_path / "gpu.md"
    env = os.environ | {"PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
                        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--smoke", "--out", str(out)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)  # fmt: skip
    assert run.returncode == 0, run.stderr + (out.read_text() if out.exists() else "")
    text = out.read_text()
    assert "FAILED" not in text
    assert "cpu Gram products torch.float32" in text
    sections = text.split("\n## ")[1:]
    titles = [s.splitlines()[0] for s in sections]
    assert len(titles) == 9, titles
    body = dict(zip(titles, sections, strict=True))
    first, second = (body[t] for t in titles if t.startswith("quickstart, ") and "recorded" not in t)
    assert "accuracy  dense" in first and "reusing" not in first
    assert "reusing the dense accuracy" in second and "reusing the RR profile" in second
    recorded = [body[t] for t in titles if t.endswith("recorded")]
    assert "evaluation_precision 32-true" in recorded[0] and "'dense_accuracy': False" in recorded[0]
    assert "evaluation_precision 32-true" in recorded[1] and "'dense_accuracy': True" in recorded[1]  # CPU: float32
    every = next(body[t] for t in titles if t.endswith("every preset"))
    for preset in ("bn_recalibration", "default", "asr", "reconstruct", "reconstruct_dense_bn"):
        assert f"| `{preset}` |" in every
    for products in ("float32", "float64"):
        table = next(body[t] for t in titles if t.endswith(f"Gram products in {products}"))
        assert f"Gram products in {products}," in table and "| `reconstruct` |" in table
    walks = next(body[t] for t in titles if "walks in channels_last" in t)
    assert "walks in channels_last," in walks and "| `default` |" in walks and "| `reconstruct` |" in walks
    assert "top-1" in body["evaluate, 2 processes (DDP)"]
