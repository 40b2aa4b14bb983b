"""Per-sample gradients of an MLP and a small CNN, against torch.func, a loop, Opacus and JAX.

Every implementation returns ``{parameter name: (batch, *parameter shape)}`` for the loss
``nll_loss(model(x_i), y_i)`` of each example on its own.
"""
import copy
import warnings

import torch
import torch.func as tf
import torch.nn.functional as F

from . import harness, models
from .harness import (
    CAPTURED, COMPILED, OURS, TF_COMPILED, Table, add_row, compiled_builders,
    ft_api, peer,
)

MODELS = {"MLP": models.mlp, "CNN": models.cnn}
INPUT_SHAPE = {"MLP": (784,), "CNN": (1, 28, 28)}
LOOP = "loop (autograd.grad per example)"
IMPLS = [OURS, CAPTURED, COMPILED, "torch.func", TF_COMPILED, LOOP, "Opacus", "JAX jit",
         "JAX no jit"]


def data(model_name, batch):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, *INPUT_SHAPE[model_name], generator=g)
    return x, torch.randint(0, 10, (batch,), generator=g)


def _psg_function(vmap, grad, functional_call, model):
    def loss(p, xi, yi):
        return F.nll_loss(functional_call(model, p, (xi[None],)), yi[None])

    return vmap(grad(loss), in_dims=(None, 0, 0))


def _vmap_grad(vmap, grad, functional_call, model, params, x, y):
    psg = _psg_function(vmap, grad, functional_call, model)
    return lambda: psg(params, x, y)


def builders(model_name, batch):
    """``implementation name -> () -> thunk`` for one configuration."""
    model = MODELS[model_name]()
    params = models.params_of(model)
    x, y = data(model_name, batch)

    def ours():
        return _vmap_grad(ft_api("vmap"), ft_api("grad"), ft_api("functional_call"),
                          model, params, x, y)

    def loop():
        names, leaves = zip(*model.named_parameters())

        def run():
            per_example = [
                torch.autograd.grad(F.nll_loss(model(x[i:i + 1]), y[i:i + 1]), leaves)
                for i in range(batch)
            ]
            return {n: torch.stack(g) for n, g in zip(names, zip(*per_example))}
        return run

    def opacus():
        gsm = peer("opacus").GradSampleModule(copy.deepcopy(model), loss_reduction="sum")
        named = list(gsm._module.named_parameters())
        warnings.filterwarnings("ignore", message="Full backward hook")

        def run():
            for _, p in named:
                p.grad_sample = p.grad = None
            F.nll_loss(gsm(x), y, reduction="sum").backward()
            return {n: p.grad_sample for n, p in named}
        return run

    def jax(jit):
        def make():
            jx = peer("jax")
            jparams = models.jax_params(model)
            jxs, jys = jx.numpy.asarray(x.numpy()), jx.numpy.asarray(y.numpy())

            def loss(p, xi, yi):
                return -models.jax_forward(model, p, xi[None])[0, yi]

            psg = jx.vmap(jx.grad(loss), in_axes=(None, 0, 0))
            psg = jx.jit(psg) if jit else psg
            return lambda: models.block(psg(jparams, jxs, jys))
        return make

    return {
        OURS: ours,
        **compiled_builders(
            lambda: _psg_function(ft_api("vmap"), ft_api("grad"), ft_api("functional_call"),
                                  model),
            lambda: _psg_function(tf.vmap, tf.grad, tf.functional_call, model),
            (params, x, y),
        ),
        "torch.func": lambda: _vmap_grad(tf.vmap, tf.grad, tf.functional_call,
                                         model, params, x, y),
        LOOP: loop,
        "Opacus": opacus,
        "JAX jit": jax(True),
        "JAX no jit": jax(False),
    }


def run(settings):
    batches = [4] if settings.quick else [16, 64, 256]
    tables = []
    for model_name in MODELS:
        table = Table(
            key=f"per_sample_grads_{model_name.lower()}",
            title=f"Per-sample gradients, {model_name} ({_describe(model_name)})",
            config_label="batch", impls=IMPLS, loop=LOOP,
        )
        table.notes.append(
            "JAX jit: `jax.jit(jax.vmap(jax.grad(loss)))`, compiled during warm-up; JAX no jit: "
            "the same without `jax.jit` (op-by-op dispatch). Opacus: `GradSampleModule` "
            "forward + backward of the summed loss, reading `p.grad_sample`."
        )
        table.notes.append(
            f"{CAPTURED}: `ft.capture(vmap(grad(loss)))`, which records the plain aten ops of the "
            "first call and replays them (NOTE [Capture and replay] in functransforms/api/"
            f"capture.py); {COMPILED}: `ft.capture(..., backend=\"{harness.COMPILE_BACKEND}\")`, the "
            f"recorded graph compiled (NOTE [Compiled capture]); {TF_COMPILED}: "
            f"`torch.compile(torch.func.vmap(torch.func.grad(loss)), backend=\"{harness.COMPILE_BACKEND}\")`. "
            f"{OURS}: the eager transform."
        )
        for batch in batches:
            add_row(table, batch, builders(model_name, batch), settings)
        tables.append(table)
    return tables


def _describe(model_name):
    model = MODELS[model_name]()
    n = sum(p.numel() for p in model.parameters())
    return " -> ".join(type(m).__name__ for m in model) + f"; {n:,} parameters"
