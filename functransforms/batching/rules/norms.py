"""Layer, group and batch normalisation, forward and backward.

The statistics of every example must stay its own:
  * layer norm normalises trailing dims, so the vmap dim is one more leading dim;
  * group norm normalises within each row of N, so the vmap dim folds into N;
  * batch norm normalises each channel over N and space, so the vmap dim folds into the
    channels: (B, N, C, *) -> (N, B * C, *) gives every example its own channels.
The kernels' affine weight is shared by every row, so a batched weight/bias is applied
after an unweighted kernel call. Their weight gradients sum over every leading dim, so
per-example weight gradients of layer and group norm are computed from the saved
statistics directly (the kernels still give grad_input).
"""
import torch

from ..registry import batch_rule, ensure_batched, pad_to_rank

aten = torch.ops.aten


def _affine(out, w, dw, b, db, rank):
    """``out * w + b`` for per-example weights broadcasting from the right."""
    if w is not None:
        out = out * (pad_to_rank(w, dw, rank) if dw is not None else w)
    if b is not None:
        out = out + (pad_to_rank(b, db, rank) if db is not None else b)
    return out


def _sum_leading(t, batched, count):
    """Sum the first ``count`` per-example dims of ``t`` (the vmap dim stays)."""
    if count == 0:
        return t
    start = 1 if batched else 0
    return t.sum(list(range(start, start + count)))


# -- layer norm ---------------------------------------------------------------------------


@batch_rule(aten.native_layer_norm.default)
def native_layer_norm_rule(interp, func, args, bdims, kwargs):
    x, normalized_shape, w, b, eps = args
    dx, _, dw, db = bdims[:4]
    if dw is None and db is None:
        return func(x, normalized_shape, w, b, eps), 0
    out, mean, rstd = func(x, normalized_shape, None, None, eps)
    rank = x.dim() - (dx is not None)
    return (_affine(out, w, dw, b, db, rank), mean, rstd), (0, dx, dx)


@batch_rule(aten.native_layer_norm_backward.default)
def native_layer_norm_backward_rule(interp, func, args, bdims, kwargs):
    grad_out, x, normalized_shape, mean, rstd, w, b, output_mask = args
    dgo, dx, _, dmean, drstd, dw = bdims[:6]
    B = interp.batch_size
    rank = max(t.dim() - (d is not None) for t, d in ((grad_out, dgo), (x, dx)))
    leading = rank - len(normalized_shape)
    grad_input = grad_weight = grad_bias = None
    bdim_input = bdim_weight = bdim_bias = None
    if output_mask[0]:
        g, kernel_w = grad_out, w
        if dw is not None:
            g, kernel_w = grad_out * pad_to_rank(w, dw, rank), None
        batched = [d is not None for d in (dgo if dw is None else 0, dx, dmean, drstd)]
        if any(batched):
            g, x_, mean_, rstd_ = (ensure_batched(t, 0 if is_b else None, B)
                                   for t, is_b in zip((g, x, mean, rstd), batched))
            # The CPU kernel reads mean/rstd as dense buffers; an expanded one reads garbage.
            mean_, rstd_ = mean_.contiguous(), rstd_.contiguous()
            bdim_input = 0
        else:
            x_, mean_, rstd_ = x, mean, rstd
        grad_input = func(g, x_, normalized_shape, mean_, rstd_, kernel_w, None,
                          [True, False, False])[0]
    if output_mask[1]:
        x_hat = (pad_to_rank(x, dx, rank) - _pad(mean, dmean, rank)) * _pad(rstd, drstd, rank)
        batched = any(d is not None for d in (dgo, dx, dmean, drstd))
        grad_weight = _sum_leading(_pad(grad_out, dgo, rank) * x_hat, batched, leading)
        bdim_weight = 0 if batched else None
    if output_mask[2]:
        grad_bias = _sum_leading(grad_out, dgo is not None, leading)
        bdim_bias = dgo
    return (grad_input, grad_weight, grad_bias), (bdim_input, bdim_weight, bdim_bias)


def _pad(t, d, rank):
    return pad_to_rank(t, d, rank) if d is not None else t


# -- group norm ---------------------------------------------------------------------------


