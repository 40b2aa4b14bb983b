"""Softmax and log-softmax (forward and backward), and activation backwards that torch
does not tag pointwise although they are.

Softmax works along one logical dim, which is the same dim one further right in the
batched value. A per-example scalar has no dim to work along in the value (dim 0 is the
vmap dim), so it gets a size-1 dim for the call.
"""
import torch

from ..registry import batch_rule, ensure_batched, physical_dim, register_rule
from .pointwise import pointwise_rule

aten = torch.ops.aten


@batch_rule(aten._softmax.default, aten._log_softmax.default)
def softmax_rule(interp, func, args, bdims, kwargs):
    x, dim, half_to_float = args
    rank = x.dim() - 1
    if rank == 0:
        return func(x.unsqueeze(1), 1, half_to_float).squeeze(1), 0
    return func(x, physical_dim(dim, rank), half_to_float), 0


@batch_rule(aten._softmax_backward_data.default, aten._log_softmax_backward_data.default)
def softmax_backward_rule(interp, func, args, bdims, kwargs):
    grad_out, out, dim, input_dtype = args
    B = interp.batch_size
    grad_out = ensure_batched(grad_out, bdims[0], B)
    out = ensure_batched(out, bdims[1], B)
    rank = out.dim() - 1
    if rank == 0:
        return func(grad_out.unsqueeze(1), out.unsqueeze(1), 1, input_dtype).squeeze(1), 0
    return func(grad_out, out, physical_dim(dim, rank), input_dtype), 0


for _op in (
    aten.elu_backward.default,
    aten.leaky_relu_backward.default,
    aten.softplus_backward.default,
    aten.hardtanh_backward.default,
    aten.hardswish.default,
    aten.hardswish_backward.default,
    aten.hardsigmoid_backward.default,
    aten.softshrink_backward.default,
    aten.hardshrink_backward.default,
):
    register_rule(_op, pointwise_rule)
