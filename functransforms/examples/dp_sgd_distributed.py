"""DP-SGD, data-parallel: per-sample gradients on every process, one noisy sum over all.

Each step takes a global batch, and each process its share of it. Per-sample gradients come
from ``vmap(grad(loss))``; each example's gradient is clipped to norm ``C`` on its own
process; ``psum(g, ("batch", "ranks"))`` sums the clipped gradients over the local examples
(the vmap axis) and then over the processes (an all-reduce); Gaussian noise of standard
deviation ``sigma C`` is added to that sum once, the same draw on every process (a generator
seeded identically everywhere); then an optimizer step. N processes compute the same
parameters as one process on the same global batch and seed, up to float rounding (the
sums are taken in another order).

    torchrun --nproc_per_node=2 -m functransforms.examples.dp_sgd_distributed
    python -m functransforms.examples.dp_sgd_distributed          # one process, no torchrun

Without torchrun's environment (WORLD_SIZE, ...) the script runs as one process and the
"ranks" axis has a single position. ``--out PATH`` saves this process's final parameters.
"""
import argparse
import datetime
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import functransforms as ft


def make_problem(seed, n_train=512, n_features=16, n_classes=4, hidden=32, dtype=torch.float64):
    """The same data and initial model on every process."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(n_features, n_classes, generator=g, dtype=dtype)
    x = torch.randn(n_train, n_features, generator=g, dtype=dtype)
    y = (x @ teacher).argmax(1)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(n_features, hidden), nn.Tanh(), nn.Linear(hidden, n_classes))
    return model.to(dtype), x, y


def make_step(model, max_norm):
    def loss(params, x, y):
        # vmap hands over one example; the model expects a batch of one
        return F.cross_entropy(ft.functional_call(model, params, (x.unsqueeze(0),)), y.unsqueeze(0))

    def clipped_sum(params, x, y):
        g = ft.grad(loss)(params, x, y)
        norm = torch.stack([v.pow(2).sum() for v in g.values()]).sum().sqrt()
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        # over this process's examples, then over every process
        return ft.psum({k: v * scale for k, v in g.items()}, ("batch", "ranks"))

    return ft.vmap(clipped_sum, in_dims=(None, 0, 0), out_dims=None, axis_name="batch")


def train(steps=5, global_batch=32, seed=0, lr=0.5, momentum=0.9, max_norm=1.0,
          noise_multiplier=1.0, dtype=torch.float64, log=None, axis=None):
    """Run DP-SGD inside ``with ft.process_axis("ranks") as axis``; returns the parameters,
    the seconds of each step, and of each step's communication (when ``axis`` is given)."""
    world, rank = ft.axis_size("ranks"), ft.axis_index("ranks").item()
    if global_batch % world:
        raise ValueError(f"the global batch ({global_batch}) must split evenly over {world} processes")
    local = global_batch // world
    model, x_train, y_train = make_problem(seed, dtype=dtype)
    step = make_step(model, max_norm)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    batches = torch.Generator().manual_seed(seed + 1)  # same global batches everywhere
    noise = torch.Generator().manual_seed(seed + 2)  # same noise everywhere
    times, comm = [], []
    for i in range(steps):
        idx = torch.randint(len(x_train), (global_batch,), generator=batches)
        mine = idx[rank * local:(rank + 1) * local]
        start, comm_before = time.perf_counter(), getattr(axis, "seconds", 0.0)
        params = {k: p.detach() for k, p in model.named_parameters()}
        summed = step(params, x_train[mine], y_train[mine])
        for name, p in model.named_parameters():
            z = torch.normal(0.0, noise_multiplier * max_norm, p.shape, generator=noise, dtype=dtype)
            p.grad = (summed[name] + z) / global_batch
        optimizer.step()
        times.append(time.perf_counter() - start)
        comm.append(getattr(axis, "seconds", 0.0) - comm_before)
        if log is not None:
            with torch.no_grad():
                full = F.cross_entropy(model(x_train), y_train).item()
            log(f"step {i + 1}: training loss {full:.4f}")
    return {k: p.detach().clone() for k, p in model.named_parameters()}, times, comm


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--out", help="save this process's final parameters here")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds any collective may wait for the other processes")
    args = parser.parse_args(argv)
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.timeout))
    try:
        with ft.process_axis("ranks") as axis:
            rank0 = axis.rank == 0
            params, times, comm = train(args.steps, args.global_batch, args.seed, args.lr,
                                        log=print if rank0 else None, axis=axis)
        if args.out:
            torch.save(params, args.out)
        if rank0:
            steady = times[1:] or times
            per_step = sum(steady) / len(steady)
            share = sum(comm[1:] or comm) / sum(steady)
            print(f"{axis.size} process(es), global batch {args.global_batch}: "
                  f"{per_step * 1e3:.2f} ms per step, {100 * share:.0f}% of it in communication")
    finally:
        if distributed:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
