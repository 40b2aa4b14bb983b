"""Embedding lookup and its dense backward.

A batched table is served by one lookup into the examples' tables laid end to end:
example b's index i becomes ``b * num_weights + i``. The backward scatters into that
long table the same way, so ``scale_grad_by_freq`` counts stay per example.
"""
import torch

from ..registry import batch_rule, ensure_batched

aten = torch.ops.aten


def _offset_indices(indices, num_weights, batch_size):
    offsets = torch.arange(batch_size, device=indices.device) * num_weights
    return indices + offsets.view(batch_size, *([1] * (indices.dim() - 1)))


@batch_rule(aten.embedding.default)
def embedding_rule(interp, func, args, bdims, kwargs):
    weight, indices, *rest = args
    dw, di = bdims[:2]
    if dw is None:
        return func(weight, indices, *rest), 0
    B, num_weights = weight.shape[:2]
    indices = _offset_indices(ensure_batched(indices, di, B), num_weights, B)
    # padding_idx only matters to the backward, which gets it from the autograd node.
    return func(weight.flatten(0, 1), indices), 0


@batch_rule(aten.embedding_dense_backward.default)
def embedding_dense_backward_rule(interp, func, args, bdims, kwargs):
    grad_out, indices, num_weights, padding_idx, scale_grad_by_freq = args
    dgo, di = bdims[:2]
    B = interp.batch_size
    grad_out = ensure_batched(grad_out, dgo, B)
    indices = ensure_batched(indices, di, B)
    if padding_idx >= 0:
        # The offsets move the padding row to a different index per example, so its
        # gradient is zeroed here and the kernel told there is none.
        keep = (indices != padding_idx).unsqueeze(-1)
        grad_out = grad_out * keep
    grad = func(grad_out, _offset_indices(indices, num_weights, B), B * num_weights, -1,
                scale_grad_by_freq)
    return grad.view(B, num_weights, *grad.shape[1:]), 0
