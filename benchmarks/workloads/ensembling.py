"""Model ensembling: one vmapped forward over the stacked state of 10 MLPs, against a loop."""
import copy

import torch
import torch.func as tf

from .harness import (
    CAPTURED, COMPILED, OURS, TF_COMPILED, Table, add_row, compiled_builders, ft_api, peer,
)
from .models import block, jax_forward, mlp_ensemble

NUM_MODELS = 10
LOOP = "loop over models"
IMPLS = [OURS, CAPTURED, COMPILED, "torch.func", TF_COMPILED, LOOP, "JAX jit"]


def _program(vmap, stack_module_state, functional_call, models, data_dim):
    """The vmapped forward and its stacked parameters and buffers."""
    params, buffers = stack_module_state(models)
    params = {k: v.detach() for k, v in params.items()}
    base = copy.deepcopy(models[0]).to("meta")
    fn = vmap(lambda p, b, xi: functional_call(base, (p, b), (xi,)), in_dims=(0, 0, data_dim))
    return fn, params, buffers


def _ensemble(vmap, stack_module_state, functional_call, models, x, data_dim):
    fn, params, buffers = _program(vmap, stack_module_state, functional_call, models, data_dim)
    return torch.no_grad()(lambda: fn(params, buffers, x))


class _Ft:
    def __getattr__(self, name):
        return ft_api(name)


def builders(width, batch, data_dim):
    models = mlp_ensemble(NUM_MODELS, width)
    shape = (batch, 64) if data_dim is None else (NUM_MODELS, batch, 64)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    per_model = [x] * NUM_MODELS if data_dim is None else list(x)

    def ours():
        return _ensemble(ft_api("vmap"), ft_api("stack_module_state"),
                         ft_api("functional_call"), models, x, data_dim)

    def program(lib):
        return lambda: _program(lib.vmap, lib.stack_module_state, lib.functional_call, models,
                                data_dim)[0]

    _, params, buffers = _program(tf.vmap, tf.stack_module_state, tf.functional_call, models,
                                  data_dim)

    def jax_jit():
        jx = peer("jax")
        stacked = {k: jx.numpy.asarray(v.numpy()) for k, v in params.items()}
        fn = jx.jit(jx.vmap(lambda p, xi: jax_forward(models[0], p, xi),
                            in_axes=(0, data_dim)))
        xj = jx.numpy.asarray(x.numpy())
        return lambda: block(fn(stacked, xj))

    return {
        OURS: ours,
        **compiled_builders(program(_Ft()), program(tf), (params, buffers, x), no_grad=True),
        "torch.func": lambda: _ensemble(tf.vmap, tf.stack_module_state, tf.functional_call,
                                        models, x, data_dim),
        "JAX jit": jax_jit,
        LOOP: lambda: torch.no_grad()(
            lambda: torch.stack([m(xi) for m, xi in zip(models, per_model)])
        ),
    }


def run(settings):
    configs = [(32, 8)] if settings.quick else [(128, 64), (512, 64), (512, 512)]
    table = Table(
        key="ensembling",
        title=f"Ensemble of {NUM_MODELS} MLPs (64-width-width-10, ReLU), inference under no_grad",
        config_label="width, batch, minibatch", impls=IMPLS, loop=LOOP,
    )
    for width, batch in configs:
        for data_dim, label in ((None, "shared"), (0, "one per model")):
            add_row(table, f"{width}, {batch}, {label}", builders(width, batch, data_dim),
                    settings)
    return [table]
