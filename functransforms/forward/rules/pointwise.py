"""Pointwise ops: derivative formulas as data.

A unary entry maps an op to ``d(x, out)``, its derivative (the tangent is ``t * d``); a
binary entry gives one partial derivative per tensor input, ``(d_self, d_other)``, each
``d(x, y, out)``. Partials are only evaluated for inputs that have a tangent. Ops whose
derivative is zero almost everywhere (floor, sign, ...) and ops with boolean/integer
results give no tangent at all.
"""
import math

import torch

from ..registry import add_tangents, fit_tangent, jvp_rule, register_rule

aten = torch.ops.aten

_LN2 = math.log(2.0)
_LN10 = math.log(10.0)
_TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)

UNARY = {
    aten.acos: lambda x, out: -(1 - x * x).rsqrt(),
    aten.asin: lambda x, out: (1 - x * x).rsqrt(),
    # (x-1)^(-1/2) (x+1)^(-1/2) rather than (x^2-1)^(-1/2): the same on reals, and on the
    # branch acosh takes for complex inputs.
    aten.acosh: lambda x, out: (x - 1).rsqrt() * (x + 1).rsqrt(),
    aten.asinh: lambda x, out: (x * x + 1).rsqrt(),
    aten.atan: lambda x, out: (1 + x * x).reciprocal(),
    aten.atanh: lambda x, out: (1 - x * x).reciprocal(),
    aten.sin: lambda x, out: x.cos(),
    aten.cos: lambda x, out: -x.sin(),
    aten.tan: lambda x, out: 1 + out * out,
    aten.sinh: lambda x, out: x.cosh(),
    aten.cosh: lambda x, out: x.sinh(),
    aten.tanh: lambda x, out: 1 - out * out,
    aten.exp: lambda x, out: out,
    aten.exp2: lambda x, out: out * _LN2,
    aten.expm1: lambda x, out: out + 1,
    aten.log: lambda x, out: x.reciprocal(),
    aten.log2: lambda x, out: (x * _LN2).reciprocal(),
    aten.log10: lambda x, out: (x * _LN10).reciprocal(),
    aten.log1p: lambda x, out: (x + 1).reciprocal(),
    aten.reciprocal: lambda x, out: -out * out,
    aten.rsqrt: lambda x, out: -0.5 * out * out * out,
    aten.sqrt: lambda x, out: 0.5 / out,
    aten.sigmoid: lambda x, out: out * (1 - out),
    aten.relu: lambda x, out: (out > 0).to(out.dtype),
    aten.erf: lambda x, out: _TWO_OVER_SQRT_PI * (-x * x).exp(),
    aten.erfc: lambda x, out: -_TWO_OVER_SQRT_PI * (-x * x).exp(),
    aten.erfinv: lambda x, out: (math.sqrt(math.pi) / 2) * (out * out).exp(),
    aten.lgamma: lambda x, out: x.digamma(),
    aten.digamma: lambda x, out: torch.polygamma(1, x),
    aten.i0: lambda x, out: torch.special.i1(x),
    aten.special_i0e: lambda x, out: torch.special.i1e(x) - x.sgn() * out,
    aten.special_ndtr: lambda x, out: (-0.5 * x * x).exp() / math.sqrt(2 * math.pi),
    aten.special_erfcx: lambda x, out: 2 * x * out - _TWO_OVER_SQRT_PI,
    aten.special_i1: lambda x, out: torch.special.i0(x) - torch.where(x == 0, 0.5, out / x),
    # i1e'(0) = 1/2; away from 0, i0e - i1e * (sgn + 1/x).
    aten.special_i1e: lambda x, out: torch.where(
        x == 0, 0.5, torch.special.i0e(x) - out * (x.sgn() + 1 / torch.where(x == 0, 1.0, x))),
    aten.special_ndtri: lambda x, out: math.sqrt(2 * math.pi) * (0.5 * out * out).exp(),
    aten.special_log_ndtr: lambda x, out: (-0.5 * x * x - out).exp() / math.sqrt(2 * math.pi),
}

