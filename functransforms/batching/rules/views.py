"""Shape and view ops: most only need their logical dim arguments moved past the batch dim.

``dims_rule`` covers that whole family from a description of which arguments are dims;
the few ops whose batching needs more than renumbering (view, expand, squeeze, repeat,
roll, clone's memory formats) have their own rules below.
"""
import torch

from ..registry import batch_rule, ensure_batched, physical_dim, register_rule

aten = torch.ops.aten

_positions = {}


def arg_positions(func, names):
    """Schema positions of the named positional arguments of ``func`` (absent names skipped)."""
    key = (id(func), names)  # OpOverload.__hash__ is Python; this runs on every view op
    found = _positions.get(key)
    if found is None:
        index = {a.name: i for i, a in enumerate(func._schema.arguments) if not a.kwarg_only}
        found = _positions[key] = tuple(index[n] for n in names if n in index)
    return found


def with_defaults(func, args, upto):
    """``args`` as a list, with omitted trailing arguments up to position ``upto`` filled in."""
    args = list(args)
    arguments = func._schema.arguments
    while len(args) <= upto:
        args.append(arguments[len(args)].default_value)
    return args


def drop_scalar_dim(out):
    """Undo the size-1 dim a 0-dim example was given, where the op kept it."""
    if isinstance(out, torch.Tensor):
        return out.squeeze(1) if out.dim() == 2 else out
    return type(out)(drop_scalar_dim(o) for o in out)


def dims_rule(dims=(), dim_lists=(), sizes=None, extra_rank=0, scalar_ok=False):
    """Build a rule that rewrites logical dim arguments into physical ones.

    ``dims`` / ``dim_lists`` name the int / int[] arguments holding dims; ``sizes`` names an
    argument holding a logical shape (``*_backward`` ops), which then also sets the rank dims
    are wrapped against; ``extra_rank`` is for ops whose dims index the output (unsqueeze,
    diag_embed). ``scalar_ok`` ops accept 0-dim examples: those run on a size-1 dim.
    """
    names = tuple(dims) + tuple(dim_lists) + ((sizes,) if sizes else ())

    def rule(interp, func, args, bdims, kwargs):
        positions = arg_positions(func, names)
        args = with_defaults(func, args, max(positions))
        for i, (a, d) in enumerate(zip(args, bdims)):
            if d is None and isinstance(a, torch.Tensor):
                args[i] = ensure_batched(a, None, interp.batch_size)
        scalar = False
        if sizes:
            size_pos = positions[-1]
            rank = len(args[size_pos])
            args[size_pos] = [interp.batch_size, *args[size_pos]]
        else:
            rank = args[0].dim() - 1
            if rank == 0 and scalar_ok:
                scalar = True
                args[0] = args[0].unsqueeze(1)
                rank = 1
        rank += extra_rank
        for pos, name in zip(positions, names):
            if name in dims:
                args[pos] = physical_dim(args[pos], rank)
            elif name in dim_lists:
                args[pos] = [physical_dim(d, rank) for d in args[pos]]
        out = func(*args, **kwargs)
        return (drop_scalar_dim(out) if scalar else out), 0

    return rule


_DIM_OPS = {
    ("dim",): [aten.select.int, aten.slice.Tensor, aten.narrow.default, aten.unbind.int,
               aten.split.Tensor, aten.split_with_sizes.default, aten.unsafe_split.Tensor,
               aten.unsafe_split_with_sizes.default, aten.split_copy.Tensor,
               aten.split_with_sizes_copy.default, aten.unbind_copy.int, aten.select_copy.int,
               aten.slice_copy.Tensor, aten.narrow_copy.default],
    ("dim1", "dim2"): [aten.diagonal.default, aten.diagonal_copy.default],
}
for _names, _ops in _DIM_OPS.items():
    for _op in _ops:
        register_rule(_op, dims_rule(dims=_names))

_transpose = dims_rule(dims=("dim0", "dim1"), scalar_ok=True)


