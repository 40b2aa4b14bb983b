"""Indexing ops (advanced indexing, gather/scatter, index_* ops) and the ops vmap refuses.

NOTE [Batched advanced indexing]
``x[i0, :, i2]`` reaches us as ``aten.index(x, [i0, None, i2])``. PyTorch places the
broadcast shape of the index tensors where the first of them stood if they are adjacent,
and in front of everything otherwise. With the batch dim in front of ``x``:
  * only ``x`` batched: index ``[None, *indices]``; the batch dim stays in front when the
    indices are adjacent, and lands after the broadcast dims when they are not.
  * some index batched: the batch dim is indexed by ``arange(B)`` broadcast against the
    other indices, so example b only reads its own slice. To keep PyTorch's placement
    rule unchanged, the batch dim is moved just before the first index (adjacent case),
    or the arange goes first (non-adjacent case, where the result leads anyway).
index_put uses the same layout for the positions it writes, and lays ``values`` out the
way the indexed result is laid out.
"""
import torch

from ..interpreter import _NeedsFallback, inplace_into_unbatched_message
from ..registry import batch_rule, ensure_batched, logical_rank, pad_to_rank, physical_dim

aten = torch.ops.aten

_SCHEMA_CACHE = {}


def _schema_slots(func):
    slots = _SCHEMA_CACHE.get(func)
    if slots is None:
        slots = {
            a.name: (i, a.kwarg_only, a.default_value if a.has_default_value() else None)
            for i, a in enumerate(func._schema.arguments)
        }
        _SCHEMA_CACHE[func] = slots
    return slots


def get_arg(func, args, kwargs, name):
    """An op argument by schema name, whether passed positionally, by keyword or defaulted."""
    i, kwarg_only, default = _schema_slots(func)[name]
    if not kwarg_only and i < len(args):
        return args[i]
    return kwargs.get(name, default)


def call_with(func, args, kwargs, **changes):
    """Call ``func`` with some arguments (by schema name) replaced."""
    args = list(args)
    kwargs = dict(kwargs)
    slots = _schema_slots(func)
    for name, value in changes.items():
        i, kwarg_only, _ = slots[name]
        if kwarg_only or i >= len(args):
            kwargs[name] = value
        else:
            args[i] = value
    return func(*args, **kwargs)


def _arange_index(batch_size, rank, device):
    return torch.arange(batch_size, device=device).view(batch_size, *([1] * rank))


def _expand_masks(indices, bdims):
    """Unbatched boolean masks become the long indices they stand for; a batched one would
    select a different number of elements per example."""
    out_idx, out_bd = [], []
    for idx, d in zip(indices, bdims):
        if _is_mask(idx):
            if d is not None:
                raise RuntimeError(_DYNAMIC_SHAPE.format(op="index.Tensor (x[mask])"))
            if idx.dim() == 0:
                raise _NeedsFallback()
            cols = idx.nonzero().unbind(1)
            out_idx.extend(cols)
            out_bd.extend([None] * len(cols))
        else:
            out_idx.append(idx)
            out_bd.append(d)
    return out_idx, out_bd


class _IndexLayout:
    """Where the indices sit and how the batched call has to be shaped (see NOTE above)."""

    def __init__(self, indices, bdims):
        positions = [i for i, idx in enumerate(indices) if idx is not None]
        self.first = positions[0] if positions else 0
        self.adjacent = positions == list(range(self.first, self.first + len(positions)))
        self.rank = max(
            (logical_rank(idx, d) for idx, d in zip(indices, bdims) if idx is not None), default=0
        )
        self.any_batched = any(d is not None for d in bdims)

    def batched_indices(self, self_v, indices, bdims, batch_size):
        """(self value laid out for the call, index list, dim of the batch in the result)."""
        padded = [
            pad_to_rank(idx, d, self.rank) if d is not None else idx
            for idx, d in zip(indices, bdims)
        ]
        ar = _arange_index(batch_size, self.rank, self_v.device)
        if self.adjacent:
            p = self.first
            return self_v.movedim(0, p), [None] * p + [ar] + padded[p:], p
        return self_v, [ar] + padded, 0