# d/dx of these is 0 almost everywhere; torch reports a zero tangent.
ZERO_DERIVATIVE = [
    aten.ceil, aten.floor, aten.round, aten.trunc, aten.sign, aten.fix, aten.signbit,
]


def _unary_rule(derivative):
    def rule(func, primals, tangents, kwargs):
        x = primals[0]
        out = func(*primals, **kwargs)
        t = tangents[0]
        if t is None or not (out.is_floating_point() or out.is_complex()):
            return out, None
        return out, fit_tangent(t * derivative(x, out), out)

    return rule


for _op, _d in UNARY.items():
    register_rule(_op, _unary_rule(_d))


# abs and sgn are not holomorphic: on complex inputs their tangent is not ``t * f'(x)``.
@jvp_rule(aten.abs)
def abs_(func, primals, tangents, kwargs):
    x = primals[0]
    out = func(*primals, **kwargs)
    t = tangents[0]
    if t is None or not (out.is_floating_point() or out.is_complex()):
        return out, None
    if x.is_complex():
        return out, (t * x.sgn().conj()).real
    return out, fit_tangent(t * x.sgn(), out)


@jvp_rule(aten.sgn)
def sgn(func, primals, tangents, kwargs):
    x = primals[0]
    out = func(*primals, **kwargs)
    t = tangents[0]
    if t is None or not x.is_complex():
        return out, None
    # d(x/|x|) = (t - sgn(x) Re(t conj(sgn(x)))) / |x|, and 0 at x = 0 as torch has it.
    size = x.abs()
    radial = out * (t * out.conj()).real
    return out, torch.where(size == 0, 0, (t - radial) / torch.where(size == 0, 1, size))


@jvp_rule(aten.polygamma.default)
def polygamma(func, primals, tangents, kwargs):
    n, x = primals
    out = func(n, x)
    return out, fit_tangent(tangents[1] * torch.polygamma(n + 1, x), out)


@jvp_rule(aten.logit.default)
def logit(func, primals, tangents, kwargs):
    # torch's formula: outside [eps, 1 - eps] the derivative is 0 (with eps) or NaN (without);
    # the decomposition's log(x / (1 - x)) would give a finite value there.
    x = primals[0]
    eps = primals[1] if len(primals) > 1 else kwargs.get("eps")
    out = func(*primals, **kwargs)
    lo, hi = (eps, 1.0 - eps) if eps is not None else (0.0, 1.0)
    outside = 0.0 if eps is not None else float("nan")
    d = torch.where((x >= lo) & (x <= hi), (x * (1 - x)).reciprocal(), outside)
    return out, fit_tangent(tangents[0] * d, out)


def no_tangent(func, primals, tangents, kwargs):
    return func(*primals, **kwargs), None


for _op in ZERO_DERIVATIVE:
    register_rule(_op, no_tangent)


def _binary_rule(d_self, d_other):
    def rule(func, primals, tangents, kwargs):
        x, y = primals[0], primals[1]
        out = func(*primals, **kwargs)
        if not (out.is_floating_point() or out.is_complex()):
            return out, None
        tx, ty = tangents[0], tangents[1] if len(tangents) > 1 else None
        result = None
        if tx is not None:
            result = tx * d_self(x, y, out)
        if ty is not None:
            result = add_tangents(result, ty * d_other(x, y, out))
        return out, fit_tangent(result, out)

    return rule


def _register_binary(op, d_self, d_other):
    register_rule(op, _binary_rule(d_self, d_other))


def _linear_combination(func, primals, tangents, kwargs):
    """add/sub(x, y, alpha): tangent is the same op on the tangents."""
    out = func(*primals, **kwargs)
    tx, ty = tangents[0], tangents[1]
    if ty is None:
        return out, fit_tangent(tx, out)
    if tx is None:
        alpha = kwargs.get("alpha", 1)
        sign = -1 if func in _SUBTRACTIONS else 1
        return out, fit_tangent(ty * (sign * alpha) if (sign * alpha) != 1 else ty, out)
    return out, fit_tangent(func(tx, ty, **kwargs), out)


_SUBTRACTIONS = (aten.sub.Tensor,)
jvp_rule(aten.add.Tensor, aten.sub.Tensor)(_linear_combination)


