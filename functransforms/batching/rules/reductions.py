"""Reductions and scans: reduce over the logical dims, never the batch dim.

Three shapes of signature cover them: a dim list (``sum.dim_IntList``, ``amax``, ``std``...)
where None or [] means every dim; a single dim (``max.dim``, ``cumsum``...); and the full
reductions without a dim (``sum.default``...), which are served by their dim-list or
single-dim siblings over all logical dims.
"""
import torch

from ..registry import batch_rule, physical_dim, register_rule
from .views import arg_positions, dims_rule, drop_scalar_dim, with_defaults

aten = torch.ops.aten


def dim_list_rule(empty_means_all=True):
    def rule(interp, func, args, bdims, kwargs):
        (pos,) = arg_positions(func, ("dim",))
        args = with_defaults(func, args, pos)
        x = args[0]
        rank = x.dim() - 1
        dims = args[pos]
        if isinstance(dims, int):
            dims = [dims]
        if dims is not None and not dims and not empty_means_all:
            return func(*args, **kwargs), 0
        if rank == 0:
            # Every dim of a 0-dim example is "dim 0": reduce a size-1 stand-in.
            args[0], args[pos] = x.unsqueeze(1), [1]
            return drop_scalar_dim(func(*args, **kwargs)), 0
        if dims is None or not dims:
            args[pos] = list(range(1, rank + 1))
        else:
            args[pos] = [physical_dim(d, rank) for d in dims]
        return func(*args, **kwargs), 0

    return rule


for _op in (aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.amin.default,
            aten.std.correction, aten.var.correction, aten.std_mean.correction,
            aten.var_mean.correction, aten.linalg_vector_norm.default, aten.logsumexp.default,
            aten.count_nonzero.dim_IntList, aten.nansum.default):
    register_rule(_op, dim_list_rule())
# any/all over an empty dim list reduce nothing.
for _op in (aten.any.dims, aten.all.dims):
    register_rule(_op, dim_list_rule(empty_means_all=False))

# median/nanmedian/cummax/cummin live with the sorting ops (sorting.py).
for _op in (aten.prod.dim_int, aten.max.dim, aten.min.dim, aten.any.dim, aten.all.dim,
            aten.cumsum.default, aten.cumprod.default, aten.logcumsumexp.default):
    register_rule(_op, dims_rule(dims=("dim",), scalar_ok=True))


def _full(reduce):
    """A full reduction as ``reduce(physical, dims)`` over every logical dim of each example."""

    def rule(interp, func, args, bdims, kwargs):
        x = args[0]
        dims = list(range(1, x.dim())) if x.dim() > 1 else [1]
        if x.dim() == 1:
            x = x.unsqueeze(1)
        return reduce(x, dims, kwargs), 0

    return rule


def _flat(reduce):
    """For reductions that take one dim: flatten each example first (a copy if it must)."""
    return lambda x, dims, kwargs: reduce(x.reshape(x.shape[0], -1), 1, kwargs)


_FULL = {
    aten.sum.default: lambda x, dims, kw: aten.sum.dim_IntList(x, dims, **kw),
    aten.mean.default: lambda x, dims, kw: aten.mean.dim(x, dims, **kw),
    aten.max.default: lambda x, dims, kw: aten.amax.default(x, dims),
    aten.min.default: lambda x, dims, kw: aten.amin.default(x, dims),
    aten.any.default: lambda x, dims, kw: aten.any.dims(x, dims),
    aten.all.default: lambda x, dims, kw: aten.all.dims(x, dims),
    aten.prod.default: _flat(lambda x, dim, kw: aten.prod.dim_int(x, dim, **kw)),
}
for _op, _reduce in _FULL.items():
    register_rule(_op, _full(_reduce))


@batch_rule(aten.argmax.default, aten.argmin.default, aten.count_nonzero.default)
def optional_dim(interp, func, args, bdims, kwargs):
    """dim=None reduces the flattened example; keepdim then keeps every dim as size 1."""
    args = with_defaults(func, args, 1)
    x, dim = args[0], args[1]
    if dim is not None:
        return _single_dim(interp, func, args, bdims, kwargs)
    rank = x.dim() - 1
    out = func(x.reshape(x.shape[0], -1), 1, *args[2:], **kwargs)
    if len(args) > 2 and args[2]:
        out = out.reshape(x.shape[0], *([1] * rank))
    return out, 0


_single_dim = dims_rule(dims=("dim",), scalar_ok=True)


@batch_rule(aten.aminmax.default)
def aminmax(interp, func, args, bdims, kwargs):
    x = args[0]
    rank = x.dim() - 1
    dim = kwargs.get("dim")
    keepdim = kwargs.get("keepdim", False)
    if dim is None:
        outs = func(x.reshape(x.shape[0], -1), dim=1, keepdim=keepdim)
        if keepdim:
            outs = tuple(o.reshape(x.shape[0], *([1] * rank)) for o in outs)
        return outs, 0
    if rank == 0:
        return drop_scalar_dim(func(x.unsqueeze(1), dim=1, keepdim=keepdim)), 0
    return func(x, dim=physical_dim(dim, rank), keepdim=keepdim), 0


@batch_rule(torch.ops.prims.prod.default)
def prims_prod(interp, func, args, bdims, kwargs):
    # Decompositions at a jvp level above (cumprod's) emit prims.prod.
    x, dims = args[0], args[1]
    rank = x.dim() - 1
    if dims is None:
        dims = range(rank)
    dims = [physical_dim(d, rank) for d in dims] if rank else []
    return func(x, dims, *args[2:], **kwargs), 0


@batch_rule(aten._is_all_true.default, aten._is_any_true.default)
def is_all_or_any_true(interp, func, args, bdims, kwargs):
    # torch's checks (TORCH_CHECK_TENSOR_ALL) read the answer with .item(): as in torch.func,
    # it is one unbatched answer for the whole batch.
    return func(args[0]), None
