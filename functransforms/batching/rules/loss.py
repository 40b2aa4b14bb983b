"""Loss functions: negative log likelihood and the elementwise losses, with backwards.

A loss reduces over the whole example, but the kernels' reductions would also run over
the vmap dim. Every rule therefore calls its kernel with ``reduction='none'``, where each
element is independent, and reduces each example itself. Backwards are linear in
grad_output, so a per-example scalar grad_output (sum/mean) is spread over the example's
elements (divided by the example's count, or total weight, for mean) and the kernel is
again called with ``reduction='none'``.
"""
import math

import torch

from ..interpreter import _NeedsFallback
from ..registry import batch_rule, ensure_batched, logical_rank, pad_to_rank, register_rule
from .indexing import get_arg

aten = torch.ops.aten

_NONE, _MEAN, _SUM = 0, 1, 2


def _per_example_sum(t, batch_size):
    return t.reshape(batch_size, -1).sum(1)


def _reduction(args, position, kwargs):
    if len(args) > position:
        return args[position]
    return kwargs.get("reduction", _MEAN)


# -- nll_loss / nll_loss2d ----------------------------------------------------------------
# Per example, nll_loss takes (C,) or (N, C) scores and nll_loss2d (N, C, H, W); an N dim
# is folded together with the vmap dim, otherwise the vmap dim serves as N.

_NLL_FULL_RANK = {
    aten.nll_loss_forward.default: 2,
    aten.nll_loss_backward.default: 2,
    aten.nll_loss2d_forward.default: 4,
    aten.nll_loss2d_backward.default: 4,
}


def _fold(t, full_rank, x_rank):
    return t.flatten(0, 1) if x_rank == full_rank else t


def _target_weights(target, weight, dweight, ignore_index, dtype):
    """Each target element's class weight (0 where ignored), batched like ``target``."""
    keep = target != ignore_index
    if weight is None:
        return keep.to(dtype)
    safe = target.where(keep, 0)
    if dweight is None:
        picked = weight.index_select(0, safe.reshape(-1)).view(safe.shape)
    else:
        picked = weight.gather(1, safe.reshape(safe.shape[0], -1)).view(safe.shape)
    return picked * keep


@batch_rule(aten.nll_loss_forward.default, aten.nll_loss2d_forward.default)
def nll_loss_forward_rule(interp, func, args, bdims, kwargs):
    x, target, weight, reduction, ignore_index = args
    dx, dt, dw = bdims[:3]
    B = interp.batch_size
    x_rank = logical_rank(x, dx)
    full_rank = _NLL_FULL_RANK[func]
    x, target = ensure_batched(x, dx, B), ensure_batched(target, dt, B)
    out, total = func(_fold(x, full_rank, x_rank), _fold(target, full_rank, x_rank),
                      weight if dw is None else None, _NONE, ignore_index)
    out = out.view(target.shape)
    if dw is not None:
        out = out * _target_weights(target, weight, dw, ignore_index, out.dtype)
    if reduction == _NONE:
        return (out, total), (0, None)
    weights = _target_weights(target, weight, dw, ignore_index, out.dtype)
    total = _per_example_sum(weights, B)
    out = _per_example_sum(out, B)
    if reduction == _MEAN:
        out = out / total
    return (out, total), 0


@batch_rule(aten.nll_loss_backward.default, aten.nll_loss2d_backward.default)
def nll_loss_backward_rule(interp, func, args, bdims, kwargs):
    grad_out, x, target, weight, reduction, ignore_index, total = args
    dgo, dx, dt, dw, _, _, dtotal = bdims
    B = interp.batch_size
    x_rank = logical_rank(x, dx)
    full_rank = _NLL_FULL_RANK[func]
    x, target = ensure_batched(x, dx, B), ensure_batched(target, dt, B)
    grad_out = ensure_batched(grad_out, dgo, B)
    if reduction != _NONE:
        grad_out = grad_out.view(B, *([1] * (target.dim() - 1)))
        if reduction == _MEAN:
            total = ensure_batched(total, dtotal, B)
            grad_out = grad_out / total.view(grad_out.shape)
        grad_out = grad_out.expand(target.shape)
    if dw is not None:
        grad_out = grad_out * _target_weights(target, weight, dw, ignore_index, grad_out.dtype)
    unused_total = torch.ones((), dtype=x.dtype, device=x.device)
    grad = func(_fold(grad_out, full_rank, x_rank), _fold(x, full_rank, x_rank),
                _fold(target, full_rank, x_rank), weight if dw is None else None, _NONE,
                ignore_index, unused_total)
    return grad.view(x.shape), 0


