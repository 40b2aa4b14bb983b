"""cat and stack: unbatched inputs get a broadcast batch dim, then the join runs one dim later."""
import torch

from ..registry import batch_rule, ensure_batched, physical_dim

aten = torch.ops.aten


def _is_legacy_empty(t, bdim):
    # cat skips 1-dim empty tensors whatever the other inputs' shapes (a legacy rule).
    return t.dim() - (bdim is not None) == 1 and t.shape[-1] == 0


@batch_rule(aten.cat.default)
def cat(interp, func, args, bdims, kwargs):
    tensors, tensor_bdims = args[0], bdims[0]
    dim = args[1] if len(args) > 1 else 0
    pairs = list(zip(tensors, tensor_bdims))
    legacy = [_is_legacy_empty(t, d) for t, d in pairs]
    if all(legacy):
        legacy[0] = False
    rank = max(t.dim() - (d is not None) for (t, d), skip in zip(pairs, legacy) if not skip)
    pdim = physical_dim(dim, rank)
    template = ensure_batched(*pairs[legacy.index(False)], interp.batch_size)
    empty_shape = [*template.shape[:pdim], 0, *template.shape[pdim + 1:]]
    # Legacy empties still take part, reshaped to an empty piece of the right shape, so
    # the result is tracked by autograd whenever an input is (as in eager).
    batched = [
        t.reshape(empty_shape) if skip else ensure_batched(t, d, interp.batch_size)
        for (t, d), skip in zip(pairs, legacy)
    ]
    return func(batched, pdim), 0


@batch_rule(aten.stack.default)
def stack(interp, func, args, bdims, kwargs):
    tensors, tensor_bdims = args[0], bdims[0]
    dim = args[1] if len(args) > 1 else 0
    rank = tensors[0].dim() - (tensor_bdims[0] is not None)
    batched = [ensure_batched(t, d, interp.batch_size) for t, d in zip(tensors, tensor_bdims)]
    return func(batched, physical_dim(dim, rank + 1)), 0
