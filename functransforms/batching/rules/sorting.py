"""Sorting and order statistics: sort, topk, kthvalue, median, mode, cummax/cummin,
searchsorted and bucketize.

Each works along one ``dim`` of a single tensor, so the rule shifts ``dim`` past the batch
dim. A 0-dim example gets a size-1 dim to work along, removed again afterwards.
"""
import torch

from ..registry import batch_rule, ensure_batched, logical_rank, physical_dim
from .indexing import call_with, get_arg

aten = torch.ops.aten


def _drop_scalar_dim(out):
    if isinstance(out, torch.Tensor):
        return out.squeeze(1) if out.dim() == 2 and out.shape[1] == 1 else out
    return type(out)(_drop_scalar_dim(o) for o in out)


@batch_rule(aten.sort.default, aten.sort.stable, aten.topk.default, aten.kthvalue.default,
            aten.median.dim, aten.nanmedian.dim, aten.mode.default, aten.cummax.default,
            aten.cummin.default)
def along_dim_rule(interp, func, args, bdims, kwargs):
    x = args[0]
    rank = logical_rank(x, 0)
    if rank == 0:
        out = call_with(func, [x.unsqueeze(1)] + list(args[1:]), kwargs, dim=1)
        return _drop_scalar_dim(out), 0
    pdim = physical_dim(get_arg(func, args, kwargs, "dim"), rank)
    return call_with(func, args, kwargs, dim=pdim), 0


@batch_rule(aten.median.default, aten.nanmedian.default)
def full_median_rule(interp, func, args, bdims, kwargs):
    # Both overloads return the lower median, so reducing the flattened example agrees.
    dim_op = aten.median.dim if func is aten.median.default else aten.nanmedian.dim
    (x,) = args
    return dim_op(x.reshape(x.shape[0], -1), 1)[0], 0


@batch_rule(aten.searchsorted.Tensor)
def searchsorted_rule(interp, func, args, bdims, kwargs):
    seq, values = args
    batch_size = interp.batch_size
    sorter = kwargs.get("sorter")
    if logical_rank(seq, bdims[0]) == 1:
        if bdims[0] is None:
            return func(seq, values, **kwargs), 0
        # A batched 1-D sequence pairs row b of the boundaries with all values of example b.
        values = ensure_batched(values, bdims[1], batch_size)
        if sorter is not None:
            kwargs = dict(kwargs, sorter=sorter.expand(batch_size, -1))
        out = func(seq, values.reshape(batch_size, -1), **kwargs)
        return out.reshape(values.shape), 0
    seq = ensure_batched(seq, bdims[0], batch_size)
    values = ensure_batched(values, bdims[1], batch_size)
    if sorter is not None:
        kwargs = dict(kwargs, sorter=ensure_batched(sorter, None, batch_size))
    return func(seq, values, **kwargs), 0


@batch_rule(aten.searchsorted.Scalar)
def searchsorted_scalar_rule(interp, func, args, bdims, kwargs):
    seq, value = args
    values = torch.full((seq.shape[0], 1), value, dtype=seq.dtype, device=seq.device)
    kwargs = dict(kwargs)
    sorter = kwargs.get("sorter")
    if sorter is not None:
        kwargs["sorter"] = sorter.expand(seq.shape[0], -1)
    return aten.searchsorted.Tensor(seq, values, **kwargs).squeeze(1), 0


@batch_rule(aten.bucketize.Tensor)
def bucketize_rule(interp, func, args, bdims, kwargs):
    values, boundaries = args
    right = get_arg(func, args, kwargs, "right")
    out_int32 = get_arg(func, args, kwargs, "out_int32")
    # bucketize is searchsorted with the arguments swapped and 1-D boundaries.
    out, _ = searchsorted_rule(
        interp, aten.searchsorted.Tensor, (boundaries, values), (bdims[1], bdims[0]),
        {"right": right, "out_int32": out_int32})
    return out, 0