@jvp_rule(aten.add.Scalar, aten.sub.Scalar)
def add_scalar(func, primals, tangents, kwargs):
    out = func(*primals, **kwargs)
    return out, fit_tangent(tangents[0], out)


@jvp_rule(aten.mul.Tensor)
def mul(func, primals, tangents, kwargs):
    x, y = primals
    out = func(x, y)
    tx, ty = tangents
    result = None
    if tx is not None:
        result = tx * y
    if ty is not None:
        result = add_tangents(result, x * ty)
    return out, fit_tangent(result, out)


@jvp_rule(aten.mul.Scalar, aten.div.Scalar)
def scale_by_scalar(func, primals, tangents, kwargs):
    out = func(*primals, **kwargs)
    return out, fit_tangent(func(tangents[0], primals[1]), out)


@jvp_rule(aten.div.Tensor)
def div(func, primals, tangents, kwargs):
    x, y = primals
    out = func(x, y)
    tx, ty = tangents
    result = None
    if tx is not None:
        result = tx / y
    if ty is not None:
        result = add_tangents(result, -ty * out / y)
    return out, fit_tangent(result, out)


@jvp_rule(aten.div.Tensor_mode, aten.div.Scalar_mode)
def rounded_division(func, primals, tangents, kwargs):
    out = func(*primals, **kwargs)
    if kwargs.get("rounding_mode") is not None:
        return out, None
    x, y = primals
    tx, ty = tangents[0], tangents[1]
    result = None if tx is None else tx / y
    if ty is not None:
        result = add_tangents(result, -ty * out / y)
    return out, fit_tangent(result, out)


@jvp_rule(aten.pow.Tensor_Scalar)
def pow_tensor_scalar(func, primals, tangents, kwargs):
    x, e = primals
    out = func(x, e)
    if e == 0:
        return out, None
    return out, fit_tangent(tangents[0] * (e * x.pow(e - 1)), out)


@jvp_rule(aten.pow.Tensor_Tensor)
def pow_tensor_tensor(func, primals, tangents, kwargs):
    x, y = primals
    out = func(x, y)
    tx, ty = tangents
    result = None
    if tx is not None:
        # y * x**(y-1), with 0 where y == 0 (x**-1 would be inf at x == 0).
        d = torch.where(y == 0, torch.zeros_like(out), y * x.pow(y - 1))
        result = tx * d
    if ty is not None:
        # out * log(x), with 0 where x == 0 and y >= 0 (the limit torch uses).
        d = torch.where((x == 0) & ((y.real if y.is_complex() else y) >= 0),
                        torch.zeros_like(out), out * x.log())
        result = add_tangents(result, ty * d)
    return out, fit_tangent(result, out)


@jvp_rule(aten.pow.Scalar)
def pow_scalar(func, primals, tangents, kwargs):
    base, y = primals
    out = func(base, y)
    if base == 0:
        # torch's limit: 0 ** y has derivative 0 in y where y >= 0.
        d = torch.where(y >= 0, torch.zeros_like(out), torch.full_like(out, -math.inf) * out)
    else:
        d = out * (math.log(base) if base > 0 else math.nan)
    return out, fit_tangent(tangents[1] * d, out)


def _max_min_rule(pick_self):
    def rule(func, primals, tangents, kwargs):
        x, y = primals
        out = func(x, y)
        tx, ty = tangents
        # torch's convention: ties share the tangent evenly.
        zx = tx if tx is not None else 0
        zy = ty if ty is not None else 0
        chosen = pick_self(x, y)
        tie = x == y
        result = torch.where(chosen, zx, zy)
        result = torch.where(tie, (zx + zy) / 2, result)
        return out, fit_tangent(result, out)

    return rule


jvp_rule(aten.maximum.default)(_max_min_rule(lambda x, y: x > y))
jvp_rule(aten.minimum.default)(_max_min_rule(lambda x, y: x < y))

