"""Autograd of the collectives over named axes (NOTE [Named axes] in core/collectives.py).

The transposes are JAX's for SPMD code: every position along the axis runs the same program
and its cotangents are summed over the axis, so the backward of psum is a psum (the
all-reduce rule of data parallelism), and the backward of all_gather hands each position
the sum of the cotangents of its own slice.

The ops get an Autograd kernel of our own rather than torch's ``register_autograd``: that
one runs the forward inside an autograd.Function, under no_grad, so the levels below a grad
level would not record the collective and a second derivative would miss its path. Here
the forward goes one level down under the level's own grad mode, as every op a grad level
lowers does (NOTE [Lowering]).
"""
import torch

from ..core.collectives import OPS, axis_by_id
from ..core.wrapper import LevelTensor
from .interpreter import GradTensor

_psum = OPS["psum"]
_pmax, _pmin, _all_gather = OPS["pmax"], OPS["pmin"], OPS["all_gather"]


def _extremum_backward(ctx, ct):
    x, out = ctx.saved_tensors
    mask = (x == out).to(ct.dtype)
    axis_id = ctx.axis.id
    return mask * (_psum(ct, axis_id) / _psum(mask, axis_id))


def _all_gather_backward(ctx, ct):
    axis = ctx.axis
    dim, tiled = ctx.args[1], ctx.args[2]
    if tiled:
        ct = ct.unflatten(dim, (axis.size, -1))
    if axis.kind == "vmap" and not axis.alive:
        # torch autograd outside the vmap, for a value every example shared: the plain
        # derivative of stacking copies.
        return ct.sum(dim)
    summed = _psum(ct, axis.id)
    return summed.index_select(dim, axis.index().reshape(1)).squeeze(dim)


_BACKWARD = {
    id(_psum): lambda ctx, ct: _psum(ct, ctx.axis.id),
    id(_pmax): _extremum_backward,
    id(_pmin): _extremum_backward,
    id(_all_gather): _all_gather_backward,
}


class _Collective(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, op, *args):
        ctx.op, ctx.args = op, args
        # Kept on the node: the backward reaches this axis even if its name is rebound.
        ctx.axis = axis_by_id(args[0])
        if isinstance(x, GradTensor) and x._level.alive:
            level = x._level
            with level.lower():
                out = GradTensor(op(x._value, *args), level)
        else:
            out = op(x, *args)  # plain torch autograd: nothing below records
        if op is _pmax or op is _pmin:
            ctx.save_for_backward(x, out)
        return out

    @staticmethod
    def backward(ctx, ct):
        return (_BACKWARD[id(ctx.op)](ctx, ct), None) + (None,) * len(ctx.args)


def _apply(*args):
    # torch's own apply: the package face patches Function.apply for user Functions.
    return super(torch.autograd.Function, _Collective).apply(*args)


def _recorded_here(x):
    # A vmap or jvp wrapper may carry a grad_fn: torch autograd records ops on it when one
    # argument is a tracked lower-level tensor. That graph is never used (the lower level
    # records the lowered op on the values), so only grad levels and plain autograd count.
    return type(x) is GradTensor or not isinstance(x, LevelTensor) or not x._level.alive


def _autograd_kernel(op):
    below = torch._C._after_autograd_keyset

    def kernel(keyset, x, *args):
        if x.requires_grad and torch.is_grad_enabled() and _recorded_here(x):
            return _apply(x, op, *args)
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & below, x, *args)

    return kernel


_lib = torch.library.Library("functransforms", "IMPL")
for _name, _op in OPS.items():
    _lib.impl(_name, _autograd_kernel(_op), "Autograd", with_keyset=True)
