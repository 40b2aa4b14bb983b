"""Collectives over named axes (NOTE [Named axes] in core/collectives.py).

The level whose axis the op names reduces over its batch dim, and the result is the same
for every example: unbatched. Any other level treats the op like an elementwise one: its
batch dim rides along in front (all_gather's logical dim shifts by one for it).
"""
import torch

from ...core.collectives import OPS
from ..registry import batch_rule


def _owns(interp, axis_id):
    return interp.axis is not None and interp.axis.id == axis_id


@batch_rule(OPS["psum"])
def psum(interp, func, args, bdims, kwargs):
    x, axis_id = args
    if _owns(interp, axis_id):
        return x.sum(0), None
    return func(x, axis_id), 0


def _extremum(reduce):
    def rule(interp, func, args, bdims, kwargs):
        x, axis_id = args
        if _owns(interp, axis_id):
            return reduce(x, 0), None
        return func(x, axis_id), 0

    return rule


batch_rule(OPS["pmax"])(_extremum(torch.amax))
batch_rule(OPS["pmin"])(_extremum(torch.amin))


@batch_rule(OPS["all_gather"])
def all_gather(interp, func, args, bdims, kwargs):
    x, axis_id, dim, tiled = args
    if _owns(interp, axis_id):
        # A fresh tensor: the op is not a view, and its result must not alias its input.
        x = x.movedim(0, dim).clone(memory_format=torch.contiguous_format)
        if tiled:
            x = x.flatten(dim, dim + 1)
        return x, None
    return func(x, axis_id, dim + 1, tiled), 0
