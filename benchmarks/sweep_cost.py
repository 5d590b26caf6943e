"""Wall time of an N-cell sweep against the same N cells as separate ``lightning-repair fit`` runs.

    .venv/bin/python benchmarks/sweep_cost.py [--config configs/quickstart.yaml] [--allocations lamp]
        [--sparsities 0.95 0.97] [--repairs bn_recalibration asr default] [--output runs/benchmarks/sweep_cost.csv]

Both run as a user would, from the command line, on the config's data and checkpoint. The fit runs skip
what a sweep does not do (RR profile, model export, TensorBoard: ``--model.rr_grid null
--model.save_model false --trainer.logger false``), so the difference is the work the sweep shares: one
process, the dense model, the calibration batches and the dense accuracy loaded or measured once, and
one evaluation per distinct (pruned or repaired) model. Every fit run's accuracies must equal the
sweep's row for its cell. Writes ``--output`` (default runs/benchmarks/sweep_cost.csv, untracked); the
tracked copy benchmarks/results/sweep_cost.csv is updated only when given as ``--output``.
"""

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--config", default="configs/quickstart.yaml")
parser.add_argument("--allocations", nargs="+", default=["lamp"])
parser.add_argument("--sparsities", nargs="+", type=float, default=[0.95, 0.97])
parser.add_argument("--repairs", nargs="+", default=["bn_recalibration", "asr", "default"])
parser.add_argument("--output", type=Path, default=Path("runs/benchmarks/sweep_cost.csv"), help="the CSV to write")
args = parser.parse_args()
cells = [(a, s, r) for a in args.allocations for s in args.sparsities for r in args.repairs]


def run(command: list[str]) -> float:
    """Seconds of ``command``; its output is shown only if it fails."""
    start = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stdout}")
    return time.perf_counter() - start


with tempfile.TemporaryDirectory() as tmp:
    sweep_dir = Path(tmp, "sweep")
    grid = [f"--grid.allocations=[{','.join(args.allocations)}]",
            f"--grid.sparsities=[{','.join(map(str, args.sparsities))}]",
            f"--grid.repairs=[{','.join(args.repairs)}]"]  # fmt: skip
    print(f"sweep of {len(cells)} cells ...", flush=True)
    sweep_s = run([str(BIN / "lightning-repair-sweep"), "--config", args.config, *grid, f"--output={sweep_dir}"])
    with open(sweep_dir / "results.csv", newline="") as f:
        rows = {(r["allocation"], float(r["sparsity"]), r["repair"]): r for r in csv.DictReader(f)}

    fit_s = 0.0
    for i, (allocation, sparsity, recipe) in enumerate(cells):
        print(f"fit {i + 1}/{len(cells)}: {allocation} {sparsity} {recipe} ...", flush=True)
        root = Path(tmp, f"fit{i}")
        fit_s += run([
            str(BIN / "lightning-repair"), "fit", "--config", args.config, f"--model.allocation={allocation}",
            f"--model.sparsity={sparsity}", f"--model.repair={recipe}", "--model.rr_grid=null",
            "--model.save_model=false", "--trainer.logger=false", "--trainer.callbacks=null",
            f"--trainer.default_root_dir={root}",
        ])  # fmt: skip
        accuracy = json.loads((root / "metrics.json").read_text())["accuracy"]
        row = rows[(allocation, sparsity, recipe)]
        for phase in ("dense", "pruned", "repaired"):
            swept = float(row[f"acc_{phase}"])
            if swept != accuracy[phase]:
                sys.exit(f"{allocation} {sparsity} {recipe}: fit {phase} {accuracy[phase]} != sweep {swept}")

args.output.parent.mkdir(parents=True, exist_ok=True)
with open(args.output, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["cells", "sweep_s", "separate_fit_runs_s", "speedup"])
    writer.writerow([len(cells), f"{sweep_s:.1f}", f"{fit_s:.1f}", f"{fit_s / sweep_s:.2f}"])
print(f"\n{len(cells)} cells: one sweep {sweep_s:.0f} s, {len(cells)} fit runs {fit_s:.0f} s "
      f"({fit_s / sweep_s:.1f}x); identical accuracies. Wrote {args.output}")  # fmt: skip
