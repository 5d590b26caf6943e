"""Cost of each repair preset in dense forward-pass equivalents F (docs/methods.md), next to a peer and a floor.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/repair_cost.py [--archs resnet18 resnet50] [--images 256]
        [--width 0.25] [--image-size 28] [--in-channels 1] [--sparsity 0.95] [--repeats 2] [--device cpu]
        [--out benchmarks/results/repair_cost.md] [--mask sparsegpt exact_obs] [--mask-gram dense]

In one run, on one LAMP-pruned model and the same calibration batches, repeated ``--repeats`` times with every
measurement alternating with the others (best of the repeats kept, so a burst of load on a shared machine hits
all of them alike):

- F: one eval-mode forward pass of the dense model over the calibration set, in its own memory format (contiguous);
  beside it, the same pass on a channels-last copy (the format a repair's walks run in on a CPU,
  ``repair.walk_format``);
- the peer, ``torch.optim.swa_utils.update_bn``: one train-mode pass of the pruned model, cumulative averages (and the
  same on a channels-last copy);
- each preset's repair time, as a multiple of F, beside its *floor*: the plain forward passes over the calibration
  set that its maths needs (1 F for a pruned-only walk, 2 F when the dense network is also read), and for
  ``bn_recalibration`` its ratio to ``update_bn``. For ``reconstruct`` also the time in its Gram statistics and solves;
  for ``default`` also a second repair against the same dense network and batches, which reuses the dense logits
  (as the cells of a sweep and the candidates of a search do). Every other repair gets its own copy of the dense
  network, so none reuses anything.

Random weights with data-driven BN statistics: cost does not depend on what the network learned. With --cpu-time
every duration is the process's CPU time instead of wall time (with OMP_NUM_THREADS=1, not inflated by other jobs on
the machine); ``--walk-format`` forces the memory format the walks run in (default: per device); ``--mask RULE``
adds ``reconstruct`` with that mask selection, named ``reconstruct+RULE``, next to plain ``reconstruct``;
``--profile PRESET`` instead lists the operators one repair with PRESET spends its time in (torch.profiler, self time
in F); with --flops it counts the floating-point operations of matrix products and convolutions instead
(torch.utils.flop_counter; elementwise work and solves are not counted): the arithmetic a preset needs.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from torch.optim.swa_utils import update_bn
from torch.utils.flop_counter import FlopCounterMode

import lightning_repair.repair as engine
from lightning_repair import reconstruction
from lightning_repair.allocation import Allocation, allocate
from lightning_repair.evaluation import calibration_forward_time
from lightning_repair.masks import apply_masks, compute_masks
from lightning_repair.models import Network
from lightning_repair.repair import repair

PRESETS = ("bn_recalibration", "default", "asr", "reconstruct", "reconstruct_dense_bn", "reconstruct_ols")
REPEATED = "default, repeated"
FLOOR = {preset: 1 if preset == "bn_recalibration" else 2 for preset in PRESETS}  # the pruned walk, and the dense one


def recipes(args) -> dict[str, str | list[dict]]:
    """The presets timed, then ``reconstruct`` with each ``--mask`` rule (named ``reconstruct+RULE``)."""
    timed = {preset: preset for preset in args.presets}
    for rule in args.mask:
        timed[f"reconstruct+{rule}"] = [{"op": "reconstruct", "mask": rule, "mask_gram": args.mask_gram}]
    return timed


def floor(name: str) -> int:
    return FLOOR[name.split("+")[0]]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def flops(fn) -> float:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def setup(arch: str, args, device: torch.device) -> tuple:
    """The dense network, its LAMP-pruned copy, the masks and the calibration batches."""
    torch.manual_seed(0)
    images = torch.randn(args.images, args.in_channels, args.image_size, args.image_size, device=device)
    batches = list(images.split(args.batch_size))
    stem = "cifar" if args.image_size <= 64 else "imagenet"
    dense = Network(arch=arch, in_channels=args.in_channels, width=args.width, stem=stem).build().to(device).train()
    with torch.no_grad():
        for b in batches:
            dense(b)  # BN statistics from data, so pruning really perturbs the network
    dense.eval()
    masks = compute_masks(dense, allocate(dense, args.sparsity, Allocation("lamp")))
    return dense, apply_masks(copy.deepcopy(dense), masks), masks, batches


def measure(arch: str, args, device: torch.device) -> dict:
    dense, pruned, masks, batches = setup(arch, args, device)
    best: dict[str, float] = {}
    shares: dict[str, float] = {}
    if args.flops:  # the same table, in FLOPs instead of seconds
        best["F"] = sum(flops(lambda b=b: dense(b)) for b in batches)
        best["update_bn"] = flops(lambda: update_bn(batches, copy.deepcopy(pruned)))
        for name, recipe in recipes(args).items():
            target = copy.deepcopy(dense)  # its own: no dense pass is reused
            best[name] = flops(lambda r=recipe, d=target: repair(copy.deepcopy(pruned), d, batches, r, masks=masks))
        return {"best": best, "shares": shares}

    def keep(name, value):
        best[name] = min(best.get(name, float("inf")), value)

    channels_last = [b.contiguous(memory_format=torch.channels_last) for b in batches]
    for _ in range(args.repeats):
        keep("F", calibration_forward_time(dense, batches))
        model = copy.deepcopy(dense).to(memory_format=torch.channels_last)
        keep("F channels-last", calibration_forward_time(model, channels_last))
        model = copy.deepcopy(pruned)
        keep("update_bn", seconds(lambda m=model: update_bn(batches, m), device))
        model = copy.deepcopy(pruned).to(memory_format=torch.channels_last)
        keep("update_bn channels-last", seconds(lambda m=model: update_bn(channels_last, m), device))
        for preset, recipe in recipes(args).items():
            model, target = copy.deepcopy(pruned), copy.deepcopy(dense)  # a dense copy: no pass of it is reused
            report = None

            def run(m=model, d=target, r=recipe):
                nonlocal report
                report = repair(m, d, batches, r, masks=masks)

            t = seconds(run, device)
            if t < best.get(preset, float("inf")):
                for k in ("reconstruction_statistics", "reconstruction_solve"):
                    if k in report.timings:
                        shares[f"{preset}:{k}"] = report.timings[k]
            keep(preset, t)
            if preset == "default":  # again, against the same dense network and batches (a sweep's or search's)
                model = copy.deepcopy(pruned)
                keep(REPEATED, seconds(lambda m=model, d=target: repair(m, d, batches, "default", masks=masks), device))
    return {"best": best, "shares": shares}


def profile(arch: str, args, device: torch.device) -> list[str]:
    """Where one repair with ``args.profile`` spends its time: torch.profiler's operators, by self time (on a GPU,
    the device's), in F."""
    dense, pruned, masks, batches = setup(arch, args, device)
    f = min(calibration_forward_time(dense, batches) for _ in range(3))
    repair(copy.deepcopy(pruned), copy.deepcopy(dense), batches, args.profile, masks=masks)  # warm-up
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":  # the kernels' own time on the device
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        repair(copy.deepcopy(pruned), copy.deepcopy(dense), batches, args.profile, masks=masks)
        sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    ops = sorted(prof.key_averages(), key=lambda e: -getattr(e, key))
    total = sum(getattr(e, key) for e in ops) / 1e6
    lines = [f"### {arch}, `{args.profile}` under torch.profiler: {total / f:.2f} F of operators' self time (F = "
             f"{f:.3f} s, unprofiled; Python between operators not counted)", "",
             "| operator | calls | self time | share |", "|---|---:|---:|---:|"]  # fmt: skip
    lines += [f"| `{e.key}` | {e.count} | {getattr(e, key) / 1e6 / f:.2f} F | {getattr(e, key) / 1e6 / total:.1%} |"
              for e in ops[:12]]  # fmt: skip
    return lines + [""]