@batch_rule(aten.index.Tensor)
def index_rule(interp, func, args, bdims, kwargs):
    self_v, indices = args
    idx_bdims = bdims[1] if isinstance(bdims[1], list) else [None] * len(indices)
    indices, idx_bdims = _expand_masks(list(indices), idx_bdims)
    layout = _IndexLayout(indices, idx_bdims)
    if not layout.any_batched:
        out = func(self_v, [None] + indices)
        if not layout.adjacent:
            out = out.movedim(layout.rank, 0)
        return out, 0
    batch_size = interp.batch_size
    self_v = ensure_batched(self_v, bdims[0], batch_size)
    self_v, call_indices, bdim = layout.batched_indices(self_v, indices, idx_bdims, batch_size)
    return func(self_v, call_indices).movedim(bdim, 0), 0


@batch_rule(aten.index_put.default, aten.index_put.hacked_twin, aten.index_put_.default,
            aten.index_put_.hacked_twin, aten._index_put_impl_.default,
            aten._index_put_impl.default)
def index_put_rule(interp, func, args, bdims, kwargs):
    self_v, indices, values = args[:3]
    rest = args[3:]
    idx_bdims = bdims[1] if isinstance(bdims[1], list) else [None] * len(indices)
    inplace = func._schema.name.endswith("_")
    if inplace and bdims[0] is None:
        raise RuntimeError(inplace_into_unbatched_message(func))
    if any(_is_mask(idx) and d is not None for idx, d in zip(indices, idx_bdims)):
        out = _put_through_batched_mask(interp, self_v, bdims[0], indices, values, bdims[2], rest)
        return (self_v.copy_(out) if inplace else out), 0
    indices, idx_bdims = _expand_masks(list(indices), idx_bdims)
    layout = _IndexLayout(indices, idx_bdims)
    if not layout.any_batched and bdims[2] is None and layout.adjacent:
        # Unbatched values broadcast against [B, <per-example result>] from the right.
        return func(self_v, [None] + indices, values, *rest, **kwargs), 0
    batch_size = interp.batch_size
    if bdims[0] is None:
        self_v = ensure_batched(self_v, None, batch_size)
    self_rank = logical_rank(self_v, 0)
    call_self, call_indices, bdim = layout.batched_indices(self_v, indices, idx_bdims, batch_size)
    result_rank = self_rank - sum(idx is not None for idx in indices) + layout.rank
    values = pad_to_rank(ensure_batched(values, bdims[2], batch_size), 0, result_rank)
    values = values.movedim(0, bdim)
    out = func(call_self, call_indices, values, *rest, **kwargs)
    return (self_v if inplace else out.movedim(bdim, 0)), 0


def _is_mask(idx):
    return idx is not None and idx.dtype in (torch.bool, torch.uint8)


def _put_through_batched_mask(interp, self_v, self_bdim, indices, values, values_bdim, rest):
    """``x[mask] = v`` with a batched mask and one value for all selected positions (the
    common ``x[x < 0] = 0``): a select per example, no data-dependent shape."""
    positions = [i for i, idx in enumerate(indices) if idx is not None]
    if len(positions) != 1 or logical_rank(values, values_bdim) != 0:
        raise _NeedsFallback()
    batch_size = interp.batch_size
    (p,) = positions
    mask = indices[p].bool()
    self_v = ensure_batched(self_v, self_bdim, batch_size)
    trailing = self_v.dim() - 1 - p - (mask.dim() - 1)
    mask = mask.reshape(batch_size, *([1] * p), *mask.shape[1:], *([1] * trailing))
    value = values.reshape(-1, *([1] * (self_v.dim() - 1))).to(self_v.dtype)
    accumulate = rest[0] if rest else False
    if accumulate:
        return torch.where(mask, self_v + value, self_v)
    return torch.where(mask, value, self_v)