# -- elementwise losses -------------------------------------------------------------------
# op: (positions of the tensors the loss is computed from, position of ``reduction``).

_ELEMENTWISE = {
    aten.mse_loss.default: ((0, 1), 2),
    aten.huber_loss.default: ((0, 1), 2),
    aten.smooth_l1_loss.default: ((0, 1), 2),
    aten.soft_margin_loss.default: ((0, 1), 2),
    aten.binary_cross_entropy.default: ((0, 1, 2), 3),
    aten.binary_cross_entropy_with_logits.default: ((0, 1, 2, 3), 4),
}

_ELEMENTWISE_BACKWARD = {
    aten.mse_loss_backward.default: ((1, 2), 3),
    aten.huber_loss_backward.default: ((1, 2), 3),
    aten.smooth_l1_loss_backward.default: ((1, 2), 3),
    aten.soft_margin_loss_backward.default: ((1, 2), 3),
    aten.binary_cross_entropy_backward.default: ((1, 2, 3), 4),
}


def _padded_unreduced(args, bdims, positions, reduction_position, batch_size):
    """Args ready for an unreduced batched call, the logical rank and the batched shape.

    Batched tensors are padded to a common logical rank. Input and target are expanded
    to the full batched shape: the kernels accumulate in place into a tensor shaped like
    them, which must already be as large as the result.
    """
    # Trailing optional tensors (weights) may be left out; they default to None.
    args = list(args) + [None] * (reduction_position - len(args))
    bdims = list(bdims) + [None] * (reduction_position - len(bdims))
    rank = max(logical_rank(args[i], bdims[i]) for i in positions if args[i] is not None)
    for i in positions:
        if args[i] is not None and bdims[i] is not None:
            args[i] = pad_to_rank(args[i], bdims[i], rank)
    shape = (batch_size, *torch.broadcast_shapes(*(
        args[i].shape[1:] if bdims[i] is not None else args[i].shape
        for i in positions if args[i] is not None
    )))
    for i in positions[:2]:
        args[i] = args[i].expand(shape)
    if len(args) > reduction_position:
        args[reduction_position] = _NONE
    else:
        args.append(_NONE)
    return args, rank, shape


def _elementwise_loss_rule(positions, reduction_position):
    def rule(interp, func, args, bdims, kwargs):
        reduction = _reduction(args, reduction_position, kwargs)
        kwargs = {k: v for k, v in kwargs.items() if k != "reduction"}
        args, _, _ = _padded_unreduced(args, bdims, positions, reduction_position,
                                       interp.batch_size)
        out = func(*args, **kwargs)
        if reduction == _SUM:
            out = _per_example_sum(out, interp.batch_size)
        elif reduction == _MEAN:
            out = out.reshape(interp.batch_size, -1).mean(1)
        return out, 0

    return rule


def _elementwise_loss_backward_rule(positions, reduction_position):
    def rule(interp, func, args, bdims, kwargs):
        B = interp.batch_size
        reduction = _reduction(args, reduction_position, kwargs)
        kwargs = {k: v for k, v in kwargs.items() if k != "reduction"}
        grad_out, dgo = args[0], bdims[0]
        args, rank, shape = _padded_unreduced(args, bdims, positions, reduction_position, B)
        if reduction == _NONE:
            grad_out = ensure_batched(grad_out, dgo, B).expand(shape)
        else:
            grad_out = ensure_batched(grad_out, dgo, B).view(B, *([1] * rank))
            if reduction == _MEAN:
                grad_out = grad_out / math.prod(shape[1:])
            grad_out = grad_out.expand(shape)
        args[0] = grad_out
        return func(*args, **kwargs), 0

    return rule


for _op, (_positions, _reduction_position) in _ELEMENTWISE.items():
    register_rule(_op, _elementwise_loss_rule(_positions, _reduction_position))
for _op, (_positions, _reduction_position) in _ELEMENTWISE_BACKWARD.items():
    register_rule(_op, _elementwise_loss_backward_rule(_positions, _reduction_position))


