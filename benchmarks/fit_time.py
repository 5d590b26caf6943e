"""The quickstart's wall time by phase: a first run, then a second run with another sparsity (caches warm).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fit_time.py [--config configs/quickstart.yaml]
        [--sparsities 0.95 0.9] [--out benchmarks/results/fit_time.md]

Each run is ``lightning-repair fit --config CONFIG --model.sparsity S`` in a fresh process, all logging into one new
folder (so the second run finds the first run's cache under the run's root). ``--pythonpath DIR`` runs another
checkout (from DIR, where CONFIG and its checkpoint must also be found), to compare before and after. The phases
are metrics.json's ``timings_s``; ``other`` is the rest of the process's wall time (start-up, imports, data
loading, writing).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PHASES = ("evaluation", "rr", "calibration_forward", "allocation", "masking", "repair")


def run(config: str, sparsity: float, root: Path, pythonpath: str | None) -> dict:
    env, cwd = dict(os.environ), None
    if pythonpath:  # ``python -m`` puts the working directory first on sys.path: run from the other checkout
        env["PYTHONPATH"], cwd = pythonpath, pythonpath
    command = [sys.executable, "-m", "lightning_repair.cli", "fit", "--config", config,
               "--trainer.logger.init_args.save_dir", str(root), "--trainer.enable_progress_bar", "false",
               "--model.sparsity", str(sparsity)]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"fit failed ({done.returncode}):\n{done.stderr[-3000:]}")
    metrics_files = sorted(root.rglob("metrics.json"), key=lambda p: p.stat().st_mtime)
    metrics = json.loads(metrics_files[-1].read_text())
    reused = [line for line in done.stderr.splitlines() if "reusing" in line]
    return {"sparsity": sparsity, "wall": wall, "timings": metrics["timings_s"], "accuracy": metrics["accuracy"],
            "reused": reused}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.95, 0.9])
    parser.add_argument("--pythonpath", help="PYTHONPATH of the runs (another checkout, to compare)")
    parser.add_argument("--label", default="", help="a name for this measurement in the output")
    parser.add_argument("--out", type=Path, help="also write the table (Markdown) here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fit-time-") as root:
        runs = [run(args.config, s, Path(root), args.pythonpath) for s in args.sparsities]
    header = "| run | sparsity | wall | " + " | ".join(PHASES) + " | other | dense / pruned / repaired |"
    lines = [f"`benchmarks/fit_time.py {' '.join(argv if argv is not None else sys.argv[1:])}` {args.label}", "",
             header, "|" + "---|" * (header.count("|") - 1)]  # fmt: skip
    for i, r in enumerate(runs, 1):
        t = r["timings"]
        other = r["wall"] - sum(t.get(p, 0.0) for p in PHASES)
        acc = r["accuracy"]
        accuracies = " / ".join(f"{acc[k]:.4f}" for k in ("dense", "pruned", "repaired"))
        phases = " | ".join(f"{t.get(p, 0.0):.1f} s" for p in PHASES)
        lines.append(f"| {i} | {r['sparsity']} | {r['wall']:.1f} s | {phases} | {other:.1f} s | {accuracies} |")
    for i, r in enumerate(runs, 1):
        lines += ["", f"run {i}: " + ("; ".join(r["reused"]) if r["reused"] else "nothing reused")]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
