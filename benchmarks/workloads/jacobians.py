"""jacrev, jacfwd and hessian of an MLP with respect to its input, at several widths.

The function is ``x -> Linear -> tanh -> Linear -> tanh -> Linear`` from R^w to R^w (hessian:
of the scalar ``sum(f(x)**2)``). Peers: torch.func, ``torch.autograd.functional`` with
``vectorize=False`` (one backward pass per row, the loop) and ``vectorize=True``, and JAX.
"""
import torch
import torch.autograd.functional as taf
import torch.func as tf
from torch import nn

from . import models
from .harness import (
    CAPTURED, COMPILED, OURS, TF_COMPILED, Table, add_row, compiled_builders, ft_api, peer,
)

LOOP = "autograd.functional vectorize=False"
VECTORIZED = "autograd.functional vectorize=True"
IMPLS = [OURS, CAPTURED, COMPILED, "torch.func", TF_COMPILED, LOOP, VECTORIZED, "JAX jit",
         "JAX no jit"]


def function(width):
    model = models.mlp((width,) * 4, act=nn.Tanh, log_softmax=False).requires_grad_(False)
    x = torch.randn(width, generator=torch.Generator().manual_seed(3))
    return model, x


def _scalar(model):
    return lambda x: model(x).pow(2).sum()


# transform -> (functransforms/torch.func/jax attribute, torch.autograd.functional call)
TRANSFORMS = {
    "jacrev": ("jacrev", lambda model, x, vec: taf.jacobian(model, x, vectorize=vec)),
    "jacfwd": ("jacfwd", lambda model, x, vec: taf.jacobian(
        model, x, vectorize=vec, strategy="forward-mode" if vec else "reverse-mode")),
    "hessian": ("hessian", lambda model, x, vec: taf.hessian(_scalar(model), x, vectorize=vec)),
}


def builders(transform, width, chunk_size=None):
    name, autograd_functional = TRANSFORMS[transform]
    model, x = function(width)
    target = _scalar(model) if transform == "hessian" else model
    chunk = {} if chunk_size is None else {"chunk_size": chunk_size}

    def ours():
        fn = ft_api(name)(target, **chunk)
        return lambda: fn(x)

    def theirs():
        fn = getattr(tf, name)(target, **chunk)
        return lambda: fn(x)

    def jax(jit):
        def make():
            jx = peer("jax")
            params = models.jax_params(model)
            if transform == "hessian":
                def target_jax(xj):
                    return (models.jax_forward(model, params, xj) ** 2).sum()
            else:
                def target_jax(xj):
                    return models.jax_forward(model, params, xj)
            fn = getattr(jx, name)(target_jax)
            fn = jx.jit(fn) if jit else fn
            xj = jx.numpy.asarray(x.numpy())
            return lambda: models.block(fn(xj))
        return make

    return {
        OURS: ours,
        **compiled_builders(lambda: ft_api(name)(target, **chunk),
                            lambda: getattr(tf, name)(target, **chunk), (x,)),
        "torch.func": theirs,
        LOOP: lambda: lambda: autograd_functional(model, x, False),
        VECTORIZED: lambda: lambda: autograd_functional(model, x, True),
        "JAX jit": jax(True),
        "JAX no jit": jax(False),
    }


def run(settings):
    widths = [8] if settings.quick else [16, 64, 256]
    tables = []
    for transform in TRANSFORMS:
        table = Table(
            key=transform,
            title=f"{transform} of a 3-layer tanh MLP R^w -> R^w w.r.t. its input"
            + (" (hessian of sum(f(x)^2))" if transform == "hessian" else ""),
            config_label="width w", impls=IMPLS, loop=LOOP,
        )
        if transform == "jacfwd":
            table.notes.append(
                "autograd.functional vectorize=True uses strategy='forward-mode' here; "
                "forward mode needs vectorize=True, so the vectorize=False column is the "
                "reverse-mode row loop."
            )
        for width in widths:
            add_row(table, width, builders(transform, width), settings)
        tables.append(table)
    return tables
