"""What a grid spec costs: its training epochs per (dataset, model, width), times the seconds
one epoch takes there, measured here, or the images per second of a GPU given on the line.

    python -m benchmarks.grid_cost paper-cpu                       # measured on this CPU
    python -m benchmarks.grid_cost paper-gpu --images-per-second 20000 --train-images 50000

The CPU estimate trains one epoch of each (dataset, model, width) with the spec's threads per
task and multiplies; pruned models cost what dense ones do here (masked training is dense
arithmetic). Evaluation, gradient batches and process start-up are left out: on digits they
add about a fifth (see benchmarks/README.md), on MNIST-sized data a few per cent.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from rdfast import training
from rdfast.data import load_dataset
from rdfast.grid import spec as grid_spec
from rdfast.grid.driver import grid_plan
from rdfast.models import build_model


def seconds_per_epoch(exp, threads: int) -> float:
    """One training epoch of `exp`'s dense model, timed after a short warm-up."""
    torch.set_num_threads(threads)
    data = load_dataset(exp.dataset, exp.data_root)
    torch.manual_seed(0)
    model = build_model(exp.model, data.input_shape, data.num_classes, exp.width)
    training.train(model, data, exp.train, epochs=1, seed_parts=(0, "warm-up"))
    start = time.perf_counter()  # the second epoch: allocations and kernels warm
    training.train(model, data, exp.train, epochs=1, seed_parts=(0, "cost"))
    return time.perf_counter() - start


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("spec")
    ap.add_argument("--images-per-second", type=float, help="a GPU's training throughput")
    ap.add_argument("--train-images", type=int, help="training images per epoch (with the above)")
    args = ap.parse_args(argv)
    if args.images_per_second and not args.train_images:
        ap.error("--images-per-second needs --train-images")
    grid = grid_spec.load(args.spec)
    plan = grid_plan(args.spec, os.devnull)["table"]
    rows, total = [], 0.0
    firsts = {}
    for job in grid.dense.values():
        firsts.setdefault((job.exp.dataset, job.exp.model, job.exp.width), job)
    for (dataset, model, width), part in plan.groupby(["dataset", "model", "width"], sort=False):
        epochs = int(part["epochs"].sum())
        if args.images_per_second:
            per_epoch = args.train_images / args.images_per_second
        else:
            job = firsts[(dataset, model, width)]
            per_epoch = seconds_per_epoch(job.exp, job.threads)
        hours = epochs * per_epoch / 3600
        total += hours
        rows.append((dataset, model, width, int(part["runs"].sum()), epochs, per_epoch, hours))
        print(f"{dataset:<14} {model:<9} {width:>5g} {rows[-1][3]:>5} runs {epochs:>8,} epochs "
              f"x {per_epoch:6.2f} s = {hours:7.1f} h", flush=True)  # fmt: skip
    what = (
        "GPU-hours"
        if args.images_per_second
        else (f"task-hours ({torch.get_num_threads()} thread(s) each)")
    )
    print(f"\n{grid.name}: {len(grid.dense)} dense models, {len(grid.runs)} runs, "
          f"{total:,.1f} {what} of training")  # fmt: skip


if __name__ == "__main__":
    main()
