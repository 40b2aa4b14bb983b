"""The general JVP fallback for ops with neither a rule nor a decomposition.

Two ways, both built on derivative formulas torch already has:
  * torch's own forward AD runs the op once on dual tensors. The primals and tangents may
    be wrappers of lower levels: the formula's ops on them reach those levels like any
    other op, so an outer grad, jvp or vmap differentiates or batches the formula itself
    (torch's formula, not an approximation of it: cholesky's, for one, is not the
    transpose of its backward on non-symmetric tangents);
  * torch has one forward-AD level, so when a formula's op reaches a lower jvp level
    that needs this fallback too, that one uses the double-vjp trick with our own grad
    levels: for ``u -> vjp_fn(u)``, which is linear in the cotangent ``u``, the vjp with
    respect to ``u`` applied to the tangent is the JVP. It costs a backward and a double
    backward.
Every use is counted (``functransforms.jvp_fallback_counts()``) and the first use of each
op warns.
"""
import threading
import warnings

import torch
import torch.autograd.forward_ad as fwAD
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..core.levels import lowering
from ..core.wrapper import LevelTensor
from ..reverse.backward import flat_vjp

_counts = {}
_warned = set()


def op_name(func):
    return f"{func._schema.name.split('::')[-1]}.{func._overloadname}"


def jvp_fallback_counts():
    """``{aten op name: times jvp served it with the general fallback}`` since start."""
    return dict(_counts)


def reset_jvp_fallback_counts():
    _counts.clear()


def _note(func):
    name = op_name(func)
    _counts[name] = _counts.get(name, 0) + 1
    if name not in _warned:
        _warned.add(name)
        warnings.warn(
            f"jvp: there is no JVP rule or decomposition for aten::{name}, so it runs through "
            f"the general (slower) fallback. Results are correct.",
            stacklevel=3,
        )


def _split_flat(level, args, kwargs):
    flat, spec = tree_flatten((list(args), dict(kwargs)))
    primals = []
    tangents = []
    for x in flat:
        if isinstance(x, LevelTensor) and x._level is level:
            primals.append(x._value)
            tangents.append(x._tangent)
        else:
            primals.append(x)
            tangents.append(None)
    return primals, tangents, spec


def general_jvp(level, func, args, kwargs):
    if func.namespace == "prims":
        # torch's forward AD silently gives prims no tangent, and they have no backward.
        raise NotImplementedError(
            f"jvp: no JVP rule for prims::{op_name(func)}; add one in forward/rules/prims.py."
        )
    _note(func)
    primals, tangents, spec = _split_flat(level, args, kwargs)
    with lowering(None):
        if not getattr(_state, "in_forward_ad", False):
            out, out_tangents = _torch_forward_ad(func, primals, tangents, spec)
        else:
            out, out_tangents = _double_vjp(func, primals, tangents, spec)
    flat_out, out_spec = tree_flatten(out)
    wrapped = [
        o if t is None else level.lift(o, t) for o, t in zip(flat_out, out_tangents)
    ]
    return tree_unflatten(wrapped, out_spec)


def _torch_forward_ad(func, primals, tangents, spec):
    # Runs under ``lowering`` (see general_jvp), which also restores the zero-tensor and
    # conj/neg keys that forward-AD formulas rely on.
    _state.in_forward_ad = True
    try:
        return _torch_forward_ad_inner(func, primals, tangents, spec)
    finally:
        _state.in_forward_ad = False


_state = threading.local()


def _torch_forward_ad_inner(func, primals, tangents, spec):
    with fwAD.dual_level():
        duals = [
            p if t is None else fwAD.make_dual(p, t) for p, t in zip(primals, tangents)
        ]
        args, kwargs = tree_unflatten(duals, spec)
        out = func(*args, **kwargs)
        flat_out, out_spec = tree_flatten(out)
        values = []
        out_tangents = []
        for o in flat_out:
            if isinstance(o, torch.Tensor):
                p, t = fwAD.unpack_dual(o)
                values.append(p)
                out_tangents.append(t)
            else:
                values.append(o)
                out_tangents.append(None)
    return tree_unflatten(values, out_spec), out_tangents


def _double_vjp(func, primals, tangents, spec):
    positions = [i for i, t in enumerate(tangents) if t is not None]
    structure = []

    def f(*diff):
        flat = list(primals)
        for i, d in zip(positions, diff):
            flat[i] = d
        args, kwargs = tree_unflatten(flat, spec)
        flat_out, out_spec = tree_flatten(func(*args, **kwargs))
        structure[:] = [out_spec]
        return flat_out

    flat_out, pullback = flat_vjp(f, [primals[i] for i in positions])
    out = tree_unflatten(flat_out, structure[0])
    diff_out = [
        i for i, o in enumerate(flat_out)
        if isinstance(o, torch.Tensor) and (o.is_floating_point() or o.is_complex())
    ]
    if not diff_out:
        return out, [None] * len(flat_out)

    def cotangent_map(*cts):
        # Ops with an output mask (convolution_backward) return None for what was not asked.
        full = [torch.zeros_like(o) if isinstance(o, torch.Tensor) else None for o in flat_out]
        for i, c in zip(diff_out, cts):
            full[i] = c
        return pullback(full)

    _, pullback_of_pullback = flat_vjp(cotangent_map, [torch.zeros_like(flat_out[i]) for i in diff_out])
    diff_tangents = pullback_of_pullback([tangents[i] for i in positions])
    out_tangents = [None] * len(flat_out)
    for i, t in zip(diff_out, diff_tangents):
        out_tangents[i] = t
    return out, out_tangents
