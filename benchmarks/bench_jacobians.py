"""Jacobians: peak memory of chunked jacrev, and jacrev/jacfwd speed against torch.func.

Memory: each configuration runs in a fresh subprocess that reports the growth of its peak
resident set size (``ru_maxrss``) across one Jacobian call, so earlier runs cannot hide a
later peak. torch's CPU allocator hands large blocks straight to the OS, so the growth
tracks the tensors alive at the worst moment.

Speed: both libraries run interleaved call by call in one process; medians.
Prints a markdown section; ``--out FILE`` also writes it there.
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
import warnings

import torch
import torch.func as tf

import functransforms as ft

warnings.filterwarnings("ignore", message=".*per-example loop.*")
# One thread: the machine is shared, and it keeps kernel time comparable between libraries.
torch.set_num_threads(1)


def layer(n, m, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g) / n ** 0.5
    return (lambda x: torch.tanh(w @ x)), torch.randn(n, generator=g)


def _peak_child(lib, n, m, chunk_size):
    f, x = layer(n, m)
    jacrev = ft.jacrev if lib == "ft" else tf.jacrev
    jac = jacrev(f, chunk_size=chunk_size)
    # A tiny warm-up loads kernels and fills caches without raising the peak.
    small_f, small_x = layer(4, 8)
    jacrev(small_f, chunk_size=chunk_size)(small_x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    out = jac(x)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    expected = torch.autograd.functional.jacobian(f, x)
    assert torch.allclose(out, expected, atol=1e-5), "wrong Jacobian"
    print(json.dumps({"peak_mib": (after - before) / 1024, "seconds": seconds}))


def peak_growth(lib, n, m, chunk_size):
    cmd = [sys.executable, __file__, "--child", lib, str(n), str(m), str(chunk_size)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def interleaved(fns, args, reps):
    """Median seconds per call; the calls alternate so load spikes hit every function alike."""
    for fn in fns.values():
        fn(*args)
    samples = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn(*args)
            samples[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


def have_jvp():
    try:
        import functransforms.api.forward  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--mem-n", type=int, default=128)
    parser.add_argument("--mem-m", type=int, default=4096)
    parser.add_argument("--out")
    parser.add_argument("--child", nargs=4)
    opts = parser.parse_args(argv)
    if opts.child:
        lib, n, m, chunk = opts.child
        return _peak_child(lib, int(n), int(m), None if chunk == "None" else int(chunk))

    lines = []
    n, m = opts.mem_n, opts.mem_m
    jac_mib = n * m * 4 / 2 ** 20
    lines += [
        f"### jacrev peak memory, tanh(W @ x): R^{n} -> R^{m} (Jacobian itself {jac_mib:.1f} MiB)",
        "",
        "| library | chunk_size | peak RSS growth MiB | seconds |",
        "|---|---|---|---|",
    ]
    for lib in ("ft", "torch.func"):
        for chunk in (None, 64, 1):
            r = peak_growth("ft" if lib == "ft" else "tf", n, m, chunk)
            name = "functransforms" if lib == "ft" else "torch.func"
            lines.append(f"| {name} | {chunk} | {r['peak_mib']:.1f} | {r['seconds']:.3f} |")

    lines += [
        "",
        "### Jacobian of tanh(W @ x), R^n -> R^m, milliseconds per call",
        "",
        "| (n, m) | ft.jacrev | tf.jacrev | ratio | ft.jacfwd | tf.jacfwd | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    jvp_ok = have_jvp()
    for n, m in ((16, 1024), (1024, 16)):
        f, x = layer(n, m)
        fns = {"ft_rev": ft.jacrev(f), "tf_rev": tf.jacrev(f), "tf_fwd": tf.jacfwd(f)}
        if jvp_ok:
            fns["ft_fwd"] = ft.jacfwd(f)
        t = {k: v * 1e3 for k, v in interleaved(fns, (x,), opts.reps).items()}
        fwd = (f"{t['ft_fwd']:.2f} | {t['tf_fwd']:.2f} | {t['ft_fwd'] / t['tf_fwd']:.2f}"
               if jvp_ok else f"n/a | {t['tf_fwd']:.2f} | n/a")
        lines.append(f"| ({n}, {m}) | {t['ft_rev']:.2f} | {t['tf_rev']:.2f} | "
                     f"{t['ft_rev'] / t['tf_rev']:.2f} | {fwd} |")
    text = "\n".join(lines)
    print(text)
    if opts.out:
        with open(opts.out, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
