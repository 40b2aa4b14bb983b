"""Fused scaled-dot-product attention (what ``F.scaled_dot_product_attention`` and
``nn.MultiheadAttention`` reach on CPU) and its backward.

The kernels take (N, H, L, E) tensors with N a plain batch dim, so the vmap dim is folded
into N: every tensor argument gets the batch dim (unbatched ones are broadcast), then
(B, N, ...) -> (B * N, ...), and results are unfolded again. Dropout inside the kernel is a
random draw per element, so folding gives each example its own draw: that is
randomness='different'; 'error' refuses a non-zero dropout_p, and 'same' is not possible
with one fused call.
"""
import torch

from ..registry import batch_rule, ensure_batched

aten = torch.ops.aten


def _fold_args(args, bdims, batch_size):
    return [
        ensure_batched(a, d, batch_size).flatten(0, 1) if isinstance(a, torch.Tensor) else a
        for a, d in zip(args, bdims)
    ]


def _fold_mask(mask, n, batch_size):
    # A per-sequence mask (N, H, L, S) with N > 1 must repeat for every example; masks that
    # broadcast over N ((L, S), (1, H, L, S), ...) broadcast over B * N as they are.
    if mask is None or mask.dim() < 4 or mask.shape[0] == 1:
        return mask
    return mask.unsqueeze(0).expand(batch_size, *mask.shape).flatten(0, 1)


def _unfold(out, batch_size):
    return tuple(
        o.unflatten(0, (batch_size, -1)) if isinstance(o, torch.Tensor) and o.dim() else o
        for o in out
    )


def _check_dropout(interp, func, dropout_p):
    if dropout_p and interp.randomness != "different":
        raise RuntimeError(
            f"vmap: scaled dot-product attention with dropout_p={dropout_p} draws random "
            f"numbers, which needs randomness='different' (one draw per example); with "
            f"randomness='{interp.randomness}' use dropout_p=0 (e.g. module.eval())."
        )


@batch_rule(aten._scaled_dot_product_flash_attention_for_cpu.default)
def sdpa_flash_cpu(interp, func, args, bdims, kwargs):
    batch = interp.batch_size
    dropout_p = args[3] if len(args) > 3 else 0.0
    _check_dropout(interp, func, dropout_p)
    n = (args[0].shape[1] if bdims[0] is not None else args[0].shape[0])
    folded = _fold_args(args, bdims, batch)
    kwargs = dict(kwargs)
    kwargs["attn_mask"] = _fold_mask(kwargs.get("attn_mask"), n, batch)
    return _unfold(func(*folded, **kwargs), batch), 0


@batch_rule(aten._scaled_dot_product_flash_attention_for_cpu_backward.default)
def sdpa_flash_cpu_backward(interp, func, args, bdims, kwargs):
    batch = interp.batch_size
    n = (args[1].shape[1] if bdims[1] is not None else args[1].shape[0])
    folded = _fold_args(args, bdims, batch)
    kwargs = dict(kwargs)
    kwargs["attn_mask"] = _fold_mask(kwargs.get("attn_mask"), n, batch)
    return _unfold(func(*folded, **kwargs), batch), 0
