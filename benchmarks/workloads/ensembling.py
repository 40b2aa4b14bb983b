"""Model ensembling: one vmapped forward over the stacked state of 10 MLPs, against a loop."""
import copy

import torch
import torch.func as tf

from .harness import OURS, Table, add_row, ft_api
from .models import mlp_ensemble

NUM_MODELS = 10
LOOP = "loop over models"
IMPLS = [OURS, "torch.func", LOOP]


def _ensemble(vmap, stack_module_state, functional_call, models, x, data_dim):
    params, buffers = stack_module_state(models)
    params = {k: v.detach() for k, v in params.items()}
    base = copy.deepcopy(models[0]).to("meta")
    fn = vmap(lambda p, b, xi: functional_call(base, (p, b), (xi,)), in_dims=(0, 0, data_dim))
    return torch.no_grad()(lambda: fn(params, buffers, x))


def builders(width, batch, data_dim):
    models = mlp_ensemble(NUM_MODELS, width)
    shape = (batch, 64) if data_dim is None else (NUM_MODELS, batch, 64)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    per_model = [x] * NUM_MODELS if data_dim is None else list(x)

    def ours():
        return _ensemble(ft_api("vmap"), ft_api("stack_module_state"),
                         ft_api("functional_call"), models, x, data_dim)

    return {
        OURS: ours,
        "torch.func": lambda: _ensemble(tf.vmap, tf.stack_module_state, tf.functional_call,
                                        models, x, data_dim),
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
