"""Autograd formulas of the collectives over named axes (NOTE [Named axes] in
core/collectives.py).

They are registered with torch autograd, which is a grad level's tape (NOTE [Reverse mode
rides on torch autograd]), so they serve grad levels and plain torch autograd alike. The
transposes are JAX's for SPMD code: every position along the axis runs the same program
and its cotangents are summed over the axis, so the backward of psum is a psum (the
all-reduce rule of data parallelism), and the backward of all_gather hands each position
the sum of the cotangents of its own slice.
"""
import torch

from ..core.collectives import OPS, axis_by_id

_psum = OPS["psum"]


def _keep_axis(ctx, inputs, output):
    # The backward must reach the same axis even if its name is rebound meanwhile.
    ctx.axis = axis_by_id(inputs[1])


def _psum_backward(ctx, ct):
    return _psum(ct, ctx.axis.id), None


def _extremum_setup(ctx, inputs, output):
    _keep_axis(ctx, inputs, output)
    ctx.save_for_backward(inputs[0], output)


def _extremum_backward(ctx, ct):
    x, out = ctx.saved_tensors
    mask = (x == out).to(ct.dtype)
    axis_id = ctx.axis.id
    return mask * (_psum(ct, axis_id) / _psum(mask, axis_id)), None


def _all_gather_setup(ctx, inputs, output):
    _keep_axis(ctx, inputs, output)
    ctx.dim, ctx.tiled = inputs[2], inputs[3]


def _all_gather_backward(ctx, ct):
    axis, dim = ctx.axis, ctx.dim
    if ctx.tiled:
        ct = ct.unflatten(dim, (axis.size, -1))
    if axis.kind == "vmap" and not axis.alive:
        # torch autograd outside the vmap, for a value every example shared: the plain
        # derivative of stacking copies.
        return ct.sum(dim), None, None, None
    summed = _psum(ct, axis.id)
    index = axis.index().reshape(1)
    return summed.index_select(dim, index).squeeze(dim), None, None, None


torch.library.register_autograd(OPS["psum"], _psum_backward, setup_context=_keep_axis)
for _op in (OPS["pmax"], OPS["pmin"]):
    torch.library.register_autograd(_op, _extremum_backward, setup_context=_extremum_setup)
torch.library.register_autograd(
    OPS["all_gather"], _all_gather_backward, setup_context=_all_gather_setup
)
