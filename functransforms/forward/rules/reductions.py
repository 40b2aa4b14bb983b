"""Selections, softmax-like normalisations and moment reductions.

Selections (max over a dim, sort, topk, ...) pick elements, so the tangent is the
tangent at the picked indices. Full max/min/amax/amin share the tangent evenly among ties,
as torch does.
"""
import math

import torch

from ..registry import fit_tangent, jvp_rule

aten = torch.ops.aten
prims = torch.ops.prims


def _dims(dim, rank):
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return list(range(rank))
    if isinstance(dim, int):
        return [dim]
    return list(dim)


@jvp_rule(aten.amax.default, aten.amin.default)
def amax(func, primals, tangents, kwargs):
    x = primals[0]
    dim = primals[1] if len(primals) > 1 else []
    keepdim = primals[2] if len(primals) > 2 else False
    out = func(*primals, **kwargs)
    dims = _dims(dim, x.dim())
    kept = out if keepdim or x.dim() == 0 else _unsqueeze_dims(out, dims, x.dim())
    mask = (x == kept).to(x.dtype)
    t = (tangents[0] * mask).sum(dims, keepdim=keepdim) / mask.sum(dims, keepdim=keepdim)
    return out, fit_tangent(t, out)


def _unsqueeze_dims(y, dims, rank):
    for d in sorted(d % rank for d in dims):
        y = y.unsqueeze(d)
    return y


@jvp_rule(aten.max.default, aten.min.default)
def max_all(func, primals, tangents, kwargs):
    x = primals[0]
    out = func(x)
    mask = (x == out).to(x.dtype)
    return out, fit_tangent((tangents[0] * mask).sum() / mask.sum(), out)


@jvp_rule(aten.max.dim, aten.min.dim, aten.kthvalue.default, aten.median.dim,
          aten.nanmedian.dim, aten.mode.default)
def select_along_dim(func, primals, tangents, kwargs):
    values, indices = func(*primals, **kwargs)
    named = _named_args(func, primals, kwargs)
    dim, keepdim = named.get("dim", -1), named.get("keepdim", False)
    t = tangents[0]
    if primals[0].dim() == 0:
        return (values, indices), (fit_tangent(t, values), None)
    idx = indices if keepdim else indices.unsqueeze(dim)
    picked = t.gather(dim, idx)
    if not keepdim:
        picked = picked.squeeze(dim)
    return (values, indices), (fit_tangent(picked, values), None)


@jvp_rule(aten.median.default, aten.nanmedian.default)
def median_all(func, primals, tangents, kwargs):
    x = primals[0]
    out = func(x)
    # The median is one element; torch picks it by value, so does this.
    mask = (x == out).to(x.dtype)
    first = mask.flatten().cumsum(0).eq(1).to(x.dtype).reshape(x.shape) * mask
    return out, fit_tangent((tangents[0] * first).sum(), out)


@jvp_rule(aten.sort.default, aten.sort.stable, aten.topk.default, aten.cummax.default,
          aten.cummin.default)
def gather_by_indices(func, primals, tangents, kwargs):
    values, indices = func(*primals, **kwargs)
    x = primals[0]
    if func is aten.sort.stable:
        dim = kwargs.get("dim", -1)
    elif func is aten.topk.default:
        dim = primals[2] if len(primals) > 2 else -1
    else:
        dim = primals[1] if len(primals) > 1 else -1
    t = tangents[0]
    if x.dim() == 0:
        return (values, indices), (fit_tangent(t, values), None)
    return (values, indices), (t.gather(dim, indices), None)


@jvp_rule(aten._softmax.default)
def softmax(func, primals, tangents, kwargs):
    dim = primals[1]
    out = func(*primals, **kwargs)
    t = fit_tangent(tangents[0], out)
    return out, out * (t - (out * t).sum(dim, keepdim=True))