@batch_rule(aten.native_group_norm.default)
def native_group_norm_rule(interp, func, args, bdims, kwargs):
    x, w, b, N, C, HxW, group, eps = args
    dx, dw, db = bdims[:3]
    B = interp.batch_size
    x = ensure_batched(x, dx, B)
    affine_batched = dw is not None or db is not None
    # The kernel needs contiguous memory (a value batched at in_dim=-1 is not).
    out, mean, rstd = func(x.flatten(0, 1).contiguous(), None if affine_batched else w,
                           None if affine_batched else b, B * N, C, HxW, group, eps)
    out = out.view(x.shape)
    if affine_batched:
        out = _affine(out, _channel_view(w, dw, x.dim()), dw, _channel_view(b, db, x.dim()), db,
                      x.dim() - 1)
    return (out, mean.view(B, N, group), rstd.view(B, N, group)), 0


def _channel_view(t, d, ndim):
    """Shape a per-channel vector to broadcast against a batched (B, N, C, *) value."""
    if t is None:
        return None
    spatial = [1] * (ndim - 3)
    return t.view(t.shape[0], 1, t.shape[1], *spatial) if d is not None else t.view(-1, *spatial)


@batch_rule(aten.native_group_norm_backward.default)
def native_group_norm_backward_rule(interp, func, args, bdims, kwargs):
    grad_out, x, mean, rstd, w, N, C, HxW, group, output_mask = args
    dgo, dx, dmean, drstd, dw = bdims[:5]
    B = interp.batch_size
    grad_out, x, mean, rstd = (ensure_batched(t, d, B)
                               for t, d in ((grad_out, dgo), (x, dx), (mean, dmean), (rstd, drstd)))
    shape = grad_out.shape
    grad_input = grad_weight = grad_bias = None
    if output_mask[0]:
        g, kernel_w = grad_out, w
        if dw is not None:
            g, kernel_w = grad_out * _channel_view(w, dw, grad_out.dim()), None
        # The kernel reads its inputs as contiguous memory; an unbatched input broadcast to the
        # batch (stride 0) must be materialised or it reads garbage.
        flat = [t.flatten(0, 1).contiguous() for t in (g, x, mean, rstd)]
        grad_input = func(*flat, kernel_w, B * N, C, HxW, group,
                          [True, False, False])[0].view(shape)
    go = grad_out.reshape(B, N, C, HxW)
    if output_mask[1]:
        grouped = x.reshape(B, N, group, C // group, HxW)
        x_hat = (grouped - mean.view(B, N, group, 1, 1)) * rstd.view(B, N, group, 1, 1)
        grad_weight = (go * x_hat.view(B, N, C, HxW)).sum([1, 3])
    if output_mask[2]:
        grad_bias = go.sum([1, 3])
    return (grad_input, grad_weight, grad_bias), 0


# -- batch norm ---------------------------------------------------------------------------


def _running_stats_message():
    return (
        "vmap: batch norm in training mode got a batched input but unbatched running_mean/"
        "running_var, which it would have to update in place with per-example statistics "
        "(Batch norm got a batched tensor as input while the running_mean or running_var, "
        "which will be updated in place, were not batched). "
        "Either stop tracking running stats (build the module with "
        "track_running_stats=False, or call replace_all_batch_norm_modules_(model) to patch "
        "every batch norm of a model), pass batched running stats through functional_call, "
        "or put the module in eval mode."
    )


def _channels_in(x):
    """(B, N, C, *) -> (N, B * C, *)."""
    return x.transpose(0, 1).flatten(1, 2)


def _channels_out(x, batch_size):
    """(N, B * C, *) -> (B, N, C, *)."""
    return x.unflatten(1, (batch_size, -1)).transpose(0, 1)


def _per_channel(t, d, batch_size):
    """A per-channel vector for the (N, B * C, *) layout: batched ones are flattened,
    shared ones repeated for every example."""
    if t is None:
        return None
    if d is not None:
        return t.reshape(-1)
    return t.repeat(batch_size) if t.numel() else t


def _batch_norm(interp, x, w, b, rm, rv, training, momentum, eps, bdims):
    dx, dw, db, drm, drv = bdims
    B = interp.batch_size
    affine_batched = dw is not None or db is not None
    stats_batched = drm is not None or drv is not None
    if dx is None and not stats_batched:
        # Only the affine parameters are batched: normalise once, scale per example.
        out, mean, invstd = aten.native_batch_norm.default(x, None, None, rm, rv, training,
                                                           momentum, eps)
        w, b = _channel_view(w, dw, x.dim() + 1), _channel_view(b, db, x.dim() + 1)
        return (_affine(out, w, dw, b, db, x.dim()), mean, invstd), (0, None, None)
    if training and dx is not None and (rm is not None and drm is None
                                        or rv is not None and drv is None):
        raise RuntimeError(_running_stats_message())
    # An unbatched input with only some stats batched runs per example against copies of
    # the unbatched stats, whose updates are dropped, as torch.func does.
    x = ensure_batched(x, dx, B)
    if not training and not stats_batched:
        # Eval mode with shared running stats: every row is normalised alike, fold into N.
        out, mean, invstd = aten.native_batch_norm.default(
            x.flatten(0, 1), None if affine_batched else w, None if affine_batched else b,
            rm, rv, False, momentum, eps)
        out = out.view(x.shape)
        if affine_batched:
            out = _affine(out, _channel_view(w, dw, x.dim()), dw, _channel_view(b, db, x.dim()),
                          db, x.dim() - 1)
        return (out, mean, invstd), (0, None, None)
    flat_rm, flat_rv = _per_channel(rm, drm, B), _per_channel(rv, drv, B)
    out, mean, invstd = aten.native_batch_norm.default(
        _channels_in(x), _per_channel(w, dw, B), _per_channel(b, db, B), flat_rm, flat_rv,
        training, momentum, eps)
    if training and rm is not None:
        # The kernel updated the flat stats; write them back unless they were views.
        for stat, flat in ((rm, flat_rm), (rv, flat_rv)):
            if not stat.is_contiguous():
                stat.copy_(flat.view(stat.shape))
    stats_bdim = 0 if mean.numel() else None
    if stats_bdim == 0:
        mean, invstd = mean.view(B, -1), invstd.view(B, -1)
    return (_channels_out(out, B), mean, invstd), (0, stats_bdim, stats_bdim)


@batch_rule(aten.native_batch_norm.default, aten._native_batch_norm_legit.no_stats)
def native_batch_norm_rule(interp, func, args, bdims, kwargs):
    if func is aten._native_batch_norm_legit.no_stats:
        x, w, b, training, momentum, eps = args
        return _batch_norm(interp, x, w, b, None, None, training, momentum, eps,
                           (*bdims[:3], None, None))
    x, w, b, rm, rv, training, momentum, eps = args
    return _batch_norm(interp, x, w, b, rm, rv, training, momentum, eps, bdims[:5])


@batch_rule(aten._native_batch_norm_legit_no_training.default)
def native_batch_norm_no_training_rule(interp, func, args, bdims, kwargs):
    x, w, b, rm, rv, momentum, eps = args
    return _batch_norm(interp, x, w, b, rm, rv, False, momentum, eps, bdims[:5])


@batch_rule(aten.native_batch_norm_backward.default)
def native_batch_norm_backward_rule(interp, func, args, bdims, kwargs):
    grad_out, x, w, rm, rv, save_mean, save_invstd, train, eps, output_mask = args
    B = interp.batch_size
    grad_out = _channels_in(ensure_batched(grad_out, bdims[0], B))
    x = _channels_in(ensure_batched(x, bdims[1], B))
    per_channel = [_per_channel(t, d, B) for t, d in zip((w, rm, rv, save_mean, save_invstd),
                                                         bdims[2:7])]
    grad_input, grad_weight, grad_bias = func(grad_out, x, *per_channel, train, eps, output_mask)
    # A level below may serve the op with a decomposition that fills unrequested outputs
    # with placeholders: only the requested ones are results.
    grad_input, grad_weight, grad_bias = (
        g if wanted else None for g, wanted in zip((grad_input, grad_weight, grad_bias), output_mask))
    if grad_input is not None:
        grad_input = _channels_out(grad_input, B)
    if grad_weight is not None:
        grad_weight = grad_weight.view(B, -1)
    if grad_bias is not None:
        grad_bias = grad_bias.view(B, -1)
    return (grad_input, grad_weight, grad_bias), 0
