"""Pooling, padding and resampling ops over (N, C, *spatial) inputs, and their backwards.

Every example is pooled independently of the others, so the vmap dim can join N: an
(N, C, *spatial) example is folded to (B * N, C, *spatial), and a (C, *spatial) example
(no N) already is a valid input with N = B. The 1d ops (max_pool1d, avg_pool1d,
adaptive_avg_pool1d) are CompositeImplicit over the 2d ones.

The table says, per op, how many spatial dims it pools over and which positional args are
tensors shaped like the input (indices and grad_output included).
"""
import torch

from ..registry import ensure_batched, register_rule

aten = torch.ops.aten


def _fold_rule(spatial, tensor_positions):
    full_rank = spatial + 2

    def rule(interp, func, args, bdims, kwargs):
        B = interp.batch_size
        args = list(args)
        folded = False
        for i in tensor_positions:
            x = ensure_batched(args[i], bdims[i], B)
            if x.dim() > full_rank:
                x = x.flatten(0, 1)
                folded = True
            # An unbatched argument arrives expanded (stride 0 over the batch); some CPU
            # kernels (adaptive_max_pool3d_backward) index their inputs as if contiguous and
            # would read past the end of the storage.
            args[i] = x.contiguous()
        out = func(*args, **kwargs)
        if folded:
            if isinstance(out, torch.Tensor):
                out = _unfold(out, B)
            else:
                out = tuple(t if t is None else _unfold(t, B) for t in out)
        return out, 0

    return rule


def _unfold(t, batch_size):
    return t.view(batch_size, t.shape[0] // batch_size, *t.shape[1:])


_POOLING = {
    # op: (spatial dims, positions of input-shaped tensor args)
    aten.max_pool2d_with_indices.default: (2, (0,)),
    aten.max_pool3d_with_indices.default: (3, (0,)),
    aten.max_pool2d_with_indices_backward.default: (2, (0, 1, 7)),
    aten.max_pool3d_with_indices_backward.default: (3, (0, 1, 7)),
    aten.avg_pool2d.default: (2, (0,)),
    aten.avg_pool3d.default: (3, (0,)),
    aten.avg_pool2d_backward.default: (2, (0, 1)),
    aten.avg_pool3d_backward.default: (3, (0, 1)),
    aten._adaptive_avg_pool2d.default: (2, (0,)),
    aten._adaptive_avg_pool3d.default: (3, (0,)),
    aten._adaptive_avg_pool2d_backward.default: (2, (0, 1)),
    aten._adaptive_avg_pool3d_backward.default: (3, (0, 1)),
    aten.adaptive_max_pool2d.default: (2, (0,)),
    aten.adaptive_max_pool3d.default: (3, (0,)),
    aten.adaptive_max_pool2d_backward.default: (2, (0, 1, 2)),
    aten.adaptive_max_pool3d_backward.default: (3, (0, 1, 2)),
    aten.reflection_pad1d.default: (1, (0,)),
    aten.reflection_pad2d.default: (2, (0,)),
    aten.reflection_pad3d.default: (3, (0,)),
    aten.reflection_pad1d_backward.default: (1, (0, 1)),
    aten.reflection_pad2d_backward.default: (2, (0, 1)),
    aten.reflection_pad3d_backward.default: (3, (0, 1)),
    aten.replication_pad1d.default: (1, (0,)),
    aten.replication_pad2d.default: (2, (0,)),
    aten.replication_pad3d.default: (3, (0,)),
    aten.replication_pad1d_backward.default: (1, (0, 1)),
    aten.replication_pad2d_backward.default: (2, (0, 1)),
    aten.replication_pad3d_backward.default: (3, (0, 1)),
    # A grid is (N, *out_spatial, spatial dims): as many dims as the input.
    aten.grid_sampler_2d.default: (2, (0, 1)),
    aten.grid_sampler_3d.default: (3, (0, 1)),
    aten.grid_sampler_2d_backward.default: (2, (0, 1, 2)),
    aten.grid_sampler_3d_backward.default: (3, (0, 1, 2)),
}
# Resampling is served by the kernels, not torch's decompositions, whose float32 results
# differ. Both overloads (output_size or scale_factors) take the same input.
_RESAMPLING = {
    "upsample_nearest1d": 1, "upsample_nearest2d": 2, "upsample_nearest3d": 3,
    "_upsample_nearest_exact1d": 1, "_upsample_nearest_exact2d": 2,
    "_upsample_nearest_exact3d": 3, "upsample_linear1d": 1, "upsample_bilinear2d": 2,
    "upsample_bicubic2d": 2, "upsample_trilinear3d": 3, "_upsample_bilinear2d_aa": 2,
    "_upsample_bicubic2d_aa": 2,
}
for _name, _spatial in _RESAMPLING.items():
    _POOLING[getattr(aten, _name).default] = _POOLING[getattr(aten, _name).vec] = (_spatial, (0,))

for _op, (_spatial, _positions) in _POOLING.items():
    register_rule(_op, _fold_rule(_spatial, _positions))