@jvp_rule(aten._log_softmax.default)
def log_softmax(func, primals, tangents, kwargs):
    dim = primals[1]
    out = func(*primals, **kwargs)
    t = fit_tangent(tangents[0], out)
    return out, t - (out.exp() * t).sum(dim, keepdim=True)


@jvp_rule(aten.logcumsumexp.default)
def logcumsumexp(func, primals, tangents, kwargs):
    # torch's own formula, eps included, so results agree with it to the last bits. The
    # general fallback's double vjp would differentiate logcumsumexp's backward, which takes
    # the log of the cotangent and gives NaN at the zero cotangent it starts from.
    x, dim = primals[0], primals[1]
    out = func(*primals, **kwargs)
    w = x.exp() if x.is_complex() else (x - x.amax(dim, keepdim=True)).exp()
    t = (w * fit_tangent(tangents[0], x)).cumsum(dim)
    return out, t / (w.cumsum(dim) + 1e-13)


@jvp_rule(aten.linalg_vector_norm.default)
def vector_norm(func, primals, tangents, kwargs):
    # torch's subgradient conventions: 0 where the norm is 0 (and, for ord < 2, where an
    # element is 0); the decomposition's pow/sum/pow gives NaN there.
    named = _named_args(func, primals, kwargs)
    x, ord = primals[0], float(named.get("ord", 2))
    dims, keepdim = _dims(named.get("dim"), x.dim()), named.get("keepdim", False)
    out = func(*primals, **kwargs)
    t = fit_tangent(tangents[0], x)
    if x.dim() == 0:
        dims = []
    kept = out if keepdim or x.dim() == 0 else _unsqueeze_dims(out, dims, x.dim())
    if ord == 0:
        return out, torch.zeros_like(out)
    if ord == 1:
        return out, (x.sgn() * t).real.sum(dims, keepdim=keepdim).to(out.dtype)
    if math.isinf(ord):
        mask = (x.abs() == kept) | x.abs().isnan()
        picked = (x.sgn() * t * mask).real.sum(dims, keepdim=keepdim)
        return out, (picked / mask.sum(dims, keepdim=keepdim)).to(out.dtype)
    inner = (x.conj() * t).real
    if ord != 2:
        weight = x.abs().pow(ord - 2)
        if ord < 2:
            weight = weight.masked_fill(x == 0, 0)
        inner = inner * weight
    t_out = inner.sum(dims, keepdim=keepdim) / out.pow(ord - 1)
    return out, t_out.masked_fill(out == 0, 0).to(out.dtype)


def _named_args(func, primals, kwargs):
    names = [a.name for a in func._schema.arguments]
    named = dict(zip(names, primals))
    named.update(kwargs)
    return named


def _moment_args(func, primals, kwargs):
    """x, reduced dims, correction, keepdim and element count for every var/std overload."""
    named = _named_args(func, primals, kwargs)
    x = primals[0]
    dims = _dims(named.get("dim", named.get("dims")), x.dim())
    correction = named.get("correction")
    if correction is None:
        correction = 1 if named.get("unbiased", True) else 0
    n = 1
    for d in dims:
        n *= x.shape[d] if x.dim() else 1
    return x, dims, correction, named.get("keepdim", False), n


def _var_tangent(x, t, dims, correction, keepdim, n):
    centered = x - x.mean(dims, keepdim=True) if x.dim() else x - x
    # var sums |x - mean|^2: on complex inputs the tangent is 2 Re(conj(x - mean) t).
    spread = (centered.conj() * t).real if centered.is_complex() else centered * t
    return (2 * spread).sum(dims, keepdim=keepdim) / max(n - correction, 0)


_STD = {aten.std, aten.std_mean}


@jvp_rule(aten.var, aten.std, prims.var)
def var(func, primals, tangents, kwargs):
    x, dims, correction, keepdim, n = _moment_args(func, primals, kwargs)
    out = func(*primals, **kwargs)
    t = _var_tangent(x, tangents[0], dims, correction, keepdim, n)
    if func.overloadpacket in _STD:
        t = t / (2 * out)
    return out, fit_tangent(t, out)


