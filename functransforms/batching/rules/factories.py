"""Factories that take a tensor (new_*, *_like) and the ops that overwrite one (fill_, copy_).

A factory called on a batched tensor makes a batched result: each example gets its own
storage, so later in-place writes of batched values into it work as they do per example.
"""
import torch

from ..interpreter import inplace_into_unbatched_message
from ..registry import batch_rule, ensure_batched, logical_rank, pad_to_rank
from .views import with_memory_format

aten = torch.ops.aten


@batch_rule(aten.new_empty.default, aten.new_zeros.default, aten.new_ones.default,
            aten.new_full.default, aten.new_empty_strided.default)
def new_factory(interp, func, args, bdims, kwargs):
    x, size, *rest = args
    if func is aten.new_empty_strided.default:
        # Strides are given per example; each example gets its own stretch of storage.
        stride, *rest = rest
        # (An empty example needs no storage: torch's storage size for it is 0.)
        extent = 1 + sum((n - 1) * st for n, st in zip(size, stride)) if all(size) else 0
        return func(x, [x.shape[0], *size], [extent, *stride], *rest, **kwargs), 0
    return func(x, [x.shape[0], *size], *rest, **kwargs), 0


@batch_rule(aten._new_zeros_with_same_feature_meta.default)
def new_zeros_with_same_feature_meta(interp, func, args, bdims, kwargs):
    """Zeros shaped like ``self``'s leading dims followed by ``other``, laid out like ``other``
    (torch's forward AD makes tangent buffers with it). The batch dim becomes one more
    leading dim of ``self``; ``other`` contributes one example's layout."""
    self, other = args[0], args[1]
    n = kwargs.get("self_num_batch_dims", 0)
    self = ensure_batched(self, bdims[0], interp.batch_size)
    if bdims[1] is not None:
        other = other[0]
    if torch._debug_has_internal_overlap(other) != 0:
        # An expanded ``other`` would give a buffer whose examples share memory, and the
        # tangent copied into it next could not be written: lay it out densely instead.
        other = torch.empty_like(other)
    return func(self, other, self_num_batch_dims=n + 1), 0


@batch_rule(aten._has_same_storage_numel.default)
def has_same_storage_numel(interp, func, args, bdims, kwargs):
    # Every example of a batched value is a view into the one physical storage: the answer
    # per example is the answer for the physical values.
    return func(*args, **kwargs), None


@batch_rule(aten.empty_like.default, aten.zeros_like.default, aten.ones_like.default,
            aten.full_like.default)
def like_factory(interp, func, args, bdims, kwargs):
    kwargs = dict(kwargs)
    memory_format = kwargs.pop("memory_format", None)
    return with_memory_format(
        args[0], memory_format, lambda v, fmt: func(v, *args[1:], memory_format=fmt, **kwargs)
    ), 0


@batch_rule(aten.fill_.Scalar, aten.fill.Scalar, aten.zero_.default, aten.zero.default)
def fill_scalar(interp, func, args, bdims, kwargs):
    return func(*args, **kwargs), 0


@batch_rule(aten.fill_.Tensor, aten.fill.Tensor, aten.copy_.default, aten.copy.default)
def fill_from_tensor(interp, func, args, bdims, kwargs):
    self, src, *rest = args
    if func in _INPLACE and bdims[0] is None:
        raise RuntimeError(inplace_into_unbatched_message(func))
    if bdims[1] is None:
        return func(*args, **kwargs), 0
    # A batched source broadcasts against each example of ``self``: line its batch dim up
    # with self's (fill's 0-dim value becomes one scalar per example the same way).
    src = pad_to_rank(src, 0, logical_rank(self, bdims[0]))
    if func in _INPLACE:
        return self.copy_(src, *rest), 0
    shape = self.shape[1:] if bdims[0] is not None else self.shape
    return self.new_empty((interp.batch_size, *shape)).copy_(src), 0


_INPLACE = (aten.fill_.Tensor, aten.copy_.default)


@batch_rule(aten.masked_fill.Tensor)
def masked_fill_tensor(interp, func, args, bdims, kwargs):
    self, mask, value = args
    rank = max(logical_rank(self, bdims[0]), logical_rank(mask, bdims[1]))
    self = pad_to_rank(self, bdims[0], rank)
    mask = pad_to_rank(mask, bdims[1], rank)
    if bdims[2] is None:
        # The result has self's shape, so self must carry the batch dim mask brings.
        self = pad_to_rank(ensure_batched(self, bdims[0], interp.batch_size), 0, rank)
        return func(self, mask, value), 0
    # masked_fill wants a 0-dim value; where() takes one value per example.
    if value.dim() != 1:
        raise RuntimeError(
            f"masked_fill_ only supports a 0-dimensional value tensor, but got tensor with "
            f"{value.dim() - 1} dimension(s).")
    if value.is_complex() and not self.is_complex():
        raise RuntimeError(
            f"value cannot be converted to type {self.dtype} without overflow")
    value = pad_to_rank(value, 0, rank).to(self.dtype)
    return torch.where(mask, value, self), 0