# ---------------------------------------------------------------------------------------
# gather / scatter: every tensor argument has the rank of ``self``, so all of them get the
# batch dim and ``dim`` moves one to the right.


def _dim_shift_rule(tensor_names, shape_from):
    # torch treats a 0-dim self as 1-D of size 1; the result has the shape of ``shape_from``
    # (gather's index, scatter's self), 0-dim only when that argument is.
    def rule(interp, func, args, bdims, kwargs):
        batch_size = interp.batch_size
        args = list(args)
        scalar = logical_rank(args[0], bdims[0]) == 0
        i = _schema_slots(func)[shape_from][0]
        scalar_out = scalar and logical_rank(args[i], bdims[i]) == 0
        for i, (a, d) in enumerate(zip(args, bdims)):
            if isinstance(a, torch.Tensor) and func._schema.arguments[i].name in tensor_names:
                a = ensure_batched(a, d, batch_size)
                args[i] = a.unsqueeze(-1) if scalar and a.dim() == 1 else a
        dim = get_arg(func, args, kwargs, "dim")
        pdim = 1 if scalar else physical_dim(dim, logical_rank(args[0], 0))
        out = call_with(func, args, kwargs, dim=pdim)
        return (out.squeeze(-1) if scalar_out else out), 0

    return rule


batch_rule(aten.gather.default)(_dim_shift_rule({"self", "index"}, "index"))
batch_rule(aten.scatter.src, aten.scatter.value, aten.scatter.reduce, aten.scatter.value_reduce,
           aten.scatter_add.default, aten.scatter_reduce.two)(
    _dim_shift_rule({"self", "index", "src"}, "self"))


# ---------------------------------------------------------------------------------------
# index_select / index_add / index_copy / index_fill: a 1-D index along ``dim``. An
# unbatched index is used as is; a batched one is turned into one index into the batch
# and ``dim`` flattened together, offset by example.


def _flat_index(idx_v, size, batch_size):
    offsets = torch.arange(batch_size, device=idx_v.device).unsqueeze(1) * size
    return (idx_v.reshape(batch_size, -1) + offsets).reshape(-1)


def _flatten_dim(x, pdim, batch_size):
    x = x.movedim(pdim, 1)
    return x.reshape(batch_size * x.shape[1], *x.shape[2:])


def _unflatten_dim(x, pdim, batch_size):
    return x.reshape(batch_size, -1, *x.shape[1:]).movedim(1, pdim)


def _index_along_dim_rule(source_name):
    """``source_name``: the argument written along ``dim`` (source, value), if any."""

    def rule(interp, func, args, bdims, kwargs):
        batch_size = interp.batch_size
        args = list(args)
        names = [a.name for a in func._schema.arguments]
        index_pos = names.index("index")
        source_pos = names.index(source_name) if source_name else None
        has_source = (
            source_pos is not None and isinstance(args[source_pos], torch.Tensor)
            and source_name == "source"
        )
        if source_name == "value" and bdims[source_pos] is not None:
            return _index_fill_batched_value(interp, rule, args, bdims, kwargs)
        scalar = logical_rank(args[0], bdims[0]) == 0
        if scalar:
            # A 0-dim example is indexed like a 1-element vector.
            args[0] = args[0].unsqueeze(-1)
            idx = args[index_pos]
            batched_index = bdims[index_pos] is not None
            args[index_pos] = idx.reshape(batch_size, 1) if batched_index else idx.reshape(1)
            if has_source:
                src = args[source_pos]
                batched_source = bdims[source_pos] is not None
                args[source_pos] = src.unsqueeze(-1) if batched_source else src.reshape(1)
            pdim = 1
        else:
            pdim = physical_dim(get_arg(func, args, kwargs, "dim"), logical_rank(args[0], bdims[0]))
        self_v = ensure_batched(args[0], bdims[0], batch_size)
        changes = {"dim": pdim}
        if has_source:
            changes[source_name] = ensure_batched(args[source_pos], bdims[source_pos], batch_size)
        if bdims[index_pos] is None:
            out = call_with(func, [self_v] + args[1:], kwargs, **changes)
        else:
            changes["dim"] = 0
            changes["index"] = _flat_index(args[index_pos], self_v.shape[pdim], batch_size)
            if has_source:
                changes[source_name] = _flatten_dim(changes[source_name], pdim, batch_size)
            flat_self = _flatten_dim(self_v, pdim, batch_size)
            out = _unflatten_dim(call_with(func, [flat_self] + args[1:], kwargs, **changes), pdim,
                                 batch_size)
        return (out.squeeze(1) if scalar else out), 0

    return rule


