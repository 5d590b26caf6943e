"""Peak memory of the repair per activation store (``activations: device | host | disk``) and calibration size.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/repair_memory.py [--images 64 256] [--presets bn_recalibration]

ResNet-50 (torchvision layout, 224 px, width 1.0) with random weights and BN statistics from a train-mode pass,
pruned to 95% by LAMP, repaired from random calibration images in batches of ``--batch-size``. Each case runs
in a fresh subprocess; a thread samples its resident memory (VmRSS) every few ms during the repair, and the table
gives the peak minus the resident memory just before it (models and calibration images loaded, the C heap's free
memory returned to the system first, so that it does not hide part of the peak in the baseline). On a CPU the
device is host memory, so ``host`` measures like ``device`` here: it moves activations off a GPU.
Writes the table to ``--output`` (benchmarks/results/repair_memory.md).
"""

import argparse
import copy
import ctypes
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from lightning_repair.allocation import Allocation, allocate
from lightning_repair.masks import apply_masks, compute_masks
from lightning_repair.models import Network
from lightning_repair.repair import repair
from lightning_repair.stores import STORES

RESULTS = Path(__file__).parent / "results" / "repair_memory.md"
MB = 2**20


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def release_free_heap() -> None:
    """Return the C heap's free memory to the system (glibc's malloc_trim; a no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakResident(threading.Thread):
    """Samples the resident memory until stopped; ``peak`` is the largest sample."""

    def __init__(self, interval: float = 0.005):
        super().__init__(daemon=True)
        self.interval, self.peak, self.running = interval, resident_bytes(), True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, resident_bytes())
            time.sleep(self.interval)

    def stop(self) -> int:
        self.running = False
        self.join()
        return max(self.peak, resident_bytes())


def run_case(preset: str, images: int, store: str, batch_size: int) -> None:
    """One repair; prints 'baseline_mb peak_mb seconds'."""
    torch.manual_seed(0)
    dense = Network(arch="resnet50", in_channels=3, num_classes=1000, stem="imagenet", width=1.0).build().train()
    with torch.no_grad():
        for _ in range(2):
            dense(torch.randn(16, 3, 224, 224))  # BN statistics from data, so pruning really perturbs the network
    dense.eval()
    masks = compute_masks(dense, allocate(dense, 0.95, Allocation("lamp")))
    pruned = apply_masks(copy.deepcopy(dense), masks)
    batches = list(torch.randn(images, 3, 224, 224).split(batch_size))
    release_free_heap()  # else memory freed while loading stays resident and hides part of the peak in the baseline
    baseline = resident_bytes()
    sampler = PeakResident()
    sampler.start()
    start = time.perf_counter()
    repair(pruned, dense, batches, preset, masks=masks, activations=store)
    seconds = time.perf_counter() - start
    print(f"{baseline / MB:.0f} {sampler.stop() / MB:.0f} {seconds:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--presets", nargs="+", default=["bn_recalibration"])
    parser.add_argument("--stores", nargs="+", default=list(STORES), choices=list(STORES))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--case", nargs=3, metavar=("PRESET", "IMAGES", "STORE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        preset, images, store = args.case
        run_case(preset, int(images), store, args.batch_size)
        return
    header = "| preset | images | activations | repair peak − baseline (MB) | baseline (MB) | time (s) |"
    lines = [header, "|---|---:|---|---:|---:|---:|"]
    print(header, flush=True)
    for preset in args.presets:
        for images in args.images:
            for store in args.stores:
                case = [sys.executable, __file__, "--case", preset, str(images), store, "--batch-size",
                        str(args.batch_size)]  # fmt: skip
                out = subprocess.run(case, check=True, capture_output=True, text=True).stdout.split()
                baseline, peak, seconds = int(out[0]), int(out[1]), float(out[2])
                lines.append(f"| {preset} | {images} | {store} | {peak - baseline} | {baseline} | {seconds:.0f} |")
                print(lines[-1], flush=True)
    command = "OMP_NUM_THREADS=" + str(torch.get_num_threads()) + " .venv/bin/python " + " ".join(sys.argv)
    args.output.write_text(
        "# Peak memory of the repair (ResNet-50, 224 px, LAMP 95%, batch size "
        f"{args.batch_size}, CPU)\n\n`{command}`\n\n" + "\n".join(lines) + "\n"
    )


if __name__ == "__main__":
    main()
