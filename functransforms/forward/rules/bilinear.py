"""Bilinear ops (products of two differentiable inputs), optionally plus a scaled input.

For a bilinear ``f(a, b)`` the tangent is ``f(ta, b) + f(a, tb)``, each term computed only
when that tangent exists, with the op itself. ``addmm``-style ops add ``beta * input``:
the product terms are computed with ``beta=0`` and ``beta * t_input`` is added.
"""
import torch

from ..registry import add_tangents, fit_tangent, jvp_rule

aten = torch.ops.aten


def _product_terms(func, primals, tangents, kwargs, positions):
    result = None
    for i in positions:
        t = tangents[i]
        if t is None:
            continue
        args = list(primals)
        args[i] = t
        result = add_tangents(result, func(*args, **kwargs))
    return result


@jvp_rule(aten.mm.default, aten.bmm.default, aten.mv.default, aten.dot.default,
          aten.vdot.default, aten.outer.default, aten.ger.default, aten.kron.default,
          aten.cross.default, aten.linalg_cross.default, aten._trilinear.default)
def bilinear(func, primals, tangents, kwargs):
    out = func(*primals, **kwargs)
    positions = (0, 1, 2) if func is aten._trilinear.default else (0, 1)
    return out, fit_tangent(_product_terms(func, primals, tangents, kwargs, positions), out)


@jvp_rule(aten.addmm.default, aten.baddbmm.default, aten.addmv.default, aten.addr.default,
          aten.addbmm.default)
def add_product(func, primals, tangents, kwargs):
    out = func(*primals, **kwargs)
    product_kwargs = dict(kwargs, beta=0)
    result = _product_terms(func, primals, tangents, product_kwargs, (1, 2))
    if tangents[0] is not None:
        beta = kwargs.get("beta", 1)
        t_input = tangents[0] if beta == 1 else tangents[0] * beta
        result = add_tangents(result, fit_tangent(t_input, out))
    return out, fit_tangent(result, out)


@jvp_rule(aten.convolution.default)
def convolution(func, primals, tangents, kwargs):
    x, w, bias = primals[:3]
    out = func(*primals, **kwargs)
    no_bias = list(primals)
    no_bias[2] = None
    result = _product_terms(func, no_bias, tangents, kwargs, (0, 1))
    if tangents[2] is not None:
        shape = (1, -1) + (1,) * (out.dim() - 2)
        result = add_tangents(result, fit_tangent(tangents[2].reshape(shape), out))
    return out, fit_tangent(result, out)
