"""Ops that are linear in their differentiable inputs: the tangent is the same op applied
to the tangents, with the other arguments (indices, sizes, masks) unchanged.

``LINEAR`` lists, per op, the positional arguments the op is linear in (jointly: a
missing tangent among several is a zero) and the arguments that are constants to be
zeroed in the tangent call (``constant_pad_nd``'s fill value, ``masked_fill``'s value).
Views are linear too; the ones whose meaning depends on strides get their own rules.
"""
import torch

from ...core.wrapper import memory_layout
from ..registry import fit_tangent, jvp_rule, register_rule

aten = torch.ops.aten

_SELF = (0,)

# op -> (linear positions, positions of constants replaced by 0 in the tangent call)
LINEAR = {
    # views and copies of views
    aten.expand: _SELF, aten.permute: _SELF, aten.transpose: _SELF, aten.t: _SELF,
    aten.select: _SELF, aten.slice: _SELF, aten.squeeze: _SELF, aten.unsqueeze: _SELF,
    aten.diagonal: _SELF, aten.alias: _SELF, aten.split: _SELF, aten.split_with_sizes: _SELF,
    aten.unbind: _SELF, aten.unfold: _SELF, aten.narrow: _SELF, aten.movedim: _SELF,
    aten.view_as_real: _SELF, aten.view_as_complex: _SELF, aten.real: _SELF, aten.imag: _SELF,
    aten.conj: _SELF, aten._conj: _SELF, aten.conj_physical: _SELF, aten.resolve_conj: _SELF,
    aten.resolve_neg: _SELF, aten.lift_fresh: _SELF, aten.lift_fresh_copy: _SELF,
    aten.expand_copy: _SELF, aten.permute_copy: _SELF, aten.transpose_copy: _SELF,
    aten.t_copy: _SELF, aten.select_copy: _SELF, aten.slice_copy: _SELF,
    aten.squeeze_copy: _SELF, aten.unsqueeze_copy: _SELF, aten.diagonal_copy: _SELF,
    aten.alias_copy: _SELF, aten.split_copy: _SELF, aten.split_with_sizes_copy: _SELF,
    aten.unbind_copy: _SELF, aten.unfold_copy: _SELF, aten.narrow_copy: _SELF,
    # copies and rearrangements
    aten.clone: _SELF, aten._to_copy: _SELF, aten.neg: _SELF, aten.positive: _SELF,
    aten.flip: _SELF, aten.roll: _SELF, aten.repeat: _SELF, aten.tril: _SELF, aten.triu: _SELF,
    aten.rot90: _SELF, aten.diag_embed: _SELF, aten.diag: _SELF, aten.trace: _SELF,
    aten.index_select: _SELF, aten.gather: _SELF, aten.take: _SELF, aten.index: _SELF,
    aten._unsafe_index: _SELF, aten.repeat_interleave: _SELF, aten.pixel_shuffle: _SELF,
    aten.pixel_unshuffle: _SELF, aten.channel_shuffle: _SELF,
    aten.deg2rad: _SELF, aten.rad2deg: _SELF, aten.tile: _SELF,
    # reductions and scans
    aten.sum: _SELF, aten.mean: _SELF, aten.cumsum: _SELF, aten.nansum: _SELF,
    # pooling, padding and resampling that only average or move values
    aten.avg_pool1d: _SELF, aten.avg_pool2d: _SELF, aten.avg_pool3d: _SELF,
    aten._adaptive_avg_pool2d: _SELF, aten._adaptive_avg_pool3d: _SELF,
    aten.adaptive_avg_pool1d: _SELF, aten.reflection_pad1d: _SELF, aten.reflection_pad2d: _SELF,
    aten.reflection_pad3d: _SELF, aten.replication_pad1d: _SELF, aten.replication_pad2d: _SELF,
    aten.replication_pad3d: _SELF, aten.im2col: _SELF, aten.col2im: _SELF,
    aten.upsample_nearest1d: _SELF, aten.upsample_nearest2d: _SELF,
    aten.upsample_nearest3d: _SELF, aten.upsample_linear1d: _SELF,
    aten.upsample_bilinear2d: _SELF, aten.upsample_bicubic2d: _SELF,
    aten.upsample_trilinear3d: _SELF, aten._upsample_nearest_exact1d: _SELF,
    aten._upsample_nearest_exact2d: _SELF, aten._upsample_nearest_exact3d: _SELF,
    aten.embedding: _SELF,
    # backward formulas that are linear in the incoming gradient (jvp of grad: Hessian-vector
    # products); their other arguments only select or shape
    aten.threshold_backward: _SELF, aten.nll_loss_backward: _SELF,
    aten.nll_loss2d_backward: _SELF,
    # several linear inputs
    aten.cat: (0,), aten.stack: (0,), aten.hstack: (0,), aten.vstack: (0,),
    aten.select_scatter: (0, 1), aten.slice_scatter: (0, 1), aten.diagonal_scatter: (0, 1),
    aten.index_put: (0, 2), aten.index_add: (0, 3), aten.index_copy: (0, 3),
    aten.masked_scatter: (0, 2), aten.scatter_add: (0, 3),
}

