"""``torch.ops.prims``: the primitives that torch._refs decompositions (used by other
levels, e.g. vmap) bottom out in. torch's own forward AD silently gives them no tangent,
so they need rules; most are the aten rules under another name.
"""
import torch

from ..registry import JVP_RULES, fit_tangent, jvp_rule, register_rule
from .linear import linear_rule
from . import reductions  # noqa: F401  (amax/amin rules are shared)
from .pointwise import UNARY, ZERO_DERIVATIVE, no_tangent

aten = torch.ops.aten
prims = torch.ops.prims

_RENAMED = {"erfinv": "erf_inv"}


def _prims_packet(name):
    return getattr(prims, _RENAMED.get(name, name), None)


def _register_same_as_aten():
    for packet in list(UNARY) + ZERO_DERIVATIVE:
        name = packet._qualified_op_name.split("::")[-1]
        target = _prims_packet(name)
        if target is not None:
            register_rule(target, JVP_RULES[packet.default])
    for name, aten_op in (
        ("add", aten.add.Tensor), ("sub", aten.sub.Tensor), ("mul", aten.mul.Tensor),
        ("div", aten.div.Tensor), ("pow", aten.pow.Tensor_Tensor),
        ("atan2", aten.atan2.default), ("maximum", aten.maximum.default),
        ("minimum", aten.minimum.default), ("where", aten.where.self),
        ("amax", aten.amax.default), ("amin", aten.amin.default),
        ("fmax", aten.fmax.default), ("fmin", aten.fmin.default),
        ("fmod", aten.fmod.Tensor), ("remainder", aten.remainder.Tensor),
        ("hypot", aten.hypot.default), ("bessel_i1", aten.special_i1.default),
        ("bessel_i1e", aten.special_i1e.default), ("ndtri", aten.special_ndtri.default),
        ("bessel_i0", aten.i0.default), ("bessel_i0e", aten.special_i0e.default),
        ("abs", aten.abs.default),
    ):
        register_rule(getattr(prims, name), JVP_RULES[aten_op])


_register_same_as_aten()

_LINEAR_PRIMS = (
    "broadcast_in_dim convert_element_type squeeze transpose collapse_view collapse "
    "split_dim view_of reshape rev clone sum conj conj_physical real imag neg slice "
    "slice_in_dim"
).split()
for _name in _LINEAR_PRIMS:
    _packet = getattr(prims, _name, None)
    if _packet is not None:
        register_rule(_packet, linear_rule((0,)))
register_rule(prims.cat, linear_rule((0,)))
register_rule(prims.as_strided_scatter, linear_rule((0, 1)))


@jvp_rule(prims.frexp.default)
def frexp(func, primals, tangents, kwargs):
    mantissa, exponent = func(*primals)
    return (mantissa, exponent), (tangents[0] / exponent.exp2(), None)

for _name in ("eq ne lt le gt ge isfinite bitwise_and bitwise_or bitwise_xor bitwise_not "
              "full_like fill item signbit").split():
    register_rule(getattr(prims, _name), no_tangent)


@jvp_rule(prims.nextafter.default)
def nextafter(func, primals, tangents, kwargs):
    # torch's convention: the result moves with ``self`` (it is ``self`` up to one ulp) and
    # not with ``other``.
    out = func(*primals, **kwargs)
    t = tangents[0]
    return out, None if t is None else fit_tangent(t, out)


@jvp_rule(prims.prod.default)
def prod(func, primals, tangents, kwargs):
    x, dims = primals[0], primals[1]
    out = func(*primals, **kwargs)
    t = tangents[0]
    if t is None or x.dim() == 0 or not dims:
        return out, None if t is None else t.to(out.dtype)
    return out, _prod_tangent(x, t, dims).to(out.dtype)


@jvp_rule(aten.prod.default, aten.prod.dim_int)
def aten_prod(func, primals, tangents, kwargs):
    # Served here rather than decomposed: the decomposition emits prims.prod, which levels
    # below (a grad level differentiating this tangent) have no formula for.
    x, t = primals[0], tangents[0]
    out = func(*primals, **kwargs)
    if x.dim() == 0:
        return out, t
    if func is aten.prod.default:
        dims, keepdim = list(range(x.dim())), False
    else:
        dims = [primals[1] % x.dim()]
        keepdim = primals[2] if len(primals) > 2 else kwargs.get("keepdim", False)
    t_out = _prod_tangent(x, t, dims)
    if keepdim:
        t_out = t_out.reshape(out.shape)
    # In the input's dtype even when ``dtype=`` converts the result, as torch's formula does.
    return out, t_out


def _prod_tangent(x, t, dims):
    """d prod(x) = sum_i t_i * prod_{j != i} x_j, with the products of the others taken as
    exclusive prefix times suffix products, so zeros in ``x`` are handled exactly."""
    t = t.expand(x.shape) if t.shape != x.shape else t
    reduced = sorted(d % x.dim() for d in dims)
    kept = [d for d in range(x.dim()) if d not in reduced]
    shape = [x.shape[d] for d in kept] + [-1]
    xs = x.permute(kept + reduced).reshape(shape)
    ts = t.permute(kept + reduced).reshape(shape)
    ones = torch.ones_like(xs[..., :1])
    before = torch.cat([ones, xs[..., :-1]], -1).cumprod(-1)
    after = torch.cat([xs[..., 1:], ones], -1).flip(-1).cumprod(-1).flip(-1)
    return (ts * before * after).sum(-1)


class _ViaAten:
    """A prim that, when called, runs its aten implementation (``impl_aten``).

    A rule computes its primal one level down, where a grad level (or torch autograd) may be
    recording: prims have no derivative formulas, so recording them would fail at backward
    ("Trying to backward through prims.where.default"). The aten ops of ``impl_aten`` are
    recorded instead. Everything else (schema, name) is read from the prim.
    """

    __slots__ = ("_prim", "_impl")

    def __init__(self, prim):
        self._prim = prim
        self._impl = prim.impl_aten

    def __call__(self, *args, **kwargs):
        return self._impl(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._prim, name)


def _via_aten(prim, rule):
    proxy = _ViaAten(prim)

    def run(func, primals, tangents, kwargs):
        return rule(proxy, primals, tangents, kwargs)

    return run


for _op, _rule in list(JVP_RULES.items()):
    if _op.namespace == "prims" and getattr(_op, "impl_aten", None) is not None:
        JVP_RULES[_op] = _via_aten(_op, _rule)
