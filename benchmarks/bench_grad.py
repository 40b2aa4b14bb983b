"""grad overhead against torch.func, in one process, interleaved.

    python benchmarks/bench_grad.py [--rounds N]

Each case is timed as batches of calls; functransforms and torch.func batches alternate so that
both see the same machine load. Reports the median time per call after a warm-up.
"""
import argparse
import statistics
import time

import torch
import torch.func

import functransforms as ft


def tiny(m):
    x = torch.randn(4)
    f = m.grad(lambda x: (x.sin() * x.exp()).sum())
    return lambda: f(x)


def mlp(m):
    # 1024 -> 512 -> 512 -> 256 -> 10: about 0.92M parameters, batch of 64.
    gen = torch.Generator().manual_seed(0)
    sizes = [1024, 512, 512, 256, 10]
    params = {
        f"w{i}": torch.randn(o, i_, generator=gen) / i_**0.5 for i, (i_, o) in enumerate(zip(sizes, sizes[1:]))
    }
    params.update({f"b{i}": torch.zeros(o) for i, o in enumerate(sizes[1:])})
    x = torch.randn(64, sizes[0], generator=gen)
    target = torch.randint(0, sizes[-1], (64,), generator=gen)

    def loss(p, x, target):
        h = x
        for i in range(len(sizes) - 1):
            h = torch.nn.functional.linear(h, p[f"w{i}"], p[f"b{i}"])
            if i < len(sizes) - 2:
                h = h.relu()
        return torch.nn.functional.cross_entropy(h, target)

    g = m.grad(loss)
    return lambda: g(params, x, target)


def matmul_chain(m):
    gen = torch.Generator().manual_seed(0)
    ws = [torch.randn(2048, 2048, generator=gen) / 2048**0.5 for _ in range(3)]

    def f(x):
        for w in ws:
            x = (x @ w).tanh()
        return x.sum()

    g = m.grad(f)
    x = torch.randn(2048, 2048, generator=gen)
    return lambda: g(x)


CHAIN = 20


def chain(m, n_ops):
    x = torch.randn(4, 8)

    def f(x):
        for _ in range(n_ops):
            x = x.sin()
        return x.sum()

    g = m.grad(f)
    return lambda: g(x)


def plain_autograd_tiny():
    x = torch.randn(4)

    def run():
        xr = x.detach().requires_grad_()
        return torch.autograd.grad((xr.sin() * xr.exp()).sum(), xr)

    return run


def measure(make_fns, rounds, calls):
    """Median seconds per call of each function; one batch of ``calls`` per function per round."""
    fns = [make() for make in make_fns]
    for fn in fns:
        for _ in range(max(1, calls // 2)):
            fn()
    samples = [[] for _ in fns]
    for _ in range(rounds):
        for fn, s in zip(fns, samples):
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            s.append((time.perf_counter() - start) / calls)
    return [statistics.median(s) for s in samples]


def fmt(seconds):
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    return f"{seconds * 1e3:.2f} ms"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--matmul", action="store_true", help="add the (slow) 2048x2048 matmul chain")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    cases = [
        ("tiny: (x.sin()*x.exp()).sum(), 4 floats", lambda m: tiny(m), 200),
        ("MLP loss, 0.92M params, batch 64", lambda m: mlp(m), 5),
    ]
    if args.matmul:
        cases.append(("3 x (2048x2048 matmul + tanh)", lambda m: matmul_chain(m), 1))
    for name, make, calls in cases:
        rounds = args.rounds if calls > 1 else max(3, args.rounds // 3)
        t_ft, t_tf = measure([lambda: make(ft), lambda: make(torch.func)], rounds, calls)
        rows.append((name, t_ft, t_tf))
    (t_plain,) = measure([plain_autograd_tiny], args.rounds, 200)

    # Per-op cost: the slope between a 20-op chain and a 0-op chain (sum only), so the fixed
    # cost of entering the transform cancels out.
    t = measure(
        [lambda: chain(ft, CHAIN), lambda: chain(torch.func, CHAIN), lambda: chain(ft, 0), lambda: chain(torch.func, 0)],
        args.rounds,
        100,
    )
    per_op_ft, per_op_tf = (t[0] - t[2]) / CHAIN, (t[1] - t[3]) / CHAIN
    rows.append((f"{CHAIN}-op sin chain on 4x8 (whole call)", t[0], t[1]))
    rows.append(("per op, forward + backward (chain slope)", per_op_ft, per_op_tf))

    print(f"torch {torch.__version__}, 1 thread, median of {args.rounds} interleaved rounds\n")
    print("| case | functransforms | torch.func | ft / torch.func |")
    print("|---|---|---|---|")
    for name, a, b in rows:
        print(f"| {name} | {fmt(a)} | {fmt(b)} | {a / b:.2f}x |")
    print(f"\nplain torch.autograd.grad on the tiny case: {fmt(t_plain)}")


if __name__ == "__main__":
    main()