@jvp_rule(aten.var_mean, aten.std_mean)
def var_mean(func, primals, tangents, kwargs):
    x, dims, correction, keepdim, n = _moment_args(func, primals, kwargs)
    spread, mean = func(*primals, **kwargs)
    t = _var_tangent(x, tangents[0], dims, correction, keepdim, n)
    if func.overloadpacket in _STD:
        t = t / (2 * spread)
    t_mean = tangents[0].mean(dims, keepdim=keepdim) if x.dim() else tangents[0]
    return (spread, mean), (fit_tangent(t, spread), fit_tangent(t_mean, mean))


@jvp_rule(aten.native_dropout.default)
def native_dropout(func, primals, tangents, kwargs):
    p = primals[1]
    out, mask = func(*primals, **kwargs)
    train = primals[2] if len(primals) > 2 else kwargs.get("train")
    if train is False or p == 0:
        return (out, mask), (fit_tangent(tangents[0], out), None)
    scale = 1.0 / (1.0 - p) if p < 1 else 0.0
    return (out, mask), (tangents[0] * mask * scale, None)


@jvp_rule(aten.prod.default, aten.prod.dim_int)
def prod(func, primals, tangents, kwargs):
    x = primals[0]
    out = func(*primals, **kwargs)
    if not (out.is_floating_point() or out.is_complex()):
        return out, None
    if func is aten.prod.default:
        keepdim = False
        flat_x, flat_t = x.reshape(-1), tangents[0].reshape(-1)
        dim_ = 0
    else:
        dim_ = primals[1]
        keepdim = primals[2] if len(primals) > 2 else False
        flat_x, flat_t = x, tangents[0]
    if x.dim() == 0:
        return out, fit_tangent(tangents[0], out)
    # Products of all other elements, computed with exclusive cumulative products so that
    # zeros in x are handled exactly.
    n = flat_x.shape[dim_]
    ones_shape = list(flat_x.shape)
    ones_shape[dim_] = 1
    ones = torch.ones(ones_shape, dtype=flat_x.dtype, device=flat_x.device)
    before = torch.cat([ones, flat_x.narrow(dim_, 0, n - 1)], dim_).cumprod(dim_)
    after = torch.cat([flat_x.narrow(dim_, 1, n - 1), ones], dim_).flip(dim_).cumprod(dim_).flip(dim_)
    t = (flat_t * before * after).sum(dim_, keepdim=keepdim)
    return out, fit_tangent(t, out)


@jvp_rule(aten._log_softmax_backward_data.default)
def log_softmax_backward(func, primals, tangents, kwargs):
    # grad_input = g - exp(y) * sum(g): linear in g, and y enters through exp(y).
    g, y, dim = primals[0], primals[1], primals[2]
    out = func(*primals, **kwargs)
    t_g, t_y = tangents[0], tangents[1]
    softmax = y.exp()
    tangent = None
    if t_g is not None:
        tangent = func(t_g, y, *primals[2:], **kwargs)
    if t_y is not None:
        term = -softmax * t_y * g.sum(dim, keepdim=True)
        tangent = term if tangent is None else tangent + term
    return out, fit_tangent(tangent, out)


@jvp_rule(aten._softmax_backward_data.default)
def softmax_backward(func, primals, tangents, kwargs):
    # grad_input = y * (g - sum(g * y)): bilinear in (g, y).
    g, y, dim = primals[0], primals[1], primals[2]
    out = func(*primals, **kwargs)
    t_g, t_y = tangents[0], tangents[1]
    tangent = None
    if t_g is not None:
        tangent = func(t_g, y, *primals[2:], **kwargs)
    if t_y is not None:
        term = t_y * (g - (g * y).sum(dim, keepdim=True)) - y * (g * t_y).sum(dim, keepdim=True)
        tangent = term if tangent is None else tangent + term
    return out, fit_tangent(tangent, out)