@batch_rule(aten.transpose.int)
def transpose(interp, func, args, bdims, kwargs):
    if args[0].dim() == 1:
        # A 0-dim example: as in torch.func, the input itself comes back.
        return args[0], 0
    return _transpose(interp, func, args, bdims, kwargs)


register_rule(aten.transpose_copy.int, dims_rule(dims=("dim0", "dim1"), scalar_ok=True))
register_rule(aten.flip.default, dims_rule(dim_lists=("dims",), scalar_ok=True))
register_rule(aten.rot90.default, dims_rule(dim_lists=("dims",)))
register_rule(aten.unsqueeze.default, dims_rule(dims=("dim",), extra_rank=1))
register_rule(aten.unsqueeze_copy.default, dims_rule(dims=("dim",), extra_rank=1))
register_rule(aten.diag_embed.default, dims_rule(dims=("dim1", "dim2"), extra_rank=1))

# Backward and scatter ops of the views above; they meet vmap in vmap(grad(f)).
register_rule(aten.select_backward.default, dims_rule(dims=("dim",), sizes="input_sizes"))
register_rule(aten.slice_backward.default, dims_rule(dims=("dim",), sizes="input_sizes"))
register_rule(aten.diagonal_backward.default,
              dims_rule(dims=("dim1", "dim2"), sizes="input_sizes"))
register_rule(aten.select_scatter.default, dims_rule(dims=("dim",)))
register_rule(aten.slice_scatter.default, dims_rule(dims=("dim",)))
register_rule(aten.diagonal_scatter.default, dims_rule(dims=("dim1", "dim2")))


@batch_rule(aten.unfold.default, aten.unfold_copy.default)
def unfold(interp, func, args, bdims, kwargs):
    x, dim, size, step = args
    if x.dim() == 1:
        # A 0-dim example unfolds as if it had one dim of size 1.
        return func(x.unsqueeze(1), 1, size, step).squeeze(1), 0
    return func(x, physical_dim(dim, x.dim() - 1), size, step), 0


_unfold_backward = dims_rule(dims=("dim",), sizes="input_sizes")


@batch_rule(aten.unfold_backward.default)
def unfold_backward(interp, func, args, bdims, kwargs):
    grad, input_sizes = args[0], args[1]
    if not input_sizes:
        # A 0-dim input was unfolded into its single element.
        return grad.reshape(grad.shape[0], -1).sum(1), 0
    return _unfold_backward(interp, func, args, bdims, kwargs)


@batch_rule(aten.as_strided.default, aten.as_strided_copy.default)
def as_strided(interp, func, args, bdims, kwargs):
    """Each example is read as if it owned the storage from its own start: example ``i``
    starts ``i`` batch strides after example 0 (the per-example loop's meaning when no
    storage_offset is given)."""
    x, size, stride = args[0], args[1], args[2]
    offset = args[3] if len(args) > 3 and args[3] is not None else x.storage_offset()
    if len(size) != len(stride):
        raise RuntimeError(
            f"vmap: as_strided: size and stride must have the same length, got size {list(size)} "
            f"and stride {list(stride)}."
        )
    # Each example may only read its own memory: the loop's meaning breaks otherwise (the
    # read would reach into the next example).
    example = _extent(x.shape[1:], x.stride()[1:])
    view = _extent(size, stride)
    start = offset - x.storage_offset()
    if view is not None and (example is None or start < 0 or start + view > example):
        raise RuntimeError(
            f"vmap: as_strided(size={list(size)}, stride={list(stride)}, storage_offset="
            f"{offset}) would read memory outside the example it is called on (This is not "
            f"supported inside of vmap). Use view/reshape/narrow, or index the example."
        )
    return func(x, [x.shape[0], *size], [x.stride(0), *stride], offset), 0


def _extent(sizes, strides):
    """Largest element offset a (sizes, strides) view reaches; None if it has no element."""
    if any(s == 0 for s in sizes):
        return None
    return sum((s - 1) * st for s, st in zip(sizes, strides))


