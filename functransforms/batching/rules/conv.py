"""Convolution and its backward.

``conv1d/2d/3d``, ``conv_transpose*`` and ``F.conv*`` with unbatched (no N) inputs are
CompositeImplicit and all arrive as ``aten.convolution`` on (N, C, *spatial) inputs.
Two foldings serve every case with one kernel call:
  * fold into N: only the input (and grad_output) carries the vmap dim, so the examples
    become more rows of one convolution with the shared weight;
  * fold into groups: the weight is batched, so each example's weight becomes its own
    group(s) of a convolution with ``B * groups`` groups, and the input's vmap dim moves
    into its channels. Group g of example b then sees exactly example b's channels.
A (weight-)batched convolution with an unbatched input keeps N rows and stacks the
examples' filters as more output channels instead.
"""
import torch

from ..registry import batch_rule, ensure_batched

aten = torch.ops.aten


def _fold_into_n(x):
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _unfold_n(x, batch_size):
    return x.view(batch_size, x.shape[0] // batch_size, *x.shape[1:])


def _channels_in(x):
    """(B, N, C, *sp) -> (N, B*C, *sp): the vmap dim becomes the outer part of C."""
    B, N, C = x.shape[:3]
    return x.transpose(0, 1).reshape(N, B * C, *x.shape[3:])


def _channels_out(x, batch_size):
    """(N, B*C, *sp) -> (B, N, C, *sp)."""
    N, BC = x.shape[:2]
    return x.view(N, batch_size, BC // batch_size, *x.shape[2:]).transpose(0, 1)


@batch_rule(aten.convolution.default)
def convolution_rule(interp, func, args, bdims, kwargs):
    x, w, bias, stride, padding, dilation, transposed, output_padding, groups = args
    dx, dw, db = bdims[:3]
    B = interp.batch_size
    geometry = (stride, padding, dilation, transposed, output_padding)
    if dw is None:
        shared_bias = bias if db is None else None
        if dx is None:
            out = func(x, w, shared_bias, *geometry, groups)
        else:
            out = _unfold_n(func(_fold_into_n(x), w, shared_bias, *geometry, groups), B)
    else:
        if dx is not None:
            out = func(_channels_in(x), w.flatten(0, 1), None, *geometry, B * groups)
            out = _channels_out(out, B)
        else:
            out = _conv_batched_weight(func, x, w, geometry, groups, B)
        if bias is not None and db is None:
            out = out + bias.view(bias.shape[0], *([1] * (out.dim() - 3)))
    if db is not None:
        spatial = x.dim() - 2 - (dx is not None)
        out = out + bias.view(B, 1, bias.shape[1], *([1] * spatial))
    return out, 0


def _conv_batched_weight(func, x, w, geometry, groups, B):
    """Unbatched input, batched weight: every example's filters become more output
    channels of one convolution. Output channels are grouped, so the filters are ordered
    (group, example, filter-in-group) and the output is reordered back."""
    if geometry[3]:
        # transposed weight (B, C_in, O/g, *k) -> (C_in, B * O/g, *k)
        per_group = w.shape[2]
        stacked = w.transpose(0, 1).reshape(w.shape[1], B * per_group, *w.shape[3:])
    else:
        # weight (B, O, C/g, *k) -> (g * B * O/g, C/g, *k)
        per_group = w.shape[1] // groups
        stacked = w.view(B, groups, per_group, *w.shape[2:]).transpose(0, 1).flatten(0, 2)
    out = func(x, stacked, None, *geometry, groups)
    N, spatial = out.shape[0], out.shape[2:]
    out = out.view(N, groups, B, per_group, *spatial).movedim(2, 0)
    return out.reshape(B, N, groups * per_group, *spatial)


@batch_rule(aten.convolution_backward.default)
def convolution_backward_rule(interp, func, args, bdims, kwargs):
    (grad_out, x, w, bias_sizes, stride, padding, dilation, transposed, output_padding, groups,
     output_mask) = args
    dgo, dx, dw = bdims[:3]
    B = interp.batch_size
    geometry = (stride, padding, dilation, transposed, output_padding)
    want_input, want_weight, want_bias = output_mask
    if dgo is None and dw is None and not (want_weight and dx is not None):
        # Only the input's shape is batched: every example gets the same gradients.
        x = x.select(0, 0) if dx is not None else x
        return func(grad_out, x, w, bias_sizes, *geometry, groups, output_mask), None
    grad_bias = None
    if want_bias:
        grad_bias = grad_out.sum([0, *range(2, grad_out.dim())]) if dgo is None else (
            grad_out.sum([1, *range(3, grad_out.dim())]))
    bias_bdim = dgo
    grad_out = ensure_batched(grad_out, dgo, B)
    x = ensure_batched(x, dx, B)
    if dw is None and not want_weight:
        grad_input = None
        if want_input:
            grad_input, _, _ = func(_fold_into_n(grad_out), _fold_into_n(x), w, None, *geometry,
                                    groups, [True, False, False])
            grad_input = _unfold_n(grad_input, B)
        return (grad_input, None, grad_bias), (0, None, bias_bdim)
    # Fold into groups; unbatched arguments are expanded (copied) to take part.
    w = ensure_batched(w, dw, B)
    grad_input, grad_weight, _ = func(_channels_in(grad_out), _channels_in(x), w.flatten(0, 1),
                                      None, *geometry, B * groups, [want_input, want_weight, False])
    if grad_input is not None:
        grad_input = _channels_out(grad_input, B)
    if grad_weight is not None:
        grad_weight = grad_weight.view(w.shape)
    return (grad_input, grad_weight, grad_bias), (0, 0, bias_bdim)
