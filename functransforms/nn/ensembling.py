"""Stacking the state of several same-shaped modules, for vmap-ed ensembles."""
import torch

from .make_functional import make_functional_with_buffers


def _check_models(models, api):
    if len(models) == 0:
        raise RuntimeError(f"{api}: Expected at least one model, got 0.")
    if len({m.training for m in models}) != 1:
        raise RuntimeError(
            f"{api}: Expected all models to have the same training/eval mode (all training "
            f"or all eval)."
        )
    if len({type(m) for m in models}) != 1:
        raise RuntimeError(f"{api}: Expected all models to be of the same class.")


def _stack_leaf(tensors, name):
    flags = {t.requires_grad for t in tensors}
    if len(flags) != 1:
        raise RuntimeError(
            f"stack_module_state: Expected all models to have the same .requires_grad for each "
            f"parameter: '{name}' requires grad in some models and not in others."
        )
    stacked = torch.stack(tensors)
    # A fresh leaf: gradients w.r.t. the ensemble's state should land on the stacked
    # tensor, not flow back into the individual models.
    return stacked.detach().requires_grad_() if flags.pop() else stacked


def stack_module_state(models):
    """``(params, buffers)``: each model's tensors stacked on a new leading dim, by name.

    Pair with ``vmap(functional_call)`` over a model whose own tensors do not matter (for
    example a copy on the ``'meta'`` device) to run every model in one batched call.
    """
    _check_models(models, "stack_module_state")
    named_params = [dict(m.named_parameters()) for m in models]
    named_buffers = [dict(m.named_buffers()) for m in models]
    params = {k: _stack_leaf([p[k] for p in named_params], k) for k in named_params[0]}
    buffers = {k: _stack_leaf([b[k] for b in named_buffers], k) for k in named_buffers[0]}
    return params, buffers


def combine_state_for_ensemble(models):
    """functorch-era ensembling: ``(fmodel, params, buffers)`` with stacked, detached state.

    ``fmodel(params, buffers, x)`` runs one model; ``vmap(fmodel)`` runs them all.
    """
    _check_models(models, "combine_state_for_ensemble")
    functional = [make_functional_with_buffers(m) for m in models]
    params = tuple(torch.stack(ts).detach() for ts in zip(*(f[1] for f in functional)))
    buffers = tuple(torch.stack(ts).detach() for ts in zip(*(f[2] for f in functional)))
    return functional[0][0], params, buffers
