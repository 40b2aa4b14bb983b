"""Per-op overhead of each transform on a chain of 20 tiny ops, against torch.func.

Both libraries run in one process, interleaved, and the median of many repetitions is
reported in microseconds per op, so machine load affects both sides alike.
"""
import argparse
import statistics
import time

import torch
import torch.func as tf

import functransforms as ft

CHAIN = 20


def chain(x):
    for _ in range(CHAIN // 2):
        x = x.sin()
        x = x * 1.5
    return x


def chain_sum(x):
    return chain(x).sum()


def workloads():
    x = torch.randn(8, 4)
    xs = torch.randn(4)
    return {
        "vmap": (ft.vmap(chain), tf.vmap(chain), chain, (x,)),
        "grad": (ft.grad(chain_sum), tf.grad(chain_sum),
                 lambda v: torch.autograd.grad(chain_sum(v.requires_grad_()), v), (xs,)),
        "vmap(grad)": (ft.vmap(ft.grad(chain_sum)), tf.vmap(tf.grad(chain_sum)), None, (x,)),
    }


def measure(fn, args, reps):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / CHAIN * 1e6


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    opts = parser.parse_args(argv)
    rows = []
    for name, (ours, theirs, eager, args) in workloads().items():
        for f in (ours, theirs):
            measure(f, args, 20)
        ours_t, theirs_t, eager_t = [], [], []
        for _ in range(opts.rounds):
            ours_t.append(measure(ours, args, opts.reps))
            theirs_t.append(measure(theirs, args, opts.reps))
            if eager is not None:
                eager_t.append(measure(eager, tuple(a.clone() for a in args), opts.reps))
        o, t = statistics.median(ours_t), statistics.median(theirs_t)
        e = statistics.median(eager_t) if eager_t else float("nan")
        rows.append((name, o, t, e))
    print("| transform | functransforms µs/op | torch.func µs/op | eager µs/op | ratio ft/torch.func |")
    print("|---|---|---|---|---|")
    for name, o, t, e in rows:
        print(f"| {name} | {o:.2f} | {t:.2f} | {e:.2f} | {o / t:.2f} |")
    return rows


if __name__ == "__main__":
    main()
