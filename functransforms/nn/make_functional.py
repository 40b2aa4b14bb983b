"""functorch-era make_functional / make_functional_with_buffers.

The returned ``fmodel`` is a copy of the model whose own parameters and buffers live on the
``'meta'`` device (they hold no memory and can never be used by accident); every call
swaps the tensors it is given in by name, runs the copy, and swaps the meta ones back.
"""
import copy

import torch
from torch import nn
from torch.nn.utils._named_member_accessor import NamedMemberAccessor
from torch.nn.utils.stateless import _reparametrize_module


def _tied_groups(named):
    """Unique tensors in first-seen order, each with every name it is reachable under."""
    groups = {}
    for name, t in named:
        groups.setdefault(id(t), (t, []))[1].append(name)
    return [(t, tuple(names)) for t, names in groups.values()]


def _strip_to_meta(model, groups, make_meta):
    accessor = NamedMemberAccessor(model)
    for t, names in groups:
        meta = make_meta(t)
        for name in names:
            accessor.set_tensor(name, meta)


def _meta_param(p):
    return nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)


def _meta_buffer(b):
    return torch.empty_like(b, device="meta")


class FunctionalModuleWithBuffers(nn.Module):
    """``fmodel(params, buffers, *args, **kwargs)``: the model run with the given state."""

    def __init__(self, stateless_model, param_names, buffer_names):
        super().__init__()
        self.stateless_model = stateless_model
        self.param_names = param_names
        self.buffer_names = buffer_names

    def forward(self, params, buffers, *args, **kwargs):
        state = _by_name(self.param_names, params, "params")
        state.update(_by_name(self.buffer_names, buffers, "buffers"))
        with _reparametrize_module(self.stateless_model, state):
            return self.stateless_model(*args, **kwargs)


class FunctionalModule(nn.Module):
    """``fmodel(params, *args, **kwargs)``: the model (which has no buffers) run with ``params``."""

    def __init__(self, stateless_model, param_names):
        super().__init__()
        self.stateless_model = stateless_model
        self.param_names = param_names

    def forward(self, params, *args, **kwargs):
        state = _by_name(self.param_names, params, "params")
        with _reparametrize_module(self.stateless_model, state):
            return self.stateless_model(*args, **kwargs)


def _by_name(name_groups, tensors, what):
    tensors = tuple(tensors)
    if len(tensors) != len(name_groups):
        raise RuntimeError(
            f"fmodel: expected {len(name_groups)} tensors in {what} (one per distinct tensor of "
            f"the model, in the order make_functional returned them), got {len(tensors)}."
        )
    return {name: t for names, t in zip(name_groups, tensors) for name in names}


def _detached_copy(model, disable_autograd_tracking):
    model_copy = copy.deepcopy(model)
    params = _tied_groups(model_copy.named_parameters(remove_duplicate=False))
    buffers = _tied_groups(model_copy.named_buffers(remove_duplicate=False))
    param_values = tuple(p for p, _ in params)
    if disable_autograd_tracking:
        for p in param_values:
            p.requires_grad_(False)
    _strip_to_meta(model_copy, params, _meta_param)
    _strip_to_meta(model_copy, buffers, _meta_buffer)
    return model_copy, params, buffers, param_values


def make_functional(model, disable_autograd_tracking=False):
    """``(fmodel, params)``: a stateless ``fmodel(params, *args)`` and a copy of the parameters.

    ``model`` must have no buffers (use :func:`make_functional_with_buffers`). Parameters
    shared between submodules appear once in ``params``. With
    ``disable_autograd_tracking=True`` the returned params do not require grad, which
    saves torch autograd's bookkeeping when only functransforms' grad is used.
    """
    if any(True for _ in model.buffers()):
        raise RuntimeError(
            "make_functional(model): the model has buffers. Use "
            "make_functional_with_buffers(model) instead."
        )
    stateless, params, _, param_values = _detached_copy(model, disable_autograd_tracking)
    return FunctionalModule(stateless, tuple(n for _, n in params)), param_values


def make_functional_with_buffers(model, disable_autograd_tracking=False):
    """``(fmodel, params, buffers)``, ``fmodel(params, buffers, *args)``; as make_functional."""
    stateless, params, buffers, param_values = _detached_copy(model, disable_autograd_tracking)
    fmodel = FunctionalModuleWithBuffers(
        stateless, tuple(n for _, n in params), tuple(n for _, n in buffers)
    )
    return fmodel, param_values, tuple(b for b, _ in buffers)
