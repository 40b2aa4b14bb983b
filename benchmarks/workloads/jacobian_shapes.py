"""Which Jacobian transform fits which shape, and what chunk_size=1 saves.

Speed: ``tanh(W @ x)`` from R^n to R^m (models.tanh_layer) at a tall (16, 1024)
and a wide (1024, 16) shape. jacrev costs one VJP per output and jacfwd one JVP per
input, both batched by vmap, so jacfwd should win the tall shape and jacrev the wide one.
The loop is ``torch.autograd.functional.jacobian(vectorize=False)``: one backward pass per
output row.

Memory: jacrev of the same function with a large output, unchunked against
``chunk_size=1``, measured as in workloads/memory.py (peak RSS growth of one call in a fresh
subprocess). Unchunked, the vmapped backward pass holds an m x m batch of cotangents and
gradients; one row at a time holds the Jacobian and one backward pass.
"""
import torch.autograd.functional as taf
import torch.func as tf

from . import memory
from .harness import ORACLE, OURS, Table, add_row, ft_api
from .models import tanh_layer

LOOP = "autograd.functional vectorize=False"
IMPLS = [OURS, ORACLE, LOOP]


def builders(transform, n, m, chunk_size=None):
    f, x = tanh_layer(n, m)
    chunk = {} if chunk_size is None else {"chunk_size": chunk_size}

    def bind(get):
        def make():
            jac = get(transform)(f, **chunk)
            return lambda: jac(x)
        return make

    return {OURS: bind(ft_api), ORACLE: bind(lambda name: getattr(tf, name)),
            LOOP: lambda: lambda: taf.jacobian(f, x, vectorize=False)}


def memory_builders(spec):
    """The hook workloads/memory.py's subprocess calls for specs of this family."""
    return builders("jacrev", spec["n"], spec["m"], spec["chunk_size"])


def run(settings):
    shapes = [(4, 32), (32, 4)] if settings.quick else [(16, 1024), (1024, 16)]
    speed = Table(
        key="jacobian_shapes",
        title="jacrev and jacfwd of a tanh layer R^n -> R^m (tanh(W @ x)), tall and wide",
        config_label="transform, (n, m)", impls=IMPLS, loop=LOOP,
    )
    for n, m in shapes:
        for transform in ("jacrev", "jacfwd"):
            add_row(speed, f"{transform}, ({n}, {m})", builders(transform, n, m), settings)
    speed.notes.append(
        f"{LOOP} is the same in the jacrev and jacfwd rows of a shape: m backward passes.")

    n, m = (8, 64) if settings.quick else (128, 4096)
    impls = [OURS] if settings.quick else [OURS, ORACLE]
    mem = Table(
        key="memory_jacrev_chunk1",
        title=f"Peak memory: jacrev of a tanh layer R^{n} -> R^{m} "
              f"(tanh(W @ x); the Jacobian itself is {n * m * 4 / 2 ** 20:.1f} MiB)",
        config_label="chunk_size", impls=impls, unit="MiB", scale=1.0,
    )
    configs = {
        str(chunk_size): {impl: {"family": "jacobian_shapes", "n": n, "m": m,
                                 "chunk_size": chunk_size} for impl in impls}
        for chunk_size in (None, 1)
    }
    memory.measure_rows(settings, [(mem, configs)])
    mem.notes.append(
        "Peak RSS growth during one call, result included, in a fresh subprocess per "
        "measurement (quick mode: one for all); see NOTE in benchmarks/workloads/memory.py.")
    return [speed, mem]