def _index_fill_batched_value(interp, rule, args, bdims, kwargs):
    # One fill value per example: mark the filled positions, then pick per example.
    self_v = ensure_batched(args[0], bdims[0], interp.batch_size)
    mask_args = [torch.zeros_like(self_v, dtype=torch.bool)] + list(args[1:3]) + [True]
    mask_bdims = [0] + list(bdims[1:3]) + [None]
    mask, _ = rule(interp, aten.index_fill.int_Scalar, mask_args, mask_bdims, kwargs)
    value = args[3].reshape(-1, *([1] * (self_v.dim() - 1))).to(self_v.dtype)
    return torch.where(mask, value, self_v), 0


batch_rule(aten.index_select.default)(_index_along_dim_rule(None))
batch_rule(aten.index_add.default, aten.index_reduce.default)(_index_along_dim_rule("source"))
batch_rule(aten.index_copy.default)(_index_along_dim_rule("source"))
batch_rule(aten.index_fill.int_Scalar, aten.index_fill.int_Tensor)(_index_along_dim_rule("value"))


# ---------------------------------------------------------------------------------------
# take / put index the flattened tensor: offsetting example b's indices by b * numel makes
# them indices into the flattened batch.


def _flat_offsets(index, numel, batch_size):
    # Negative indices count from the end of their own example.
    index = torch.where(index < 0, index + numel, index)
    shape = (batch_size,) + (1,) * (index.dim() - 1)
    return index + torch.arange(batch_size, device=index.device).view(shape) * numel


@batch_rule(aten.take.default)
def take_rule(interp, func, args, bdims, kwargs):
    batch_size = interp.batch_size
    self_v = ensure_batched(args[0], bdims[0], batch_size)
    index = ensure_batched(args[1], bdims[1], batch_size)
    numel = self_v[0].numel()
    return func(self_v, _flat_offsets(index, numel, batch_size)), 0


@batch_rule(aten.put.default)
def put_rule(interp, func, args, bdims, kwargs):
    batch_size = interp.batch_size
    self_v = ensure_batched(args[0], bdims[0], batch_size)
    index = ensure_batched(args[1], bdims[1], batch_size)
    source = ensure_batched(args[2], bdims[2], batch_size)
    numel = self_v[0].numel()
    flat_index = _flat_offsets(index, numel, batch_size)
    return call_with(func, [self_v, flat_index, source] + list(args[3:]), kwargs), 0


# ---------------------------------------------------------------------------------------
# Masks. masked_scatter writes the k-th selected position from the k-th source element, so
# a running count of the mask says where every position reads from: no per-example shapes.


def _broadcast_batched(batch_size, *pairs):
    """Batched values (batch dim in front) of the per-example broadcast of each (value, bdim)."""
    rank = max(logical_rank(v, d) for v, d in pairs)
    padded = [
        pad_to_rank(v, d, rank) if d is not None
        else ensure_batched(v.reshape((1,) * (rank - v.dim()) + v.shape), None, batch_size)
        for v, d in pairs
    ]
    return torch.broadcast_tensors(*padded)


@batch_rule(aten.masked_select.default)
def masked_select_rule(interp, func, args, bdims, kwargs):
    if bdims[1] is not None:
        raise RuntimeError(_DYNAMIC_SHAPE.format(op="masked_select.default"))
    # An unbatched mask selects the same positions in every example.
    self_v, mask = _broadcast_batched(interp.batch_size, (args[0], bdims[0]), (args[1], None))
    return self_v[:, mask[0]], 0


