"""Pointwise ops: every op tagged ``torch.Tag.pointwise`` is batched by broadcasting.

Batched values are padded with size-1 dims after the batch dim up to the highest logical
rank among the tensor arguments, so they broadcast against unbatched arguments exactly as
the per-example tensors would.
"""
import torch

from ..registry import elementwise, logical_rank, pad_to_rank, register_rule

aten = torch.ops.aten


@elementwise
def pointwise_rule(interp, func, args, bdims, kwargs):
    rank = 0
    lowest_batched_rank = None
    tensors = 0
    for a, d in zip(args, bdims):
        if isinstance(a, torch.Tensor):
            tensors += 1
            if d is None:
                r = a.dim()
            else:
                r = a.dim() - 1
                if lowest_batched_rank is None or r < lowest_batched_rank:
                    lowest_batched_rank = r
            if r > rank:
                rank = r
    if lowest_batched_rank == rank and (rank > 0 or tensors == 1):
        # Every batched value already has the full logical rank: plain broadcasting works.
        return func._op(*args, **kwargs), 0
    if lowest_batched_rank == 0:
        args = _keep_scalar_promotion(args, bdims)
    padded = [pad_to_rank(a, d, rank) if d is not None else a for a, d in zip(args, bdims)]
    return func._op(*padded, **kwargs), 0


def _keep_scalar_promotion(args, bdims):
    """A batched 0-dim tensor becomes a 1-dim value, which would win type promotion against
    dimensioned tensors of a lower category. Cast it to the dtype the per-example op uses."""
    tensors = [(i, a) for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    if len({a.dtype for _, a in tensors}) <= 1:
        return args
    promoted = None
    for i, a in tensors:
        shape = (1,) if logical_rank(a, bdims[i]) else ()
        stand_in = torch.empty(shape, dtype=a.dtype, device="meta")
        promoted = stand_in if promoted is None else torch.empty(
            max(promoted.shape, shape), dtype=torch.result_type(promoted, stand_in), device="meta"
        )
    args = list(args)
    for i, a in tensors:
        scalar = bdims[i] is not None and logical_rank(a, bdims[i]) == 0
        if scalar and a.dtype not in (promoted.dtype, torch.bool):
            args[i] = a.to(promoted.dtype)
    return args


def _register_pointwise_family():
    for name in dir(aten):
        packet = getattr(aten, name, None)
        if not isinstance(packet, torch._ops.OpOverloadPacket):
            continue
        for overload_name in packet.overloads():
            op = getattr(packet, overload_name)
            if torch.Tag.pointwise in op.tags and torch.Tag.nondeterministic_seeded not in op.tags:
                register_rule(op, pointwise_rule)


_register_pointwise_family()
# Elementwise but not tagged pointwise; their decompositions fill an output shaped after
# one argument, which cannot hold a batch when only the other one is batched.
for _op in (aten.complex.default, aten.polar.default):
    register_rule(_op, pointwise_rule)
