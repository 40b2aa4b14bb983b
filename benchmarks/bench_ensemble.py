"""Ensembling 10 MLPs: vmap(functional_call) over stacked state, against torch.func and a loop.

All three run interleaved call by call in one process (medians), for both in_dims
cases: one minibatch shared by every model (0, 0, None) and one minibatch per model
(0, 0, 0). Prints a markdown section; ``--out FILE`` also writes it there.
"""
import argparse
import copy
import statistics
import time
import warnings

import torch
import torch.func as tf
from torch import nn

import functransforms as ft

warnings.filterwarnings("ignore", message=".*per-example loop.*")
# One thread: the machine is shared, and it keeps kernel time comparable between libraries.
torch.set_num_threads(1)


def make_models(num_models, width):
    torch.manual_seed(0)
    return [
        nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                      nn.Linear(width, 10))
        for _ in range(num_models)
    ]


def interleaved(fns, reps):
    """Median seconds per call; the calls alternate so load spikes hit every function alike."""
    samples = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", type=int, default=10)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--reps", type=int, default=60)
    parser.add_argument("--out")
    opts = parser.parse_args(argv)

    models = make_models(opts.models, opts.width)
    params, buffers = ft.stack_module_state(models)
    params = {k: v.detach() for k, v in params.items()}
    base = copy.deepcopy(models[0]).to("meta")
    lines = [
        f"### Ensemble of {opts.models} MLPs (64-{opts.width}-{opts.width}-10), batch "
        f"{opts.batch}, milliseconds per forward",
        "",
        "| in_dims | functransforms | torch.func | loop over models | ft/torch.func | ft/loop |",
        "|---|---|---|---|---|---|",
    ]
    for data_dim in (None, 0):
        if data_dim is None:
            x = torch.randn(opts.batch, 64)
            per_model = [x] * opts.models
        else:
            x = torch.randn(opts.models, opts.batch, 64)
            per_model = list(x)
        in_dims = (0, 0, data_dim)
        ours = ft.vmap(lambda p, b, x: ft.functional_call(base, (p, b), (x,)), in_dims)
        theirs = tf.vmap(lambda p, b, x: tf.functional_call(base, (p, b), (x,)), in_dims)

        with torch.no_grad():
            fns = {
                "ft": lambda: ours(params, buffers, x),
                "tf": lambda: theirs(params, buffers, x),
                "loop": lambda: torch.stack([m(xi) for m, xi in zip(models, per_model)]),
            }
            torch.testing.assert_close(fns["ft"](), fns["loop"](), atol=1e-5, rtol=1e-4)
            for fn in fns.values():
                fn()
            t = {k: v * 1e3 for k, v in interleaved(fns, opts.reps).items()}
        lines.append(
            f"| {in_dims} | {t['ft']:.3f} | {t['tf']:.3f} | {t['loop']:.3f} | "
            f"{t['ft'] / t['tf']:.2f} | {t['ft'] / t['loop']:.2f} |"
        )
    text = "\n".join(lines)
    print(text)
    if opts.out:
        with open(opts.out, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