_register_binary(aten.fmod, lambda x, y, out: 1, lambda x, y, out: -(x / y).trunc())
_register_binary(aten.remainder, lambda x, y, out: 1, lambda x, y, out: -(x / y).floor())
_register_binary(aten.hypot, lambda x, y, out: x / out, lambda x, y, out: y / out)
_register_binary(aten.xlogy, lambda x, y, out: torch.where(x == 0, 0.0, y.log()) if isinstance(y, torch.Tensor) else math.log(y), lambda x, y, out: x / y)
jvp_rule(aten.fmax.default)(_max_min_rule(lambda x, y: (x > y) | y.isnan()))
jvp_rule(aten.fmin.default)(_max_min_rule(lambda x, y: (x < y) | y.isnan()))
_register_binary(
    aten.atan2.default,
    lambda y, x, out: x / (x * x + y * y),
    lambda y, x, out: -y / (x * x + y * y),
)


@jvp_rule(aten.where.self)
def where(func, primals, tangents, kwargs):
    cond, x, y = primals
    out = func(cond, x, y)
    tx, ty = tangents[1], tangents[2]
    if tx is None and ty is None:
        return out, None
    # A missing tangent (or a Python scalar branch) contributes zero.
    tx = tx if tx is not None else 0.0
    ty = ty if ty is not None else 0.0
    if not isinstance(tx, torch.Tensor) and not isinstance(ty, torch.Tensor):
        return out, None
    return out, fit_tangent(torch.where(cond, tx, ty), out)


@jvp_rule(aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default)
def clamp_scalar(func, primals, tangents, kwargs):
    x = primals[0]
    out = func(*primals, **kwargs)
    t = tangents[0]
    if t is None:
        return out, None
    lo = primals[1] if func is not aten.clamp_max.default else None
    hi = primals[2] if func is aten.clamp.default and len(primals) > 2 else (
        primals[1] if func is aten.clamp_max.default else None
    )
    keep = None
    if lo is not None:
        keep = x >= lo
    if hi is not None:
        keep = (x <= hi) if keep is None else keep & (x <= hi)
    if keep is None:
        return out, fit_tangent(t, out)
    return out, fit_tangent(torch.where(keep, t, torch.zeros_like(t)), out)


# Results that are booleans or integers carry no tangent.
_NONDIFF_NAMES = (
    "eq ne lt le gt ge logical_and logical_or logical_xor logical_not bitwise_and bitwise_or "
    "bitwise_xor bitwise_not bitwise_left_shift bitwise_right_shift isnan isinf isfinite "
    "isposinf isneginf isreal signbit __and__ __or__ __xor__ __lshift__ __rshift__ "
    "argmax argmin rand_like randn_like randint_like bernoulli "
    "nonzero searchsorted bucketize count_nonzero _local_scalar_dense detach is_nonzero "
    "equal allclose isclose any all histc bincount eye multinomial heaviside "
    "gcd lcm floor_divide _unique2 unique_dim unique_consecutive sym_size sym_stride "
    "sym_numel sym_storage_offset"
).split()

for _name in _NONDIFF_NAMES:
    _packet = getattr(aten, _name, None)
    if _packet is not None:
        register_rule(_packet, no_tangent)
register_rule(aten.fill.Scalar, no_tangent)


def fresh_buffer(func, primals, tangents, kwargs):
    """``new_zeros(x)``, ``empty_like(x)``, ...: values that don't depend on ``x``, but
    buffers that code (autograd's own backward formulas too) writes duals into next. A
    zero tangent, not a bare primal, lets those in-place writes carry their tangents."""
    out = func(*primals, **kwargs)
    if not (out.is_floating_point() or out.is_complex()):
        return out, None
    like = next((t for t in tangents if isinstance(t, torch.Tensor)), None)
    if like is None:
        return out, torch.zeros_like(out)
    # Made from the input's tangent: under vmap of jvp a batched tangent gives a batched
    # buffer, which the batched tangents written next can go into (a plain one refuses them).
    if out.is_contiguous():
        return out, like.new_zeros(out.shape, dtype=out.dtype)
    stride = torch.zeros_like(out).stride()
    return out, like.new_empty_strided(out.shape, stride, dtype=out.dtype).zero_()


for _name in ("ones_like zeros_like empty_like full_like new_zeros new_ones new_empty "
              "new_full new_empty_strided empty_strided").split():
    register_rule(getattr(aten, _name), fresh_buffer)