@batch_rule(aten.permute.default, aten.permute_copy.default)
def permute(interp, func, args, bdims, kwargs):
    x, order = args
    rank = x.dim() - 1
    return func(x, [0, *(physical_dim(d, rank) for d in order)]), 0


@batch_rule(aten.t.default, aten.t_copy.default)
def t(interp, func, args, bdims, kwargs):
    x = args[0]
    if x.dim() > 3:
        raise RuntimeError(
            f"t() expects a tensor with <= 2 dimensions, but self is {x.dim() - 1}D")
    if x.dim() < 3:
        return aten.alias.default(x), 0
    return x.transpose(1, 2), 0


@batch_rule(aten.view.default, aten.view_copy.default)
def view(interp, func, args, bdims, kwargs):
    x, shape = args
    physical = [x.shape[0], *shape]
    try:
        return func(x, physical), 0
    except RuntimeError:
        # An example whose own strides refuse the view is refused, as eager (and
        # torch.func) would: a copy would silently stop being a view.
        example = torch.empty_strided(x.shape[1:], x.stride()[1:], dtype=x.dtype,
                                      device="meta")
        try:
            example.view(shape)
        except RuntimeError as e:
            raise RuntimeError(f"vmap: {e}") from None
        # The example allows it but the batch dim's stride does not (the batch sits
        # inside the example's memory, e.g. in_dims=1): only a copy can give the shape.
        return x.reshape(physical), 0


@batch_rule(aten._unsafe_view.default)
def unsafe_view(interp, func, args, bdims, kwargs):
    # reshape() already copied once to make the logical layout viewable; the physical
    # value may still carry a batch stride that blocks a view, so let reshape decide.
    x, shape = args[0], args[1]
    return x.reshape([x.shape[0], *shape]), 0


@batch_rule(aten.view.dtype)
def view_dtype(interp, func, args, bdims, kwargs):
    x, dtype = args
    if x.dim() == 1 and x.element_size() != torch.empty((), dtype=dtype).element_size():
        # The physical last dim is the batch dim: viewing it would mix examples.
        raise RuntimeError(
            f"vmap: cannot view a 0-dim tensor of {x.dtype} as {dtype}: the element sizes "
            f"differ, which needs a last dimension to resize."
        )
    return func(x, dtype), 0


@batch_rule(aten.expand.default, aten.expand_copy.default)
def expand(interp, func, args, bdims, kwargs):
    x, size = args
    missing = len(size) - (x.dim() - 1)
    if missing > 0:
        x = x.reshape(x.shape[:1] + (1,) * missing + x.shape[1:])
    return func(x, [x.shape[0], *size], **kwargs), 0


@batch_rule(aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims,
            aten.squeeze_copy.default, aten.squeeze_copy.dim, aten.squeeze_copy.dims)
def squeeze(interp, func, args, bdims, kwargs):
    x = args[0]
    rank = x.dim() - 1
    wanted = [] if len(args) == 1 else [args[1]] if isinstance(args[1], int) else args[1]
    for d in wanted:
        if not -max(rank, 1) <= d < max(rank, 1):
            # RuntimeError, as torch.func's (eager raises IndexError).
            raise RuntimeError(
                f"vmap: squeeze: Dimension out of range (expected to be in range of "
                f"[{-max(rank, 1)}, {max(rank, 1) - 1}], but got {d}) for an example of "
                f"{rank} dims."
            )
    if len(args) == 1:
        dims = [i for i in range(1, x.dim()) if x.shape[i] == 1]
    elif rank == 0:
        dims = []
    else:
        dims = [physical_dim(d, rank) for d in wanted]
    return aten.squeeze.dims(x, dims), 0


@batch_rule(aten.repeat.default)
def repeat(interp, func, args, bdims, kwargs):
    x, repeats = args
    missing = len(repeats) - (x.dim() - 1)
    if missing > 0:
        x = x.reshape(x.shape[:1] + (1,) * missing + x.shape[1:])
    return func(x, [1, *repeats]), 0