def _selection_order(mask, batch_size):
    """For every position of a flattened example, how many selected positions precede it."""
    return mask.reshape(batch_size, -1).long().cumsum(1) - 1


@batch_rule(aten.masked_scatter.default)
def masked_scatter_rule(interp, func, args, bdims, kwargs):
    if args[1].dtype != torch.bool:
        raise RuntimeError(f"masked_scatter_ only supports boolean masks, but got mask with "
                           f"dtype {args[1].dtype}")
    batch_size = interp.batch_size
    self_v, mask = _broadcast_batched(batch_size, (args[0], bdims[0]), (args[1], bdims[1]))
    source = ensure_batched(args[2], bdims[2], batch_size).reshape(batch_size, -1)
    if source.shape[1] == 0:
        return self_v.clone(), 0
    order = _selection_order(mask, batch_size).clamp(0, source.shape[1] - 1)
    picked = source.gather(1, order).reshape(self_v.shape)
    return torch.where(mask, picked, self_v), 0


@batch_rule(aten.masked_scatter_backward.default)
def masked_scatter_backward_rule(interp, func, args, bdims, kwargs):
    batch_size = interp.batch_size
    grad, mask = _broadcast_batched(batch_size, (args[0], bdims[0]), (args[1], bdims[1]))
    sizes = args[2]
    numel = 1
    for n in sizes:
        numel *= n
    # Unselected positions write to a spare last column that is dropped.
    target = torch.where(mask.reshape(batch_size, -1), _selection_order(mask, batch_size), numel)
    out = grad.new_zeros(batch_size, numel + 1).scatter(1, target, grad.reshape(batch_size, -1))
    return out[:, :numel].reshape(batch_size, *sizes), 0


@batch_rule(torch.ops.prims.where.default)
def prims_where_rule(interp, func, args, bdims, kwargs):
    # where(cond, a, b) reaches us as prims.where from PyTorch's reference decompositions.
    # Unlike aten.where it does not broadcast, so every tensor gets the full batched shape.
    positions = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    full = _broadcast_batched(interp.batch_size, *[(args[i], bdims[i]) for i in positions])
    args = list(args)
    for i, t in zip(positions, full):
        args[i] = t
    return func(*args, **kwargs), 0


# ---------------------------------------------------------------------------------------
# Ops vmap refuses, with what to do instead.


def _refuse(message):
    def rule(interp, func, args, bdims, kwargs):
        name = f"{func._schema.name.split('::')[-1]}.{func._overloadname}"
        raise RuntimeError(message.format(op=name))

    return rule


batch_rule(aten._local_scalar_dense.default)(_refuse(
    "vmap: aten::{op} turns a batched tensor into a Python number: it looks like you're "
    "calling .item() on a Tensor (or float(), int(), bool()) or attempting to use a Tensor in "
    "some data-dependent control flow (`if x.sum() > 0:`). Every example has its own value, "
    "so there is no single number to return. Keep the computation in tensors: use "
    "torch.where(cond, a, b) instead of `if`/`else`, or move the check outside vmap."
))

_DYNAMIC_SHAPE = (
    "vmap: We do not support batching operators that can output dynamic shape. aten::{op} "
    "returns a tensor whose shape depends on the values of its input, so the examples of one "
    "batch would need different shapes. Use a fixed-shape formulation "
    "instead: torch.where(mask, x, 0) in place of x[mask] or masked_select, or "
    "torch.nonzero_static(x, size=...) in place of nonzero."
)
batch_rule(aten.nonzero.default)(_refuse(_DYNAMIC_SHAPE.replace(
    "depends on the values of its input,",
    "depends on the values of its input (Attempted to vmap over aten::where(condition) or "
    "aten::nonzero, which torch.where(condition) and torch.nonzero run),")))
batch_rule(aten._unique.default, aten._unique2.default,
           aten.unique_dim.default, aten.unique_consecutive.default,
           aten.unique_dim_consecutive.default)(_refuse(_DYNAMIC_SHAPE))