# -- row-wise losses ----------------------------------------------------------------------
# multi_margin_loss and multilabel_margin_loss score each row of an (N, C) input; a (C,)
# input is one row and a 0-dim one a row of one class. The rows of every example go to one
# unreduced kernel call. (torch's decompositions of these ops get the 0-dim and 1-D cases
# wrong, so the kernels themselves are called.)


def _as_rows(x, bdim, batch_size):
    """(the example rows as an (B * N, C) tensor, N)."""
    x = ensure_batched(x, bdim, batch_size)
    if x.dim() == 1:
        return x.reshape(batch_size, 1), 1
    if x.dim() == 2:
        return x, 1
    return x.reshape(batch_size * x.shape[1], x.shape[2]), x.shape[1]


def _reduce_rows(out, rank, reduction, batch_size):
    out = out.reshape(batch_size, -1)
    if reduction == _MEAN:
        return out.mean(1)
    if reduction == _SUM:
        return out.sum(1)
    return out if rank == 2 else out.reshape(batch_size)


def _spread_over_rows(grad_out, bdim, rows, reduction, batch_size):
    """A per-example grad_output as one value per row, for an unreduced backward call."""
    grad_out = ensure_batched(grad_out, bdim, batch_size).reshape(batch_size, -1)
    if reduction == _NONE:
        return grad_out.reshape(-1)
    per_row = grad_out.expand(batch_size, rows).reshape(-1)
    return per_row / rows if reduction == _MEAN else per_row


@batch_rule(aten.multi_margin_loss.default)
def multi_margin_loss_rule(interp, func, args, bdims, kwargs):
    x, target, p, margin, weight, reduction = _multi_margin_args(func, args, kwargs)
    if len(bdims) > 4 and bdims[4] is not None:
        raise _NeedsFallback()
    B = interp.batch_size
    rows, _ = _as_rows(x, bdims[0], B)
    target = ensure_batched(target, bdims[1], B)
    out = func(rows, target.reshape(-1), p, margin, weight, _NONE)
    if reduction == _NONE:
        # One loss per target, shaped like it ((1,) for a (C,) input and a (1,) target).
        return out.reshape(target.shape), 0
    return _reduce_rows(out, logical_rank(x, bdims[0]), reduction, B), 0


@batch_rule(aten.multi_margin_loss_backward.default)
def multi_margin_loss_backward_rule(interp, func, args, bdims, kwargs):
    grad_out = args[0]
    x, target, p, margin, weight, reduction = _multi_margin_args(func, args, kwargs)
    if len(bdims) > 5 and bdims[5] is not None:
        raise _NeedsFallback()
    B = interp.batch_size
    rows, n = _as_rows(x, bdims[1], B)
    target = ensure_batched(target, bdims[2], B).reshape(-1)
    grad_out = _spread_over_rows(grad_out, bdims[0], n, reduction, B)
    grad = func(grad_out, rows, target, p, margin, weight, _NONE)
    return grad.reshape(ensure_batched(x, bdims[1], B).shape), 0


def _multi_margin_args(func, args, kwargs):
    return [get_arg(func, args, kwargs, name)
            for name in ("self", "target", "p", "margin", "weight", "reduction")]


@batch_rule(aten.multilabel_margin_loss_forward.default)
def multilabel_margin_loss_forward_rule(interp, func, args, bdims, kwargs):
    x, target, reduction = args
    B = interp.batch_size
    rows, _ = _as_rows(x, bdims[0], B)
    target_rows, _ = _as_rows(target, bdims[1], B)
    out, is_target = func(rows, target_rows, _NONE)
    shape = ensure_batched(x, bdims[0], B).shape
    return (_reduce_rows(out, logical_rank(x, bdims[0]), reduction, B),
            is_target.reshape(shape)), 0


@batch_rule(aten.multilabel_margin_loss_backward.default)
def multilabel_margin_loss_backward_rule(interp, func, args, bdims, kwargs):
    grad_out, x, target, reduction, is_target = args
    B = interp.batch_size
    rows, n = _as_rows(x, bdims[1], B)
    target_rows, _ = _as_rows(target, bdims[2], B)
    is_target_rows, _ = _as_rows(is_target, bdims[4], B)
    grad_out = _spread_over_rows(grad_out, bdims[0], n, reduction, B)
    grad = func(grad_out, rows, target_rows, _NONE, is_target_rows)
    return grad.reshape(ensure_batched(x, bdims[1], B).shape), 0