# op overload -> (linear positions, constants zeroed in the tangent call)
LINEAR_WITH_CONSTANTS = {
    aten.constant_pad_nd.default: (_SELF, (2,)),
    aten.masked_fill.Scalar: (_SELF, (2,)),
    aten.masked_fill.Tensor: ((0, 2), ()),
    aten.index_fill.int_Scalar: (_SELF, (3,)),
    aten.index_fill.int_Tensor: ((0, 3), ()),
    aten.scatter.value: (_SELF, (3,)),
    aten.scatter.src: ((0, 3), ()),
    aten.scatter.value_reduce: None,
    aten.scatter.reduce: None,
}


def _zero_like_constant(value):
    return torch.zeros_like(value) if isinstance(value, torch.Tensor) else 0


def linear_rule(positions, constants=()):
    single = positions == _SELF and not constants

    def rule(func, primals, tangents, kwargs):
        out = func(*primals, **kwargs)
        if single:
            t = tangents[0]
            if _missing(t):
                return out, None
            if type(t) is list:
                # cat/stack of tensors some of which carry no tangent
                t = _tangent_or_zeros(primals[0], t)
            return out, _fit_all(out, func(t, *primals[1:], **kwargs))
        args = list(primals)
        if all(_missing(tangents[i]) for i in positions):
            return out, None
        for i in positions:
            args[i] = _tangent_or_zeros(primals[i], tangents[i])
        for i in constants:
            if i < len(args):
                args[i] = _zero_like_constant(args[i])
        return out, _fit_all(out, func(*args, **kwargs))

    return rule


def _missing(t):
    if type(t) is list:
        return all(x is None for x in t)
    return t is None


def _tangent_or_zeros(primal, tangent):
    if type(primal) in (list, tuple):
        return type(primal)(_tangent_or_zeros(p, t) for p, t in zip(primal, tangent or [None] * len(primal)))
    if tangent is None:
        return torch.zeros_like(primal) if isinstance(primal, torch.Tensor) else primal
    return tangent


def _fit_all(out, t):
    if isinstance(out, torch.Tensor):
        return fit_tangent(t, out)
    return tuple(fit_tangent(ti, o) if isinstance(o, torch.Tensor) else None for ti, o in zip(t, out))


for _op, _positions in LINEAR.items():
    register_rule(_op, linear_rule(_positions))
for _op, _spec in LINEAR_WITH_CONSTANTS.items():
    if _spec is not None:
        register_rule(_op, linear_rule(*_spec))


@jvp_rule(aten.view.default, aten._unsafe_view.default, aten.view_copy.default,
          aten._reshape_alias.default, aten.reshape.default)
def view(func, primals, tangents, kwargs):
    # The tangent's strides need not match the primal's (it may be a broadcast), so it is
    # reshaped rather than viewed.
    out = func(*primals, **kwargs)
    return out, fit_tangent(tangents[0].reshape(primals[1]), out)


@jvp_rule(aten.view.dtype)
def view_dtype(func, primals, tangents, kwargs):
    out = func(*primals, **kwargs)
    if not (out.is_floating_point() or out.is_complex()):
        return out, None
    return out, tangents[0].contiguous().view(primals[1])


def _same_memory_layout(t, x, dtype):
    """Whether ``t`` addresses its storage as ``x`` does, over storage at least as large
    (a batched ``t``: each example, with room for all of ``x``'s storage)."""
    if t.dtype != dtype:
        return False
    t_layout, x_layout = memory_layout(t), memory_layout(x)
    return (t_layout is not None and x_layout is not None and t_layout[:2] == x_layout[:2]
            and t_layout[2] >= x_layout[2])


@jvp_rule(aten.as_strided.default, aten.as_strided_copy.default)
def as_strided(func, primals, tangents, kwargs):
    # as_strided addresses memory, so the tangent is first laid out exactly like the primal.
    # The buffer is made from the tangent: under vmap a batched tangent then gets a batched
    # buffer (a plain one could not receive the copy).
    x, size, stride = primals[:3]
    offset = primals[3] if len(primals) > 3 and primals[3] is not None else x.storage_offset()
    out = func(*primals, **kwargs)
    t = tangents[0]
    if func is aten.as_strided.default and _same_memory_layout(t, x, out.dtype):
        # A view's tangent must be the same view of the tangent (NOTE [In-place tangents]):
        # as_strided_backward writes the cotangent through ``zeros.as_strided(...)``, and a
        # copy would drop that write, and with it the cotangent's tangent.
        return out, t.as_strided(size, stride, offset)
    # Otherwise the tangent is copied into a buffer laid out like the primal, made from the
    # tangent: a batched (vmap) or recorded (grad below) tangent needs a buffer of its level.
    laid_out = t.new_empty_strided(x.shape, x.stride(), dtype=out.dtype)
    laid_out.copy_(t)
    rel = offset - x.storage_offset()
    return out, laid_out.as_strided(size, stride, laid_out.storage_offset() + rel)


@jvp_rule(aten.copy.default)
def copy(func, primals, tangents, kwargs):
    # Not aten.copy itself: torch has no derivative for it, and a grad level below records
    # what this rule computes (copy_ reaches here as its functional twin; torch's forward AD
    # issues copy_ on tangents, which a nested fallback differentiates).
    self, src = primals[:2]
    out = src.to(dtype=self.dtype, device=self.device).expand(self.shape).clone()
    return out, fit_tangent(tangents[1], out)


@jvp_rule(aten.fill.Tensor)
def fill_tensor(func, primals, tangents, kwargs):
    out = func(*primals, **kwargs)
    return out, fit_tangent(tangents[1], out)