def table(arch: str, result: dict, args) -> list[str]:
    best, f = result["best"], result["best"]["F"]
    unit = f"{f / 1e9:.2f} GFLOP" if args.flops else f"{f:.3f} s"
    heading = f"### {arch}: F = {unit}, `update_bn` = {best['update_bn'] / f:.2f} F"
    if "F channels-last" in best:
        heading += (f" (on channels-last copies: a forward pass {best['F channels-last'] / f:.2f} F, `update_bn` "
                    f"{best['update_bn channels-last'] / f:.2f} F)")  # fmt: skip
    lines = [heading, "",
             "| preset | time | floor | time / floor | time / `update_bn` | Grams / solves |",
             "|---|---:|---:|---:|---:|---|"]  # fmt: skip
    for preset in recipes(args):
        t = best[preset] / f
        if preset == "bn_recalibration":
            peer = f"{best[preset] / best['update_bn']:.2f}x"
            if "update_bn channels-last" in best:
                peer += f" ({best[preset] / best['update_bn channels-last']:.2f}x channels-last)"
        elif ("+" in preset or preset == "reconstruct_ols") and "reconstruct" in best:
            # a mask selection: its cost next to plain reconstruct's
            peer = f"{best[preset] / best['reconstruct']:.2f}x `reconstruct`"
        else:
            peer = ""
        split = ""
        if f"{preset}:reconstruction_statistics" in result["shares"]:
            split = " / ".join(f"{result['shares'][f'{preset}:{k}'] / f:.2f} F"
                               for k in ("reconstruction_statistics", "reconstruction_solve"))  # fmt: skip
        lines.append(f"| `{preset}` | {t:.2f} F | {floor(preset)} F | {t / floor(preset):.2f}x | {peer} | {split} |")
    if REPEATED in best:
        lines += ["", f"`default` repeated against the same dense network and batches, as in a sweep or a search "
                      f"(the dense logits reused): {best[REPEATED] / f:.2f} F"]  # fmt: skip
    return lines + [""]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["resnet18"])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--in-channels", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--sparsity", type=float, default=0.95)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    parser.add_argument("--mask", nargs="*", default=[], help="mask rules to time as reconstruct options")
    parser.add_argument("--mask-gram", default="dense", choices=["dense", "repaired"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--gram-products",
        choices=("auto", "float32", "float64"),
        default="auto",
        help="dtype of reconstruct's conv Gram products (accumulated in float64); auto: per device",
    )
    parser.add_argument(
        "--walk-format",
        choices=("auto", "contiguous_format", "channels_last"),
        default="auto",
        help="the memory format the repair's walks run the networks in; auto: per device",
    )
    parser.add_argument("--profile", choices=PRESETS, help="instead: one repair with this preset, by operator")
    parser.add_argument("--out", type=Path, help="also write the tables (Markdown) here")
    cost = parser.add_mutually_exclusive_group()
    cost.add_argument("--cpu-time", action="store_true", help="measure CPU time (with OMP_NUM_THREADS=1)")
    cost.add_argument("--flops", action="store_true", help="count matrix-product and convolution FLOPs, not time")
    args = parser.parse_args(argv)
    if args.cpu_time:  # every timer here and in the library reads time.perf_counter
        time.perf_counter = time.process_time
    device = torch.device(args.device)
    if args.gram_products != "auto":
        reconstruction.PRODUCT_DTYPE = getattr(torch, args.gram_products)
    products = reconstruction.product_dtype(device)
    if args.walk_format != "auto":
        engine.WALK_FORMAT = getattr(torch, args.walk_format)
    walks = str(engine.walk_format(device) or "the models' own format").removeprefix("torch.")
    lines = [f"`benchmarks/repair_cost.py {' '.join(argv if argv is not None else sys.argv[1:])}`: "
             f"{args.images} images of {args.in_channels}x{args.image_size}x{args.image_size}, batch "
             f"{args.batch_size}, width {args.width}, LAMP {args.sparsity:.0%}, {device.type}, "
             f"{torch.get_num_threads()} thread(s), walks in {walks}, "
             f"Gram products in {str(products).removeprefix('torch.')}, "
             + ("one profiled repair after a warm-up" if args.profile else
                f"best of {args.repeats} alternating repeats"), ""]  # fmt: skip
    for arch in args.archs:
        lines += profile(arch, args, device) if args.profile else table(arch, measure(arch, args, device), args)
        print("\n".join(lines), flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