@batch_rule(aten.roll.default)
def roll(interp, func, args, bdims, kwargs):
    x, shifts = args[0], args[1]
    dims = args[2] if len(args) > 2 else []
    rank = x.dim() - 1
    if not dims:
        # Rolling without dims rolls the flattened example.
        return func(x.reshape(x.shape[0], -1), shifts, [1]).view(x.shape), 0
    return func(x, shifts, [physical_dim(d, rank) for d in dims]), 0


@batch_rule(aten.alias.default, aten.detach.default)
def alias(interp, func, args, bdims, kwargs):
    return func(args[0]), 0


@batch_rule(aten.view_as_real.default, aten.view_as_complex.default,
            aten._conj.default, aten._neg_view.default, aten.view_as_real_copy.default,
            aten.view_as_complex_copy.default, aten._neg_view_copy.default)
def trailing_dims_only(interp, func, args, bdims, kwargs):
    # These reinterpret (or lazily flip) elements and the last dim, never the leading one.
    if args[0].dim() == 1 and func in (aten.view_as_complex.default,
                                       aten.view_as_complex_copy.default):
        # The physical last dim would be the batch dim.
        raise RuntimeError("vmap: view_as_complex: Input tensor must have one or more "
                           "dimensions per example, got a 0-dim example.")
    return func(*args, **kwargs), 0


@batch_rule(aten.constant_pad_nd.default)
def constant_pad(interp, func, args, bdims, kwargs):
    # Padding applies to the trailing dims; the batch dim must stay out of its reach.
    x, pad = args[0], args[1]
    if len(pad) // 2 > x.dim() - 1:
        raise RuntimeError(
            f"vmap: constant_pad_nd: a pad of length {len(pad)} needs at least "
            f"{len(pad) // 2} dimensions per example, got {x.dim() - 1}."
        )
    return func(*args, **kwargs), 0


@batch_rule(aten.triu.default, aten.tril.default)
def trailing_matrix(interp, func, args, bdims, kwargs):
    # These work on the last two dims, which the batch dim never is for a matrix input; a
    # vector input would silently become one matrix.
    if args[0].dim() < 3:
        raise RuntimeError(
            f"vmap: {func._schema.name.split('::')[-1]}: input tensor must have at least 2 "
            f"dimensions per example, got {args[0].dim() - 1}."
        )
    return func(*args, **kwargs), 0


# -- copies and memory formats -----------------------------------------------------------

_CHANNELS_LAST = {torch.channels_last: 4, torch.channels_last_3d: 5}


def with_memory_format(x, memory_format, make):
    """Run ``make(physical, memory_format)`` so that the *logical* strides get the format.

    Channels-last formats are defined for 4-/5-dim tensors; the physical value has one dim
    more, so the channel dim is moved last, the copy made contiguous, and the view moved back.
    """
    if memory_format not in _CHANNELS_LAST:
        return make(x, memory_format)
    if x.dim() - 1 != _CHANNELS_LAST[memory_format]:
        # The physical value might have the right rank: the format would then be laid
        # across the batch dim. The parenthesis holds torch.func's wordings (it refuses
        # every channels-last format under vmap, from clone and from contiguous).
        raise RuntimeError(
            f"vmap: required rank {_CHANNELS_LAST[memory_format]} tensor to use "
            f"{str(memory_format).replace('torch.', '')} format, got an example of rank "
            f"{x.dim() - 1} (torch.func: NYI: querying is_contiguous inside of vmap for "
            f"memory_format other than torch.contiguous_format; clone is only supported with "
            f"memory_format torch.preserve_format or torch.contiguous_format)."
        )
    out = make(x.movedim(2, -1), torch.contiguous_format)
    return out.movedim(-1, 2)


@batch_rule(aten.clone.default, aten._to_copy.default)
def copy_with_format(interp, func, args, bdims, kwargs):
    kwargs = dict(kwargs)
    memory_format = kwargs.pop("memory_format", None)
    return with_memory_format(
        args[0], memory_format, lambda v, fmt: func(v, memory_format=fmt, **kwargs)
    ), 0
